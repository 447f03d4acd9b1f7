"""Sampling speed: our jitted sampler against the reference's per-character loop, same run.

    python benchmarks/sample_throughput.py [--json PATH]

At the reference size (2 x 512, vocabulary 71, top-k 5): characters per second of the reference
loop (one PyTorch call, a softmax, a top-k and numpy's choice per character), of our sampler for
1 stream and for 64 streams drawn in one call (also with `precision="bfloat16"`), and our
first-call compile time. The samplers take turns, each turn an untimed call then a timed one,
and medians are reported, since the machine is shared and noisy.
"""

import argparse
import json
import os
import platform
import statistics
import string
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from charlstm_jax import sampling
from charlstm_jax.data import Vocab
from charlstm_jax.model import CharLSTM
from charlstm_jax.torch_reference import ReferenceLSTM, reference_sample

VOCAB_SIZE, HIDDEN, LAYERS, TOP_K = 71, 512, 2, 5
PROMPT = "pigs"


def _ours(model, params, vocab, length, num_samples, seed, precision="float32"):
    start = time.perf_counter()
    texts = sampling.sample(
        model,
        params,
        vocab,
        PROMPT,
        length,
        top_k=TOP_K,
        num_samples=num_samples,
        rng_seed=seed,
        precision=precision,
    )
    elapsed = time.perf_counter() - start
    assert len(texts) == num_samples and all(len(t) == length for t in texts)
    return num_samples * length / elapsed


def flops_per_char(hidden: int, layers: int, vocab: int) -> int:
    """Matrix-product FLOPs of one character of one stream (the first layer's input: a gather)."""
    recurrent = layers * hidden * 4 * hidden
    inputs = (layers - 1) * hidden * 4 * hidden
    return 2 * (recurrent + inputs + hidden * vocab)


def product_ceiling(rows: int, hidden: int, repeats: int = 200) -> float:
    """GFLOP/s of XLA's `[rows, 2H] x [2H, 4H]` product, chained, measured alone here."""
    w = jax.random.normal(jax.random.key(0), (2 * hidden, 4 * hidden)) / hidden
    x = jax.random.normal(jax.random.key(1), (rows, 2 * hidden))

    @jax.jit
    def chain(x):
        def body(x, _):
            y = jnp.tanh(x @ w)  # the next product depends on this one, as in the sampler
            return y[:, : 2 * hidden], None

        return jax.lax.scan(body, x, None, length=repeats)[0]

    chain(x).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        chain(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return repeats * 2 * rows * 2 * hidden * 4 * hidden / statistics.median(times) / 1e9


def _reference(model, prompt_ids, length, seed):
    start = time.perf_counter()
    out = reference_sample(model, prompt_ids, length, TOP_K, np.random.default_rng(seed))
    elapsed = time.perf_counter() - start
    assert len(out) == length
    return length / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--length", type=int, default=1000, help="characters per stream")
    parser.add_argument("--reference_length", type=int, default=300)
    args = parser.parse_args()

    vocab = Vocab(string.ascii_letters + string.digits + " .,!?;:'\n")
    assert len(vocab) == VOCAB_SIZE
    model = CharLSTM(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, num_layers=LAYERS)
    params = model.init(jax.random.key(0), model.initialize_carry(1), jnp.zeros((1, 1), int))
    params = params["params"]
    torch.manual_seed(0)
    reference = ReferenceLSTM(VOCAB_SIZE, HIDDEN, LAYERS, 0.5)
    prompt_ids = list(vocab.encode(PROMPT))

    start = time.perf_counter()
    _ours(model, params, vocab, 256, 1, 0)  # compiles priming and one chunk
    compile_1 = time.perf_counter() - start
    start = time.perf_counter()
    _ours(model, params, vocab, 256, 64, 0)
    compile_64 = time.perf_counter() - start

    runners = {
        "reference": lambda seed: _reference(reference, prompt_ids, args.reference_length, seed),
        "ours_1": lambda seed: _ours(model, params, vocab, args.length, 1, seed),
        "ours_64": lambda seed: _ours(model, params, vocab, args.length, 64, seed),
        "ours_64_bf16": lambda seed: _ours(model, params, vocab, args.length, 64, seed, "bfloat16"),
    }
    rates = {name: [] for name in runners}
    for repeat in range(args.repeats):  # take turns, so load changes hit all alike
        for name, run in runners.items():
            # One untimed call first: right after another sampler ran, caches hold its data
            # and PyTorch's idle threads still spin, which would charge one for the other.
            run(repeat)
            rates[name].append(run(repeat))
    median = {name: statistics.median(values) for name, values in rates.items()}
    flops = flops_per_char(HIDDEN, LAYERS, VOCAB_SIZE)
    ceiling = product_ceiling(64, HIDDEN)
    figures = {
        "hardware": f"{platform.processor() or platform.machine()}, {jax.devices()[0]}",
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "model": f"{LAYERS} x {HIDDEN}, vocabulary {VOCAB_SIZE}, top_k {TOP_K}",
        "reference_chars_per_s": median["reference"],
        "ours_1_chars_per_s": median["ours_1"],
        "ours_64_chars_per_s": median["ours_64"],
        "speedup_1": median["ours_1"] / median["reference"],
        "speedup_64": median["ours_64"] / median["reference"],
        "ours_64_bfloat16_chars_per_s": median["ours_64_bf16"],
        "speedup_64_bfloat16": median["ours_64_bf16"] / median["reference"],
        "compile_s_1_stream": compile_1,
        "compile_s_64_streams": compile_64,
        "repeats": args.repeats,
        "mflop_per_char": flops / 1e6,
        "ours_64_gflops": median["ours_64"] * flops / 1e9,
        "product_ceiling_gflops_64_rows": ceiling,
        "speedup_64_at_ceiling": ceiling * 1e9 / flops / median["reference"],
    }
    print(f"Sampling at {figures['model']} on {figures['hardware']} (medians of {args.repeats})")
    print(f"{'sampler':<34}{'chars/s':>12}{'x reference':>14}")
    print(f"{'reference (PyTorch, per char)':<34}{median['reference']:>12.0f}{1.0:>14.1f}")
    print(f"{'charlstm-jax, 1 stream':<34}{median['ours_1']:>12.0f}{figures['speedup_1']:>14.1f}")
    print(
        f"{'charlstm-jax, 64 streams (total)':<34}{median['ours_64']:>12.0f}"
        f"{figures['speedup_64']:>14.1f}"
    )
    print(
        f"{'charlstm-jax, 64 streams, bfloat16':<34}{median['ours_64_bf16']:>12.0f}"
        f"{figures['speedup_64_bfloat16']:>14.1f}"
    )
    print(
        f"first call (compile + 256 chars): 1 stream {compile_1:.1f} s, "
        f"64 streams {compile_64:.1f} s"
    )
    print(
        f"64 streams: {figures['ours_64_gflops']:.0f} GFLOP/s of products ({flops / 1e6:.2f} "
        f"MFLOP a character); a [64, {2 * HIDDEN}] x [{2 * HIDDEN}, {4 * HIDDEN}] product alone "
        f"runs at {ceiling:.0f} GFLOP/s here, which caps 64 streams at "
        f"{figures['speedup_64_at_ceiling']:.0f}x the reference"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
