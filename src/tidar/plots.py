"""PNG plots for `tidar bench` reports, `tidar profile` latency profiles and `make demo`.

matplotlib is imported lazily with the Agg backend so this works on headless machines and the
CLI stays quick to start.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        written.append(out / fname)
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
        fig.tight_layout()
        fig.savefig(out / "acceptance.png", dpi=120)
        plt.close(fig)
        written.append(out / "acceptance.png")
    if profile is not None:
        step = (report.get("config") or {}).get("tidar_step_tokens")
        written.append(plot_latency_profile(profile, out / "latency.png", operating_tokens=step))
    return written


def plot_latency_profile(profile: dict[str, Any], png_path: str | Path, operating_tokens: int | None = None) -> Path:
    """Forward latency (ms) vs new tokens per forward, from `tidar profile --json`. Marked: the AR
    step (T=1), the operating point `tidar profile --choose` picked (if the profile has one) and the
    benchmarked TiDAR step (`operating_tokens`, if given and different)."""
    from tidar.profile import interpolate

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
        marks.append((int(best["tokens"]), f"chosen: b={best.get('block_size')} {best.get('policy')}", "tab:red", "*"))
    if operating_tokens and all(t != operating_tokens for t, *_ in marks):
        marks.append((operating_tokens, "benchmarked TiDAR step", "tab:orange", "D"))
    for t, label, color, marker in marks:
        y = interpolate(lat, t) * 1e3
        ax.axvline(t, color=color, ls="--", lw=1)
        ax.plot([t], [y], marker, color=color, ms=11 if marker == "*" else 7,
                label=f"{label} (T={t}, {y / ar_ms:.2f}x an AR step)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def plot_demo(rows: Sequence[dict[str, Any]], png_path: str | Path) -> Path:
    """`make demo`: tokens/s of TiDAR vs AR per prompt, and tokens per forward, side by side.

    rows: [{"prompt", "matches_ar", "tidar": stats, "ar": stats, "speedup_vs_ar"}], stats as in
    GenerationStats.as_dict().
    """
    plt = _pyplot()
    names = [str(r["prompt"]) for r in rows]
    x = list(range(len(rows)))
    w = 0.38
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(7.0, 2.2 * len(rows) + 3), 3.8))
    ti = [r["tidar"]["tokens_per_s"] for r in rows]
    ar = [r["ar"]["tokens_per_s"] for r in rows]
    ax1.bar([i - w / 2 for i in x], ar, w, label="AR", color="tab:blue")
    ax1.bar([i + w / 2 for i in x], ti, w, label="TiDAR", color="tab:orange")
    for i, r in enumerate(rows):
        label = f"{r.get('speedup_vs_ar', 0.0):.2f}x" + ("" if r.get("matches_ar", True) else " (differs)")
        ax1.annotate(label, (i, max(ti[i], ar[i])), ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(x, names)
    ax1.set_ylabel("generated tokens / s")
    ax1.set_title("speed (same prompts, same process)", fontsize=9)
    ax1.legend(fontsize=8)
    ax1.margins(y=0.15)
    ax2.bar([i - w / 2 for i in x], [r["ar"]["tokens_per_forward"] for r in rows], w, label="AR", color="tab:blue")
    ax2.bar([i + w / 2 for i in x], [r["tidar"]["tokens_per_forward"] for r in rows], w, label="TiDAR",
            color="tab:orange")
    ax2.set_xticks(x, names)
    ax2.set_ylabel("tokens / forward")
    ax2.set_title("tokens committed per model forward", fontsize=9)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
