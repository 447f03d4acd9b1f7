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

The memory allocator: our scripts make glibc keep freed memory (`charlstm_jax.allocator`),
which spares a trainer the page faults of a fresh 140 MB buffer each step. This process sets it
too, before torch starts its threads, so the in-process comparison is like for like; a child
process repeats the step comparison with glibc's defaults for both. Whole epochs run the
reference as it ships (glibc's defaults) and with the same setting as ours.
"""

# ruff: noqa: E402 (the allocator must be set before the imports below start their threads)
from charlstm_jax import allocator

ALLOCATOR_TUNED = allocator.reuse_freed_memory()

import argparse
import functools
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
    Returns the thin parts (one product per time step: `W_hh^T @ h` forward, `W_hh @ dz`
    backward) and the large part (all steps at once: input products, weight gradients, head).
    """
    rows = batch * window
    recurrent = layers * 2 * rows * hidden * 4 * hidden  # W_hh^T @ h, each time step
    inputs = (layers - 1) * 2 * rows * hidden * 4 * hidden  # x @ W_ih, layers above the first
    head = 2 * rows * hidden * vocab
    # Backward: recurrent dh (thin, per step) + dW_hh (large); inputs and head twice (large).
    large = recurrent + 3 * inputs + 3 * head
    total = 2 * recurrent + large
    return {"thin_forward": recurrent, "thin_backward": recurrent, "large": large, "total": total}


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


def matmul_ceiling(batch: int, window: int, hidden: int, repeats: int = 9) -> dict:
    """GFLOP/s of the step's three kinds of product, each measured alone with XLA.

    In the orientation the model runs them (its layers are feature-major, see
    `charlstm_jax.model`). Thin forward: `window` dependent `[4H, H] x [H, batch]` products in a
    scan (the recurrence's shape); thin backward: the same with `[H, 4H] x [4H, batch]` (the
    backward scan's); large: one `[batch * window, H] x [H, 4H]` product (input products,
    weight gradients).
    """
    key = jax.random.key(0)
    w = jax.random.normal(key, (hidden, 4 * hidden)) / hidden
    w_t = jnp.asarray(np.asarray(w).T)
    h0 = jax.random.normal(key, (hidden, batch))
    x = jax.random.normal(key, (batch * window, hidden))

    def chain(step):
        return jax.jit(lambda h: jax.lax.scan(lambda h, _: (step(h), None), h, None, window)[0])

    # Every row of each product is used, as in the LSTM (XLA would shrink a product whose
    # output is only partly used).
    def forward(h):
        i, f, g, o = jnp.split(w_t @ h, 4, axis=0)
        return jnp.tanh(i) * jnp.tanh(f) + jnp.tanh(g) * jnp.tanh(o)

    def backward(dz):
        dh = jnp.tanh(w @ dz)
        return jnp.concatenate([dh, -dh, 0.5 * dh, dh], axis=0)

    runs = {
        "thin_forward": (chain(forward), h0),
        "thin_backward": (chain(backward), jnp.tile(h0, (4, 1))),
        "large": (jax.jit(lambda x: x @ w), x),
    }
    flops = window * 2 * batch * hidden * 4 * hidden
    ceiling = {}
    for name, (fn, arg) in runs.items():
        run = functools.partial(lambda fn, arg: fn(arg).block_until_ready(), fn, arg)
        run()
        # The best of the repeats: a ceiling is what the products reach when nothing disturbs.
        ceiling[f"{name}_gflops"] = flops / min(_time(run, repeats)) / 1e9
    return ceiling


def floor_seconds(flops: dict, ceiling: dict) -> float:
    """The step's time if every product ran at its kind's ceiling and nothing else took time."""
    return sum(flops[kind] / (ceiling[f"{kind}_gflops"] * 1e9) for kind in flops if kind != "total")


def large_floor_seconds(flops: dict, ceiling: dict) -> float:
    """The step's time if every product, thin ones too, ran at the large product's rate: the
    stricter floor once the thin products beat XLA's (our cell kernel runs them)."""
    return flops["total"] / (ceiling["large_gflops"] * 1e9)


class Ours:
    """Our jitted train step and validation pass at one configuration."""

    def __init__(
        self, hidden: int, batch: int, window: int, layers: int = 2, cell_kernel: bool = True
    ):
        config = get_config()
        config.update(hidden_size=hidden, batch_size=batch, window=window, num_layers=layers)
        config.cell_kernel = cell_kernel
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
        # All of the step, as the train loop waits for it: the next step must not allocate
        # its buffer before this one has freed its own (see `charlstm_jax.allocator`).
        jax.block_until_ready((self.state, self.carry, metrics))

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


def compare(
    hidden: int, batch: int, window: int, steps: int, warmup: int = 2, xla_path: bool = False
) -> dict:
    """Alternate our step and the reference's; medians in seconds and chars/s. With
    `xla_path`, also ours without the compiled cell kernel (`config.cell_kernel=False`)."""
    ours, reference = Ours(hidden, batch, window), Reference(hidden, batch, window)
    start = time.perf_counter()
    ours.step()
    compile_s = time.perf_counter() - start
    runners = {"ours": ours.step, "reference": reference.step}
    if xla_path:
        runners["ours_xla_path"] = Ours(hidden, batch, window, cell_kernel=False).step
    for _ in range(warmup):
        for run in runners.values():
            run()
    allocator.programs_compiled()  # as the train loop does once its programs are built
    medians = alternate(runners, steps)
    ours_s, reference_s = medians["ours"], medians["reference"]
    chars = batch * window
    xla = {}
    if xla_path:
        xla = {"ours_xla_path_step_s": medians["ours_xla_path"]}
        xla["cell_kernel_speedup"] = medians["ours_xla_path"] / ours_s
    return {
        **xla,
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
    allocator.programs_compiled()
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


# glibc's settings that `allocator` makes, as environment variables: the reference compiles
# nothing, so it has them from its start.
TUNED_MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(allocator.INT_MAX),
}
DEFAULT_MALLOC_ENV = {allocator.OPT_OUT: "1"}

# The whole-epoch runs: (name, what it is); the reference as it ships comes first.
EPOCH_RUNS = [
    ("reference", "reference, glibc's allocator (as it ships)"),
    ("reference_tuned_allocator", "reference, with our allocator setting"),
    ("ours", "ours, first run (cold compilation cache)"),
    ("ours_warm_cache", "ours, later runs (warm cache)"),
    ("ours_default_allocator", "ours, warm cache, glibc's allocator"),
]


def epoch_comparison(text: Path, rounds: int) -> dict:
    """One epoch of the reference configuration, whole process, ours and the reference's.

    Each round runs the reference as it ships and with our allocator setting, and ours with a
    cold compilation cache (a user's first run), with the cache that run left (every later
    run: a resumed run, another epoch count), and with that cache but glibc's allocator.
    Medians of the wall times, the highest peak memory.
    """
    runs = {name: [] for name, _ in EPOCH_RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "reference_epoch.py"
        script.write_text(REFERENCE_EPOCH)
        reference = [sys.executable, str(script), str(text), f"{tmp}/ref.pt"]
        for i in range(rounds):
            runs["reference"].append(_timed_process(reference))
            runs["reference_tuned_allocator"].append(_timed_process(reference, TUNED_MALLOC_ENV))
            cache = {"JAX_COMPILATION_CACHE_DIR": f"{tmp}/xla{i}"}
            for name, env in [
                ("ours", cache),  # fills the cache
                ("ours_warm_cache", cache),
                ("ours_default_allocator", {**cache, **DEFAULT_MALLOC_ENV}),
            ]:
                command = [
                    sys.executable,
                    "scripts/train.py",
                    "--config",
                    "configs/animal_farm.py",
                    "--config.epochs=1",
                    f"--config.data_path={text}",
                    f"--workdir={tmp}/run_{name}_{i}",
                ]
                runs[name].append(_timed_process(command, env=env))
    result = {
        name: {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in rs),
            "all_seconds": [r["seconds"] for r in rs],
        }
        for name, rs in runs.items()
    }
    shipped, tuned = result["reference"]["seconds"], result["reference_tuned_allocator"]["seconds"]
    ours, warm = result["ours"]["seconds"], result["ours_warm_cache"]["seconds"]
    result["speedup"] = shipped / ours
    result["speedup_warm_cache"] = shipped / warm
    result["speedup_same_allocator"] = tuned / ours
    result["speedup_same_allocator_warm_cache"] = tuned / warm
    return result


def default_allocator_comparison(steps: int) -> dict:
    """The step and validation comparison again, in a child process on glibc's defaults."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "default.json"
        command = [sys.executable, __file__, "--no_sweep", "--no_epoch", f"--steps={steps}"]
        subprocess.run(
            [*command, f"--json={out}"],
            cwd=REPO,
            env={**os.environ, **DEFAULT_MALLOC_ENV},
            check=True,
            stdout=subprocess.DEVNULL,
        )
        figures = json.loads(out.read_text())
    return {
        "speedup": figures["speedup"],
        "ours_step_s": figures["ours_step_s"],
        "reference_step_s": figures["reference_step_s"],
        "validation_s": figures["validation_s"],
    }


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
    parser.add_argument("--steps", type=int, default=20, help="timed steps at the reference size")
    parser.add_argument("--sweep_steps", type=int, default=5)
    parser.add_argument("--no_sweep", action="store_true")
    parser.add_argument("--no_epoch", action="store_true")
    parser.add_argument(
        "--no_default_allocator", action="store_true",
        help="skip the child process that compares the steps on glibc's default allocator",
    )  # fmt: skip
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
    allocation = "our allocator setting" if ALLOCATOR_TUNED else "glibc's default allocator"
    print(f"Training step at the reference configuration on {hardware}; both with {allocation}")
    ceiling = matmul_ceiling(16, 100, 512)  # first: torch's idle threads would slow it
    main_result = compare(512, 16, 100, args.steps, xla_path=True)
    ours, reference = main_result.pop("_runners")
    flops = step_flops(16, 100, 512, 2, VOCAB_SIZE)
    floor_s = floor_seconds(flops, ceiling)
    large_floor_s = large_floor_seconds(flops, ceiling)
    validation = validation_cost(ours, reference, repeats=5)
    figures = {
        "hardware": hardware,
        "allocator_tuned": ALLOCATOR_TUNED,
        "speedup": main_result["speedup"],
        **{k: v for k, v in main_result.items() if k not in ("hidden", "batch")},
        "gflop_per_step": flops["total"] / 1e9,
        "ours_gflops": flops["total"] / main_result["ours_step_s"] / 1e9,
        "ceiling": ceiling,
        "floor_step_s": floor_s,
        "fraction_of_floor": floor_s / main_result["ours_step_s"],
        "reference_fraction_of_floor": floor_s / main_result["reference_step_s"],
        "large_floor_step_s": large_floor_s,
        "fraction_of_large_floor": large_floor_s / main_result["ours_step_s"],
        "reference_fraction_of_large_floor": large_floor_s / main_result["reference_step_s"],
        "validation_s": validation,
        "validation_speedup": validation["reference"] / validation["ours"],
    }
    r = main_result
    print(_row("", "step (s)", "chars/s", "x ref"))
    print(_row("reference (PyTorch)", r["reference_step_s"], r["reference_chars_per_s"], 1.0))
    print(_row("charlstm-jax", r["ours_step_s"], r["ours_chars_per_s"], r["speedup"]))
    xla_s = r["ours_xla_path_step_s"]
    print(_row("  XLA path (no kernel)", xla_s, 16 * 100 / xla_s, r["reference_step_s"] / xla_s))
    print(f"first call (compile): {r['compile_s']:.1f} s")
    print(
        f"{flops['total'] / 1e9:.1f} GFLOP per step, ours at {figures['ours_gflops']:.1f} "
        f"GFLOP/s; products alone: thin forward {ceiling['thin_forward_gflops']:.0f}, thin "
        f"backward {ceiling['thin_backward_gflops']:.0f}, large {ceiling['large_gflops']:.0f} "
        f"GFLOP/s -> floor {floor_s:.3f} s/step; ours reaches "
        f"{figures['fraction_of_floor']:.0%} of the floor's speed, the reference "
        f"{figures['reference_fraction_of_floor']:.0%}"
    )
    print(
        f"every product at the large one's rate -> floor {large_floor_s:.3f} s/step; ours "
        f"reaches {figures['fraction_of_large_floor']:.0%} of it, the reference "
        f"{figures['reference_fraction_of_large_floor']:.0%}"
    )
    print(
        f"validation pass (10 windows of 16 x 100): ours {validation['ours']:.2f} s, "
        f"reference {validation['reference']:.2f} s ({figures['validation_speedup']:.2f}x)"
    )
    if ALLOCATOR_TUNED and not args.no_default_allocator:
        default = default_allocator_comparison(args.steps)
        figures["default_allocator"] = default
        figures["speedup_default_allocator"] = default["speedup"]
        print(
            f"both on glibc's default allocator (a child process): step ours "
            f"{default['ours_step_s']:.3f} s, reference {default['reference_step_s']:.3f} s "
            f"({default['speedup']:.2f}x); validation ours {default['validation_s']['ours']:.2f} "
            f"s, reference {default['validation_s']['reference']:.2f} s"
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
        shipped = epoch["reference"]["seconds"]
        print(f"\none epoch, whole process (median of {args.epoch_rounds}):")
        header = _row("", "seconds", "peak GiB", "x ref")[22:]
        print(f"{'':<44}{header}  (x ref: against the reference as it ships)")
        for name, label in EPOCH_RUNS:
            run = epoch[name]
            print(
                f"{label:<44}"
                + _row("", run["seconds"], run["peak_rss_gib"], shipped / run["seconds"])[22:]
            )
        print(
            "against the reference with our allocator setting: "
            f"{epoch['speedup_same_allocator']:.2f}x (first run), "
            f"{epoch['speedup_same_allocator_warm_cache']:.2f}x (warm cache)"
        )
        # Validation passes per epoch: ours at steps 10, ..., 90 and at the epoch's end (94),
        # the reference's at 10, ..., 90.
        share = 10 * validation["ours"] / epoch["ours_warm_cache"]["seconds"]
        ref_share = 9 * validation["reference"] / epoch["reference_tuned_allocator"]["seconds"]
        print(
            f"validation's share of an epoch: ours ~{share:.0%}, the reference's ~{ref_share:.0%}"
        )
        figures["epoch_speedup"] = epoch["speedup"]
        figures["epoch_speedup_warm_cache"] = epoch["speedup_warm_cache"]
        figures["epoch_speedup_same_allocator"] = epoch["speedup_same_allocator"]
        figures["validation_share_of_epoch"] = {"ours": share, "reference": ref_share}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
