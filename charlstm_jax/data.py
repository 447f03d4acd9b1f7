"""Text -> vocabulary -> id streams -> stateful mini-batches (numpy only).

The batching is the reference's: the id sequence is cut into `batch_size` rows, each row walked
left to right in windows of `window` characters, so row `i` of batch `n + 1` continues row `i`
of batch `n` and the LSTM carry can flow from one batch into the next. Every target is the true
next character of the text.
"""

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from charlstm_jax.errors import UserError


class DataError(UserError):
    """The text cannot be used: missing, unreadable, not UTF-8, or too short."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A known public text: where it comes from and the sha256 of its bytes."""

    filename: str
    url: str
    sha256: str


_SOURCE = "https://raw.githubusercontent.com/kapilsh/ml-projects/master/rnn/data/"
CORPORA = {
    "animal_farm": Corpus(
        "animal_farm.txt",
        _SOURCE + "animal_farm.txt",
        "69c09b32507801cb4edff9d8435f8fb6444723e5169df7143182e7e53295b4c7",
    ),
    "1984": Corpus(
        "1984.txt",
        _SOURCE + "1984.txt",
        "57f323498176fc527dc051e55cd4d152161c2a354d024a7933857889731e46b7",
    ),
}


def file_sha256(path: str | Path) -> str:
    """The sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_corpus(name: str, data_dir: str | Path, corpus: Corpus | None = None) -> Path:
    """The path of known corpus `name` in `data_dir`, downloaded there first when missing.

    The file's sha256 must match the known one: a download that does not match is removed.
    `corpus` overrides the entry of `CORPORA` (tests serve it from a local server).
    """
    if corpus is None:
        if name not in CORPORA:
            raise DataError(
                f"Unknown corpus {name!r}; use one of {', '.join(sorted(CORPORA))} "
                "or set config.data_path to your own text file."
            )
        corpus = CORPORA[name]
    path = Path(data_dir) / corpus.filename
    if path.exists():
        found = file_sha256(path)
        if found != corpus.sha256:
            raise DataError(
                f"{path} has sha256 {found}, not the {corpus.sha256} of the known {name} "
                f"text; delete it to download the right one, or train on it with "
                f"--config.data_path={path}."
            )
        return path
    import pooch  # only needed to download

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        pooch.retrieve(
            corpus.url,
            known_hash=f"sha256:{corpus.sha256}",
            fname=corpus.filename,
            path=path.parent,
        )
    except ValueError as error:  # pooch's hash mismatch; it keeps no file
        path.unlink(missing_ok=True)
        raise DataError(
            f"The download of {corpus.url} did not match sha256 {corpus.sha256} and was "
            f"removed ({str(error).splitlines()[0]}); place the right file at {path}."
        ) from None
    except Exception as error:  # no network, HTTP error, refused connection
        raise DataError(
            f"Could not download {corpus.url} ({type(error).__name__}); without a network, "
            f"put {corpus.filename} (sha256 {corpus.sha256}) at {path} yourself."
        ) from None
    return path


def read_text(path: str | Path) -> str:
    """A UTF-8 text file read with universal newlines (CRLF and CR become LF)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"No text file at {path}: check the path (config.data_path).")
    try:
        raw = path.read_bytes()
    except OSError as error:  # no permission, an I/O error, a file gone meanwhile
        raise DataError(
            f"Cannot read {path} ({error.strerror or error}); check the file."
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not UTF-8 text: byte {raw[error.start : error.start + 1]!r} at byte "
            f"offset {error.start} is not valid UTF-8; convert the file to UTF-8 first."
        ) from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.startswith("\ufeff"):  # a byte-order mark is not part of the text
        text = text[1:]
    if not text:
        raise DataError(f"{path} is empty: give a text file with content to train on.")
    return text


class Vocab:
    """One id per character, ids in sorted character order (stable from run to run)."""

    def __init__(self, chars):
        self.chars = tuple(sorted(set(chars)))
        self._ids = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        """The vocabulary of every distinct character of `text`."""
        return cls(text)

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.chars == other.chars

    def __contains__(self, char: str) -> bool:
        return char in self._ids

    def missing(self, text: str) -> list[str]:
        """The distinct characters of `text` that have no id, in order of appearance."""
        return list(dict.fromkeys(c for c in text if c not in self._ids))

    def encode(self, text: str) -> np.ndarray:
        """Ids `[len(text)]` (int32); unknown characters raise `DataError`."""
        missing = self.missing(text)
        if missing:
            raise DataError(
                f"Characters not in the vocabulary: {''.join(missing)!r}; "
                "remove them from the text."
            )
        return np.fromiter((self._ids[c] for c in text), dtype=np.int32, count=len(text))

    def decode(self, ids) -> str:
        """The text of a sequence of ids."""
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))

    def to_json(self) -> str:
        """The vocabulary as a JSON list of characters."""
        return json.dumps(list(self.chars), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Vocab":
        """The vocabulary saved by `to_json`."""
        return cls(json.loads(text))

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON (UTF-8)."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        """Read a vocabulary written by `save`."""
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def split_train_validation(ids: np.ndarray, validation_split: float):
    """The first `1 - validation_split` of the ids train, the tail validates (as the reference)."""
    train_count = int(len(ids) * (1 - validation_split))
    return ids[:train_count], ids[train_count:]


def stream_batches(ids: np.ndarray, batch_size: int, window: int):
    """Stateful-stream batches: `(inputs, targets)`, each `[num_batches, batch_size, window]`.

    The ids are cut to the largest multiple of `batch_size * window` that still leaves one next
    character, laid out as `batch_size` rows, and cut into windows: `inputs[n, i]` is followed
    in the text by `inputs[n + 1, i]`, and `targets` are the inputs shifted by one character.
    """
    batch_length = batch_size * window
    num_batches = (len(ids) - 1) // batch_length
    if num_batches < 1:
        raise DataError(
            f"{len(ids)} characters make no batch: {batch_size} rows of {window} need at least "
            f"{batch_length + 1}; use a longer text or a smaller batch_size or window."
        )
    used = num_batches * batch_length

    def windows(seq):
        return seq.reshape(batch_size, num_batches, window).transpose(1, 0, 2)

    return windows(ids[:used]), windows(ids[1 : used + 1])


def validation_rows(num_ids: int, batch_size: int, window: int) -> int:
    """Rows for the validation streams: `batch_size` as the reference, fewer for a short tail."""
    return min(batch_size, (num_ids - 1) // window)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A text made ready for training: vocabulary, batches, and where it came from."""

    vocab: Vocab
    train_inputs: np.ndarray  # [num_train_batches, batch_size, window]
    train_targets: np.ndarray
    valid_inputs: np.ndarray  # [num_valid_batches, valid_rows, window]
    valid_targets: np.ndarray
    path: Path
    sha256: str
    num_chars: int


def corpus_path(config) -> Path:
    """The text file a config trains on: `data_path`, else the known `corpus` (fetched)."""
    if config.data_path:
        return Path(config.data_path)
    return fetch_corpus(config.corpus, config.data_dir)


def load_dataset(config) -> Dataset:
    """Read, encode, split and batch the config's text; size errors say what is needed."""
    path = corpus_path(config)
    text = read_text(path)
    vocab = Vocab.from_text(text)
    ids = vocab.encode(text)
    train_ids, valid_ids = split_train_validation(ids, config.validation_split)
    need_train = config.batch_size * config.window + 1
    need_valid = config.window + 1
    if len(train_ids) < need_train or len(valid_ids) < need_valid:
        raise DataError(
            f"{path} is too short: its {len(ids)} characters split into {len(train_ids)} to "
            f"train and {len(valid_ids)} to validate, but training needs at least {need_train} "
            f"(batch_size * window + 1) and validation at least {need_valid} (window + 1); use a "
            "longer text or a smaller batch_size, window or validation_split."
        )
    rows = validation_rows(len(valid_ids), config.batch_size, config.window)
    train_inputs, train_targets = stream_batches(train_ids, config.batch_size, config.window)
    valid_inputs, valid_targets = stream_batches(valid_ids, rows, config.window)
    return Dataset(
        vocab=vocab,
        train_inputs=train_inputs,
        train_targets=train_targets,
        valid_inputs=valid_inputs,
        valid_targets=valid_targets,
        path=path,
        sha256=file_sha256(path),
        num_chars=len(text),
    )
