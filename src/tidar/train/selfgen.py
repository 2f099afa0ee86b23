"""Self-generated data: shards of the model's own greedy continuations, and a datastore of them.

A drafter is judged against the AR model's greedy continuations, and those read differently from
corpus text (more regular, often repeating the context). So besides corpus shards, the trainer can
read shards of the model's own greedy continuations of prompts (corpus windows, or code prompts
shaped like HumanEval's): the drafter then learns on the distribution it is tested on. The token ids
are kept as generated (decoding and re-tokenizing the text could split it differently from how the
model produced it).
"""

from __future__ import annotations

import ast
import json
import os
import textwrap
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from tidar.decode import DATASTORE_FILE, Datastore, GenerationConfig, generate
from tidar.model.weights import MANIFEST_FILE, chat_ids, file_sha256, model_vocab_size
from tidar.train.corpora import Source, open_source
from tidar.train.errors import DataError
from tidar.train.loader import TokenShards
from tidar.train.shards import atomic_write_text, shard_writers, write_index

__all__ = ["GENERATED_LOG", "build_datastore", "code_prompts", "from_generated", "generate_from_model",
           "generate_shards"]

GENERATED_LOG = "generated.jsonl"
Prompts = Sequence[tuple[str, list[int]]]  # (name, token ids)


# -- prompts ---------------------------------------------------------------------------------------


def _newline_ends(tokenizer: Any, vocab_size: int) -> np.ndarray:
    """Boolean mask over the vocabulary: tokens whose text ends a line."""
    ends = np.zeros(vocab_size, dtype=bool)
    for i in range(vocab_size):
        ends[i] = tokenizer.decode([i]).endswith("\n")
    return ends


def _corpus_prompt(tokens: np.ndarray, rng: np.random.Generator, length: int, line_end: np.ndarray,
                   eos_id: int) -> list[int]:
    """A corpus window of up to `length` tokens that ends a line when one ends in its last quarter,
    and does not reach back across a document boundary."""
    start = int(rng.integers(0, len(tokens) - length))
    window = np.asarray(tokens[start : start + length], dtype=np.int64)
    for cut in range(len(window), (3 * len(window)) // 4, -1):
        if line_end[window[cut - 1]]:
            window = window[:cut]
            break
    eos = np.flatnonzero(window == eos_id)
    if len(eos):
        window = window[eos[-1] + 1 :]
    return [int(t) for t in window]


def _function_prompts(name: str, text: str) -> list[tuple[str, str, str, str]]:
    """(name, signature, prompt, summary) for each function of a Python file whose body goes on past its
    docstring: the source from `def` through the docstring, dedented, as HumanEval-style prompts are, and
    the docstring's first paragraph on one line."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or len(node.body) < 2:
            continue
        doc = ast.get_docstring(node)
        if not doc or node.body[0].end_lineno is None:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        src = textwrap.dedent("\n".join(lines[start - 1 : node.body[0].end_lineno])) + "\n"
        if src.startswith((" ", "\t")):  # mixed indentation that dedent cannot undo
            continue
        summary = " ".join(doc.split("\n\n", 1)[0].split())
        out.append((f"{name}:{node.lineno}", f"{node.name}({ast.unparse(node.args)})", src, summary))
    return out


def _is_test_file(name: str) -> bool:
    """A test module (tests/, test_*.py, *_test.py, conftest.py): its functions are not the code
    users ask for, and packages ship many of them."""
    parts = Path(name).parts
    stem = Path(name).stem
    return (any(p in ("test", "tests", "testing") for p in parts[:-1]) or stem.startswith("test_")
            or stem.endswith("_test") or stem == "conftest")


def _source_functions(src: Source, excluded: set[str]) -> list[tuple[str, str, str, str]]:
    # Other packages' test modules are left out. The stdlib's are kept: the commands that generated
    # the shipped drafter's stdlib chunks (--skip-prompts offsets included) must give the same prompts.
    skip_tests = src.kind != "stdlib"
    found = []
    for i, item_name in enumerate(src.names):
        if item_name in excluded or not item_name.endswith(".py") or (
                skip_tests and _is_test_file(item_name[len(src.spec) + 1:])):
            continue
        text = src.document(i)[0]
        if text:
            found.extend(_function_prompts(item_name, text))
    return found


def code_prompts(tokenizer: Any, source: str | Sequence[str] = "stdlib", *, exclude: Sequence[str] = (),
                 chat_every: int = 4, max_tokens: int = 256, seed: int = 0, skip: int = 0) -> list[tuple[str, list[int]]]:
    """(name, token ids) of code prompts from the Python files of `source` (a spec or several, as
    `resolve_source` takes them), in seeded shuffled order.

    Every function with a docstring and a body becomes a prompt ending after its docstring (the shape of
    HumanEval's prompts); every `chat_every`-th one is instead a chat turn asking for that function
    (the shape of the demo's chat prompt). Files named in `exclude` (a shard index's val files) are
    skipped, so prompts come from the train split only. Prompts over `max_tokens` tokens are dropped.
    The first `skip` prompts of the order (those an earlier run with this seed used) are left out.
    """
    specs = [source] if isinstance(source, str) else list(source)
    found = []
    for src in [open_source(spec) for spec in specs]:  # every spec checked before the slow parsing
        found.extend(_source_functions(src, set(exclude)))
    if not found:
        raise DataError(f"{', '.join(specs)}: no Python functions with docstrings to make code prompts from")
    order = np.random.default_rng((seed, 1)).permutation(len(found)).tolist()
    chat = chat_every > 0 and bool(getattr(tokenizer, "chat_template", None))
    out = []
    for k, i in enumerate(order):
        name, signature, prompt, summary = found[i]
        if chat and k % chat_every == chat_every - 1:
            ids = chat_ids(tokenizer, [{"role": "user", "content": f"Write a Python function `{signature}`: {summary}"}])
            name = f"chat:{name}"
        else:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if 0 < len(ids) <= max_tokens:
            out.append((name, [int(t) for t in ids]))
    if not out:
        raise DataError(f"no code prompt from {', '.join(specs)} fits in {max_tokens} tokens; raise max_tokens")
    if not 0 <= skip < len(out):
        raise DataError(f"cannot skip {skip} prompts: there are {len(out)} code prompts; pass 0 <= skip < {len(out)}")
    return out[skip:]


# -- generating ------------------------------------------------------------------------------------


@dataclass
class _Job:
    """One `generate_shards` run: where prompts come from, and what its log must have been made with."""

    src: TokenShards
    out: Path
    prompts: Prompts | None  # None: windows of src's train split
    origin: str  # recorded in every log row; a resume with another origin or seed is refused
    seed: int
    eos_id: int = field(init=False)
    train: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.eos_id = self.src.eos_id
        self.train = self.src.split("train")

    @property
    def log(self) -> Path:
        return self.out / GENERATED_LOG

    def prompt(self, i: int, length: int, line_end: np.ndarray | None) -> list[int]:
        """Prompt i: a pure function of (seed, i), so an interrupted run resumes exactly."""
        if self.prompts is not None:
            return list(self.prompts[i][1])
        return _corpus_prompt(self.train, np.random.default_rng((self.seed, i)), length, line_end, self.eos_id)

    def doc_name(self, i: int) -> str:
        return f"generated:{i}" if self.prompts is None else f"generated:{self.prompts[i][0]}"


def _origin(src: TokenShards, prompts: Prompts | None, prompts_name: str) -> str:
    if prompts is None:
        return str(src.path)
    # the checksum makes a resume with other prompts of the same name and count fail loudly
    crc = zlib.crc32(json.dumps([list(map(int, ids)) for _, ids in prompts]).encode())
    return f"{prompts_name or 'prompts'} ({len(prompts)} prompts, crc32 {crc:08x})"


def _check_generate_args(samples: int, prompt_tokens: int, new_tokens: int, batch_size: int, val_every: int) -> None:
    if samples < 1 or prompt_tokens < 8 or new_tokens < 1 or batch_size < 1 or val_every < 2:
        raise DataError("need samples >= 1, prompt_tokens >= 8, new_tokens >= 1, batch_size >= 1, val_every >= 2")


def _check_prompt_source(src: TokenShards, samples: int, prompt_tokens: int, prompts: Prompts | None) -> None:
    if prompts is not None and samples > len(prompts):
        raise DataError(f"asked for {samples} samples but there are only {len(prompts)} prompts; lower --samples")
    if prompts is None and src.tokens("train") < 2 * prompt_tokens:
        raise DataError(f"{src.path} has too few train tokens ({src.tokens('train')}) to draw prompts from")


def _read_generated(path: Path) -> list[dict[str, Any]]:
    """Complete lines of a generation log; a torn last line (the writer was killed) is dropped."""
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def _resume_log(job: _Job) -> list[dict[str, Any]]:
    """The rows already generated, after checking they were made with the same settings."""
    rows = _read_generated(job.log)
    if rows and (rows[0].get("seed") != job.seed or rows[0].get("src") != job.origin):
        raise DataError(f"{job.log} was made with other settings (seed {rows[0].get('seed')}, src "
                        f"{rows[0].get('src')}); use another --out or delete it")
    with job.log.open("w", encoding="utf-8") as fh:  # rewrite without a torn tail before appending
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def _generate_rows(model: Any, tokenizer: Any, job: _Job, rows: list[dict[str, Any]], *, samples: int,
                   prompt_tokens: int, new_tokens: int, batch_size: int, time_limit_min: float | None,
                   progress: bool) -> bool:
    """Generate (and log) samples until `rows` holds `samples`; False when the time limit came first."""
    line_end = _newline_ends(tokenizer, job.src.vocab_size) if job.prompts is None else None
    gen = GenerationConfig(mode="ar", max_new_tokens=new_tokens, eos_token_id=[job.eos_id])
    deadline = None if time_limit_min is None else time.monotonic() + 60 * time_limit_min
    with tqdm(total=samples, initial=len(rows), desc="generating", unit="sample", disable=not progress) as bar, \
            job.log.open("a", encoding="utf-8") as fh:
        while len(rows) < samples:
            if deadline is not None and time.monotonic() > deadline:
                return False
            idx = range(len(rows), min(samples, len(rows) + batch_size))
            batch = [job.prompt(i, prompt_tokens, line_end) for i in idx]
            for i, p, c in zip(idx, batch, generate(model, batch, gen).sequences, strict=True):
                row = {"i": i, "seed": job.seed, "src": job.origin, "prompt": p,
                       "completion": c[:-1] if c and c[-1] == job.eos_id else c}
                fh.write(json.dumps(row) + "\n")
                rows.append(row)
            fh.flush()
            os.fsync(fh.fileno())
            bar.update(len(idx))
    return True


def _write_generated_shards(job: _Job, rows: list[dict[str, Any]], val_every: int, source: str,
                            generated: dict[str, Any]) -> dict[str, Any]:
    """Every `val_every`-th sample to val, the rest to train; returns the index."""
    dtype = job.src.dtype
    with shard_writers(job.out, dtype, job.eos_id) as writers:
        for r in rows:
            split = "val" if r["i"] % val_every == val_every - 1 else "train"
            writers[split].write([job.doc_name(r["i"])], [r["prompt"] + r["completion"]])
    return write_index(job.out, writers, dtype, vocab_size=job.src.vocab_size, eos_id=job.eos_id, seed=job.seed,
                       val_fraction=1 / val_every, max_tokens=None, sources=[source],
                       tokenizer=job.src.index.get("tokenizer"), generated=generated, skipped={})


def generate_shards(
    model: Any,
    tokenizer: Any,
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    samples: int,
    prompt_tokens: int = 64,
    new_tokens: int = 192,
    batch_size: int = 32,
    val_every: int = 50,
    seed: int = 0,
    time_limit_min: float | None = None,
    progress: bool = True,
    model_name: str = "",
    prompts: Prompts | None = None,
    prompts_name: str = "",
) -> dict[str, Any] | None:
    """Shards of the model's own greedy continuations of prompts drawn from `src_dir`'s train split.

    Given `prompts` ((name, token ids), e.g. from `code_prompts`, named `prompts_name`), sample i continues
    prompts[i] instead, and `src_dir` only gives the token format (dtype, vocabulary, EOS).

    Each sample is a corpus prompt of up to `prompt_tokens` tokens plus `new_tokens` greedy AR tokens
    (fewer if the model ends with EOS); every `val_every`-th sample goes to val. Samples are appended
    to `out_dir/generated.jsonl` as they are made, and prompts are a pure function of (seed, sample
    index), so an interrupted run resumes where it stopped. Returns the index once `samples` are done,
    None when the time limit stopped it first (re-run to continue).
    """
    _check_generate_args(samples, prompt_tokens, new_tokens, batch_size, val_every)
    src = TokenShards(src_dir)
    _check_prompt_source(src, samples, prompt_tokens, prompts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job = _Job(src, out, prompts, _origin(src, prompts, prompts_name), seed)
    rows = _resume_log(job)
    if not _generate_rows(model, tokenizer, job, rows, samples=samples, prompt_tokens=prompt_tokens,
                          new_tokens=new_tokens, batch_size=batch_size, time_limit_min=time_limit_min,
                          progress=progress):
        return None
    source = f"generated: greedy AR continuations ({new_tokens} tokens) of " + (
        f"{prompt_tokens}-token prompts from {src.path} train split" if prompts is None else job.origin)
    generated = {"model": model_name or type(model).__name__,
                 "completion_tokens": sum(len(r["completion"]) for r in rows), "samples": len(rows)}
    return _write_generated_shards(job, rows, val_every, source, generated)


def generate_from_model(shards_dir: str | Path, out_dir: str | Path, *, samples: int,
                        code_sources: Sequence[str] | None = None, skip_prompts: int = 0, model: str | None = None,
                        dtype: str = "bfloat16", prompt_tokens: int = 64, new_tokens: int = 192, batch_size: int = 32,
                        seed: int = 0, time_limit_min: float | None = None, progress: bool = True
                        ) -> dict[str, Any] | None:
    """`generate_shards` with the model `model` (a directory, 'smollm2', or None for the shipped one)
    loaded for inference: continuations of windows of `shards_dir`'s train split or, given
    `code_sources`, of code prompts from them (the Python files of the shards' val split left out,
    every 4th prompt a chat turn, the first `skip_prompts` of the seeded order skipped). Bad sources
    and shards fail before the model loads."""
    from tidar.runtime import Runtime

    for spec in code_sources or ():
        open_source(spec)
    shards = TokenShards(shards_dir)
    rt = Runtime.load(model, dtype=dtype)
    prompts, prompts_name = None, ""
    if code_sources is not None:
        prompts = code_prompts(rt.tokenizer, code_sources, exclude=shards.index["val"]["files"], seed=seed,
                               skip=skip_prompts)
        prompts_name = (f"code prompts: functions of {','.join(code_sources)} through their docstrings, "
                        "every 4th as a chat turn")
        if skip_prompts:
            prompts_name += f", from #{skip_prompts} of seed {seed}'s order"
    return generate_shards(rt.model, rt.tokenizer, shards_dir, out_dir, samples=samples, prompt_tokens=prompt_tokens,
                           new_tokens=new_tokens, batch_size=batch_size, seed=seed, time_limit_min=time_limit_min,
                           progress=progress, model_name=rt.name, prompts=prompts, prompts_name=prompts_name)


# -- the datastore ---------------------------------------------------------------------------------


def from_generated(dirs: Sequence[str | Path]) -> tuple[list[list[int]], list[dict]]:
    """The completions of `tidar data generate` output directories (their `generated.jsonl`), and a
    record of each directory (path, samples, tokens, the prompts' description) for provenance."""
    seqs: list[list[int]] = []
    sources = []
    for d in dirs:
        log = Path(d) / GENERATED_LOG
        if not log.exists():
            raise DataError(f"{log} not found: pass directories written by `tidar data generate`")
        n = tokens = 0
        src = ""
        with open(log) as f:
            for line in f:
                r = json.loads(line)
                seqs.append(r["completion"])
                n += 1
                tokens += len(r["completion"])
                src = src or r.get("src", "")
        sources.append({"dir": str(d), "samples": n, "tokens": tokens, "prompts": src})
    return seqs, sources


def build_datastore(generated: Sequence[str | Path], out: Path, orders: Sequence[int],
                    operating_point: dict[str, Any] | None = None) -> tuple[Path, Datastore]:
    """Index `tidar data generate` outputs into model directory `out` (datastore.safetensors), and
    record what it holds (and any operating-point defaults) in the model's manifest."""
    if not out.is_dir():
        raise DataError(f"--out {out} is not a directory: pass a model directory (e.g. from `tidar export`)")
    op = dict(operating_point or {})
    if op and not (out / MANIFEST_FILE).exists():
        raise DataError(f"{out} has no {MANIFEST_FILE} to record the operating point {op} in")
    seqs, sources = from_generated(generated)
    ds = Datastore(seqs, model_vocab_size(out), orders, meta={"sources": sources})
    path = ds.save(out)
    manifest = out / MANIFEST_FILE
    if manifest.exists():  # record what the datastore holds next to the adapter's provenance
        m = json.loads(manifest.read_text())
        m["datastore"] = {"file": DATASTORE_FILE, "sha256": file_sha256(path), "tokens": len(ds),
                          "sequences": ds.sequences, "orders": list(ds.orders), "sources": sources}
        m.setdefault("operating_point", {}).update(op)
        atomic_write_text(manifest, json.dumps(m, indent=2) + "\n")
    return path, ds
