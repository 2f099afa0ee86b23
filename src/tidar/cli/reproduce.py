"""`tidar reproduce` (`make reproduce`): the paper's comparison at laptop scale, resumable stage by stage."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tidar.cli.args import Parser, run_command
from tidar.reproduce.config import ReproduceConfig, ReproduceError
from tidar.reproduce.pipeline import Pipeline, stage_names
from tidar.train.errors import DataError, TrainConfigError


def build_parser() -> Parser:
    p = Parser(prog="tidar reproduce",
               description="Train a small tokenizer and model, pretrain AR, continue it as AR, TiDAR and block "
                           "diffusion on equal tokens, measure them with the engine and write a report. Re-running "
                           "the same command resumes where it stopped. Exit code 3: a training stage stopped early (its "
                           "stop_after or time_limit_min); run again to continue.")
    p.add_argument("--config", default="configs/reproduce.json", help="run config (default: configs/reproduce.json)")
    p.add_argument("--out", default="runs/reproduce", help="run directory (default: runs/reproduce)")
    p.add_argument("--until", default=None, metavar="STAGE",
                   help="stop after this stage (tokenizer, shards, pretrain, continue-OBJECTIVE, evaluate, report)")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    return p


def reproduce(args: argparse.Namespace) -> int:
    cfg = ReproduceConfig.load(args.config)
    if args.until is not None and args.until not in stage_names(cfg):
        raise ReproduceError(f"--until {args.until!r} is not a stage; choose from {', '.join(stage_names(cfg))}")
    pipeline = Pipeline(cfg, args.out, progress=not args.no_progress, log=lambda line: print(line, flush=True))
    return 0 if pipeline.run(args.until) else 3


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, reproduce, ReproduceError, DataError, TrainConfigError)
