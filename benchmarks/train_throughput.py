"""Training speed and memory: our jitted train step against the reference's PyTorch step.

    python benchmarks/train_throughput.py [--json PATH] [--no_sweep] [--no_epoch]

In one run, alternating the two so that load changes hit both alike (medians reported):
- characters per second of one training step at the reference configuration (2 x 512, batch 16,
  window 100, vocabulary 71): ours (`train.train_step`, jitted) and the reference's (numpy
  one-hot, `nn.LSTM`, dropout, Adam, clipping: `torch_reference.reference_train_step`);
- our first-call compile time; floating-point operations per step and the rate achieved,
  against a matrix-product ceiling measured here at the step's own shapes;
- the cost of one validation pass (10 windows of 16 x 100) for both, and its share of an epoch;
- sweeps over hidden size (128, 256, 512, 1024) and batch size (16, 64, 256);
- one whole epoch as a user runs it (`scripts/train.py`, a fresh process: start-up, compilation,
  training and validation every 10 steps) against the reference's epoch loop in a fresh
  process, with the peak resident memory of each.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from charlstm_jax import train
from charlstm_jax.config import get_config
from charlstm_jax.torch_reference import (
    ReferenceLSTM,
    make_optimizer,
    reference_train_step,
    reference_validation_loss,
)

REPO = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 71


def step_flops(batch: int, window: int, hidden: int, layers: int, vocab: int) -> dict:
    """Matrix-product FLOPs of one training step (forward, and backward at twice the forward).

    The first layer's one-hot input product is a row gather (no FLOPs), so is its gradient.
    Returns the recurrent (thin, per time step) and the large (all steps at once) parts.
    """
    rows = batch * window
    recurrent = layers * 2 * rows * hidden * 4 * hidden  # h @ W_hh, each time step
    inputs = (layers - 1) * 2 * rows * hidden * 4 * hidden  # x @ W_ih, layers above the first
    head = 2 * rows * hidden * vocab
    # Backward: recurrent dh (thin, per step) + dW_hh (large); inputs and head twice (large).
    thin = recurrent * 2
    large = recurrent + 3 * inputs + 3 * head
    return {"thin": thin, "large": large, "total": thin + large}


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def alternate(runners: dict, timed: int, per_turn: int = 2) -> dict:
    """Median seconds per call of each runner, taking turns until each has `timed` calls.

    Each turn starts with one untimed call: right after the other framework ran, caches hold
    its data and its idle threads still spin (measured here: a step timed straight after the
    other's ran 10-25% slower, for both), which would charge one side for the other's work.
    """
    times = {name: [] for name in runners}
    while min(len(t) for t in times.values()) < timed:
        for name, fn in runners.items():
            fn()
            times[name] += _time(fn, per_turn)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_ceiling(batch: int, window: int, hidden: int, repeats: int = 5) -> dict:
    """GFLOP/s of the step's two kinds of product, measured alone with XLA.

    Thin: `window` dependent `[batch, H] x [H, 4H]` products in a scan (the recurrence's shape);
    large: one `[batch * window, H] x [H, 4H]` product (input projections, weight gradients).
    """
    key = jax.random.key(0)
    w = jax.random.normal(key, (hidden, 4 * hidden)) / hidden
    h0 = jax.random.normal(key, (batch, hidden))
    x = jax.random.normal(key, (batch * window, hidden))

    @jax.jit
    def thin(h):
        def body(h, _):
            # Every column of the product is used, as in the LSTM (XLA would shrink a product
            # whose output is only partly used).
            i, f, g, o = jnp.split(h @ w, 4, axis=-1)
            return jnp.tanh(i) * jnp.tanh(f) + jnp.tanh(g) * jnp.tanh(o), None

        return jax.lax.scan(body, h, None, length=window)[0]

    large = jax.jit(lambda x: x @ w)
    thin(h0).block_until_ready()
    large(x).block_until_ready()
    t_thin = statistics.median(_time(lambda: thin(h0).block_until_ready(), repeats))
    t_large = statistics.median(_time(lambda: large(x).block_until_ready(), repeats))
    flops = 2 * batch * hidden * 4 * hidden
    return {
        "thin_gflops": window * flops / t_thin / 1e9,
        "large_gflops": window * flops / t_large / 1e9,
    }


class Ours:
    """Our jitted train step and validation pass at one configuration."""

    def __init__(self, hidden: int, batch: int, window: int, layers: int = 2):
        config = get_config()
        config.update(hidden_size=hidden, batch_size=batch, window=window, num_layers=layers)
        self.config = config
        self.state = train.create_train_state(config, VOCAB_SIZE, jax.random.key(0))
        self.model = train.create_model(config, VOCAB_SIZE)
        self.carry = self.model.initialize_carry(batch)
        self.key = jax.random.key(1)
        self.step_fn = jax.jit(train.train_step, donate_argnums=(0, 1))
        self.eval_fn = jax.jit(train.evaluate, static_argnums=0)
        rng = np.random.default_rng(0)
        self.inputs = rng.integers(0, VOCAB_SIZE, (batch, window), dtype=np.int32)
        self.targets = rng.integers(0, VOCAB_SIZE, (batch, window), dtype=np.int32)
        self.valid = jnp.asarray(rng.integers(0, VOCAB_SIZE, (10, batch, window), dtype=np.int32))

    def step(self):
        self.state, self.carry, metrics = self.step_fn(
            self.state, self.carry, self.inputs, self.targets, self.key
        )
        metrics["loss"].block_until_ready()

    def validate(self):
        carry = self.model.initialize_carry(self.valid.shape[1])
        self.eval_fn(
            self.model.apply, self.state.params, self.valid, self.valid, carry
        ).block_until_ready()


class Reference:
    """The reference's PyTorch train step and validation pass at one configuration."""

    def __init__(self, hidden: int, batch: int, window: int, layers: int = 2):
        torch.manual_seed(0)
        self.model = ReferenceLSTM(VOCAB_SIZE, hidden, layers, 0.5)
        self.optimizer = make_optimizer(self.model, 1e-3)
        self.h, self.c = self.model.initial_hidden_state(batch)
        rng = np.random.default_rng(0)
        self.inputs = rng.integers(0, VOCAB_SIZE, (batch, window))
        self.targets = rng.integers(0, VOCAB_SIZE, (batch, window))
        self.valid = rng.integers(0, VOCAB_SIZE, (10, batch, window))

    def step(self):
        _, self.h, self.c = reference_train_step(
            self.model, self.optimizer, self.inputs, self.targets, self.h, self.c, 5.0
        )

    def validate(self):
        reference_validation_loss(self.model, self.valid, self.valid)


def compare(hidden: int, batch: int, window: int, steps: int, warmup: int = 2) -> dict:
    """Alternate our step and the reference's; medians in seconds and chars/s."""
    ours, reference = Ours(hidden, batch, window), Reference(hidden, batch, window)
    start = time.perf_counter()
    ours.step()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        ours.step()
        reference.step()
    medians = alternate({"ours": ours.step, "reference": reference.step}, steps)
    ours_s, reference_s = medians["ours"], medians["reference"]
    chars = batch * window
    return {
        "hidden": hidden,
        "batch": batch,
        "ours_step_s": ours_s,
        "reference_step_s": reference_s,
        "ours_chars_per_s": chars / ours_s,
        "reference_chars_per_s": chars / reference_s,
        "speedup": reference_s / ours_s,
        "compile_s": compile_s,
        "_runners": (ours, reference),
    }


def validation_cost(ours: Ours, reference: Reference, repeats: int) -> dict:
    """Median seconds of one validation pass (10 windows) for both, alternating."""
    ours.validate()  # compile
    return alternate({"ours": ours.validate, "reference": reference.validate}, repeats)


REFERENCE_EPOCH = """
import resource, sys, time
import numpy as np, torch
from charlstm_jax import data
from charlstm_jax.torch_reference import *
text = data.read_text(sys.argv[1])
vocab = data.Vocab.from_text(text)
ids = vocab.encode(text)
train_ids, valid_ids = data.split_train_validation(ids, 0.1)
inputs, targets = data.stream_batches(train_ids, 16, 100)
valid_inputs, valid_targets = data.stream_batches(valid_ids, 16, 100)
model = ReferenceLSTM(len(vocab), 512, 2, 0.5)
optimizer = make_optimizer(model, 1e-3)
h, c = model.initial_hidden_state(16)
for run, (x, y) in enumerate(zip(inputs, targets), 1):
    loss, h, c = reference_train_step(model, optimizer, x, y, h, c, 5.0)
    if run % 10 == 0:
        reference_validation_loss(model, valid_inputs, valid_targets)
torch.save(model.state_dict(), sys.argv[2])
"""


def _peak_rss_gib(pid: int) -> float | None:
    """The process's peak resident memory so far (VmHWM; it starts afresh at exec), in GiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def _timed_process(command: list[str], env: dict | None = None) -> dict:
    """Wall time and peak resident memory (GiB) of a fresh process.

    The peak is read from /proc while the process runs (a fork's rusage would also count the
    pages it shared with this large benchmark process before its exec).
    """
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, _peak_rss_gib(process.pid) or 0.0)
        time.sleep(0.1)
    elapsed = time.perf_counter() - start
    stderr = process.stderr.read()
    if process.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{stderr[-3000:]}")
    return {"seconds": elapsed, "peak_rss_gib": peak}


def epoch_comparison(text: Path, rounds: int) -> dict:
    """One epoch of the reference configuration, whole process, ours and the reference's.

    Ours runs twice per round: with a cold compilation cache (a user's first run) and again
    with the cache that run left (every later run: a resumed run, another epoch count). The
    rounds alternate the three; medians of the wall times, the highest peak memory.
    """
    runs = {"reference": [], "ours": [], "ours_warm_cache": []}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "reference_epoch.py"
        script.write_text(REFERENCE_EPOCH)
        for i in range(rounds):
            runs["reference"].append(
                _timed_process([sys.executable, str(script), str(text), f"{tmp}/ref.pt"])
            )
            cache = {"JAX_COMPILATION_CACHE_DIR": f"{tmp}/xla{i}"}
            for name in ("ours", "ours_warm_cache"):  # the first fills the cache
                command = [
                    sys.executable,
                    "scripts/train.py",
                    "--config",
                    "configs/animal_farm.py",
                    "--config.epochs=1",
                    f"--config.data_path={text}",
                    f"--workdir={tmp}/run_{name}_{i}",
                ]
                runs[name].append(_timed_process(command, env=cache))
    result = {
        name: {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in rs),
            "all_seconds": [r["seconds"] for r in rs],
        }
        for name, rs in runs.items()
    }
    reference_s = result["reference"]["seconds"]
    result["speedup"] = reference_s / result["ours"]["seconds"]
    result["speedup_warm_cache"] = reference_s / result["ours_warm_cache"]["seconds"]
    return result


def _row(label, *cells) -> str:
    """One table line: a label, then right-aligned numbers (3 decimals below 10) or text."""

    def cell(x):
        if isinstance(x, str):
            return f"{x:>10}"
        return f"{x:>10.3f}" if abs(x) < 10 else f"{x:>10.0f}"

    return f"{label:<22}" + "".join(cell(x) for x in cells)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--steps", type=int, default=12, help="timed steps at the reference size")
    parser.add_argument("--sweep_steps", type=int, default=5)
    parser.add_argument("--no_sweep", action="store_true")
    parser.add_argument("--no_epoch", action="store_true")
    parser.add_argument("--epoch_rounds", type=int, default=2, help="whole-epoch runs of each")
    parser.add_argument(
        "--text", default=str(REPO.parent / "shared" / "data" / "animal_farm.txt"),
        help="the text for the epoch comparison",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())

    hardware = (
        f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
        f"on {jax.devices()[0].platform}, torch {torch.__version__}"
    )
    print(f"Training step at the reference configuration on {hardware}")
    main_result = compare(512, 16, 100, args.steps)
    ours, reference = main_result.pop("_runners")
    flops = step_flops(16, 100, 512, 2, VOCAB_SIZE)
    ceiling = matmul_ceiling(16, 100, 512)
    floor_s = flops["thin"] / (ceiling["thin_gflops"] * 1e9)
    floor_s += flops["large"] / (ceiling["large_gflops"] * 1e9)
    validation = validation_cost(ours, reference, repeats=5)
    figures = {
        "hardware": hardware,
        "speedup": main_result["speedup"],
        **{k: v for k, v in main_result.items() if k not in ("hidden", "batch")},
        "gflop_per_step": flops["total"] / 1e9,
        "ours_gflops": flops["total"] / main_result["ours_step_s"] / 1e9,
        "ceiling": ceiling,
        "floor_step_s": floor_s,
        "fraction_of_floor": floor_s / main_result["ours_step_s"],
        "validation_s": validation,
    }
    r = main_result
    print(_row("", "step (s)", "chars/s", "x ref"))
    print(_row("reference (PyTorch)", r["reference_step_s"], r["reference_chars_per_s"], 1.0))
    print(_row("charlstm-jax", r["ours_step_s"], r["ours_chars_per_s"], r["speedup"]))
    print(f"first call (compile): {r['compile_s']:.1f} s")
    print(
        f"{flops['total'] / 1e9:.1f} GFLOP per step, ours at {figures['ours_gflops']:.1f} "
        f"GFLOP/s; products alone: thin {ceiling['thin_gflops']:.1f}, large "
        f"{ceiling['large_gflops']:.1f} GFLOP/s -> floor {floor_s:.3f} s/step; "
        f"ours reaches {figures['fraction_of_floor']:.0%} of the floor's speed"
    )
    ratio = validation["reference"] / validation["ours"]
    print(
        f"validation pass (10 windows of 16 x 100): ours {validation['ours']:.2f} s, "
        f"reference {validation['reference']:.2f} s ({ratio:.2f}x)"
    )

    if not args.no_sweep:
        sweep = []
        print("\n" + _row("hidden x batch", "ours s", "ref s", "ours c/s", "ref c/s", "x ref"))
        for hidden, batch in [(128, 16), (256, 16), (512, 16), (1024, 16), (512, 64), (512, 256)]:
            row = compare(hidden, batch, 100, args.sweep_steps, warmup=1)
            row.pop("_runners")
            sweep.append(row)
            print(
                _row(
                    f"{hidden} x {batch}",
                    row["ours_step_s"],
                    row["reference_step_s"],
                    row["ours_chars_per_s"],
                    row["reference_chars_per_s"],
                    row["speedup"],
                )
            )
        figures["sweep"] = sweep

    if not args.no_epoch:
        epoch = epoch_comparison(Path(args.text), args.epoch_rounds)
        figures["epoch"] = epoch
        ours_e, warm_e, ref_e = epoch["ours"], epoch["ours_warm_cache"], epoch["reference"]
        # Validation passes per epoch: ours at steps 10, ..., 90 and at the epoch's end (94),
        # the reference's at 10, ..., 90.
        share = 10 * validation["ours"] / ours_e["seconds"]
        ref_share = 9 * validation["reference"] / ref_e["seconds"]
        print(
            f"\none epoch, whole process (median of {args.epoch_rounds}): reference "
            f"{ref_e['seconds']:.1f} s (peak RSS {ref_e['peak_rss_gib']:.2f} GiB, validation "
            f"~{ref_share:.0%}); ours {ours_e['seconds']:.1f} s with a cold compilation cache "
            f"({epoch['speedup']:.2f}x; peak RSS {ours_e['peak_rss_gib']:.2f} GiB, validation "
            f"~{share:.0%}), {warm_e['seconds']:.1f} s with a warm one "
            f"({epoch['speedup_warm_cache']:.2f}x)"
        )
        figures["epoch_speedup"] = epoch["speedup"]
        figures["epoch_speedup_warm_cache"] = epoch["speedup_warm_cache"]
        figures["validation_share_of_epoch"] = {"ours": share, "reference": ref_share}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
