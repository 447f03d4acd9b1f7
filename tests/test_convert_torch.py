"""Importing the reference's checkpoints: the same probabilities, nothing unsafe, clear errors."""

# ruff: noqa: E402

import collections
import hashlib
import json
import pickle
import sys
import types
import zipfile
from unittest import mock

import jax
import numpy as np
import pytest

# The imports below need torch, so they come after the skip when it is absent.
torch = pytest.importorskip("torch")

from charlstm_jax import checkpoint
from charlstm_jax.config import get_config
from charlstm_jax.convert import ConversionError, _corpus_of, convert_checkpoint
from charlstm_jax.data import Vocab, read_text
from charlstm_jax.torch_reference import ReferenceLSTM, one_hot
from charlstm_jax.train import create_model, create_train_state
from tests.conftest import run_script, shared_text

TEXT = "All animals are equal,\nbut some animals are more equal than others.\n" * 20
H, L = 24, 2
HYPER_PARAMETERS = {
    "num_layers": L,
    "hidden_size": H,
    "epochs": 30,
    "batch_size": 16,
    "window": 100,
    "learning_rate": 0.001,
    "clip": 5,
    "validation_split": 0.1,
    "drop_prob": 0.5,
    "validation_counts": 10,
    "use_gpu": True,
}


def write_reference_checkpoint(path, model, text=TEXT, seed=0):
    """`torch.save` a checkpoint as the reference's training script writes it.

    Its vocabulary comes from a `set`, so its ids follow no order: here a fixed shuffle. Its
    `Tokens` is a namedtuple of the module `rnn.loader`, which exists only while saving.
    Returns `int_to_chars`.
    """
    chars = sorted(set(text))
    np.random.default_rng(seed).shuffle(chars)
    int_to_chars = dict(enumerate(chars))
    chars_to_int = {c: i for i, c in int_to_chars.items()}
    Tokens = collections.namedtuple("Tokens", ["int_to_chars", "chars_to_int", "tokens"])
    Tokens.__module__ = "rnn.loader"
    loader = types.ModuleType("rnn.loader")
    loader.Tokens = Tokens
    tokens = Tokens(int_to_chars, chars_to_int, np.array([chars_to_int[c] for c in text]))
    saved = {"parameters": HYPER_PARAMETERS, "model": model.state_dict(), "tokens": tokens}
    with mock.patch.dict(sys.modules, {"rnn": types.ModuleType("rnn"), "rnn.loader": loader}):
        torch.save(saved, path)
    return int_to_chars


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    """`(path, model, int_to_chars)`: a checkpoint of epoch 7 of a random reference model."""
    torch.manual_seed(0)
    model = ReferenceLSTM(len(set(TEXT)), H, L, 0.5).eval()
    path = tmp_path_factory.mktemp("reference") / "model_7.pt"
    return path, model, write_reference_checkpoint(path, model)


def _restore(workdir, epoch):
    """`(model, params, meta, vocab)` of a converted epoch, read back as sampling would."""
    config = get_config()
    saved = json.loads((workdir / "config.json").read_text())
    config.update({k: saved[k] for k in ("num_layers", "hidden_size", "drop_prob")})
    vocab = Vocab.load(workdir / "vocab.json")
    model = create_model(config, len(vocab))
    # The params' shapes, as create_train_state makes them, without computing them.
    shapes = jax.eval_shape(
        lambda: create_train_state(config, len(vocab), jax.random.key(0)).params
    )
    checkpoints = checkpoint.RunCheckpoints(workdir, read_only=True)
    try:
        params, meta = checkpoints.restore_epoch(epoch, checkpoint.abstract_tree(shapes))
    finally:
        checkpoints.close()
    return model, params, meta, vocab


def _max_probability_difference(workdir, epoch, model, int_to_chars) -> float:
    """After each character of a text, the largest difference between the converted model's
    probability of a character and the reference model's probability of the same character."""
    ours, params, _, vocab = _restore(workdir, epoch)
    text = "some animals are more equal"
    carry = ours.initialize_carry(1)
    _, logits = jax.jit(ours.apply)({"params": params}, carry, vocab.encode(text)[None])
    probabilities = np.asarray(jax.nn.softmax(logits[0]))  # [T, V] in our ids

    chars_to_int = {c: i for i, c in int_to_chars.items()}
    x = torch.from_numpy(one_hot(np.array([[chars_to_int[c] for c in text]]), len(vocab)))
    with torch.no_grad():
        ref_logits, _, _ = model(x, *model.initial_hidden_state(1))
    ref_probabilities = torch.softmax(ref_logits, dim=1).numpy()  # [T, V] in the reference's ids
    same_chars = ref_probabilities[:, [chars_to_int[c] for c in vocab.chars]]
    return float(np.abs(probabilities - same_chars).max())


def test_converted_model_gives_every_character_the_same_probability(reference_checkpoint, tmp_path):
    path, model, int_to_chars = reference_checkpoint
    workdir = tmp_path / "run"
    summary = convert_checkpoint(path, workdir)
    assert summary["epoch"] == 7  # from the file name model_7.pt

    difference = _max_probability_difference(workdir, 7, model, int_to_chars)
    print(f"probabilities max abs difference: {difference:.2e}")
    assert difference < 1e-5

    _, _, meta, vocab = _restore(workdir, 7)
    assert vocab.chars == tuple(sorted(set(TEXT)))
    assert meta["vocab"] == list(vocab.chars)
    assert meta["epoch"] == 7 and meta["step"] == 0
    assert meta["corpus_sha256"] == hashlib.sha256(TEXT.encode()).hexdigest()
    assert meta["source"] == str(path.absolute())
    config = json.loads((workdir / "config.json").read_text())
    assert set(config) == set(get_config().keys())  # a full config, as training writes
    for key, value in HYPER_PARAMETERS.items():
        if key != "use_gpu":
            assert config[key] == value, key
    assert meta["config"] == config


def test_more_epochs_of_one_run_share_a_workdir(reference_checkpoint, tmp_path):
    path, model, _ = reference_checkpoint
    final = tmp_path / "model_final.pt"
    final.write_bytes(path.read_bytes())
    workdir = tmp_path / "run"
    convert_checkpoint(path, workdir)
    assert convert_checkpoint(final, workdir)["epoch"] == 30  # 'final': the run's last epoch
    checkpoints = checkpoint.RunCheckpoints(workdir, read_only=True)
    assert checkpoints.epochs() == [7, 30]
    checkpoints.close()
    with pytest.raises(ConversionError, match="already has a checkpoint of epoch 7"):
        convert_checkpoint(path, workdir)


def test_checkpoint_written_with_numpy_1_is_read(reference_checkpoint, tmp_path):
    """numpy 1.x pickled its arrays through `numpy.core`, not `numpy._core`."""
    path, model, int_to_chars = reference_checkpoint
    old = tmp_path / "model_3.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(old, "w") as target:
        for info in source.infolist():
            content = source.read(info)
            if info.filename.endswith("data.pkl"):  # protocol 2: GLOBAL names end in newlines
                assert b"cnumpy._core.multiarray\n" in content
                content = content.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
            target.writestr(info, content)
    convert_checkpoint(old, tmp_path / "run")
    assert _max_probability_difference(tmp_path / "run", 3, model, int_to_chars) < 1e-5


@pytest.mark.parametrize(
    "name, filename", [("animal_farm", "animal_farm.txt"), ("1984", "1984.txt")]
)
def test_the_reference_corpora_are_recognised(name, filename):
    """The reference read its text with universal newlines: Animal Farm's CRLF ends are gone."""
    text = read_text(shared_text(filename))
    assert _corpus_of(text) == (name, hashlib.sha256(text.encode()).hexdigest())


class _RunsACommand:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["pickle", "torch"])
def test_a_file_with_other_objects_is_refused_unread(container, tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "model_1.pt"
    payload = {"parameters": HYPER_PARAMETERS, "model": {}, "tokens": _RunsACommand(marker)}
    if container == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    with pytest.raises(ConversionError, match=r"system\) .* was refused unread") as error:
        convert_checkpoint(path, tmp_path / "run")
    assert not marker.exists()
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is not a PyTorch checkpoint"),
        (np.random.default_rng(0).bytes(4096), "is not a PyTorch checkpoint"),
        ({"state_dict": {"w": torch.zeros(2)}}, "should hold the keys parameters, model, tokens"),
        (
            {"parameters": HYPER_PARAMETERS, "model": {"w": torch.zeros(2)}, "tokens": None},
            "'tokens' should be the reference's Tokens",
        ),
    ],
    ids=["empty", "random_bytes", "other_keys", "no_tokens"],
)
def test_a_file_that_is_not_a_reference_checkpoint_gets_one_sentence(content, message, tmp_path):
    path = tmp_path / "model.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ConversionError, match=message) as error:
        convert_checkpoint(path, tmp_path / "run")
    assert "\n" not in str(error.value) and str(error.value).endswith(".")


def test_weights_of_another_model_get_one_sentence(tmp_path):
    model = ReferenceLSTM(len(set(TEXT)), H, L, 0.5)
    model.fc = torch.nn.Linear(H, 5)  # an output layer that does not fit the vocabulary
    path = tmp_path / "model_2.pt"
    write_reference_checkpoint(path, model)
    with pytest.raises(
        ConversionError, match="characters but the output layer 5; the checkpoint is damaged"
    ):
        convert_checkpoint(path, tmp_path / "run")


def _convert_cli(*args):
    return run_script("convert_torch.py", *args)


def test_cli_converts_and_errors_in_one_line(reference_checkpoint, tmp_path):
    path, _, _ = reference_checkpoint
    done = _convert_cli(f"--checkpoint={path}", f"--workdir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / checkpoint.EPOCHS / "7").is_dir()
    assert (tmp_path / "run" / "vocab.json").exists()

    missing = _convert_cli(f"--checkpoint={tmp_path / 'nothing.pt'}", f"--workdir={tmp_path}")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: No file at {tmp_path / 'nothing.pt'}: give the path of a checkpoint written "
        "by the PyTorch reference's training script (--checkpoint)."
    ]
