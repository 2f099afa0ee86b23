"""One runner per decoding method: `runner(prompt ids, max_new_tokens, stop) -> Run`, with everything
the method needs loaded up front (never timed): our engine (AR, TiDAR, baselines in the engine's
terms), transformers' `generate` and llama.cpp.

`Run` is what one generation reports; `BenchOptions` is what the methods are built from.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tidar.decode import GenerationConfig, TextStreamer, generate
from tidar.decode.options import DIFFUSION_ONLY
from tidar.measure import baselines
from tidar.measure.prompts import BenchError
from tidar.model.weights import (
    ADAPTER_FILE,
    DEFAULT_BASE,
    MANIFEST_FILE,
    WeightsError,
    load_model,
    resolve_model_path,
    smollm2_gguf_path,
)
from tidar.runtime import DTYPE

METHODS = ("ar", "tidar", "tidar-diffusion", "tidar-no-datastore", "tidar-learn", "diffusion", "spec", "hf", "hf-lookup",
           "llamacpp", "llamacpp-lookup")




LOOKUP_TOKENS = 10  # hf-lookup / llamacpp-lookup: candidate tokens per step

# the decoding options that make a method sample, given to every method that can (all through our engine)
SAMPLING_OPTIONS = ("do_sample", "temperature", "top_k", "top_p", "seed")
SAMPLING_METHODS = ("ar", "tidar", "tidar-diffusion", "tidar-no-datastore", "tidar-learn", "spec")


LLAMACPP_INSTALL = "pip install -e '.[bench]' (builds llama.cpp from source, about 5 minutes)"


@dataclass
class Run:
    """One generation by one method."""

    tokens: list[int]  # generated ids (EOS included when hit), after any stop-string cut
    wall_s: float  # the whole generate call: prefill + decoding
    forwards: int | None = None  # model forwards after the prefill one; None = unknown
    decode_tokens: int | None = None  # tokens emitted by those forwards
    acceptance_histogram: list[int] | None = None  # counts of acceptance lengths 1..b
    query_tokens: int | None = None  # new tokens fed to those forwards (our engine only)
    accepted_drafts: dict[str, int] | None = None  # draft tokens accepted, by draft source (our engine only)
    sampled: bool = False  # random draws (do_sample): not comparable token by token with another method's


# (prompt ids, max_new_tokens, stop strings) -> Run
Runner = Callable[[list[int], int, Sequence[str]], Run]


@dataclass
class BenchOptions:
    model: str | None = None
    dtype: str = "bfloat16"
    threads: int | None = None
    compile: bool | None = None  # None: the model's operating point
    weights: str | None = None  # q4 | dense; None: q4 where the model's base is a GGUF
    engine: dict[str, Any] = field(default_factory=dict)  # GenerationConfig overrides for ar/tidar methods
    sampling: dict[str, Any] = field(default_factory=dict)  # SAMPLING_OPTIONS overrides for every sampling method
    draft_model: str | None = None  # spec: draft model directory
    draft_layers: int | None = None  # spec: draft = the target's first N layers (when no draft_model)
    thresholds: tuple[float, ...] = (0.9,)  # diffusion: confidence thresholds, one run each
    block_sizes: tuple[int, ...] = ()  # tidar-diffusion: one run per block size (empty: the engine's)
    policies: tuple[str, ...] = ()  # tidar-diffusion: one run per policy (empty: "all", the paper's)
    betas: tuple[float, ...] = ()  # tidar-diffusion: one run per beta (empty: the engine's, 1 unless --beta)
    gamma: int = 4  # spec: draft tokens per step
    warmup: int = 1  # warm-up generations per method

    def as_dict(self) -> dict[str, Any]:
        return {**self.engine, "draft_model": self.draft_model, "draft_layers": self.draft_layers,
                "thresholds": list(self.thresholds),
                "block_sizes": list(self.block_sizes), "policies": list(self.policies),
                "betas": list(self.betas), "gamma": self.gamma, "warmup": self.warmup,
                "baseline_lookup_tokens": LOOKUP_TOKENS, "sampling": self.sampling_config()}

    @property
    def sampled(self) -> bool:
        return bool(self.sampling.get("do_sample"))

    def sampling_config(self) -> dict[str, Any] | None:
        """What the methods sample with (every option, defaults filled in), or None when greedy."""
        if not self.sampled:
            return None
        cfg = GenerationConfig(**self.sampling)
        return {k: getattr(cfg, k) for k in SAMPLING_OPTIONS if k != "do_sample"}


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise BenchError("--methods is empty; give e.g. ar,tidar")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise BenchError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise BenchError("a method is listed twice in --methods")
    return methods


def validate_methods(methods: Sequence[str], opts: BenchOptions) -> None:
    """Everything that can fail without loading a model fails here."""
    for m in methods:
        if opts.sampled and m not in SAMPLING_METHODS:
            raise BenchError(f"method {m!r} decodes greedily only; with --do-sample choose from "
                             f"{', '.join(SAMPLING_METHODS)}")
        if m == "spec":
            if not opts.draft_model and not opts.draft_layers:
                raise BenchError("method 'spec' needs --draft-model PATH (a smaller model with the same vocabulary) "
                                 "or --draft-layers N (the target's first N layers)")
            if opts.draft_model and not Path(opts.draft_model).exists() and opts.draft_model not in ("smollm2", "base"):
                raise BenchError(f"--draft-model {opts.draft_model} does not exist")
        elif m.startswith("llamacpp"):
            if importlib.util.find_spec("llama_cpp") is None:
                raise BenchError(f"method {m!r} needs llama-cpp-python: {LLAMACPP_INSTALL}")
            try:
                smollm2_gguf_path()
            except WeightsError as e:
                raise BenchError(str(e)) from None


def cut_at_stop(tokenizer: Any, tokens: list[int], stop: Sequence[str]) -> list[int]:
    """The shortest prefix of `tokens` whose text contains a stop string (all of them if none)."""
    if not stop:
        return tokens
    streamer = TextStreamer(tokenizer, stop)
    for n, t in enumerate(tokens, 1):
        streamer.push([t])
        if streamer.stopped:
            return tokens[:n]
    return tokens


def _stopper(tokenizer: Any, stop: Sequence[str]) -> Callable[[int, list[int]], int | None] | None:
    """An `on_tokens` callback that ends generation once a stop string is complete."""
    if not stop:
        return None
    streamer = TextStreamer(tokenizer, stop)

    def on_tokens(i: int, toks: list[int]) -> int | None:
        for n, t in enumerate(toks, 1):
            streamer.push([t])
            if streamer.stopped:
                return n
        return None

    return on_tokens


def run_from_output(out: Any, wall_s: float) -> Run:
    """A Run from our engine's GenerationOutput (batch of one)."""
    st = out.stats
    toks = list(out.sequences[0])
    dropped = max(st.generated_tokens - len(toks), 0)  # emitted by the last step past a stop string
    decode = st.step_tokens if st.step_tokens else max(len(toks) - 1, 0)
    hist = list(st.acceptance_histogram) if st.acceptance_histogram else None
    # the baselines count no rows (query_tokens 0): unknown, not zero
    return Run(toks, wall_s, st.forwards, max(decode - dropped, 0), hist, st.query_tokens or None,
               dict(getattr(st, "accepted_drafts", {})) or None)


class EngineRunner:
    """AR or TiDAR through our engine, or a baseline function with the same calling convention."""

    def __init__(self, runtime: Any, overrides: dict[str, Any],
                 fn: Callable[[Any, list[list[int]], Any, Callable | None], Any] | None = None,
                 streams_stop: bool = True) -> None:
        self.runtime = runtime
        self.overrides = overrides
        self.fn = fn
        self.streams_stop = streams_stop  # whether fn honours on_tokens (else cut afterwards)

    def __call__(self, ids: list[int], max_new_tokens: int, stop: Sequence[str] = ()) -> Run:
        cfg = self.runtime.generation_config(max_new_tokens=max_new_tokens, **self.overrides)
        on_tokens = _stopper(self.runtime.tokenizer, stop) if self.streams_stop else None
        t0 = time.perf_counter()
        if self.fn is None:
            out = generate(self.runtime.model, [ids], cfg, on_tokens=on_tokens)
        else:
            out = self.fn(self.runtime.model, [ids], cfg, on_tokens)
        wall = time.perf_counter() - t0
        run = run_from_output(out, wall)
        run.sampled = cfg.do_sample
        if stop:
            kept = cut_at_stop(self.runtime.tokenizer, run.tokens, stop)
            if run.decode_tokens is not None:
                run.decode_tokens = max(run.decode_tokens - (len(run.tokens) - len(kept)), 0)
            run.tokens = kept
        return run


def hf_checkpoint_dir(model: str | None) -> Path:
    """A directory transformers opens as the same dense weights: the model itself if it is a full
    checkpoint, the base for a TiDAR adapter (its AR path is the base, bit for bit)."""
    path = resolve_model_path(model)
    if (path / MANIFEST_FILE).exists() and (path / ADAPTER_FILE).exists():
        return hf_checkpoint_dir(json.loads((path / MANIFEST_FILE).read_text()).get("base", DEFAULT_BASE))
    if (path / "config.json").exists() and any(path.glob("model*.safetensors")):
        return path
    raise WeightsError(f"{path} is not a full Hugging Face checkpoint (config.json + model.safetensors)")


class HFRunner:
    """transformers `generate`, greedy, optionally with prompt lookup; forwards counted by a hook."""

    def __init__(self, hf_model: Any, tokenizer: Any, eos_ids: Sequence[int], lookup: int | None = None) -> None:
        self.model = hf_model
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        self.lookup = lookup
        self.calls = 0
        hf_model.register_forward_pre_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1

    @classmethod
    def load(cls, directory: Path, dtype: str, tokenizer: Any, eos_ids: Sequence[int],
             lookup: int | None = None) -> HFRunner:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # our checkpoints carry the [MASK] vector: an "unexpected key"
        hf_logging.disable_progress_bar()
        try:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype)).eval()
        finally:
            hf_logging.set_verbosity(level)
            if bar:
                hf_logging.enable_progress_bar()
        return cls(model, tokenizer, eos_ids, lookup)

    def __call__(self, ids: list[int], max_new_tokens: int, stop: Sequence[str] = ()) -> Run:
        input_ids = torch.tensor([ids])
        kw: dict[str, Any] = {
            "attention_mask": torch.ones_like(input_ids),
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "eos_token_id": self.eos_ids or None,
            "pad_token_id": self.eos_ids[0] if self.eos_ids else 0,
        }
        if self.lookup:
            kw["prompt_lookup_num_tokens"] = self.lookup
        if stop:
            kw["stop_strings"] = list(stop)
            kw["tokenizer"] = self.tokenizer
        self.calls = 0
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids, **kw)
        wall = time.perf_counter() - t0
        toks = cut_at_stop(self.tokenizer, out[0, len(ids):].tolist(), stop)
        return Run(toks, wall, max(self.calls - 1, 0), max(len(toks) - 1, 0))


class LlamaCppRunner:
    """The SmolLM2 GGUF through llama-cpp-python: greedy, optionally with its prompt-lookup drafts."""

    def __init__(self, llm: Any, tokenizer: Any, eos_ids: Sequence[int]) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.eos = set(eos_ids)
        self.calls = 0
        inner = llm.eval

        def counting_eval(tokens: Sequence[int]) -> Any:  # one call = one batched forward
            self.calls += 1
            return inner(tokens)

        llm.eval = counting_eval  # generate() calls self.eval: an instance attribute wins

    @classmethod
    def load(cls, threads: int, n_ctx: int, tokenizer: Any, eos_ids: Sequence[int],
             lookup: int | None = None) -> LlamaCppRunner:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=lookup) if lookup else None
        llm = Llama(model_path=str(smollm2_gguf_path()), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                    draft_model=draft, seed=0, verbose=False)
        return cls(llm, tokenizer, eos_ids)

    def __call__(self, ids: list[int], max_new_tokens: int, stop: Sequence[str] = ()) -> Run:
        streamer = TextStreamer(self.tokenizer, stop) if stop else None
        # reset() forgets the KV cache: otherwise a repeated prompt (the warm-up) would skip its prefill
        self.llm.reset()
        self.calls = 0
        toks: list[int] = []
        t0 = time.perf_counter()
        for tok in self.llm.generate(list(ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                     reset=True):
            toks.append(int(tok))
            if tok in self.eos or len(toks) >= max_new_tokens:
                break
            if streamer is not None:
                streamer.push([int(tok)])
                if streamer.stopped:
                    break
        wall = time.perf_counter() - t0
        return Run(toks, wall, max(self.calls - 1, 0), max(len(toks) - 1, 0))


def learning_generate(store: Any) -> Callable[..., Any]:
    """`generate` drafting from `store`, which then learns each output: the prompts run earlier in
    the benchmark stand in for a server's earlier traffic. `.reset()` forgets them (after warm-up)."""
    def fn(model: Any, prompts: list[list[int]], cfg: Any, on_tokens: Any) -> Any:
        out = generate(model, prompts, cfg, on_tokens=on_tokens, datastore=store)
        for seq in out.sequences:
            store.learn(seq)
        return out

    fn.reset = store.reset_learned  # type: ignore[attr-defined]
    return fn


def method_runs(methods: Sequence[str], opts: BenchOptions) -> dict[str, tuple[str, dict[str, Any]]]:
    """Run name -> (method, its parameters): `tidar-diffusion` once per swept block size, policy and
    beta (`tidar-diffusion-b3`, `-full`, `-beta0.5`), `diffusion` once per threshold when several
    (`diffusion-t0.7`)."""
    runs: dict[str, tuple[str, dict[str, Any]]] = {}
    for m in methods:
        if m == "tidar-diffusion":
            for b, policy, beta in itertools.product(opts.block_sizes or (None,), opts.policies or ("all",),
                                                     opts.betas or (None,)):
                name = (m + (f"-b{b}" if b else "") + (f"-{policy}" if len(opts.policies) > 1 else "")
                        + (f"-beta{beta:g}" if len(opts.betas) > 1 else ""))
                runs[name] = (m, {"block_size": b, "policy": policy, "beta": beta})
        elif m == "diffusion" and len(opts.thresholds) > 1:
            runs.update({f"{m}-t{t:g}": (m, {"threshold": t}) for t in opts.thresholds})
        else:
            runs[m] = (m, {"threshold": opts.thresholds[0]} if m == "diffusion" else {})
    return runs


def build_runners(runtime: Any, methods: Sequence[str], opts: BenchOptions, max_len: int = 4096) -> dict[str, Runner]:
    """Load what each method needs (timed nothing yet). `max_len` bounds prompt + new tokens."""
    engine, sampling = dict(opts.engine), dict(opts.sampling)
    runners: dict[str, Runner] = {}
    for name, (m, params) in method_runs(methods, opts).items():
        if m == "ar":  # plain AR: no prompt-lookup bookkeeping even if the operating point has it
            runners[name] = EngineRunner(runtime, {"mode": "ar", "lookup_ngram": 0, **sampling})
        elif m == "tidar":
            runners[name] = EngineRunner(runtime, {"mode": "tidar", **engine, **sampling})
        elif m == "tidar-diffusion":  # the paper's TiDAR: diffusion drafts only
            overrides = {"mode": "tidar", **engine, **sampling, **DIFFUSION_ONLY,
                         **{k: v for k, v in params.items() if v is not None}}
            runners[name] = EngineRunner(runtime, overrides)
        elif m == "tidar-no-datastore":  # the same without the datastore's drafts, to show their share
            runners[name] = EngineRunner(runtime, {"mode": "tidar", **engine, **sampling, "datastore_tokens": 0})
        elif m == "tidar-learn":  # the datastore also learns each output, as `tidar serve --learn` does
            if runtime.datastore is None:
                raise BenchError(f"method 'tidar-learn' needs a model with a datastore; {runtime.name} has none")
            runners[name] = EngineRunner(runtime, {"mode": "tidar", **engine, **sampling},
                                         learning_generate(runtime.datastore.fork()))
        elif m == "diffusion":
            fn = baselines.diffusion_generate
            runners[name] = EngineRunner(
                runtime, {"mode": "tidar", "block_size": engine.get("block_size")},
                lambda model, ps, cfg, _cb, fn=fn, t=params["threshold"]: fn(model, ps, cfg, threshold=t), streams_stop=False)
        elif m == "spec":
            fn = baselines.spec_generate
            if opts.draft_model:
                draft = load_model(opts.draft_model, dtype=DTYPE[opts.dtype])
            else:
                draft = baselines.truncated_draft(runtime.model, opts.draft_layers)
            runners[name] = EngineRunner(
                runtime, {"mode": "ar", "lookup_ngram": 0, **sampling},
                lambda model, ps, cfg, _cb, fn=fn, draft=draft: fn(model, draft, ps, cfg, gamma=opts.gamma),
                streams_stop=False)
    hf = [m for m in methods if m.startswith("hf")]
    if hf:
        directory = hf_checkpoint_dir(opts.model)
        base = HFRunner.load(directory, opts.dtype, runtime.tokenizer, runtime.eos_ids)
        for m in hf:  # one set of weights for both; each runner's hook counts only during its own calls
            runners[m] = base if m == "hf" else HFRunner(base.model, runtime.tokenizer, runtime.eos_ids,
                                                         LOOKUP_TOKENS)
    for m in methods:
        if m.startswith("llamacpp"):
            runners[m] = LlamaCppRunner.load(opts.threads or torch.get_num_threads(), max_len, runtime.tokenizer,
                                             runtime.eos_ids, LOOKUP_TOKENS if m == "llamacpp-lookup" else None)
    return runners

