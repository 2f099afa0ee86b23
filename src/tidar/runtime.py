"""A loaded model plus its tokenizer and default operating point: the thin layer the CLI, bench and
server share to turn text into tokens, run the decoding engine and turn tokens back into text."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

import torch

from tidar.decode.datastore import DATASTORE_FILE, Datastore
from tidar.decode.engine import GenerationConfig, GenerationError, TextStreamer, generate
from tidar.model.transformer import Transformer
from tidar.model.weights import MANIFEST_FILE, chat_ids, load_model, load_tokenizer, resolve_model_path

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TextResult:
    text: str
    tokens: list[int]
    stats: dict[str, Any]
    finish_reason: str  # "stop" (EOS or stop string) | "length"


class Runtime:
    def __init__(self, model: Transformer, tokenizer: Any, operating_point: dict[str, Any] | None = None,
                 name: str = "", datastore: Datastore | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.operating_point = operating_point or {}
        self.name = name
        self.learn = False  # whether the datastore learns each output (`tidar serve --learn`)
        # kept on the model, so `generate(rt.model, ...)` and `model.generate` draft from it too
        model.datastore = datastore

    @property
    def datastore(self) -> Datastore | None:
        return getattr(self.model, "datastore", None)

    @classmethod
    def load(cls, name: str | None = None, dtype: str = "bfloat16", compile: bool | None = None) -> Runtime:
        """`compile`: run the decoder blocks through torch.compile (None: the operating point's choice)."""
        path = resolve_model_path(name)
        model = load_model(path, dtype=DTYPE[dtype]).fuse_for_inference()
        tokenizer = load_tokenizer(path)
        op: dict[str, Any] = {}
        manifest = path / MANIFEST_FILE
        if manifest.exists():
            op = json.loads(manifest.read_text()).get("operating_point", {})
        datastore = Datastore.load(path) if (path / DATASTORE_FILE).exists() else None
        rt = cls(model, tokenizer, op, name=str(path), datastore=datastore)
        if compile if compile is not None else op.get("compile", False):
            rt.compile()
        return rt

    @property
    def compiled(self) -> bool:
        return self.model.compiled

    def compile(self, log: IO[str] | None = sys.stderr) -> bool:
        """Compile the decoder blocks and trigger every graph a generation needs (prefill and step,
        TiDAR and AR), so no request pays for compilation. Falls back to eager (with a note) where
        inductor cannot build, e.g. without a C++ compiler. Returns whether compilation is on."""
        t = time.perf_counter()
        if log is not None:
            print("compiling the decoder blocks with torch.compile (first time on a machine: about a minute)...",
                  file=log, flush=True)
        self.model.compile_blocks()
        try:
            for mode in ("tidar", "ar"):
                # no EOS, so the decode-step graphs are reached too
                generate(self.model, [[1, 2, 3, 4, 5]], self.generation_config(mode=mode, max_new_tokens=4, eos_token_id=[-1]))
        except Exception as e:  # noqa: BLE001 - any inductor/compiler failure leaves a working eager model
            self.model.decompile_blocks()
            if log is not None:
                print(f"note: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "running eager", file=log)
            return False
        if log is not None:
            print(f"compiled in {time.perf_counter() - t:.0f}s", file=log, flush=True)
        return True

    @property
    def eos_ids(self) -> list[int]:
        ids = set(self.model.config.eos_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    def generation_config(self, args: Any = None, **overrides: Any) -> GenerationConfig:
        """Defaults: the model's operating point, then CLI args / overrides on top."""
        kw: dict[str, Any] = {"block_size": self.operating_point.get("block_size"),
                              "policy": self.operating_point.get("policy", "all"),
                              "policy_k": self.operating_point.get("policy_k", 2),
                              "lookup_ngram": self.operating_point.get("lookup_ngram", 0),
                              "lookup_tokens": self.operating_point.get("lookup_tokens", 0),
                              "lookup_occurrence": self.operating_point.get("lookup_occurrence",
                                                                             GenerationConfig.lookup_occurrence),
                              "span_predraft": self.operating_point.get("span_predraft", False),
                              "min_draft_gain": self.operating_point.get("min_draft_gain", 0.0),
                              "datastore_tokens": self.operating_point.get("datastore_tokens", 0) if self.datastore is not None else 0,
                              "datastore_confidence": self.operating_point.get("datastore_confidence", 0.0),
                              "max_draft_batch": self.operating_point.get("max_draft_batch", 0)}
        if args is not None:
            for k in ("mode", "max_new_tokens", "block_size", "policy", "policy_k", "beta", "lookup_ngram", "lookup_tokens",
                      "lookup_occurrence", "min_draft_gain", "datastore_tokens", "datastore_confidence", "max_draft_batch", "do_sample",
                      "temperature", "top_k", "top_p", "seed"):
                v = getattr(args, k, None)
                if v is not None:
                    kw[k] = v
        kw.update({k: v for k, v in overrides.items() if v is not None})
        kw["eos_token_id"] = kw.get("eos_token_id") or self.eos_ids
        cfg = GenerationConfig(**kw)
        cfg.validate()
        if cfg.datastore_tokens and self.datastore is None:
            raise GenerationError(f"--datastore-tokens {cfg.datastore_tokens}: the model {self.name} has no "
                                  f"{DATASTORE_FILE}; use 0, or build one with `tidar datastore build`")
        return cfg

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise GenerationError("this model's tokenizer has no chat template; drop --chat")
            return chat_ids(self.tokenizer, [{"role": "user", "content": prompt}])
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise GenerationError("the prompt is empty after tokenization")
        return list(ids)

    def generate_text(self, prompt: str, gen: GenerationConfig, chat: bool = False, stop: list[str] | None = None,
                      stream: IO[str] | None = None) -> TextResult:
        return self.generate_batch([prompt], gen, chat=chat, stop=stop, stream=stream)[0]

    def generate_batch(self, prompts: list[str], gen: GenerationConfig, chat: bool = False,
                       stop: list[str] | None = None, stream: IO[str] | None = None) -> list[TextResult]:
        """Generate for several prompts in one batch; `stream` (batch of 1) gets text as committed."""

        def write(i: int, text: str) -> None:
            if stream is not None:
                stream.write(text)
                stream.flush()

        return self.generate_ids([self.encode(p, chat) for p in prompts], gen, stop, on_text=write)

    def generate_ids(self, prompts: Sequence[Sequence[int]], gen: GenerationConfig,
                     stop: Sequence[str] | None = None, on_text: Callable[[int, str], None] | None = None,
                     on_start: Callable[[], None] | None = None,
                     cancel: threading.Event | None = None) -> list[TextResult]:
        """`Runtime.generate_batch` for already-tokenized prompts (chat templates with several
        messages, token-id prompts). `on_text(i, text)` receives each sequence's text as its tokens
        are committed; `on_start()` fires once after the prefill; setting `cancel` ends generation
        at the next step (the client went away)."""
        streamers = [TextStreamer(self.tokenizer, stop or []) for _ in prompts]
        started = False

        def on_tokens(i: int, toks: list[int]) -> int | None:
            nonlocal started
            if not started:
                started = True
                if on_start is not None:
                    on_start()
            if cancel is not None and cancel.is_set():
                return 0
            for n, t in enumerate(toks, 1):  # token by token, so nothing after a stop string is kept
                text = streamers[i].push([t])
                if text and on_text is not None:
                    on_text(i, text)
                if streamers[i].stopped:
                    return n
            return None

        t0 = time.perf_counter()
        out = generate(self.model, [list(p) for p in prompts], gen, on_tokens=on_tokens)
        wall = time.perf_counter() - t0
        if self.learn and self.datastore is not None:
            for seq in out.sequences:
                self.datastore.learn(seq)
        eos = set(self.eos_ids)
        results = []
        for i, s in enumerate(streamers):
            tail = s.push([], final=True)
            if tail and on_text is not None:
                on_text(i, tail)
            toks = out.sequences[i]
            hit_eos = bool(toks) and toks[-1] in eos
            text = s.text()[: s.shown] if s.stopped else s.text()
            stats = out.stats.as_dict()
            stats["wall_s"] = round(wall, 4)
            results.append(TextResult(text, toks, stats, "stop" if (hit_eos or s.stopped) else "length"))
        return results
