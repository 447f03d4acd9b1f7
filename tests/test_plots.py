"""Learning-curve PNGs: the library functions and scripts/plot_metrics.py, on fake metrics."""

import math

import pytest

from charlstm_jax.metrics import read_metrics
from charlstm_jax.plots import LEARNING_CURVE_PNG, plot_learning_curves, plot_run
from tests.conftest import run_script

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(workdir, start_loss):
    """A two-epoch run's metrics.csv, four validations an epoch, the loss falling."""
    workdir.mkdir(parents=True)
    lines = ["Epoch,Run,Step,TrainLoss,ValidationLoss,TrainBPC,ValidationBPC"]
    for epoch in (1, 2):
        for run in range(1, 5):
            step = (epoch - 1) * 40 + run * 10
            train, valid = start_loss / (1 + step / 30), start_loss / (1 + step / 40) + 0.1
            lines.append(
                f"{epoch},{run},{step},{train},{valid},{train / math.log(2)},{valid / math.log(2)}"
            )
    (workdir / "metrics.csv").write_text("\n".join(lines) + "\n")
    return workdir


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert 10_000 < len(data) < 2_000_000  # a real drawing, not an empty canvas or a dump


def _plot_cli(*args, cwd):
    return run_script("plot_metrics.py", *args, cwd=cwd, timeout=120)


def test_plot_run_writes_the_png_atomically_and_skips_an_empty_run(tmp_path):
    workdir = _fake_run(tmp_path / "a", 4.0)
    assert plot_run(workdir) == workdir / LEARNING_CURVE_PNG
    _assert_png(workdir / LEARNING_CURVE_PNG)
    assert sorted(p.name for p in workdir.iterdir()) == ["learning_curve.png", "metrics.csv"]

    (tmp_path / "empty").mkdir()
    assert plot_run(tmp_path / "empty") is None
    assert not list((tmp_path / "empty").iterdir())


def test_plot_learning_curves_overlays_runs(tmp_path):
    runs = {
        name: read_metrics(_fake_run(tmp_path / name, loss)) for name, loss in [("a", 4), ("b", 3)]
    }
    out = plot_learning_curves(runs, tmp_path / "both.png")
    _assert_png(out)
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_draws_one_run_into_its_workdir_and_several_here(tmp_path):
    a, b = _fake_run(tmp_path / "a", 4.0), _fake_run(tmp_path / "b", 3.0)
    done = _plot_cli(f"--workdirs={a}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    _assert_png(a / LEARNING_CURVE_PNG)

    done = _plot_cli(f"--workdirs={a},{b}", "--labels=big,small", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    _assert_png(tmp_path / "learning_curves.png")

    done = _plot_cli(f"--workdirs={a},{b}", f"--out={tmp_path / 'out' / 'x.png'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    _assert_png(tmp_path / "out" / "x.png")


@pytest.mark.parametrize("empty", [False, True])
def test_cli_refuses_a_run_without_metrics_in_one_line(tmp_path, empty):
    a = _fake_run(tmp_path / "a", 4.0)
    missing = tmp_path / "missing"
    if empty:
        missing.mkdir()
        (missing / "metrics.csv").write_text("Epoch,Run,Step\n")
    done = _plot_cli(f"--workdirs={a},{missing}", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {missing / 'metrics.csv'} is missing or has no rows")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "learning_curves.png").exists()
