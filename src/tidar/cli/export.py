"""`tidar export`: a training run's adapter (or an adapter directory) as the shipped default model,
with its operating point and a description of its training data in the manifest; or (`--hf DIR`) a
model as a transformers directory that `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)` opens, with TiDAR decoding as its `generate()` (see `tidar.hf`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from tidar.cli.args import CLIError, Parser, run_command
from tidar.hf.errors import HFExportError
from tidar.train.errors import DataError, ExportError


def build_parser() -> Parser:
    p = Parser(prog="tidar export",
               description="Export a trained adapter as the shipped default model (tidar export SRC), or a model as a "
                           "Hugging Face transformers directory (tidar export --hf DIR [--model M]).")
    p.add_argument("src", nargs="?", default=None,
                   help="a training run directory (its latest checkpoint) or an adapter directory (not with --hf)")
    p.add_argument("--out", default=None,
                   help="destination directory (default: the shipped model, tidar/assets/smollm2-tidar)")
    p.add_argument("--operating-point", default=None,
                   help="the model's default decoding settings: a JSON file or inline JSON object, or the output of "
                        "`tidar profile --choose --json` (its best choice is taken)")
    p.add_argument("--data", default=None,
                   help="shard directory whose index.json describes the training data (recorded in the manifest)")
    p.add_argument("--hf", metavar="DIR", default=None,
                   help="instead write DIR, a transformers model directory: config.json (auto_map to the remote code, "
                        "the [MASK] id, block size and adapter config), model.safetensors (base + adapter, float32), "
                        "the tokenizer, configuration_tidar.py + modeling_tidar.py and custom_generate/generate.py. "
                        "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) opens it; its generate() "
                        "then decodes with TiDAR (greedy output = AR's), generate(..., tidar=False) with "
                        "transformers' own AR loop. DIR is replaced whole: it must be new, empty or an earlier export")
    p.add_argument("--model", default=None,
                   help="with --hf: the model to export: an adapter directory, a full checkpoint or 'smollm2' "
                        "(default: the shipped TiDAR model)")
    return p


def cmd_export(args: argparse.Namespace) -> int:
    if args.hf is not None:
        return cmd_export_hf(args)
    if args.src is None:
        raise CLIError("give SRC (a run or adapter directory to export as the shipped model), or --hf DIR")
    if args.model is not None:
        raise CLIError("--model goes with --hf; the adapter to export as the shipped model is SRC")
    from tidar.model.weights import ADAPTER_FILE, SHIPPED_MODEL
    from tidar.train.export import data_record, export, operating_point_from

    out = Path(args.out) if args.out is not None else SHIPPED_MODEL
    op = operating_point_from(args.operating_point) if args.operating_point else None
    extra = {"data": data_record(args.data)} if args.data else {}
    manifest = export(Path(args.src), out, op, extra=extra)
    size = (out / ADAPTER_FILE).stat().st_size
    total = f", {manifest['tokens_total']} in all" if "tokens_total" in manifest else ""
    print(f"exported step {manifest.get('step')} ({manifest.get('tokens')} tokens{total}) to {out} "
          f"({size / 2**20:.1f} MiB, sha256 {manifest['sha256'][:12]})")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    """`tidar export --hf DIR [--model M]`: the model as a transformers directory."""
    extra = [flag for flag, value in (("SRC", args.src), ("--out", args.out), ("--operating-point", args.operating_point),
                                      ("--data", args.data)) if value is not None]
    if extra:
        raise CLIError(f"--hf takes the model from --model, not {', '.join(extra)}")
    from tidar.hf.export import export_hf

    written = export_hf(Path(args.hf), args.model)
    note = "" if written["tokenizer"] else " (the model has no tokenizer: none written)"
    print(f"exported {written['config']['tidar']['source']['model']} to {args.hf}: {', '.join(written['files'])}{note}\n"
          f"open it with AutoModelForCausalLM.from_pretrained({str(args.hf)!r}, trust_remote_code=True)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`tidar export SRC ...` or `tidar export --hf DIR ...`; returns 0, or 2 with one `error: ...` line on bad input."""
    return run_command(build_parser(), argv, cmd_export, ExportError, DataError, FileNotFoundError, HFExportError)
