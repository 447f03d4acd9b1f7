"""Train a character-level LSTM: python scripts/train.py --config configs/animal_farm.py

The run directory (--workdir, default runs/<config name>) gets per-epoch checkpoints,
metrics.csv and TensorBoard events; running the same command again resumes the run.
"""

import shlex
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from charlstm_jax.cli import main_wrapper
from charlstm_jax.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/animal_farm.py", "Training configuration file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; default runs/<config name>.")


@main_wrapper
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    workdir = _WORKDIR.value or str(Path("runs") / Path(config_file).stem)
    logging.info("Run directory: %s", workdir)
    summary = train_and_evaluate(_CONFIG.value, workdir)
    if summary["interrupted"]:
        command = " ".join(shlex.quote(arg) for arg in [sys.executable, *sys.argv])
        logging.warning("To resume, run the same command again: %s", command)
    elif summary["valid_loss"] is not None:
        logging.info(
            "Done: epoch %d, step %d, validation loss %.4f; checkpoints in %s/checkpoints.",
            summary["epoch"],
            summary["step"],
            summary["valid_loss"],
            workdir,
        )


if __name__ == "__main__":
    app.run(main)
