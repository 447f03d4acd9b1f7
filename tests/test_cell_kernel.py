"""The compiled CPU kernel for the cell's step: the same function as the XLA path, gradients too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charlstm_jax import cell_kernel
from charlstm_jax.model import CharLSTM, init_params

V, T = 13, 7

pytestmark = pytest.mark.skipif(
    not cell_kernel.available(), reason="the compiled kernel is not built (pip install -e .)"
)


def _random_carry(model, batch, seed):
    carry = model.initialize_carry(batch)
    keys = jax.random.split(jax.random.key(seed), len(jax.tree_util.tree_leaves(carry)))
    leaves, treedef = jax.tree_util.tree_flatten(carry)
    leaves = [0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _both(hidden, batch):
    """The model with the kernel and without it (the XLA path), params, a carry and ids."""
    kernel = CharLSTM(vocab_size=V, hidden_size=hidden, num_layers=2, drop_prob=0.5)
    xla = kernel.clone(cell_kernel=False)
    params = init_params(kernel, jax.random.key(hidden + batch))
    ids = jax.random.randint(jax.random.key(batch), (batch, T), 0, V)
    return kernel, xla, params, _random_carry(kernel, batch, 3), ids


def _assert_trees_close(a, b, **tolerance):
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    for x, y in leaves:
        np.testing.assert_allclose(x, y, **tolerance)


def test_usable_only_for_multiples_of_16():
    assert cell_kernel.usable(16) and cell_kernel.usable(512)
    assert not cell_kernel.usable(24)


# Batches below, at and above one 16-column vector, and not a multiple of it.
@pytest.mark.parametrize(("hidden", "batch"), [(16, 1), (32, 16), (48, 21)])
@pytest.mark.parametrize("train", [False, True])
def test_forward_matches_the_xla_path(hidden, batch, train):
    kernel, xla, params, carry, ids = _both(hidden, batch)
    rngs = {"dropout": jax.random.key(7)} if train else None
    outputs = [
        jax.jit(lambda p, c, m=m: m.apply({"params": p}, c, ids, train, rngs=rngs))(params, carry)
        for m in (kernel, xla)
    ]
    _assert_trees_close(*outputs, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(("hidden", "batch"), [(16, 3), (32, 16), (48, 21)])
def test_gradients_match_the_xla_path(hidden, batch):
    """Gradients of a loss on the logits and the final carry, for the params and the carry."""
    kernel, xla, params, carry, ids = _both(hidden, batch)
    weights = jax.random.normal(jax.random.key(11), (batch, T, V))

    def loss(model, params, carry):
        rngs = {"dropout": jax.random.key(5)}
        final, logits = model.apply({"params": params}, carry, ids, True, rngs=rngs)
        carry_term = sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(final))
        return jnp.sum(logits * weights) + carry_term

    grads = [jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0) for _ in range(2)]
    ours = grads[0](kernel, params, carry)
    reference = grads[1](xla, params, carry)
    _assert_trees_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_windows_in_a_row_keep_the_carry():
    """Two windows through the kernel, the carry handed on, equal one window twice as long."""
    kernel, _, params, carry, _ = _both(32, 5)
    ids = jax.random.randint(jax.random.key(2), (5, 2 * T), 0, V)
    apply = jax.jit(lambda c, x: kernel.apply({"params": params}, c, x))
    full_carry, full = apply(carry, ids)
    half_carry, first = apply(carry, ids[:, :T])
    half_carry, second = apply(half_carry, ids[:, T:])
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), full, atol=1e-6)
    _assert_trees_close(half_carry, full_carry, atol=1e-6)


def test_missing_library_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(cell_kernel, "available", lambda: False)
    with pytest.raises(RuntimeError, match="cell_kernel=False"):
        cell_kernel.uninitialized((4,))
