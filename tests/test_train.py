"""Training end to end: the loss falls, the run directory holds what the README says."""

import math

import jax
import numpy as np
import pytest

from charlstm_jax import checkpoint
from charlstm_jax.data import Vocab
from charlstm_jax.metrics import COLUMNS, read_metrics
from charlstm_jax.train import TrainingError, train_and_evaluate
from tests.conftest import REPO, run_script, shared_text


def test_tiny_model_learns_a_repeated_phrase(tiny_config, phrase_file, tmp_path):
    tiny_config.data_path = str(phrase_file)
    tiny_config.epochs = 3
    summary = train_and_evaluate(tiny_config, tmp_path / "run")
    vocab_size = len(set(phrase_file.read_text()))
    assert summary["train_loss"] < 0.25 * math.log(vocab_size)
    assert summary["valid_loss"] < 0.25 * math.log(vocab_size)
    # The best checkpoint is the epoch whose end had the lowest validation loss.
    epoch_ends = {r["Epoch"]: r["ValidationLoss"] for r in read_metrics(tmp_path / "run")}
    best_epoch = min(epoch_ends, key=epoch_ends.get)
    assert summary["best"] == (best_epoch, pytest.approx(epoch_ends[best_epoch]))
    loaded = checkpoint.load_checkpoint(tmp_path / "run", "best")
    assert loaded.epoch == best_epoch and loaded.meta["valid_loss"] == summary["best"][1]


def test_short_run_on_animal_farm_leaves_checkpoints_events_and_metrics(tiny_config, tmp_path):
    text = shared_text("animal_farm.txt").read_text()[:12_000]
    corpus = tmp_path / "slice.txt"
    corpus.write_text(text)
    tiny_config.data_path = str(corpus)
    tiny_config.epochs = 2
    workdir = tmp_path / "run"
    summary = train_and_evaluate(tiny_config, workdir)

    steps_per_epoch = (int(len(text) * 0.9) - 1) // (4 * 16)
    assert summary["step"] == 2 * steps_per_epoch
    rows = read_metrics(workdir)
    assert list(rows[0]) == list(COLUMNS)
    validations = steps_per_epoch // 5 + (steps_per_epoch % 5 != 0)
    assert len(rows) == 2 * validations
    assert [r["Step"] for r in rows] == sorted(r["Step"] for r in rows)
    for row in rows:
        assert 0 < row["ValidationLoss"] < math.log(71) + 0.5
        assert row["ValidationBPC"] == pytest.approx(row["ValidationLoss"] / math.log(2))
    assert rows[-1]["ValidationLoss"] < rows[0]["ValidationLoss"]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert (workdir / "learning_curve.png").exists()
    assert Vocab.load(workdir / "vocab.json") == Vocab.from_text(text)

    checkpoints = checkpoint.RunCheckpoints(workdir, read_only=True)
    assert checkpoints.epochs() == [1, 2]
    meta = checkpoints.read_meta("epoch", 1)
    assert meta["epoch"] == 1 and meta["step"] == steps_per_epoch
    assert meta["config"]["hidden_size"] == 32 and len(meta["vocab"]) == len(set(text))
    assert checkpoints.state_steps()[-1] == 2 * steps_per_epoch


def test_a_checkpoint_even_with_fewer_steps_than_validation_counts(
    tiny_config, phrase_file, tmp_path
):
    tiny_config.data_path = str(phrase_file)
    tiny_config.validation_counts = 10_000
    workdir = tmp_path / "run"
    train_and_evaluate(tiny_config, workdir)
    assert checkpoint.RunCheckpoints(workdir, read_only=True).epochs() == [1]
    assert len(read_metrics(workdir)) == 1  # the epoch's end is always validated


def test_early_stopping_after_patience_epochs_without_improvement(
    tiny_config, phrase_file, tmp_path
):
    tiny_config.data_path = str(phrase_file)
    tiny_config.update(epochs=6, patience=2, learning_rate=1e-12)  # too small to improve
    workdir = tmp_path / "run"
    summary = train_and_evaluate(tiny_config, workdir)
    assert summary["stopped_early"] == 3 and summary["epoch"] == 3
    assert summary["best"][0] == 1
    assert checkpoint.RunCheckpoints(workdir, read_only=True).epochs() == [1, 2, 3]
    # Running the same command again finds the run finished: no step is taken.
    again = train_and_evaluate(tiny_config, workdir)
    assert again["stopped_early"] == 3 and again["step"] == summary["step"]
    # A larger patience resumes it.
    tiny_config.patience = 4
    more = train_and_evaluate(tiny_config, workdir)
    assert more["stopped_early"] == 5 and more["step"] > summary["step"]


def test_best_of_a_run_without_best_copies_comes_from_the_epochs(
    tiny_config, phrase_file, tmp_path
):
    """Runs trained before best copies were kept still answer `--epoch best`."""
    import shutil

    tiny_config.data_path = str(phrase_file)
    tiny_config.epochs = 2
    train_and_evaluate(tiny_config, tmp_path / "run")
    best_epoch = train_and_evaluate(tiny_config, tmp_path / "run")["best"][0]
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "best")
    assert checkpoint.load_checkpoint(tmp_path / "run", "best").epoch == best_epoch


def test_a_setting_the_saved_run_did_not_know_is_compared_with_its_default(
    tiny_config, phrase_file, tmp_path
):
    tiny_config.data_path = str(phrase_file)
    train_and_evaluate(tiny_config, tmp_path / "run")
    tiny_config.weight_drop = 0.3  # the run trained without it
    with pytest.raises(TrainingError, match=r"weight_drop=0.3 \(run has 0.0\)"):
        train_and_evaluate(tiny_config, tmp_path / "run")


def test_cosine_schedule_length_cannot_change_on_resume(tiny_config, phrase_file, tmp_path):
    tiny_config.data_path = str(phrase_file)
    tiny_config.update(epochs=1, lr_schedule="cosine")
    train_and_evaluate(tiny_config, tmp_path / "run")
    tiny_config.epochs = 2
    with pytest.raises(TrainingError, match="epochs=2 \\(run has 1\\)"):
        train_and_evaluate(tiny_config, tmp_path / "run")


def test_training_is_deterministic(tiny_config, phrase_file, tmp_path):
    tiny_config.data_path = str(phrase_file)
    first = train_and_evaluate(tiny_config, tmp_path / "a")
    second = train_and_evaluate(tiny_config, tmp_path / "b")
    assert first["valid_loss"] == second["valid_loss"]
    assert np.array_equal(
        [r["TrainLoss"] for r in read_metrics(tmp_path / "a")],
        [r["TrainLoss"] for r in read_metrics(tmp_path / "b")],
    )
    assert jax.devices()[0].platform == "cpu"


def _train_cli(*args, cwd=REPO):
    return run_script("train.py", *args, cwd=cwd)


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.drop_prob=1.0", "config.drop_prob must lie in [0, 1)"),
        ("--config.data_path=/nonexistent/novel.txt", "No text file at /nonexistent/novel.txt"),
    ],
)
def test_cli_bad_input_is_one_sentence(flag, message, tmp_path):
    result = _train_cli("--config", "configs/tiny.py", flag, "--workdir", str(tmp_path / "r"))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_trains_with_default_workdir(phrase_file, tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.py").write_text((REPO / "configs" / "tiny.py").read_text())
    result = _train_cli(
        "--config",
        "configs/mine.py",
        "--config.epochs=1",
        f"--config.data_path={phrase_file}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert checkpoint.RunCheckpoints(tmp_path / "runs" / "mine", read_only=True).epochs() == [1]
