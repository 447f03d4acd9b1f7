"""Learning curves as a PNG: training and validation loss against step, epochs marked.

Drawn on a bare `matplotlib.figure.Figure` (the Agg renderer, no pyplot and no global state), so
it is safe inside training and on machines without a display. matplotlib is imported when a
picture is first drawn (about 0.4 s), not with this module, so that the scripts that never draw
one (sampling, evaluation) start without it.
"""

import math
import os
from pathlib import Path

from charlstm_jax.metrics import read_metrics

LEARNING_CURVE_PNG = "learning_curve.png"


def _epoch_ends(rows: list[dict]) -> list[tuple[int, int]]:
    """(epoch, step) of each epoch's last row: where one epoch ends."""
    last_step = {}
    for row in rows:
        last_step[row["Epoch"]] = row["Step"]
    return sorted(last_step.items())


def plot_learning_curves(runs: dict[str, list[dict]], path: str | Path) -> Path:
    """Draw each run's train (dashed) and validation (solid) loss against step into `path`.

    `runs` maps a label to a run's `metrics.csv` rows (`read_metrics`). Losses are in nats per
    character on the left axis, bits per character on the right; dotted lines mark epoch ends
    and a dot the best validation loss. The PNG is replaced atomically: a process killed while
    drawing leaves the previous picture, never half of one.
    """
    from matplotlib.figure import Figure  # here, not at the top: see the module docstring

    path = Path(path)
    figure = Figure(figsize=(9, 5), layout="constrained")
    axes = figure.add_subplot()
    for index, (label, rows) in enumerate(runs.items()):
        colour = f"C{index % 10}"  # matplotlib's default cycle of ten colours
        steps = [row["Step"] for row in rows]
        axes.plot(steps, [row["ValidationLoss"] for row in rows], color=colour, label=label)
        axes.plot(
            steps,
            [row["TrainLoss"] for row in rows],
            color=colour,
            linestyle="--",
            linewidth=0.8,
            alpha=0.8,
        )
        for epoch, step in _epoch_ends(rows):
            axes.axvline(step, color=colour, linestyle=":", linewidth=0.8, alpha=0.6)
            if len(runs) == 1:  # epoch numbers only where they cannot be confused
                axes.annotate(
                    f"epoch {epoch}",
                    (step, 1),
                    xycoords=("data", "axes fraction"),
                    xytext=(-2, -2),
                    textcoords="offset points",
                    ha="right",
                    va="top",
                    fontsize=7,
                    color="0.4",
                )
        best = min(rows, key=lambda row: row["ValidationLoss"])
        axes.plot(best["Step"], best["ValidationLoss"], "o", color=colour, markersize=6)
        axes.annotate(
            f"{best['ValidationLoss']:.3f}",
            (best["Step"], best["ValidationLoss"]),
            xytext=(0, -12),
            textcoords="offset points",
            ha="center",
            fontsize=8,
            color=colour,
        )
    # Legend: one entry per run (its colour), plus what the line styles mean.
    axes.plot([], [], color="0.3", label="validation")
    axes.plot([], [], color="0.3", linestyle="--", linewidth=0.8, label="train")
    axes.plot([], [], color="0.3", linestyle=":", linewidth=0.8, label="epoch end")
    axes.plot([], [], "o", color="0.3", label="best validation")
    axes.legend(fontsize=8)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per character)")
    axes.secondary_yaxis(
        "right", functions=(lambda nats: nats / math.log(2), lambda bits: bits * math.log(2))
    ).set_ylabel("bits per character")
    axes.set_title("Learning curve" if len(runs) == 1 else "Learning curves")
    axes.grid(alpha=0.3)

    path.parent.mkdir(parents=True, exist_ok=True)
    # The process id keeps a trainer and a plotting script from sharing the temporary file.
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        figure.savefig(tmp_path, format="png", dpi=120)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def plot_run(workdir: str | Path) -> Path | None:
    """Rewrite `<workdir>/learning_curve.png` from its `metrics.csv`; None when it has no rows."""
    rows = read_metrics(workdir)
    if not rows:
        return None
    return plot_learning_curves({Path(workdir).name: rows}, Path(workdir) / LEARNING_CURVE_PNG)
