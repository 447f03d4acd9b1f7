"""Never lose a run, as a user meets it: signals and SIGKILL sent to `scripts/train.py`.

A training subprocess is stopped by SIGTERM (it saves and says how to resume), or
killed by SIGKILL at several points, two of them in the middle of a checkpoint write; each time
the run is resumed, and it must end with every epoch's checkpoint present, loadable and bit for
bit equal to an uninterrupted run's, with metrics.csv equal row for row.
"""

import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from charlstm_jax import checkpoint
from charlstm_jax.metrics import read_metrics
from charlstm_jax.train import TrainingError, train_and_evaluate
from configs.tiny import get_config
from tests.conftest import REPO

EPOCHS = 3
STEPS_PER_EPOCH = 202  # (14400 * 0.9 - 1) // (4 * 16): long enough to signal mid-run

# Runs scripts/train.py, but SIGKILLs itself right after the n-th call of a RunCheckpoints
# method returns: the checkpoint's write has begun in the background and is cut short.
KILL_AFTER = """
import os, runpy, signal, sys
from charlstm_jax import checkpoint
method, calls = sys.argv[1], int(sys.argv[2])
original = getattr(checkpoint.RunCheckpoints, method)
count = [0]
def kill_after(self, *args, **kwargs):
    original(self, *args, **kwargs)
    count[0] += 1
    if count[0] == calls:
        os.kill(os.getpid(), signal.SIGKILL)
setattr(checkpoint.RunCheckpoints, method, kill_after)
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "phrase.txt"
    path.write_text("the pigs rule the farm. " * 600)
    return path


def _overrides(text_file):
    return [f"--config.data_path={text_file}", f"--config.epochs={EPOCHS}"]


def _config(text_file):
    """The config the subprocesses train with: configs/tiny.py and the overrides."""
    config = get_config()
    config.data_path, config.epochs = str(text_file), EPOCHS
    return config


@pytest.fixture(scope="module")
def straight(tmp_path_factory, text_file):
    """The run never stopped."""
    workdir = tmp_path_factory.mktemp("straight")
    train_and_evaluate(_config(text_file), workdir)
    return workdir


def _train_command(text_file, workdir, *prefix):
    script = str(REPO / "scripts" / "train.py")
    flags = ["--config", "configs/tiny.py", *_overrides(text_file), "--workdir", str(workdir)]
    return [sys.executable, *prefix, script, *flags]


def _start(command):
    return subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_step(process, workdir, past: int) -> None:
    """Wait until the subprocess has logged a metrics row after global step `past`."""
    deadline = time.monotonic() + 120
    while not any(row["Step"] > past for row in read_metrics(workdir)):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no training progress in 120 s"
        time.sleep(0.02)


def _last_state_step(workdir) -> int:
    return checkpoint.RunCheckpoints(workdir, read_only=True).state_steps()[-1]


def assert_same_run(workdir, reference):
    """Every epoch's checkpoint loads and equals the reference's; so does metrics.csv."""
    assert checkpoint.available_epochs(workdir) == list(range(1, EPOCHS + 1))
    for epoch in range(1, EPOCHS + 1):
        got = checkpoint.load_checkpoint(workdir, epoch).params
        want = checkpoint.load_checkpoint(reference, epoch).params
        for a, b in zip(
            jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True
        ):
            assert np.array_equal(a, b), f"epoch {epoch} weights differ"
    assert read_metrics(workdir) == read_metrics(reference)


def _tmp_dirs(workdir):
    return [p for p in (workdir / "checkpoints").rglob("*") if "tmp" in p.name]


def test_sigterm_saves_says_how_to_resume_and_resumes_exactly(text_file, straight, tmp_path):
    """SIGINT is the same handler (tests/test_resume.py sends both, in process)."""
    workdir = tmp_path / "run"
    process = _start(_train_command(text_file, workdir))
    _wait_for_step(process, workdir, past=0)
    with pytest.raises(TrainingError, match="is being trained by another process"):
        train_and_evaluate(_config(text_file), workdir)  # a second trainer is refused
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert "Stopped by SIGTERM" in stderr and "Traceback" not in stderr
    assert "To resume, run the same command again:" in stderr and str(workdir) in stderr
    assert 0 < _last_state_step(workdir) < EPOCHS * STEPS_PER_EPOCH
    summary = train_and_evaluate(_config(text_file), workdir)  # the same run, in this process
    assert summary["step"] == EPOCHS * STEPS_PER_EPOCH
    assert_same_run(workdir, straight)


def test_sigkill_anywhere_even_mid_save_loses_nothing(text_file, straight, tmp_path):
    workdir = tmp_path / "run"
    kills = [
        ("save_epoch", 1),  # while epoch 1's checkpoint is written: no state saved yet
        ("save_state", 2),  # while the state at the end of epoch 2 is written
    ]
    for method, calls in kills:
        command = _train_command(text_file, workdir, "-c", KILL_AFTER, method, str(calls))
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        assert _tmp_dirs(workdir), "the kill should have cut a checkpoint write short"
    assert _last_state_step(workdir) == STEPS_PER_EPOCH  # the state before the cut one
    # A kill from outside at any moment, with the stale lock and half-written files it leaves.
    process = _start(_train_command(text_file, workdir))
    _wait_for_step(process, workdir, past=STEPS_PER_EPOCH + 50)
    process.kill()
    process.communicate(timeout=60)
    assert (workdir / ".lock").exists()
    summary = train_and_evaluate(_config(text_file), workdir)
    assert summary["step"] == EPOCHS * STEPS_PER_EPOCH
    assert not _tmp_dirs(workdir)  # half-written checkpoints were cleaned up
    assert_same_run(workdir, straight)
