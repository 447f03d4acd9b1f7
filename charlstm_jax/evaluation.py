"""Loss, bits per character and perplexity of a checkpoint on a text.

By default the text is the run's own validation tail, cut into the same streams and windows as
during training, so the figure equals the run's validation loss; any other text is cut the same
way (`validation_rows` streams of the run's window, the carry threaded through).
"""

import math
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from charlstm_jax import data
from charlstm_jax.checkpoint import LoadedCheckpoint
from charlstm_jax.errors import UserError
from charlstm_jax.train import evaluate


class Score(NamedTuple):
    """How well a model predicts a text: mean cross-entropy and what follows from it."""

    loss: float  # nats per character
    characters: int  # characters scored (whole windows only, as in training)

    @property
    def bits_per_char(self) -> float:
        return self.loss / math.log(2)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def validation_text(meta: dict) -> str:
    """The validation tail of the text a checkpoint was trained on (checked by its sha256)."""
    path = meta.get("corpus_path")
    if not path or not Path(path).is_file():
        raise UserError(
            f"The run's text is not at {path!r} any more; pass --text with a file to evaluate on."
        )
    if meta.get("corpus_sha256") and data.file_sha256(path) != meta["corpus_sha256"]:
        raise UserError(
            f"{path} is not the text the model was trained on (its sha256 differs); pass --text "
            "with a file to evaluate on."
        )
    text = data.read_text(path)
    _, tail = data.split_train_validation(text, meta["config"]["validation_split"])
    return tail


def text_windows(text: str, vocab: data.Vocab, config: dict, drop_unknown: bool = False):
    """`(inputs, targets)`, each `[N, rows, window]`: `text` as training cuts validation."""
    missing = vocab.missing(text)
    if missing and not drop_unknown:
        raise UserError(
            f"The text has characters the model never saw: {''.join(missing)!r}; remove them "
            "or pass --drop_unknown to leave them out."
        )
    ids = vocab.encode("".join(c for c in text if c in vocab))
    window = config["window"]
    if len(ids) < window + 1:
        raise UserError(
            f"The text has {len(ids)} usable characters, fewer than one window of {window} plus "
            "one: give a longer text."
        )
    rows = data.validation_rows(len(ids), config["batch_size"], window)
    return data.stream_batches(ids, rows, window)


_evaluate = jax.jit(evaluate, static_argnums=0)


def score(loaded: LoadedCheckpoint, inputs: np.ndarray, targets: np.ndarray) -> Score:
    """The checkpoint's mean loss over every window, in evaluation mode (no dropout)."""
    carry = loaded.model.initialize_carry(inputs.shape[1])
    loss = _evaluate(loaded.model.apply, loaded.params, inputs, targets, carry)
    return Score(float(loss), int(inputs.size))
