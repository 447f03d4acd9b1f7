"""Priming and generation, jitted: one scan over the prompt, one `lax.scan` per chunk of text.

Each step takes the softmax of the last logits (divided by `temperature`), keeps the `top_k`
most likely characters (and, with `top_p` < 1, the fewest of those whose probability reaches
`top_p`), renormalises and draws one with `jax.random.categorical`, then feeds it back.

Precision: float32 by default, the model's own function. `precision="bfloat16"` rounds the
LSTM's kernels and products' inputs to bfloat16 (sums stay float32; the head stays float32): on
CPUs with bfloat16 instructions, and on GPUs and TPUs, many streams sample about 2x faster,
and the logits move by about 1e-2, so the text differs from float32's after a while.

Randomness: stream `i` of a call draws step `t` with `fold_in(fold_in(key(rng_seed), i), t)`,
so a seed always gives the same text, chunking does not change it, and stream `i` of a batched
call equals a single-stream call given that stream's key.
"""

import math
from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from charlstm_jax.data import Vocab
from charlstm_jax.errors import UserError
from charlstm_jax.model import CharLSTM, decode_step

# An empty prompt starts the text as at the start of a paragraph.
EMPTY_PROMPT = "\n"
PRECISIONS = ("float32", "bfloat16")
# The LSTM's matrices; biases and the head stay float32 in every precision.
_KERNELS = ("input_kernel", "recurrent_kernel")


class SamplingError(UserError):
    """A sampling option or prompt cannot be used; the message says which and what to do."""


def check_options(vocab_size: int, top_k: int, temperature: float, top_p: float, length: int):
    """Raise `SamplingError` in one sentence for an option out of range."""
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer):
        raise SamplingError(f"top_k must be an integer, got {top_k!r}.")
    if not 1 <= top_k <= vocab_size:
        raise SamplingError(
            f"top_k must lie in [1, {vocab_size}] (the vocabulary size), got {top_k}."
        )
    if not (np.isfinite(temperature) and temperature > 0):
        raise SamplingError(f"temperature must be a positive number, got {temperature!r}.")
    if not (np.isfinite(top_p) and 0 < top_p <= 1):
        raise SamplingError(f"top_p must lie in (0, 1], got {top_p!r}.")
    if isinstance(length, bool) or not isinstance(length, int | np.integer) or length < 0:
        raise SamplingError(f"length must be a non-negative integer, got {length!r}.")


def prompt_ids(vocab: Vocab, prompt: str, drop_unknown: bool = False) -> np.ndarray:
    """The prompt's ids; unknown characters are listed in the error, or dropped on request.

    An empty prompt (or one emptied by dropping) is `EMPTY_PROMPT`, a newline.
    """
    missing = vocab.missing(prompt)
    if missing and not drop_unknown:
        raise SamplingError(
            f"The prompt has characters the model never saw: {''.join(missing)!r}; remove "
            "them, or pass --drop_unknown to leave them out."
        )
    prompt = "".join(c for c in prompt if c in vocab)
    if not prompt:
        if EMPTY_PROMPT not in vocab:
            raise SamplingError(
                "The prompt is empty and the vocabulary has no newline to start from; "
                "give a prompt."
            )
        prompt = EMPTY_PROMPT
    return vocab.encode(prompt)


def with_precision(model: CharLSTM, params, precision: str):
    """The model and params for `precision`: as they are, or with bfloat16 LSTM products."""
    if precision not in PRECISIONS:
        raise SamplingError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if precision == "float32":
        return model, params

    def cast(path, x):
        return x.astype(jnp.bfloat16) if path[-1].key in _KERNELS else x

    params = jax.tree_util.tree_map_with_path(cast, params)
    return model.clone(product_dtype=jnp.bfloat16), params


def stream_keys(rng_seed: int, num_samples: int) -> jax.Array:
    """One key per stream: `fold_in(key(rng_seed), i)` for stream `i`."""
    root = jax.random.key(rng_seed)
    return jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(num_samples))


@partial(jax.jit, static_argnums=0)
def prime(model: CharLSTM, params, ids: jax.Array):
    """Feed `ids[N, P]` from a zero carry in one scan; returns `(carry, last_logits[N, V])`."""
    carry = model.initialize_carry(ids.shape[0])
    carry, logits = model.apply({"params": params}, carry, ids, train=False)
    return carry, logits[:, -1]


def choose(logits: jax.Array, key: jax.Array, top_k: int, temperature, top_p) -> jax.Array:
    """Draw one id from `logits[V]` among the `top_k` (and `top_p`) most likely."""
    top_logits, top_ids = jax.lax.top_k(logits / temperature, top_k)
    probs = jax.nn.softmax(top_logits)
    # Nucleus: keep a candidate while the mass before it is below top_p (the first always).
    mass_before = jnp.cumsum(probs) - probs
    top_logits = jnp.where(mass_before < top_p, top_logits, -jnp.inf)
    return top_ids[jax.random.categorical(key, top_logits)]


@partial(jax.jit, static_argnums=(0, 1, 2))
def generate_chunk(
    model: CharLSTM, length: int, top_k: int, params, carry, logits, keys, start, temperature, top_p
):
    """Generate `length` ids for each of `N` streams from `(carry, logits[N, V])`.

    `keys[N]` are the streams' keys and `start` the index of the chunk's first character, so
    consecutive chunks continue one text. Returns `(carry, logits, ids[N, length])`.
    """

    def step(state, t):
        carry, logits = state
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, start + t)
        ids = jax.vmap(choose, in_axes=(0, 0, None, None, None))(
            logits, step_keys, top_k, temperature, top_p
        )
        carry, new_logits = decode_step(model, params, carry, ids)
        return (carry, new_logits), ids

    (carry, logits), ids = jax.lax.scan(step, (carry, logits), jnp.arange(length))
    return carry, logits, ids.T


def sample_chunks(
    model: CharLSTM,
    params,
    vocab: Vocab,
    prompt: str,
    length: int,
    *,
    top_k: int = 5,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    rng_seed: int = 0,
    chunk: int = 256,
    drop_unknown: bool = False,
    precision: str = "float32",
) -> Iterator[list[str]]:
    """An iterator over the new text of each stream, chunk by chunk (`num_samples` strings).

    `length` counts the new characters generated after the prompt; the prompt is not repeated.
    Options and prompt are checked at once, before anything is generated.
    """
    check_options(len(vocab), top_k, temperature, top_p, length)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise SamplingError(f"num_samples must be a positive integer, got {num_samples!r}.")
    ids = prompt_ids(vocab, prompt, drop_unknown)
    model, params = with_precision(model, params, precision)

    # Chunks of equal size, at most `chunk`: a length just over a multiple of `chunk` would
    # otherwise compute most of a last chunk only to throw it away (1000 = 4 x 250, not 4 x 256).
    num_chunks = max(1, math.ceil(length / chunk))
    size = math.ceil(length / num_chunks)

    def chunks():
        carry, logits = prime(model, params, jnp.asarray(np.tile(ids, (num_samples, 1))))
        keys = stream_keys(rng_seed, num_samples)
        done = 0
        while done < length:
            carry, logits, new = generate_chunk(
                model,
                size,
                top_k,
                params,
                carry,
                logits,
                keys,
                done,
                jnp.float32(temperature),
                jnp.float32(top_p),
            )
            take = min(size, length - done)
            yield [vocab.decode(row[:take]) for row in np.asarray(new)]
            done += take

    return chunks()


def sample(model: CharLSTM, params, vocab: Vocab, prompt: str, length: int, **options) -> list[str]:
    """The `num_samples` new texts of `length` characters after `prompt` (see `sample_chunks`)."""
    texts = None
    for pieces in sample_chunks(model, params, vocab, prompt, length, **options):
        texts = pieces if texts is None else [t + p for t, p in zip(texts, pieces, strict=True)]
    return texts or [""] * options.get("num_samples", 1)
