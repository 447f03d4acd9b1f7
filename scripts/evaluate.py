"""Score a checkpoint on a text: python scripts/evaluate.py --workdir runs/animal_farm

Prints the mean cross-entropy (nats per character), bits per character and perplexity. The text
is the run's validation tail by default (the figure equals the run's validation loss) or any
UTF-8 file given with `--text`; `--epoch all` prints a row per epoch.
"""

from absl import app, flags

from charlstm_jax import checkpoint, data, evaluation
from charlstm_jax.cli import main_wrapper

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory, or one epoch's checkpoint directory.", required=True
)
_EPOCH = flags.DEFINE_string("epoch", "final", "Epoch number, 'final', 'best' or 'all'.")
_TEXT = flags.DEFINE_string("text", None, "A UTF-8 text file; default: the run's validation tail.")
_DROP_UNKNOWN = flags.DEFINE_bool(
    "drop_unknown", False, "Leave out characters the model never saw instead of failing."
)


@main_wrapper
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    epochs = checkpoint.select_epochs(_WORKDIR.value, _EPOCH.value)
    text = data.read_text(_TEXT.value) if _TEXT.value else None
    header = ("epoch", "characters", "loss (nats)", "bits/char", "perplexity")
    windows = None
    for epoch in epochs:
        loaded = checkpoint.load_checkpoint(_WORKDIR.value, epoch)
        if windows is None:  # every epoch of a run shares its vocabulary and windows
            source = text if text is not None else evaluation.validation_text(loaded.meta)
            config = loaded.meta["config"]
            windows = evaluation.text_windows(source, loaded.vocab, config, _DROP_UNKNOWN.value)
            print("{:>5}  {:>10}  {:>11}  {:>9}  {:>10}".format(*header))
        result = evaluation.score(loaded, *windows)
        print(
            f"{loaded.epoch:>5}  {result.characters:>10}  {result.loss:>11.4f}  "
            f"{result.bits_per_char:>9.4f}  {result.perplexity:>10.3f}",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
