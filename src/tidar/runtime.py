"""A loaded model plus its tokenizer and default operating point: the thin layer the CLI, bench and
server share to turn text into tokens, run the decoding engine and turn tokens back into text."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from tidar.decode import DATASTORE_FILE, Datastore, GenerationConfig, GenerationError, TextStreamer, generate
from tidar.decode.options import check_option, options
from tidar.model.transformer import Transformer
from tidar.model.weights import (
    MANIFEST_FILE,
    WeightsError,
    atomic_directory,
    cache_dir,
    chat_ids,
    load_for_inference,
    load_tokenizer,
    resolve_model_path,
)

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TUNED = frozenset(f.name for f in options("tuned"))  # decoding options a model's operating point may set
RUNTIME_KEYS = frozenset({"dtype", "compile"})  # the operating point's keys that are not decoding options


def operating_point(path: Path) -> dict[str, Any]:
    """The `operating_point` of a model directory's manifest ({} without one). Keys ending in
    `chosen_by` are notes; any other key that is neither a tuned decoding option nor a runtime
    setting is an error, so a removed option cannot linger in a manifest unnoticed."""
    manifest = path / MANIFEST_FILE
    if not manifest.exists():
        return {}
    op = json.loads(manifest.read_text()).get("operating_point", {})
    check_operating_point(op, str(manifest))
    return op


def check_operating_point(op: dict[str, Any], where: str) -> None:
    """Raise WeightsError unless every key of `op` is a tuned decoding option with a valid value, a
    runtime setting, or a note."""
    unknown = [k for k in op if k not in TUNED | RUNTIME_KEYS and not k.endswith("chosen_by")]
    if unknown:
        raise WeightsError(f"{where}: unknown operating-point keys {unknown}; known: {sorted(TUNED | RUNTIME_KEYS)}")
    for k in TUNED & set(op):
        try:
            check_option(k, op[k])
        except GenerationError as e:
            raise WeightsError(f"{where}: operating point: {e}") from None


DATASTORE_CACHE_FORMAT = b"tidar-datastore-cache-1"


def load_datastore(path: Path) -> Datastore:
    """`Datastore.load(path)` through a cache of the built object (`cache_dir()/datastores`, in
    `Datastore.write_built`'s files): building the n-gram tables from the stored tokens took 1.7-2.0 s
    of a cold `tidar generate`. An entry is keyed by the datastore file's bytes, the Datastore
    module's source (the object and its file format) and numpy's version, so a new file or a changed
    implementation is built afresh; an unreadable entry is rebuilt, and where the cache cannot be
    written the datastore is built each time."""
    source = path / DATASTORE_FILE
    h = hashlib.sha256(DATASTORE_CACHE_FORMAT + source.read_bytes() + np.__version__.encode())
    h.update(Path(sys.modules[Datastore.__module__].__file__).read_bytes())
    entry = cache_dir() / "datastores" / h.hexdigest()[:32]
    try:
        return Datastore.read_built(entry)
    except (OSError, ValueError, KeyError, TypeError):  # no entry yet, or a damaged one
        pass
    store = Datastore.load(path)
    try:
        with atomic_directory(entry) as tmp:  # a concurrent start reads the old entry or the new one
            store.write_built(tmp)
    except (OSError, TypeError):  # read-only cache, or an attribute the format does not hold
        pass
    return store


@dataclass
class TextResult:
    text: str
    tokens: list[int]
    stats: dict[str, Any]
    finish_reason: str  # "stop" (EOS or stop string) | "length"


class StreamedTexts:
    """Each sequence's text as its tokens are committed (`TextStreamer`: a stop string is held back
    until disambiguated and never shown), and the final TextResults. Shared by `Runtime.generate_ids`
    and the server's worker, which drives the decoder step by step."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], n: int,
                 on_text: Callable[[int, str], None] | None = None) -> None:
        self.streamers = [TextStreamer(tokenizer, stop) for _ in range(n)]
        self.on_text = on_text

    def push(self, i: int, toks: list[int]) -> int | None:
        """How many of `toks` to keep when a stop string ended sequence i, else None (the
        `on_tokens` contract of `generate`)."""
        s = self.streamers[i]
        for n, t in enumerate(toks, 1):  # token by token, so nothing after a stop string is kept
            text = s.push([t])
            if text and self.on_text is not None:
                self.on_text(i, text)
            if s.stopped:
                return n
        return None

    def results(self, seqs: Sequence[list[int]], stats: dict[str, Any], eos: set[int]) -> list[TextResult]:
        out = []
        for i, s in enumerate(self.streamers):
            tail = s.push([], final=True)
            if tail and self.on_text is not None:
                self.on_text(i, tail)
            toks = list(seqs[i])
            hit_eos = bool(toks) and toks[-1] in eos
            text = s.text()[: s.shown] if s.stopped else s.text()
            out.append(TextResult(text, toks, dict(stats), "stop" if (hit_eos or s.stopped) else "length"))
        return out


class Runtime:
    def __init__(self, model: Transformer, tokenizer: Any, operating_point: dict[str, Any] | None = None,
                 name: str = "", datastore: Datastore | None = None, weights: str = "dense") -> None:
        self.model = model
        self.weights = weights  # how the base projections run: "q4" (the GGUF's blocks) or "dense"
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
    def load(cls, name: str | None = None, dtype: str = "bfloat16", compile: bool | None = None,
             weights: str | None = None, light_tokenizer: bool = False) -> Runtime:
        """`compile`: run the decoder blocks through torch.compile (None: the operating point's choice);
        `weights`: q4 | dense (None: q4 where the base is a GGUF, see `load_for_inference`; on q4 the
        model is inference-only: its dense base weights are released). `light_tokenizer`: the model's
        tokenizer on the `tokenizers` library alone where its files allow (`tidar.model.tokenizer`):
        no transformers import (3.7-4.4 s of a cold start), only what the runtime and server use."""
        path = resolve_model_path(name)
        op = operating_point(path)
        compile = compile if compile is not None else op.get("compile", False)
        if compile and weights == "q4":
            raise WeightsError("--compile runs the dense weights (inductor cannot trace the Q4_1 kernel); "
                               "drop --compile or use --weights dense")
        model, taken = load_for_inference(name, DTYPE[dtype], "dense" if compile else weights)
        tokenizer = load_tokenizer(path, light=light_tokenizer)
        datastore = load_datastore(path) if (path / DATASTORE_FILE).exists() else None
        rt = cls(model, tokenizer, op, name=str(path), datastore=datastore, weights=taken)
        if compile:
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

    def generation_config(self, **overrides: Any) -> GenerationConfig:
        """The model's operating point, with `overrides` (those not None) on top, validated."""
        kw = {k: v for k, v in self.operating_point.items() if k in TUNED}
        if self.datastore is None:
            kw.pop("datastore_tokens", None)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        kw["eos_token_id"] = kw.get("eos_token_id") or self.eos_ids
        try:
            cfg = GenerationConfig(**kw)
        except TypeError as e:  # an unknown keyword
            raise GenerationError(f"unknown generation option: {e}") from None
        cfg.validate()
        if cfg.datastore_tokens and self.datastore is None:
            raise GenerationError(f"datastore_tokens {cfg.datastore_tokens}: the model {self.name} has no "
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
                     stop: Sequence[str] | None = None, on_text: Callable[[int, str], None] | None = None
                     ) -> list[TextResult]:
        """`Runtime.generate_batch` for already-tokenized prompts (chat templates with several
        messages, token-id prompts). `on_text(i, text)` receives each sequence's text as its tokens
        are committed."""
        texts = StreamedTexts(self.tokenizer, stop or [], len(prompts), on_text)
        t0 = time.perf_counter()
        out = generate(self.model, [list(p) for p in prompts], gen, on_tokens=texts.push)
        if self.learn and self.datastore is not None:
            for seq in out.sequences:
                self.datastore.learn(seq)
        stats = {**out.stats.as_dict(), "wall_s": round(time.perf_counter() - t0, 4)}
        return texts.results(out.sequences, stats, set(self.eos_ids))
