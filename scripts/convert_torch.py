"""Import a checkpoint of the PyTorch reference into a run directory that sampling reads:

    python scripts/convert_torch.py --checkpoint model_7.pt --workdir runs/from_torch

The file is read with torch's weights-only unpickler (no code from it runs) and the reference's
character ids are mapped onto our sorted vocabulary. Needs torch (`pip install torch`).
"""

import importlib.util

from absl import app, flags, logging

from charlstm_jax.cli import main_wrapper
from charlstm_jax.errors import UserError

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A .pt file written by the reference's training script.", required=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to write.", required=True)


@main_wrapper
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if importlib.util.find_spec("torch") is None:
        raise UserError(
            "Converting a PyTorch checkpoint needs torch: pip install torch (CPU is enough)."
        )
    from charlstm_jax.convert import convert_checkpoint

    summary = convert_checkpoint(_CHECKPOINT.value, _WORKDIR.value)
    logging.info(
        "Done: epoch %d of the reference is in %s; sample it with: python scripts/sample.py "
        "--workdir %s",
        summary["epoch"],
        summary["workdir"],
        summary["workdir"],
    )


if __name__ == "__main__":
    app.run(main)
