"""`tidar export --hf DIR`: a TiDAR model as a transformers model directory.

DIR holds config.json (a Llama config with model_type "tidar", `auto_map` to the remote code and a
`tidar` entry: [MASK] id, block size, adapter), model.safetensors (base and adapter weights, float32),
the tokenizer files, configuration_tidar.py + modeling_tidar.py (the model) and
custom_generate/generate.py (TiDAR decoding), so that
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` opens it where `tidar` is not
installed. The remote code lives in `tidar/hf/remote/` and is copied verbatim."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from tidar.hf.errors import HFExportError
from tidar.model.weights import (
    WeightsError,
    atomic_directory,
    load_model,
    load_tokenizer,
    read_manifest,
    resolve_model_path,
    write_pretrained,
)

REMOTE = Path(__file__).resolve().parent / "remote"
# each remote file in tidar/hf/remote -> where the exported directory holds it
REMOTE_FILES = {"configuration_tidar.py": "configuration_tidar.py", "modeling_tidar.py": "modeling_tidar.py",
                "generate.py": "custom_generate/generate.py"}
MODEL_TYPE = "tidar"
AUTO_MAP = {"AutoConfig": "configuration_tidar.TidarConfig", "AutoModelForCausalLM": "modeling_tidar.TidarForCausalLM"}

__all__ = ["REMOTE_FILES", "export_hf", "hf_config"]


def export_hf(out: str | Path, model: str | Path | None = None) -> dict[str, Any]:
    """Write the transformers directory `out` for `model` (default: the shipped TiDAR model; an
    adapter directory, a full checkpoint or 'smollm2'). Returns what was written: its config
    ("config"), its files ("files") and whether a tokenizer was found ("tokenizer")."""
    out = Path(out)
    _check_destination(out)
    path = resolve_model_path(model)
    net = load_model(path, dtype=torch.float32)
    if net.config.model_type != "llama":
        raise HFExportError(f"--hf exports Llama-family models only; {path} is {net.config.model_type!r}")
    tokenizer = _tokenizer(path)
    with atomic_directory(out) as staging:  # an interrupted export leaves no half directory
        write_pretrained(net, staging, tokenizer=tokenizer)
        config = hf_config(net.config.to_hf(), path)
        (staging / "config.json").write_text(json.dumps(config, indent=2, default=list) + "\n")
        for src, dst in REMOTE_FILES.items():
            (staging / dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REMOTE / src, staging / dst)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return {"config": config, "files": files, "tokenizer": tokenizer is not None}


def hf_config(base: dict[str, Any], source: Path) -> dict[str, Any]:
    """Our Llama config.json (`TidarConfig.to_hf`, with its `tidar` entry) as the remote model's."""
    config = dict(base)
    config["model_type"] = MODEL_TYPE
    config["architectures"] = ["TidarForCausalLM"]
    config["auto_map"] = dict(AUTO_MAP)
    config.setdefault("dtype", "float32")
    config.pop("_name_or_path", None)
    manifest = read_manifest(source) or {}
    # where the weights came from: the adapter's checksum identifies a shipped/exported adapter
    config["tidar"] = {**config["tidar"], "source": {"model": str(source), "adapter_sha256": manifest.get("sha256")}}
    return config


def _check_destination(out: Path) -> None:
    """Refuse to replace anything but an earlier export (the directory is replaced whole)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise HFExportError(f"{out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    try:
        earlier = json.loads((out / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        earlier = False
    if not earlier:
        raise HFExportError(f"{out} is a non-empty directory that is not an earlier `tidar export --hf`: "
                            "not replacing it (give a new or empty directory)")


def _tokenizer(path: Path) -> Any:
    """The model's tokenizer (an adapter's: its base's), or None for a model stored without one."""
    try:
        return load_tokenizer(path)
    except WeightsError:
        return None
