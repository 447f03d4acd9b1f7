"""Train a character-level LSTM: python scripts/train.py --config configs/animal_farm.py

The run directory (--workdir, default runs/<config name>) gets per-epoch checkpoints,
metrics.csv and TensorBoard events; running the same command again resumes the run.
"""

import shlex
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from charlstm_jax import parallel
from charlstm_jax.cli import main_wrapper
from charlstm_jax.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/animal_farm.py", "Training configuration file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; default runs/<config name>.")
# Multi-process runs (see README, Scale out); the environment may give them instead.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a multi-process run."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's number, from 0.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-process run that JAX finds itself (TPU pod, Slurm)."
)


@main_wrapper
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    parallel.initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value
    )
    if not parallel.is_primary():  # process 0 speaks for the run
        logging.set_verbosity(logging.WARNING)
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
