"""`tidar plot`: one figure of one or more training runs, written where --out says."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib", reason="plots need matplotlib")

from tidar.cli.plot import main  # noqa: E402
from tidar.measure import plots  # noqa: E402


def write_run(run_dir, loss: float = 3.0):
    """A metrics.jsonl as `tidar train` writes it: train records and one eval."""
    run_dir.mkdir(parents=True)
    recs = [{"kind": "train", "step": s, "tokens": 100 * s, "ar_loss": loss - 0.1 * s, "diff_loss": loss + 1 - 0.1 * s,
             "tokens_per_s": 1000.0} for s in (1, 2, 3)]
    recs.append({"kind": "eval", "step": 3, "tokens": 300, "val_ar_loss": loss, "val_diff_loss": loss + 1,
                 "val_acc_data": [0.5, 0.3], "val_acc_ar": [0.6, 0.4]})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run_dir


@pytest.fixture
def figures(monkeypatch):
    """The legend labels of every figure saved."""
    saved = []
    real = plots._save

    def save(fig, path, dpi=120):
        saved.append([label for ax in fig.axes for label in ax.get_legend_handles_labels()[1]])
        return real(fig, path, dpi)

    monkeypatch.setattr(plots, "_save", save)
    return saved


def test_default_out_is_next_to_the_first_runs_metrics(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    assert main([str(run)]) == 0
    assert (run / "metrics.png").stat().st_size > 1000
    assert capsys.readouterr().out.strip() == f"wrote {run / 'metrics.png'}"
    (run / "metrics.png").unlink()
    assert main([str(run / "metrics.jsonl")]) == 0  # a metrics file is a run too
    assert (run / "metrics.png").exists()


def test_out_is_where_the_png_goes(tmp_path):
    run = write_run(tmp_path / "run")
    out = tmp_path / "figs" / "loss.png"
    assert main([str(run), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000 and not (run / "metrics.png").exists()


def test_several_runs_share_one_figure(tmp_path, figures):
    a, b = write_run(tmp_path / "run-a"), write_run(tmp_path / "run-b", loss=2.0)
    assert main([str(a), str(b), "--out", str(tmp_path / "both.png")]) == 0
    (labels,) = figures
    assert any(x.startswith("run-a ") for x in labels) and any(x.startswith("run-b ") for x in labels)
    assert not (a / "metrics.png").exists()


@pytest.mark.parametrize("metrics, fragment", [
    (None, "bad not found (give a run directory"),
    ('{"kind": "train"}\n{oops\n', "metrics.jsonl line 2 is not JSON"),
    ("[1, 2]\n", "metrics.jsonl line 1 is not a JSON object"),
])
def test_bad_runs_are_one_line_errors(tmp_path, capsys, metrics, fragment):
    """Every run is read: a bad second one fails the command, with its path in the message."""
    good, bad = write_run(tmp_path / "good"), tmp_path / "bad"
    if metrics is not None:
        write_run(bad)
        (bad / "metrics.jsonl").write_text(metrics)
    assert main([str(good), str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}") and fragment in err and len(err.splitlines()) == 1
    assert not (good / "metrics.png").exists()


def test_no_runs_is_a_usage_error(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err.strip()
    assert "the following arguments are required: RUN" in err and len(err.splitlines()) == 1
