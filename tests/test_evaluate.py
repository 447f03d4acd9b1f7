"""scripts/evaluate.py: loss, bits per character and perplexity of checkpoints on a text."""

import math

import pytest

from charlstm_jax.metrics import read_metrics
from charlstm_jax.train import train_and_evaluate
from tests.conftest import run_script


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from charlstm_jax.config import get_config

    tmp = tmp_path_factory.mktemp("evaluate")
    text = tmp / "phrase.txt"
    text.write_text("the pigs rule the farm. " * 120)
    config = get_config()
    config.update(
        num_layers=1,
        hidden_size=32,
        epochs=2,
        batch_size=4,
        window=16,
        learning_rate=1e-2,
        validation_counts=5,
        drop_prob=0.0,
        data_path=str(text),
    )
    train_and_evaluate(config, tmp / "run")
    return tmp / "run"


def _table(stdout: str) -> list[list[float]]:
    lines = stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["epoch", "characters"]
    return [[float(x) for x in line.split()] for line in lines[1:]]


def test_default_text_is_the_validation_tail_and_matches_training(trained_run):
    result = run_script("evaluate.py", "--workdir", str(trained_run), "--epoch", "all")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = _table(result.stdout)
    assert [row[0] for row in rows] == [1, 2]
    epoch_ends = {r["Epoch"]: r["ValidationLoss"] for r in read_metrics(trained_run)}
    for epoch, characters, loss, bits, perplexity in rows:
        assert loss == pytest.approx(epoch_ends[epoch], abs=1e-4)
        assert bits == pytest.approx(loss / math.log(2), abs=1e-3)
        assert perplexity == pytest.approx(math.exp(loss), rel=1e-3)
        assert characters % 16 == 0 and characters > 0


def test_any_text_file_and_unknown_characters(trained_run, tmp_path):
    other = tmp_path / "other.txt"
    # The training phrase with "!" for ".": once the unknown "!" is dropped, a text the model
    # knows. (A reordering of its words is not: the model memorises the phrase, and on "the
    # farm rules the pigs" it was worse than uniform for two seeds in three.)
    other.write_text("the pigs rule the farm! " * 40)
    result = run_script("evaluate.py", "--workdir", str(trained_run), "--text", str(other))
    assert result.returncode == 2
    assert "characters the model never saw: '!'" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_script(
        "evaluate.py", "--workdir", str(trained_run), "--text", str(other), "--drop_unknown"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    [[epoch, characters, loss, _, _]] = _table(result.stdout)
    assert epoch == 2 and 0 < loss < math.log(8)
    assert characters == (23 * 40 - 1) // 64 * 64  # 4 streams of 16: whole batches only


def test_best_epoch_and_bad_epoch(trained_run):
    result = run_script("evaluate.py", "--workdir", str(trained_run), "--epoch", "best")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(_table(result.stdout)) == 1
    result = run_script("evaluate.py", "--workdir", str(trained_run), "--epoch", "last")
    assert result.returncode == 2
    assert "--epoch must be a number, 'final', 'best' or 'all'" in result.stderr
