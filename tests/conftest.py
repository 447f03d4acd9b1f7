"""Shared fixtures: the tiny config, a small text, and the corpora of ../shared/data."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import pytest

from charlstm_jax.config import get_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# One on-disk compilation cache for the whole session, subprocesses included: most tests train
# the same tiny model, and compiling it dominates their time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="charlstm-xla-"))
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run_script(name: str, *args, cwd=REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `scripts/<name>` as a user would, in a fresh Python process; output captured."""
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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
