"""`tidar train`: train TiDAR (or the AR / block diffusion baselines) from a JSON config plus
`key=value` overrides (`--set key=value` is the same thing)::

    tidar train --config configs/smollm2-adapter-b4.json max_steps=200 lr=5e-4
    tidar train --config configs/tiny-tidar.json --dry-run        # validate, print, exit
    torchrun --standalone --nproc_per_node=2 -m tidar.cli train --config configs/tiny-tidar.json

Override values are parsed as JSON when they parse (`lr=1e-4`, `adapter_layers=[22,23]`,
`fsdp=true`) and taken as plain strings otherwise (`init=smollm2`). A run resumes automatically when
`out_dir` holds a checkpoint (`--resume` makes that mandatory); `fsdp=true` shards with FSDP2, the
default under torchrun is DDP. See `tidar.train.trainer` for what a run writes."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tidar.cli.args import Parser, parse_or_exit_code, run_reporting_errors

if TYPE_CHECKING:
    from tidar.train.config import TrainConfig
    from tidar.train.distributed import Dist


def build_parser() -> Parser:
    p = Parser(prog="tidar train",
               description="Train TiDAR (or the AR / block diffusion baselines). Settings: a JSON config plus "
                           "key=value overrides (values parsed as JSON, else strings). Resumes automatically "
                           "when out_dir holds a checkpoint.")
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable; applied before the positional overrides)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, same as --set")
    p.add_argument("--resume", action="store_true",
                   help="require a checkpoint in out_dir and continue from its latest one (error if there is none)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate everything (config, data, model, checkpoint), print the config, and exit")
    return p


def dry_run(cfg: TrainConfig, resume: bool | None) -> int:
    from tidar.train.prepare import prepare

    setup = prepare(cfg, resume)
    n_train = sum(p.numel() for p in setup.model.parameters() if p.requires_grad)
    print(json.dumps(cfg.to_dict(), indent=2))
    print(f"ok: model {setup.model.num_params():,} params ({n_train:,} trainable), data {setup.shards}, "
          f"resume from {setup.checkpoint or 'nothing'}")
    return 0


def run(args: argparse.Namespace, dist: Dist) -> int:
    from tidar.train.config import TrainConfig
    from tidar.train.trainer import train
    from tidar.train.validation import eval_line

    cfg = TrainConfig.load(args.config, [*args.set, *args.overrides])
    resume = True if args.resume else None
    if args.dry_run:
        return dry_run(cfg, resume)
    res = train(cfg, resume=resume)
    if dist.main:
        if res["eval"]:
            print(eval_line(res["eval"]))
        print(f"done: step {res['step']}, out dir {res['out_dir']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`tidar train ...`; returns 0, or 2 with one `error: ...` line on stderr (from rank 0 only) for a bad setup."""
    args = parse_or_exit_code(build_parser(), argv)
    if isinstance(args, int):
        return args
    # libgomp reads this once when torch loads (below); spin-waiting threads make a contended CPU
    # ~36x slower (TIDAR.md §8). Only effective when this command is what first imports torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from tidar.model.config import ConfigError
    from tidar.model.weights import WeightsError
    from tidar.train.distributed import dist_from_env
    from tidar.train.errors import DataError, TrainConfigError

    user_errors = (TrainConfigError, DataError, ConfigError)

    def body() -> int:
        dist = dist_from_env()  # a bad launch environment is reported (as from the main process)
        try:
            return run(args, dist)
        except (*user_errors, WeightsError):
            if dist.main:
                raise
            return 2  # every rank fails alike: rank 0 reports it

    return run_reporting_errors(body, *user_errors)
