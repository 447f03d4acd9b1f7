"""Write new text from a checkpoint: python scripts/sample.py --workdir runs/animal_farm

`--epoch` picks a number, `final` (the last epoch saved), `best` (the lowest validation loss) or
`all` (one labelled sample from each epoch's own weights). The prompt is printed, then
`--length` new characters as they come.
"""

import sys

from absl import app, flags

from charlstm_jax import checkpoint, novelty, sampling
from charlstm_jax.cli import main_wrapper

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory, or one epoch's checkpoint directory.", required=True
)
_EPOCH = flags.DEFINE_string("epoch", "final", "Epoch number, 'final', 'best' or 'all'.")
_PROMPT = flags.DEFINE_string("prompt", "pigs", "Text to start from; empty starts a paragraph.")
_LENGTH = flags.DEFINE_integer("length", 1000, "New characters to write after the prompt.")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Draw among the k most likely characters; 1: greedy.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Divides the logits; < 1 is bolder.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus: keep the most likely up to this mass.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Streams drawn in one batched call.")
_RNG_SEED = flags.DEFINE_integer("rng_seed", 0, "Same seed, same text.")
_REPORT_NOVELTY = flags.DEFINE_bool(
    "report_novelty", False, "After each sample, how much of it is copied from the training text."
)
_TEXT = flags.DEFINE_string(
    "text", None, "The training text for --report_novelty; default: where training read it."
)
_DROP_UNKNOWN = flags.DEFINE_bool(
    "drop_unknown", False, "Leave out prompt characters the model never saw instead of failing."
)
_PRECISION = flags.DEFINE_enum(
    "precision",
    "float32",
    list(sampling.PRECISIONS),
    "bfloat16: LSTM products in bfloat16, faster on CPUs with bfloat16 instructions, GPUs, TPUs.",
)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@main_wrapper
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    options = dict(
        top_k=_TOP_K.value,
        temperature=_TEMPERATURE.value,
        top_p=_TOP_P.value,
        num_samples=_NUM_SAMPLES.value,
        rng_seed=_RNG_SEED.value,
        drop_unknown=_DROP_UNKNOWN.value,
        precision=_PRECISION.value,
    )
    epochs = checkpoint.select_epochs(_WORKDIR.value, _EPOCH.value)
    for epoch in epochs:
        loaded = checkpoint.load_checkpoint(_WORKDIR.value, epoch)
        sampling.check_options(
            len(loaded.vocab), _TOP_K.value, _TEMPERATURE.value, _TOP_P.value, _LENGTH.value
        )
        if len(epochs) > 1:
            _write(f"=== epoch {loaded.epoch} ===\n")
        chunks = sampling.sample_chunks(
            loaded.model, loaded.params, loaded.vocab, _PROMPT.value, _LENGTH.value, **options
        )
        train_text = None
        if _REPORT_NOVELTY.value:
            train_text = novelty.training_text(loaded.meta, _TEXT.value)
        streaming = _NUM_SAMPLES.value == 1  # one stream prints as it comes
        texts = ["" for _ in range(_NUM_SAMPLES.value)]
        if streaming:
            _write(_PROMPT.value)
        for pieces in chunks:
            if streaming:
                _write(pieces[0])
            texts = [t + p for t, p in zip(texts, pieces, strict=True)]
        if streaming:
            _write("\n")
        for i, text in enumerate(texts):
            if not streaming:
                _write(f"--- sample {i} ---\n{_PROMPT.value}{text}\n")
            if train_text is not None:
                _write(f"[novelty: {novelty.novelty(text, train_text).summary()}]\n")


if __name__ == "__main__":
    app.run(main)
