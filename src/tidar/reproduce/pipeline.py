"""`make reproduce`: the paper's comparison at laptop scale, as resumable stages.

tokenizer -> shards -> pretrain (AR, from scratch, the shared checkpoint) -> one continuation per
objective from that checkpoint on equal tokens (ar, tidar, block_diffusion) -> evaluate -> report.

A finished stage leaves `stages/<name>.json`; a re-run skips it. A training stage that was cut off
resumes from its last checkpoint (the trainer's own resume), so the command can be interrupted at
any point and run again.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tidar.reproduce.config import ReproduceConfig, ReproduceError
from tidar.reproduce.evaluate import evaluate_models
from tidar.reproduce.report import write_report
from tidar.train.config import SCRATCH
from tidar.train.shards import build_shards, tokenizer_from_spec
from tidar.train.tokenizer import train_bpe
from tidar.train.trainer import train

__all__ = ["Pipeline", "stage_names"]


def stage_names(cfg: ReproduceConfig) -> list[str]:
    return ["tokenizer", "shards", "pretrain", *(f"continue-{o}" for o in cfg.objectives), "evaluate", "report"]


class Pipeline:
    """The stages of one reproduction run in `out_dir`; `run()` does those not done yet."""

    def __init__(self, cfg: ReproduceConfig, out_dir: str | Path, progress: bool = True,
                 log: Callable[[str], None] = print) -> None:
        self.cfg, self.out, self.progress, self.log = cfg, Path(out_dir), progress, log
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_same_config()

    def _check_same_config(self) -> None:
        """A run directory belongs to one config: resuming with another would mix two experiments."""
        path = self.out / "config.json"
        mine = self.cfg.to_dict()
        if path.exists():
            saved = json.loads(path.read_text())
            changed = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k) and k != "eval")
            if changed:
                raise ReproduceError(f"{self.out} was started with another config (differs in {', '.join(changed)}); "
                                     "use another --out, or delete that directory to start over")
        path.write_text(json.dumps(mine, indent=2) + "\n")

    def done(self, stage: str) -> dict[str, Any] | None:
        path = self.out / "stages" / f"{stage}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def run(self, until: str | None = None) -> bool:
        """Run the stages not done yet, through `until`; False when a training stage stopped early
        (its `stop_after` or `time_limit_min`): the next run continues it."""
        for stage in stage_names(self.cfg):
            if self.done(stage) is not None:
                self.log(f"[{stage}] done earlier ({self.out / 'stages' / (stage + '.json')})")
            elif not self._run_stage(stage):
                return False
            if stage == until:
                break
        return True

    def _run_stage(self, stage: str) -> bool:
        self.log(f"[{stage}] starting {_now()}")
        start = time.perf_counter()
        result = self._stage_fn(stage)()
        if result.get("unfinished"):
            self.log(f"[{stage}] stopped at step {result['step']} of {result['max_steps']}; run the same command "
                     "again to continue from its checkpoint")
            return False
        record = {"stage": stage, "finished": _now(), "seconds": round(time.perf_counter() - start, 1), **result}
        path = self.out / "stages" / f"{stage}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        self.log(f"[{stage}] done in {record['seconds']:.0f} s")
        return True

    def _stage_fn(self, stage: str) -> Callable[[], dict[str, Any]]:
        if stage.startswith("continue-"):
            objective = stage.removeprefix("continue-")
            return lambda: self._train(stage, self.cfg.continued, init=str(self.out / "pretrain" / "model"),
                                       objective=objective)
        return {"tokenizer": self._tokenizer, "shards": self._shards, "evaluate": self._evaluate,
                "report": self._report,
                "pretrain": lambda: self._train("pretrain", self.cfg.pretrain,
                                                init=SCRATCH + json.dumps(self.cfg.model_config()), objective="ar"),
                }[stage]

    # -- stages --------------------------------------------------------------------------------

    def _tokenizer(self) -> dict[str, Any]:
        path = train_bpe(self.cfg.sources, self.cfg.vocab_size, self.out / "tokenizer", progress=self.progress)
        return {"path": str(path), "vocab_size": self.cfg.vocab_size}

    def _shards(self) -> dict[str, Any]:
        idx = build_shards(self.cfg.sources, tokenizer_from_spec(str(self.out / "tokenizer")), self.out / "shards",
                           progress=self.progress)
        return {"train_tokens": idx["train"]["tokens"], "val_tokens": idx["val"]["tokens"],
                "val_files": len(idx["val"]["files"])}

    def _train(self, name: str, stage: dict[str, Any], *, init: str, objective: str) -> dict[str, Any]:
        cfg = self.cfg.train_config(stage, init=init, mode="full", objective=objective, data=str(self.out / "shards"),
                                    tokenizer=str(self.out / "tokenizer"), out_dir=str(self.out / name),
                                    progress=self.progress)
        result = train(cfg)
        if result["step"] < cfg.max_steps:
            return {"unfinished": True, "step": result["step"], "max_steps": cfg.max_steps}
        return {"step": result["step"], "train": result["train"], "eval": result["eval"],
                "tokens": cfg.max_steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len}

    def _evaluate(self) -> dict[str, Any]:
        models = {"pretrain": self.out / "pretrain" / "model",
                  **{o: self.out / f"continue-{o}" / "model" for o in self.cfg.objectives}}
        report = evaluate_models(self.cfg, models, self.out / "shards", progress=self.progress, log=self.log)
        (self.out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        return {"path": str(self.out / "eval.json")}

    def _report(self) -> dict[str, Any]:
        paths = write_report(self.out, self.cfg)
        return {"files": [str(p) for p in paths]}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
