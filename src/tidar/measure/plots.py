"""PNG plots of what was measured: `tidar bench` reports, `tidar profile` latency profiles,
`make demo`, and training runs (`tidar plot RUN_DIR... --out file.png`, from metrics.jsonl).

matplotlib is imported lazily with the Agg backend so this works on headless machines and the
CLI stays quick to start.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def _bars(ax: Any, names: Sequence[str], values: Sequence[float | None], ylabel: str, title: str,
          highlight: str | None = None) -> None:
    shown = [v if v is not None else 0.0 for v in values]
    colors = ["tab:orange" if n == highlight else "tab:blue" for n in names]
    bars = ax.bar(range(len(names)), shown, color=colors)
    for bar, v in zip(bars, values, strict=True):
        ax.annotate("n/a" if v is None else f"{v:.2f}" if v < 10 else f"{v:.1f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def _subtitle(report: dict[str, Any]) -> str:
    model = Path(str(report.get("model", ""))).name
    return (f"{model}, {report.get('dtype')}, {report.get('threads')} threads, {report.get('prompts')} prompts "
            f"({report.get('source')}), {report.get('max_new_tokens')} new tokens")


def plot_bench(report: dict[str, Any], out_dir: str | Path, profile: dict[str, Any] | None = None) -> list[Path]:
    """tokens/s and tokens/forward per method, TiDAR's acceptance histogram, and (with a profile)
    latency vs new tokens with the benchmarked operating point marked. Returns the PNG paths."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = report["methods"]
    names = list(methods)
    written = []
    for key, ylabel, fname in (("tokens_per_s", "generated tokens / s", "tokens_per_s.png"),
                               ("tokens_per_forward", "tokens / forward", "tokens_per_forward.png")):
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 2), 3.6))
        _bars(ax, names, [methods[n].get(key) for n in names], ylabel, _subtitle(report), highlight="tidar")
        ax.title.set_fontsize(8)
        written.append(_save(fig, out / fname))
    hist = (methods.get("tidar") or {}).get("acceptance_histogram")
    if hist:
        fig, ax = plt.subplots(figsize=(4.5, 3.4))
        total = sum(hist) or 1
        ax.bar(range(1, len(hist) + 1), [c / total for c in hist], color="tab:orange")
        ax.set_xticks(range(1, len(hist) + 1))
        ax.set_xlabel("accepted tokens per step (a)")
        ax.set_ylabel("fraction of steps")
        mean = methods["tidar"].get("mean_acceptance")
        ax.set_title(f"TiDAR acceptance length (mean {mean:.2f})" if mean else "TiDAR acceptance length")
        written.append(_save(fig, out / "acceptance.png"))
    if profile is not None:
        # the rows TiDAR's forwards actually fed, where measured (prompt-lookup spans lengthen steps)
        step = (methods.get("tidar") or {}).get("query_tokens_per_forward") or \
            (report.get("config") or {}).get("tidar_step_tokens")
        written.append(plot_latency_profile(profile, out / "latency.png", operating_tokens=step))
    return written


def plot_latency_profile(profile: dict[str, Any], png_path: str | Path, operating_tokens: float | None = None) -> Path:
    """Forward latency (ms) vs new tokens per forward, from `tidar profile --json`. Marked: the AR
    step (T=1), the operating point `tidar profile --choose` picked (if the profile has one) and the
    benchmarked TiDAR step (`operating_tokens`, if given and different)."""
    from tidar.measure.profile import interpolate

    plt = _pyplot()
    lat = {int(k): float(v) for k, v in profile["latency_s"].items()}
    xs = sorted(lat)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(xs, [lat[x] * 1e3 for x in xs], marker="o", ms=3, label="forward latency")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("new tokens in one forward (T)")
    ax.set_ylabel("ms per forward")
    ax.set_title(f"latency vs new tokens: {profile.get('dtype')}, {profile.get('threads')} threads, "
                 f"prefix {profile.get('prefix')}", fontsize=9)
    if 1 in lat:
        ax.plot([1], [lat[1] * 1e3], "s", color="tab:gray", label="AR step (T=1)")
    ar_ms = interpolate(lat, 1) * 1e3
    marks = []
    best = (profile.get("choice") or {}).get("best")
    if best and best.get("tokens"):
        marks.append((best["tokens"], f"chosen: b={best.get('block_size')} {best.get('policy')}", "tab:red", "*"))
    if operating_tokens and all(t != operating_tokens for t, *_ in marks):
        marks.append((operating_tokens, "benchmarked TiDAR step", "tab:orange", "D"))
    for t, label, color, marker in marks:
        y = interpolate(lat, t) * 1e3
        ax.axvline(t, color=color, ls="--", lw=1)
        ax.plot([t], [y], marker, color=color, ms=11 if marker == "*" else 7,
                label=f"{label} (T={t:.3g}, {y / ar_ms:.2f}x an AR step)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, png_path, dpi=120)


def plot_demo(rows: Sequence[dict[str, Any]], png_path: str | Path) -> Path:
    """`make demo`: tokens/s per prompt and tokens per forward, side by side, of AR, TiDAR's shipped
    mix (diffusion + copy drafts) and, where the rows have it, TiDAR with diffusion drafts only (the
    paper's TiDAR). A TiDAR bar is labelled with its speedup over AR, and "(differs)" when its output
    was not AR's.

    rows: [{"prompt", "matches_ar", "tidar": stats, "ar": stats, "speedup_vs_ar"}], optionally with
    "tidar_diffusion": stats, "diffusion_speedup_vs_ar" and "diffusion_matches_ar" (demo.json files
    written before `make demo` measured diffusion drafts alone lack them); stats as in
    GenerationStats.as_dict().
    """
    plt = _pyplot()
    # (label, stats key, speedup key, exactness key, color)
    series = [("AR", "ar", None, None, "tab:blue"),
              ("TiDAR, shipped mix", "tidar", "speedup_vs_ar", "matches_ar", "tab:orange")]
    if any("tidar_diffusion" in r for r in rows):
        series.append(("TiDAR, diffusion drafts only", "tidar_diffusion", "diffusion_speedup_vs_ar",
                       "diffusion_matches_ar", "tab:green"))
    names = [str(r["prompt"]) for r in rows]
    x = list(range(len(rows)))
    w = 0.8 / len(series)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(7.0, 0.75 * len(series) * len(rows) + 3), 3.8))
    for j, (label, key, speedup, matches, color) in enumerate(series):
        at = [i + (j - (len(series) - 1) / 2) * w for i in x]
        tps = [r[key]["tokens_per_s"] if key in r else 0.0 for r in rows]
        ax1.bar(at, tps, w, label=label, color=color)
        ax2.bar(at, [r[key]["tokens_per_forward"] if key in r else 0.0 for r in rows], w, label=label, color=color)
        for i, r in enumerate(rows):
            if speedup and key in r:
                note = f"{r.get(speedup, 0.0):.2f}x" + ("" if r.get(matches, True) else "\n(differs)")
                ax1.annotate(note, (at[i], tps[i]), ha="center", va="bottom", fontsize=7)
    ax1.set_ylabel("generated tokens / s")
    ax1.set_title("speed (same prompts, same process)", fontsize=9)
    ax1.margins(y=0.15)
    ax2.set_ylabel("tokens / forward")
    ax2.set_title("tokens committed per model forward", fontsize=9)
    for ax in (ax1, ax2):
        ax.set_xticks(x, names)
        ax.legend(fontsize=7)
    return _save(fig, png_path, dpi=120)


# -- training runs ---------------------------------------------------------------------------------
def _metrics_file(path: str | Path) -> Path:
    path = Path(path)
    return path / "metrics.jsonl" if path.is_dir() else path


class MetricsError(ValueError):
    """A metrics.jsonl that is not what `tidar train` writes."""


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, eval records) of one run directory or metrics.jsonl file."""
    f = _metrics_file(path)
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found (give a run directory made by `tidar train`)")
    train, evals = [], []
    for n, line in enumerate(f.read_text().splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise MetricsError(f"{f} line {n} is not JSON: {e.msg}") from None
            if not isinstance(rec, dict):
                raise MetricsError(f"{f} line {n} is not a JSON object")
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


def plot_metrics(metrics_jsonl_paths: Sequence[str | Path], out_png: str | Path | None = None) -> Path:
    """One figure for one or more runs (directories or metrics.jsonl files): train/val AR and
    diffusion losses vs tokens, draft accuracy by offset at the last eval (bars) and over training,
    and training tokens/s. Returns out_png (default: metrics.png next to the first run's metrics)."""
    plt = _pyplot()
    runs = [(_label(p), *read_metrics(p)) for p in metrics_jsonl_paths]
    out_png = out_png if out_png is not None else _metrics_file(metrics_jsonl_paths[0]).parent / "metrics.png"
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax_loss, ax_bar, ax_acc, ax_speed = axes.flat
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    for i, (name, train, evals) in enumerate(runs):
        c = colors[i % len(colors)]
        for key, style in (("ar_loss", "-"), ("diff_loss", "--")):
            pts = [(r["tokens"], r[key]) for r in train if key in r]
            if pts:
                ax_loss.plot([t for t, _ in pts], _ema([v for _, v in pts]), style, color=c, alpha=0.6, lw=1,
                             label=f"{name} train {key[:-5]}" + (" (its targets)" if key == "diff_loss" else ""))
            pts = [(r["tokens"], r["val_" + key]) for r in evals if "val_" + key in r]
            if pts:
                ax_loss.plot([t for t, _ in pts], [v for _, v in pts], style, color=c, marker="o", ms=3, lw=2,
                             label=f"{name} val {key[:-5]}" + (" (vs data)" if key == "diff_loss" else ""))
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

    ax_loss.set(title="loss (train: EMA, val: markers)", xlabel="training tokens", ylabel="loss")
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
    return _save(fig, out_png, dpi=110)

