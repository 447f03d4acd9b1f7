"""Draw learning curves: python scripts/plot_metrics.py --workdirs runs/a,runs/b

One run is redrawn into its own <workdir>/learning_curve.png (what training writes after each
epoch); several runs are overlaid, one colour each, in learning_curves.png here (--out to choose).
"""

from pathlib import Path

from absl import app, flags, logging

from charlstm_jax.cli import main_wrapper
from charlstm_jax.errors import UserError
from charlstm_jax.metrics import METRICS_CSV, read_metrics
from charlstm_jax.plots import LEARNING_CURVE_PNG, plot_learning_curves

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Run directories, comma-separated.", required=True)
_LABELS = flags.DEFINE_list("labels", None, "A legend label per run; default the directory names.")
_OUT = flags.DEFINE_string(
    "out",
    None,
    "PNG to write; default <workdir>/learning_curve.png for one run, else "
    "learning_curves.png in the current directory.",
)


@main_wrapper
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    workdirs = _WORKDIRS.value
    labels = _LABELS.value or [Path(workdir).name or workdir for workdir in workdirs]
    if len(labels) != len(workdirs):
        raise UserError(
            f"--labels has {len(labels)} names for {len(workdirs)} --workdirs; give one per run."
        )
    if len(set(labels)) != len(labels):  # a dict keeps one run per label
        raise UserError("Two runs share a label; give --labels, one distinct name per run.")
    runs = {}
    for label, workdir in zip(labels, workdirs, strict=True):
        rows = read_metrics(workdir)
        if not rows:
            raise UserError(
                f"{Path(workdir) / METRICS_CSV} is missing or has no rows yet; check --workdirs "
                "or train there first (python scripts/train.py --workdir ...)."
            )
        runs[label] = rows
    if _OUT.value:
        out = Path(_OUT.value)
    elif len(workdirs) == 1:
        out = Path(workdirs[0]) / LEARNING_CURVE_PNG
    else:
        out = Path("learning_curves.png")
    plot_learning_curves(runs, out)
    logging.info("Wrote %s.", out)


if __name__ == "__main__":
    app.run(main)
