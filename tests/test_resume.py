"""Never lose a run, in process: exact resume, interrupts, damaged checkpoints, mismatches,
non-finite losses, one writer per workdir.

Runs are compared bit for bit: every params leaf with `np.array_equal`, `metrics.csv` row by
row. Interrupts are real signals sent to this process from the progress bar's update, so they
land after a chosen step; tests/test_crash.py does the same to a training subprocess.
"""

import asyncio
import gc
import logging
import os
import shutil
import signal
import subprocess
import sys

import filelock
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charlstm_jax import checkpoint, train
from charlstm_jax.config import get_config
from charlstm_jax.metrics import read_metrics
from charlstm_jax.train import TrainingError, train_and_evaluate
from tests.conftest import REPO

STEPS_PER_EPOCH = 40  # (2880 * 0.9 - 1) // (4 * 16) for the phrase file below


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "phrase.txt"
    path.write_text("the pigs rule the farm. " * 120)
    return path


def _config(text_file, epochs):
    """The tiny model, with dropout (on the LSTM's outputs) so that the dropout keys matter."""
    config = get_config()
    config.num_layers, config.hidden_size, config.drop_prob = 1, 16, 0.2
    config.batch_size, config.window, config.validation_counts = 4, 16, 5
    config.learning_rate, config.epochs, config.data_path = 1e-2, epochs, str(text_file)
    return config


@pytest.fixture(scope="module")
def straight(tmp_path_factory, text_file):
    """A run of four epochs that is never stopped."""
    workdir = tmp_path_factory.mktemp("straight")
    train_and_evaluate(_config(text_file, 4), workdir)
    return workdir


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, text_file):
    """A finished run of two epochs (copy it before changing it)."""
    workdir = tmp_path_factory.mktemp("two")
    train_and_evaluate(_config(text_file, 2), workdir)
    return workdir


def _params(workdir, epoch="final"):
    return checkpoint.load_checkpoint(workdir, epoch).params


def assert_same_run(workdir, reference, epochs=(1, 2, 3, 4)):
    """Every epoch's weights and every metrics row of `workdir` are those of `reference`."""
    assert checkpoint.available_epochs(workdir) == list(epochs)
    for epoch in epochs:
        got, want = _params(workdir, epoch), _params(reference, epoch)
        for a, b in zip(
            jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True
        ):
            assert np.array_equal(a, b), f"epoch {epoch} weights differ"
    assert read_metrics(workdir) == read_metrics(reference)
    assert not list(workdir.rglob("*.tmp")) and not list(workdir.rglob("*orbax-checkpoint-tmp*"))


def _interrupt_after(monkeypatch, steps, signum):
    """Send `signum` to this process when the progress bar has counted `steps` more steps."""
    counted = {"steps": 0}

    class Bar(train.tqdm):
        def update(self, n=1):
            super().update(n)
            counted["steps"] += n
            if counted["steps"] == steps:
                os.kill(os.getpid(), signum)

    monkeypatch.setattr(train, "tqdm", Bar)


def test_two_epochs_then_two_more_equals_four_straight(two_epochs, straight, text_file, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(two_epochs, workdir)
    summary = train_and_evaluate(_config(text_file, 4), workdir)  # train longer
    assert summary["step"] == 4 * STEPS_PER_EPOCH and summary["epoch"] == 4
    assert_same_run(workdir, straight)


def test_a_finished_run_resumed_does_nothing_and_says_so(straight, text_file, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    rows, steps = read_metrics(workdir), checkpoint.RunCheckpoints(workdir).state_steps()
    for epochs in (4, 2):  # the same epochs, or fewer than were trained
        with caplog.at_level(logging.INFO):
            summary = train_and_evaluate(_config(text_file, epochs), workdir)
        assert "has already trained 4 epochs" in caplog.text
        assert summary["step"] == 4 * STEPS_PER_EPOCH and summary["interrupted"] is None
        assert summary["valid_loss"] == rows[-1]["ValidationLoss"]
    assert read_metrics(workdir) == rows
    assert checkpoint.RunCheckpoints(workdir).state_steps() == steps


def test_interrupts_mid_epoch_and_at_epoch_ends_resume_exactly(
    straight, text_file, tmp_path, monkeypatch
):
    workdir, config = tmp_path / "run", _config(text_file, 4)
    # (steps to run before the signal, the global step where the run stops)
    stops = [
        (13, 13),  # mid-epoch, between validations: carry and partial loss sums saved
        (67, 80),  # exactly at the end of epoch 2: its epoch checkpoint is saved too
    ]
    for (steps, stop), signum in zip(stops, (signal.SIGINT, signal.SIGTERM), strict=True):
        _interrupt_after(monkeypatch, steps, signum)
        summary = train_and_evaluate(config, workdir)
        assert summary["interrupted"] == signal.Signals(signum).name
        assert summary["step"] == stop
        saved = checkpoint.RunCheckpoints(workdir, read_only=True)
        assert saved.state_steps()[-1] == stop
        assert saved.read_meta("state", stop)["batch_index"] == stop - 40 * ((stop - 1) // 40)
    assert checkpoint.available_epochs(workdir) == [1, 2]
    # A signal on the very last step: the run is complete, not interrupted.
    _interrupt_after(monkeypatch, 4 * STEPS_PER_EPOCH - 80, signal.SIGINT)
    summary = train_and_evaluate(config, workdir)
    assert summary["interrupted"] is None and summary["step"] == 4 * STEPS_PER_EPOCH
    assert_same_run(workdir, straight)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hidden_size=24), "hidden_size=24 (run has 16)"),
        (dict(num_layers=2), "num_layers=2 (run has 1)"),
        (dict(learning_rate=0.5), "learning_rate=0.5 (run has 0.01)"),
    ],
)
def test_resuming_with_other_settings_explains(two_epochs, text_file, change, message):
    config = _config(text_file, 2)
    config.update(change)
    with pytest.raises(TrainingError, match=r"holds a run with other settings") as error:
        train_and_evaluate(config, two_epochs)
    assert message in str(error.value) and "only epochs" in str(error.value)


def test_resuming_on_another_text_explains_and_a_moved_text_is_fine(
    two_epochs, text_file, tmp_path
):
    other = tmp_path / "other.txt"
    other.write_text("the pigs rule the farm! " * 120)
    with pytest.raises(TrainingError, match="was trained on a text with sha256") as error:
        train_and_evaluate(_config(other, 2), two_epochs)
    assert str(other) in str(error.value)
    moved = tmp_path / "moved.txt"  # the same bytes elsewhere: data_path may change
    shutil.copy(text_file, moved)
    summary = train_and_evaluate(_config(moved, 2), two_epochs)
    assert summary["step"] == 2 * STEPS_PER_EPOCH


def test_sampling_a_damaged_checkpoint_is_one_line_naming_it(two_epochs, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(two_epochs, workdir)
    damaged = workdir / "checkpoints" / "epochs" / "2"
    _damage(_largest_file(damaged / "params"), "delete")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sample.py"), "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: The checkpoint {damaged} is damaged")
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr


def test_asyncio_reports_of_failed_reads_are_dropped_and_others_kept(caplog):
    # The subprocess test above only sometimes meets these: asyncio reports a failed read's
    # task that nobody awaited when the task is collected, which depends on timing.
    checkpoint._silence_failed_read_echoes()

    async def _read_array_index_and_device_put():
        raise ValueError("a shard is missing")

    async def unrelated_task():
        raise ValueError("something else")

    def fail_unretrieved(coroutine, gathered=False):
        async def start():
            # A task of its own, or gathered, as orbax reads arrays: then asyncio reports the
            # gathering future, whose repr does not name the read (only its traceback does).
            return asyncio.gather(coroutine) if gathered else asyncio.ensure_future(coroutine)

        loop = asyncio.new_event_loop()
        future = loop.run_until_complete(start())
        loop.run_until_complete(asyncio.sleep(0.01))
        loop.close()
        del future
        gc.collect()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        fail_unretrieved(_read_array_index_and_device_put())
        fail_unretrieved(_read_array_index_and_device_put(), gathered=True)
        fail_unretrieved(unrelated_task())
    reports = [record.getMessage() for record in caplog.records]
    assert len(reports) == 1 and "unrelated_task" in reports[0]


def _damage(path, how):
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()


def _largest_file(directory):
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("how", ["truncate", "delete"])
@pytest.mark.parametrize("part", ["params", "meta"])
def test_a_damaged_epoch_checkpoint_is_named_never_loaded(two_epochs, tmp_path, how, part):
    workdir = tmp_path / "run"
    shutil.copytree(two_epochs, workdir)
    damaged = workdir / "checkpoints" / "epochs" / "2"
    _damage(_largest_file(damaged / part), how)
    with pytest.raises(checkpoint.CheckpointError, match=f"{damaged} is damaged"):
        checkpoint.load_checkpoint(workdir, 2)
    with pytest.raises(checkpoint.CheckpointError, match=f"{damaged} is damaged"):
        checkpoint.load_checkpoint(workdir)  # "final" is epoch 2
    _params(workdir, 1)  # the epoch before is untouched


def test_every_damaged_file_is_detected_or_harmless(two_epochs, tmp_path):
    """Truncate, delete or flip a byte of each file of a checkpoint in turn: loading either
    raises `CheckpointError` naming it or gives the very same weights, never other ones."""
    source = two_epochs / "checkpoints" / "epochs" / "2"
    good = jax.tree_util.tree_leaves(_params(two_epochs, 2))
    detected = 0
    for rel in sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file()):
        for how in ("truncate", "delete", "flip"):
            workdir = tmp_path / f"{rel}-{how}".replace("/", "_")
            shutil.copytree(two_epochs, workdir)
            path = workdir / "checkpoints" / "epochs" / "2" / rel
            if how == "flip":
                data = bytearray(path.read_bytes())
                if not data:
                    continue
                data[len(data) // 2] ^= 0xFF
                path.write_bytes(bytes(data))
            else:
                _damage(path, how)
            try:
                params = _params(workdir, 2)
            except checkpoint.CheckpointError as error:
                assert str(path.parents[len(rel.parts) - 1]) in str(error)
                detected += 1
                continue
            for a, b in zip(jax.tree_util.tree_leaves(params), good, strict=True):
                assert np.array_equal(a, b), f"{how} {rel} loaded other weights"
    assert detected >= 10  # the arrays' and meta's own files are all caught


def test_resume_falls_back_from_a_damaged_state_and_still_ends_exactly(
    two_epochs, straight, text_file, tmp_path, caplog
):
    workdir = tmp_path / "run"
    shutil.copytree(two_epochs, workdir)
    newest = workdir / "checkpoints" / "state" / str(2 * STEPS_PER_EPOCH)
    _damage(_largest_file(newest / "state"), "truncate")
    with caplog.at_level(logging.WARNING):
        summary = train_and_evaluate(_config(text_file, 4), workdir)
    assert f"{newest} is damaged" in caplog.text and "Falling back" in caplog.text
    assert summary["step"] == 4 * STEPS_PER_EPOCH
    assert_same_run(workdir, straight)  # epoch 2 trained again, its checkpoint rewritten


def test_resume_with_every_state_damaged_names_it(two_epochs, text_file, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(two_epochs, workdir)
    states = sorted((workdir / "checkpoints" / "state").iterdir(), key=lambda p: int(p.name))
    for state in states:
        (state / "meta" / "metadata").unlink()
    with pytest.raises(checkpoint.CheckpointError, match=f"{states[0]} is damaged"):
        train_and_evaluate(_config(text_file, 4), workdir)


def test_a_second_trainer_on_a_busy_workdir_is_refused(two_epochs, text_file, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(two_epochs, workdir)
    with filelock.FileLock(workdir / ".lock"):  # as the running trainer holds it
        with pytest.raises(TrainingError, match="is being trained by another process"):
            train_and_evaluate(_config(text_file, 4), workdir)
    assert read_metrics(workdir) == read_metrics(two_epochs)


def _poisoned_after(monkeypatch, bad_step):
    """Make every training step from global step `bad_step` on see a NaN carry."""
    clean = train.train_step

    def poisoned(state, carry, inputs, targets, dropout_key, **kwargs):
        poison = jnp.where(state.step >= bad_step - 1, jnp.nan, 0.0)
        carry = jax.tree_util.tree_map(lambda x: x + poison, carry)
        return clean(state, carry, inputs, targets, dropout_key, **kwargs)

    monkeypatch.setattr(train, "train_step", poisoned)


def test_a_non_finite_loss_stops_keeps_the_last_good_checkpoint_then_skip_goes_on(
    two_epochs, text_file, tmp_path, monkeypatch, caplog
):
    workdir = tmp_path / "run"
    shutil.copytree(two_epochs, workdir)
    _poisoned_after(monkeypatch, 2 * STEPS_PER_EPOCH + 7)
    with pytest.raises(TrainingError, match=r"non-finite at step 87 \(epoch 3\)") as error:
        train_and_evaluate(_config(text_file, 4), workdir)
    assert "--config.skip_nonfinite=True" in str(error.value)
    saved = checkpoint.RunCheckpoints(workdir, read_only=True)
    assert saved.epochs() == [1, 2] and saved.state_steps()[-1] == 2 * STEPS_PER_EPOCH
    final, before = _params(workdir), _params(two_epochs)
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(final), leaves(before), strict=True):
        assert np.array_equal(a, b)
    assert read_metrics(workdir)[-1]["Step"] == 85  # the rows before the bad step

    # As the message says: skip such updates and go on (a change allowed on resume).
    config = _config(text_file, 4)
    config.skip_nonfinite = True
    with caplog.at_level(logging.INFO):
        summary = train_and_evaluate(config, workdir)
    assert summary["step"] == 4 * STEPS_PER_EPOCH
    assert "step 90 | Training loss" in caplog.text
    assert "| 4 non-finite updates skipped" in caplog.text  # steps 87 to 90
    assert "| 5 non-finite updates skipped" in caplog.text  # every step from 91 on
    rows = {r["Step"]: r for r in read_metrics(workdir)}
    assert np.isfinite(rows[90]["TrainLoss"]) and np.isnan(rows[95]["TrainLoss"])
    assert checkpoint.available_epochs(workdir) == [1, 2, 3, 4]
