"""Is a sample new writing or copied text? Its overlap with the training text.

A 3.3M-parameter model trained on 150K characters can memorise: these figures tell how much of
a sample appears verbatim in the text it learned from.
"""

import dataclasses
from pathlib import Path

from charlstm_jax import data
from charlstm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Novelty:
    """How much of a sample is copied from the training text."""

    longest_copy: str  # the longest substring of the sample found in the training text
    piece_length: int  # the length of the pieces counted below
    pieces: int  # the sample's pieces of `piece_length` characters (overlapping)
    copied_pieces: int  # how many of them occur in the training text

    @property
    def copied_share(self) -> float:
        """The share of the sample's pieces that occur in the training text (0 when none)."""
        return self.copied_pieces / self.pieces if self.pieces else 0.0

    def summary(self) -> str:
        """One line for a report."""
        return (
            f"longest copied substring: {len(self.longest_copy)} characters "
            f"({self.longest_copy!r}); {self.copied_share:.0%} of its {self.pieces} "
            f"{self.piece_length}-character pieces occur in the training text"
        )


def longest_copy(sample: str, text: str) -> str:
    """The longest substring of `sample` that occurs in `text`.

    Grows a match from each start while it still occurs (a copy found from start `i` is at
    least one character shorter from `i + 1`, so the search never shrinks below the best).
    """
    best = ""
    for start in range(len(sample)):
        length = len(best) + 1
        while start + length <= len(sample) and sample[start : start + length] in text:
            best = sample[start : start + length]
            length += 1
    return best


def novelty(sample: str, text: str, piece_length: int = 20) -> Novelty:
    """The sample's overlap with the training `text`: longest copy and share of copied pieces."""
    known = {text[i : i + piece_length] for i in range(len(text) - piece_length + 1)}
    pieces = [sample[i : i + piece_length] for i in range(len(sample) - piece_length + 1)]
    return Novelty(
        longest_copy=longest_copy(sample, text),
        piece_length=piece_length,
        pieces=len(pieces),
        copied_pieces=sum(piece in known for piece in pieces),
    )


def training_text(meta: dict, path: str | None = None) -> str:
    """The training part of the text a checkpoint was trained on (its validation tail left out).

    The text is read from `path`, else from where training found it, and must have the sha256
    kept in the checkpoint.
    """
    path = path or meta.get("corpus_path")
    if not path or not Path(path).is_file():
        raise UserError(
            f"The training text is not at {path!r}; pass --text with the file the model was "
            "trained on to measure novelty."
        )
    if meta.get("corpus_sha256") and data.file_sha256(path) != meta["corpus_sha256"]:
        raise UserError(
            f"{path} is not the text the model was trained on (its sha256 differs); pass --text "
            "with that file."
        )
    ids = list(data.read_text(path))
    train, _ = data.split_train_validation(ids, meta["config"]["validation_split"])
    return "".join(train)
