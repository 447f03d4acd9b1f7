"""The run's metrics on disk: `metrics.csv` (the reference's table) and TensorBoard scalars."""

import csv
import math
import sys
from pathlib import Path

COLUMNS = ("Epoch", "Run", "Step", "TrainLoss", "ValidationLoss", "TrainBPC", "ValidationBPC")
METRICS_CSV = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


def bits_per_char(loss_nats: float) -> float:
    """Cross-entropy in nats per character as bits per character."""
    return loss_nats / math.log(2)


def _summary_writer_class():
    """tensorboardX's `SummaryWriter`, imported without torch unless torch is loaded already.

    tensorboardX imports torch, when it is installed, only to accept its tensors: 1.7 s of a
    training run's start-up for nothing here. A `None` in `sys.modules` makes that import fail,
    which tensorboardX handles.
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def read_metrics(workdir: str | Path) -> list[dict]:
    """The rows of a run's `metrics.csv`, numbers parsed; empty when there is none.

    A row cut short (by a process killed while writing it) is left out.
    """
    path = Path(workdir) / METRICS_CSV
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    ints = {"Epoch", "Run", "Step"}
    parsed = []
    for row in rows:
        try:
            parsed.append({k: int(v) if k in ints else float(v) for k, v in row.items()})
        except (TypeError, ValueError):
            continue
    return parsed


class MetricsWriter:
    """Appends validation rows to `metrics.csv` and TensorBoard as the run goes.

    On resume from global step `resume_step`, rows logged after it (by a run that died before
    its next checkpoint) are dropped, so the table reads as if the run had never stopped.
    """

    def __init__(self, workdir: str | Path, resume_step: int = 0):
        summary_writer = _summary_writer_class()
        workdir = Path(workdir)
        self._csv_path = workdir / METRICS_CSV
        kept = [row for row in read_metrics(workdir) if row["Step"] <= resume_step]
        # Rewritten through a temporary file: a process killed here keeps the old rows.
        tmp_path = self._csv_path.with_name(METRICS_CSV + ".tmp")
        with open(tmp_path, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(kept)
        tmp_path.replace(self._csv_path)
        # TensorBoard hides the events a dead run logged after `resume_step` (a fresh run too:
        # one killed before its first checkpoint may have logged some).
        self._tensorboard = summary_writer(
            str(workdir / TENSORBOARD_DIR), purge_step=resume_step + 1
        )

    def write(self, epoch: int, run: int, step: int, train_loss: float, valid_loss: float):
        """Record one validation point (losses in nats per character)."""
        row = {
            "Epoch": epoch,
            "Run": run,
            "Step": step,
            "TrainLoss": train_loss,
            "ValidationLoss": valid_loss,
            "TrainBPC": bits_per_char(train_loss),
            "ValidationBPC": bits_per_char(valid_loss),
        }
        with open(self._csv_path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerow(row)
        scalars = {
            "Loss/train": train_loss,
            "Loss/valid": valid_loss,
            "BPC/train": row["TrainBPC"],
            "BPC/valid": row["ValidationBPC"],
        }
        for name, value in scalars.items():
            self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()
        return row

    def write_speed(self, step: int, chars_per_second: float) -> None:
        """Record training speed (characters per second) at `step`."""
        self._tensorboard.add_scalar("Speed/chars_per_second", chars_per_second, step)

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        self._tensorboard.close()


class NoMetrics:
    """The `MetricsWriter` of processes other than the first: only process 0 writes metrics."""

    def write(self, *args) -> None:
        pass

    def write_speed(self, *args) -> None:
        pass

    def close(self) -> None:
        pass
