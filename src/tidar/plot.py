"""Plots of training runs from their metrics.jsonl (see tidar.train): losses, draft accuracy, speed.

    tidar plot runs/tiny-ar runs/tiny-tidar --out docs/tiny.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _metrics_file(path: str | Path) -> Path:
    path = Path(path)
    return path / "metrics.jsonl" if path.is_dir() else path


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, eval records) of one run directory or metrics.jsonl file."""
    f = _metrics_file(path)
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found (give a run directory made by `tidar train`)")
    train, evals = [], []
    for line in f.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            (evals if rec.get("kind") == "eval" else train).append(rec)
    return train, evals


def _ema(values: list[float], weight: float = 0.9) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else weight * acc + (1 - weight) * v
        out.append(acc)
    return out


def _label(path: str | Path) -> str:
    p = Path(path)
    return (p.parent.name if p.name == "metrics.jsonl" else p.name) or str(p)


def plot_metrics(metrics_jsonl_paths: Sequence[str | Path], out_png: str | Path) -> Path:
    """One figure for one or more runs: train/val AR and diffusion losses vs tokens, draft accuracy
    by offset at the last eval (bars) and over training, and training tokens/s. Returns out_png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(_label(p), *read_metrics(p)) for p in metrics_jsonl_paths]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax_loss, ax_bar, ax_acc, ax_speed = axes.flat
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    for i, (name, train, evals) in enumerate(runs):
        c = colors[i % len(colors)]
        for key, style in (("ar_loss", "-"), ("diff_loss", "--")):
            pts = [(r["tokens"], r[key]) for r in train if key in r]
            if pts:
                ax_loss.plot([t for t, _ in pts], _ema([v for _, v in pts]), style, color=c, alpha=0.6, lw=1,
                             label=f"{name} train {key[:-5]}")
            pts = [(r["tokens"], r["val_" + key]) for r in evals if "val_" + key in r]
            if pts:
                ax_loss.plot([t for t, _ in pts], [v for _, v in pts], style, color=c, marker="o", ms=3, lw=2,
                             label=f"{name} val {key[:-5]}")
        speed = [(r["step"], r["tokens_per_s"]) for r in train if "tokens_per_s" in r]
        if speed:
            ax_speed.plot([s for s, _ in speed], _ema([v for _, v in speed]), color=c, label=name)

    # draft accuracy by offset at the last eval: vs AR argmax (what acceptance checks) and vs data
    width = 0.8 / max(1, 2 * len(runs))
    slot = 0
    n_offsets = 0
    for i, (name, _, evals) in enumerate(runs):
        c = colors[i % len(colors)]
        last = next((r for r in reversed(evals) if "val_acc_data" in r), None)
        if last is None:
            continue
        for key, hatch in (("val_acc_ar", ""), ("val_acc_data", "//")):
            if key not in last:
                continue
            acc = last[key]
            xs = [j - 0.4 + width * (slot + 0.5) for j in range(len(acc))]
            ax_bar.bar(xs, acc, width, color=c, hatch=hatch, alpha=0.8 if hatch == "" else 0.45,
                       label=f"{name} vs {'AR argmax' if key == 'val_acc_ar' else 'data'} (step {last['step']})")
            slot += 1
        # over training: one line per offset, vs AR argmax when available
        key = "val_acc_ar" if any("val_acc_ar" in r for r in evals) else "val_acc_data"
        pts = [r for r in evals if key in r]
        vs = "AR argmax" if key == "val_acc_ar" else "data"
        for j in range(len(pts[0][key]) if pts else 0):
            ax_acc.plot([r["tokens"] for r in pts], [r[key][j] for r in pts], color=c,
                        alpha=1.0 - 0.6 * j / max(1, len(pts[0][key])), marker=".",
                        label=f"{name} offset {j} (vs {vs})")
        n_offsets = max(n_offsets, len(last.get("val_acc_data", [])))

    ax_loss.set(title="loss (train: EMA, val: markers)", xlabel="training tokens", ylabel="cross-entropy")
    ax_bar.set(title="draft accuracy by offset (last eval)", xlabel="offset in block", ylabel="accuracy",
               ylim=(0, 1))
    if n_offsets:
        ax_bar.set_xticks(range(n_offsets))
    ax_acc.set(title="draft accuracy by offset over training", xlabel="training tokens", ylabel="accuracy",
               ylim=(0, 1))
    ax_speed.set(title="training speed", xlabel="step", ylabel="tokens/s (EMA)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def main(argv: Sequence[str] | None = None) -> int:
    """`tidar plot RUN_DIR... --out file.png`."""
    p = argparse.ArgumentParser(prog="tidar plot", description="Plot training metrics of one or more runs.")
    p.add_argument("runs", nargs="+", help="run directories (or their metrics.jsonl files)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/metrics.png of the first run)")
    args = p.parse_args(argv)
    out = args.out or str(_metrics_file(args.runs[0]).parent / "metrics.png")
    try:
        path = plot_metrics(args.runs, out)
    except (FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
