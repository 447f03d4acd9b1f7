"""Data parallel over several devices and processes gives the one-device run's numbers.

Several CPU devices come from `--xla_force_host_platform_device_count`, which must be set before
JAX starts: those runs are subprocesses. The one-device runs train in this process.
"""

import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from charlstm_jax import checkpoint, sampling
from charlstm_jax.config import get_config
from charlstm_jax.metrics import read_metrics
from charlstm_jax.parallel import ParallelError, initialize_distributed
from charlstm_jax.train import train_and_evaluate
from tests.conftest import REPO

# Dropout on: its masks must not depend on how the rows are split.
SETTINGS = dict(
    num_layers=1,
    hidden_size=32,
    batch_size=4,
    window=16,
    learning_rate=1e-2,
    validation_counts=5,
    drop_prob=0.5,
)


def _flags(text, epochs):
    flags = [f"--config.{k}={v}" for k, v in SETTINGS.items()]
    return [*flags, f"--config.data_path={text}", f"--config.epochs={epochs}"]


def _train_cli(workdir, text, epochs, devices, *extra):
    """scripts/train.py in a fresh process with `devices` CPU devices; returns the Popen."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--config=configs/tiny.py"]
    command += [*_flags(text, epochs), f"--workdir={workdir}", *extra]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process, timeout=300):
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def _config(text, epochs):
    config = get_config()
    config.update(**SETTINGS, data_path=str(text), epochs=epochs)
    return config


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("parallel") / "phrase.txt"
    # Short (16 steps an epoch): sharded sums round differently from one device's, and
    # training amplifies that; over a few dozen steps the weights still agree within 1e-5.
    path.write_text("the pigs rule the farm, the dogs guard the pigs. " * 24)
    return path


@pytest.fixture(scope="module")
def one_device_run(text, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one") / "run"
    train_and_evaluate(_config(text, 2), workdir)
    return workdir


def _assert_same_run(workdir, reference, epoch=2):
    ours, theirs = read_metrics(workdir), read_metrics(reference)
    assert [r["Step"] for r in ours] == [r["Step"] for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a["TrainLoss"] == pytest.approx(b["TrainLoss"], abs=1e-5)
        assert a["ValidationLoss"] == pytest.approx(b["ValidationLoss"], abs=1e-5)
    ours = checkpoint.load_checkpoint(workdir, epoch).params
    theirs = checkpoint.load_checkpoint(reference, epoch).params
    leaves = zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs), strict=True)
    for a, b in leaves:
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_four_devices_match_one_and_sample_on_one(text, one_device_run, tmp_path):
    assert jax.device_count() == 1  # this process: the checkpoint below restores on one
    code, stderr = _finish(_train_cli(tmp_path / "run", text, 2, devices=4))
    assert code == 0, stderr[-3000:]
    assert "on 4 device(s) in 1 process(es)" in stderr
    _assert_same_run(tmp_path / "run", one_device_run)
    loaded = checkpoint.load_checkpoint(tmp_path / "run")
    [sample] = sampling.sample(loaded.model, loaded.params, loaded.vocab, "the", 40)
    assert len(sample) == 40


def test_resume_on_one_device_a_run_begun_on_four(text, one_device_run, tmp_path):
    code, stderr = _finish(_train_cli(tmp_path / "run", text, 1, devices=4))
    assert code == 0, stderr[-3000:]
    summary = train_and_evaluate(_config(text, 2), tmp_path / "run")  # here: one device
    assert summary["epoch"] == 2
    _assert_same_run(tmp_path / "run", one_device_run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(text, one_device_run, tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    processes = [
        _train_cli(
            tmp_path / "run",
            text,
            2,
            2,  # devices per process: 4 in all, one row each
            f"--coordinator_address={address}",
            "--num_processes=2",
            f"--process_id={i}",
        )
        for i in range(2)
    ]
    results = [_finish(p) for p in processes]
    for code, stderr in results:
        assert code == 0, stderr[-3000:]
    assert "on 4 device(s) in 2 process(es)" in results[0][1]
    assert "Training on" not in results[1][1]  # only process 0 logs
    _assert_same_run(tmp_path / "run", one_device_run)


def test_a_stop_in_one_process_stops_both_and_they_resume(text, one_device_run, tmp_path):
    address = f"127.0.0.1:{_free_port()}"

    def start(epochs):
        return [
            _train_cli(
                tmp_path / "run",
                text,
                epochs,
                2,
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={i}",
            )
            for i in range(2)
        ]

    first, second = start(epochs=50)  # far more than the signal needs
    for line in first.stderr:  # process 0 logs; wait for training to be under way
        if "step 5 |" in line:
            break
    second.send_signal(signal.SIGINT)  # only process 1 is told to stop
    results = [_finish(p) for p in (first, second)]
    for code, stderr in results:
        assert code == 0, stderr[-3000:]
    assert "Stopped by a stop in another process" in results[0][1]
    assert "Stopped by SIGINT" in results[1][1]
    step = read_metrics(tmp_path / "run")[-1]["Step"]
    # At a log point no earlier than the one process 0 had logged when the signal was sent
    # (process 1 may not have reached that point's agreement yet), and long before the end.
    assert 5 <= step < 67
    for code, stderr in (_finish(p) for p in start(epochs=2)):
        assert code == 0, stderr[-3000:]
    _assert_same_run(tmp_path / "run", one_device_run)


def test_batch_size_that_devices_do_not_divide(text, tmp_path):
    process = _train_cli(tmp_path / "run", text, 1, 4, "--config.batch_size=6")
    code, stderr = _finish(process)
    assert code == 2
    assert "config.batch_size=6 does not split evenly over 4 devices; use a multiple of 4" in stderr
    assert "Traceback" not in stderr


def test_incomplete_multi_process_flags(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ParallelError, match="needs all three of --coordinator_address"):
        initialize_distributed(coordinator_address="127.0.0.1:1234")
    with pytest.raises(ParallelError, match=r"--process_id must lie in \[0, 2\)"):
        initialize_distributed("127.0.0.1:1234", 2, 2)
