"""Shared fixtures: the tiny config, a small text, and the corpora of ../shared/data."""

from pathlib import Path

import pytest

from charlstm_jax.config import get_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_text(name: str) -> Path:
    """A corpus of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (the corpora are not shipped with the package)")
    return path


@pytest.fixture
def tiny_config():
    """A model small enough to train in seconds: 1 x 32, 4 streams of 16 characters."""
    config = get_config()
    config.num_layers = 1
    config.hidden_size = 32
    config.epochs = 1
    config.batch_size = 4
    config.window = 16
    config.learning_rate = 1e-2
    config.validation_counts = 5
    config.drop_prob = 0.0
    return config


@pytest.fixture
def phrase_file(tmp_path):
    """A short repeated phrase: easy to learn, 8 symbols."""
    path = tmp_path / "phrase.txt"
    path.write_text("the pigs rule the farm. " * 120)
    return path
