"""Fidelity to the PyTorch reference: with the same weights, the same logits, gradients and step.

The reference is `charlstm_jax.torch_reference.ReferenceLSTM` (nn.LSTM + dropout + nn.Linear,
torch 2.13.0); its random weights are mapped onto our params with `convert`.
"""

# ruff: noqa: E402

import functools

import jax
import numpy as np
import optax
import pytest

# The imports below need torch, so they come after the skip when it is absent.
torch = pytest.importorskip("torch")

from charlstm_jax.config import get_config
from charlstm_jax.convert import flax_from_torch_state_dict, torch_state_dict_from_flax
from charlstm_jax.model import CharLSTM
from charlstm_jax.torch_reference import ReferenceLSTM, one_hot
from charlstm_jax.train import create_optimizer, cross_entropy

V, H, L, B, T = 13, 24, 2, 3, 7
BATCHES = 4  # consecutive windows with the carry threaded through


@pytest.fixture(autouse=True)
def highest_precision():
    """float32 products on every backend (GPUs would otherwise use TF32)."""
    with jax.default_matmul_precision("highest"):
        yield


@functools.partial(jax.jit, static_argnames=("model", "train"))
def _apply(model, params, carry, ids, train=False):
    """`model.apply`, jitted: one compilation per test instead of op-by-op dispatch."""
    return model.apply(
        {"params": params}, carry, ids, train=train, rngs={"dropout": jax.random.key(0)}
    )


def _models(drop_prob: float, seed: int = 0):
    """A random reference model, our model, and the reference's weights as our params."""
    torch.manual_seed(seed)
    reference = ReferenceLSTM(V, H, L, drop_prob)
    params = flax_from_torch_state_dict(reference.state_dict())
    model = CharLSTM(V, H, L, drop_prob)
    return reference, model, params


def _batches(seed: int):
    """`BATCHES` windows of one stream: `(inputs, targets)`, each `[BATCHES, B, T]`."""
    ids = np.random.default_rng(seed).integers(0, V, size=(B, BATCHES * T + 1))
    windows = np.stack([ids[:, n * T : (n + 1) * T + 1] for n in range(BATCHES)])
    return windows[..., :-1], windows[..., 1:]


def _torch_carry(carry):
    """Our carry (a tuple over layers of `(c, h)`, each `[B, H]`) as torch's `h, c[L, B, H]`."""
    h = torch.from_numpy(np.stack([np.asarray(h) for _, h in carry]))
    c = torch.from_numpy(np.stack([np.asarray(c) for c, _ in carry]))
    return h, c


def test_mapping_round_trip_keeps_the_function():
    reference, _, params = _models(0.0)
    back = torch_state_dict_from_flax(params)
    original = reference.state_dict()
    assert sorted(back) == sorted(original)
    for name, value in original.items():  # every weight comes back exactly, biases included
        np.testing.assert_array_equal(back[name], value)
    # With the vocabulary permuted too, both directions invert each other.
    permutation = np.random.default_rng(0).permutation(V)
    there = flax_from_torch_state_dict(back, permutation)
    again = flax_from_torch_state_dict(torch_state_dict_from_flax(there, permutation), permutation)
    for a, b in zip(
        jax.tree_util.tree_leaves(there), jax.tree_util.tree_leaves(again), strict=True
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("train", [True, False], ids=["train_mode_no_dropout", "eval_mode"])
def test_logits_agree_over_consecutive_batches(train):
    # Train mode compares with dropout off (its masks cannot match); eval mode keeps drop_prob
    # 0.5, which both frameworks must ignore.
    reference, model, params = _models(0.0 if train else 0.5)
    reference.train(train)
    inputs, _ = _batches(1)
    carry = model.initialize_carry(B)
    h, c = reference.initial_hidden_state(B)
    worst = 0.0
    for batch in inputs:
        carry, logits = _apply(model, params, carry, batch, train=train)
        with torch.no_grad():
            ref_logits, h, c = reference(torch.from_numpy(one_hot(batch, V)), h, c)
        ours = np.asarray(logits).reshape(B * T, V)
        np.testing.assert_allclose(ours, ref_logits.numpy(), atol=1e-5, rtol=0)
        worst = max(worst, np.abs(ours - ref_logits.numpy()).max())
        ours_h, ours_c = _torch_carry(carry)
        np.testing.assert_allclose(ours_h, h, atol=1e-5, rtol=0)
        np.testing.assert_allclose(ours_c, c, atol=1e-5, rtol=0)
    print(f"logits max abs difference ({'train' if train else 'eval'}): {worst:.2e}")


def _gradients(reference, model, params, loss_scale: float = 1.0):
    """Gradients of the mean cross-entropy of the second window (carry from the first) in both
    frameworks: `(ours, reference's by name)`."""
    inputs, targets = _batches(2)
    carry = model.initialize_carry(B)
    carry, _ = _apply(model, params, carry, inputs[0])
    h, c = _torch_carry(carry)

    def loss_fn(params):
        _, logits = model.apply({"params": params}, carry, inputs[1])
        return loss_scale * cross_entropy(logits, targets[1])

    ours = jax.jit(jax.grad(loss_fn))(params)
    reference.zero_grad()
    logits, _, _ = reference(torch.from_numpy(one_hot(inputs[1], V)), h, c)
    y = torch.from_numpy(targets[1].astype(np.int64)).view(-1)
    (loss_scale * torch.nn.functional.cross_entropy(logits, y)).backward()
    return ours, {name: p.grad.clone() for name, p in reference.named_parameters()}


def _max_relative(a, b) -> float:
    """Largest elementwise difference relative to the largest magnitude of `b`."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_gradients_agree_for_every_parameter():
    # The default model, with the hand-written backward pass that training uses (test_model
    # checks it against autodiff).
    reference, model, params = _models(0.0, seed=1)
    ours, theirs = _gradients(reference, model, params)
    expected = flax_from_torch_state_dict(theirs)
    worst = 0.0
    leaves = jax.tree_util.tree_leaves_with_path(ours)
    for (path, a), b in zip(leaves, jax.tree_util.tree_leaves(expected), strict=True):
        relative = _max_relative(a, b)
        assert relative < 1e-4, f"{jax.tree_util.keystr(path)}: {relative:.2e}"
        worst = max(worst, relative)
    print(f"gradients max relative difference: {worst:.2e}")


def test_one_clipped_adam_step_lands_on_the_same_weights():
    """train.py's optimizer against the reference's Adam + clip_grad_norm_, one step.

    Our layers keep PyTorch's two biases, so clipping's global norm and Adam's moments act on
    the same parameters in both frameworks.
    """
    reference, model, params = _models(0.0, seed=2)
    # A large loss scale makes the global norm exceed the clip, so clipping is compared too.
    ours, _ = _gradients(reference, model, params, loss_scale=1000.0)
    assert float(optax.tree.norm(ours)) > 5.0
    optimizer = create_optimizer(get_config())  # clip 5, Adam 1e-3: the reference's
    assert (get_config().clip, get_config().learning_rate) == (5.0, 1e-3)

    @jax.jit
    def step(params, grads):
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        return optax.apply_updates(params, updates)

    stepped = step(params, ours)
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 5.0)
    torch.optim.Adam(reference.parameters(), lr=1e-3).step()
    expected = flax_from_torch_state_dict(
        {name: p.detach() for name, p in reference.named_parameters()}
    )
    worst = 0.0
    leaves = jax.tree_util.tree_leaves_with_path(stepped)
    for (path, a), b in zip(leaves, jax.tree_util.tree_leaves(expected), strict=True):
        name = jax.tree_util.keystr(path)
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)
        worst = max(worst, np.abs(np.asarray(a) - np.asarray(b)).max())
    print(f"after one step: weights max abs difference {worst:.2e}")
