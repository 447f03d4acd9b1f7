"""The CharLSTM: shapes, carry threading, the one-hot input, the hand-written backward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charlstm_jax.model import CharLSTM, LSTMLayer, count_params, decode_step, init_params

V, H, L, B, T = 11, 16, 2, 3, 8


@pytest.fixture(scope="module")
def model_and_params():
    model = CharLSTM(vocab_size=V, hidden_size=H, num_layers=L, drop_prob=0.5)
    params = model.init(jax.random.key(0), model.initialize_carry(B), jnp.zeros((B, T), int))
    return model, params["params"]


def _ids(seed, shape=(B, T)):
    return jax.random.randint(jax.random.key(seed), shape, 0, V)


def test_shapes_and_parameter_count(model_and_params):
    model, params = model_and_params
    carry, logits = model.apply({"params": params}, model.initialize_carry(B), _ids(1))
    assert logits.shape == (B, T, V)
    assert len(carry) == L and all(c.shape == h.shape == (B, H) for c, h in carry)
    # PyTorch's count for nn.LSTM(V, H, 2) + Linear(H, V): the same parameters.
    torch_count = 4 * H * (V + H + 2) + 4 * H * (H + H + 2) + H * V + V
    assert count_params(params) == torch_count


def test_two_half_windows_equal_one_full_window(model_and_params):
    model, params = model_and_params
    ids = _ids(2)
    carry0 = model.initialize_carry(B)
    full_carry, full = model.apply({"params": params}, carry0, ids)
    carry, first = model.apply({"params": params}, carry0, ids[:, : T // 2])
    carry, second = model.apply({"params": params}, carry, ids[:, T // 2 :])
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), full, atol=1e-6)
    for (c1, h1), (c2, h2) in zip(carry, full_carry, strict=True):
        np.testing.assert_allclose(c1, c2, atol=1e-6)
        np.testing.assert_allclose(h1, h2, atol=1e-6)


def test_decode_step_equals_a_one_step_window(model_and_params):
    """Generation's batch-major single step is the model's function on a one-step window."""
    model, params = model_and_params
    carry = jax.tree_util.tree_map(
        lambda x: jax.random.normal(jax.random.key(19), x.shape), model.initialize_carry(B)
    )
    ids = _ids(20, (B,))
    window_carry, window_logits = model.apply({"params": params}, carry, ids[:, None])
    step_carry, step_logits = decode_step(model, params, carry, ids)
    np.testing.assert_allclose(step_logits, window_logits[:, 0], atol=1e-6)
    leaves = zip(*map(jax.tree_util.tree_leaves, (step_carry, window_carry)), strict=True)
    for a, b in leaves:
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_first_layer_gather_equals_one_hot_product(model_and_params):
    model, params = model_and_params
    ids = _ids(3)
    layer = params["lstm_0"]
    gathered = jnp.take(layer["input_kernel"], ids, axis=0)
    one_hot = jax.nn.one_hot(ids, V) @ layer["input_kernel"]
    np.testing.assert_allclose(gathered, one_hot, atol=1e-7)


def test_dropout_acts_only_in_training(model_and_params):
    model, params = model_and_params
    ids, carry = _ids(4), model.initialize_carry(B)
    _, eval1 = model.apply({"params": params}, carry, ids, train=False)
    _, eval2 = model.apply({"params": params}, carry, ids, train=False)
    np.testing.assert_array_equal(eval1, eval2)
    rngs = {"dropout": jax.random.key(5)}
    _, train1 = model.apply({"params": params}, carry, ids, train=True, rngs=rngs)
    assert not np.allclose(train1, eval1)


def test_fused_backward_equals_autodiff(model_and_params):
    """The hand-written backward pass gives autodiff's gradients, carry included."""
    model, params = model_and_params
    ids, targets = _ids(6), _ids(7)
    # A non-zero incoming carry and a loss on the outgoing carry exercise every cotangent.
    carry = jax.tree_util.tree_map(
        lambda x: jax.random.normal(jax.random.key(8), x.shape), model.initialize_carry(B)
    )

    def loss(module, params, carry):
        new_carry, logits = module.apply(
            {"params": params}, carry, ids, train=True, rngs={"dropout": jax.random.key(9)}
        )
        log_probs = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(log_probs, targets[..., None], -1).mean()
        return nll + 0.1 * sum(jnp.sum(c**2) + jnp.sum(h) for c, h in new_carry)

    fused = jax.grad(loss, argnums=(1, 2))(model, params, carry)
    autodiff = jax.grad(loss, argnums=(1, 2))(model.clone(fused_backward=False), params, carry)
    leaves = zip(jax.tree_util.tree_leaves(fused), jax.tree_util.tree_leaves(autodiff), strict=True)
    for a, b in leaves:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


REGULARISED = {"variational_dropout": True, "weight_drop": 0.4, "embed_drop": 0.3}


def test_fused_backward_equals_autodiff_with_weight_drop(model_and_params):
    """Weight drop and embedding dropout pass through the hand-written backward correctly."""
    model, params = model_and_params
    model = model.clone(**REGULARISED)
    ids, targets = _ids(10), _ids(11)

    def loss(module, params):
        _, logits = module.apply(
            {"params": params},
            module.initialize_carry(B),
            ids,
            train=True,
            rngs={"dropout": jax.random.key(12)},
        )
        log_probs = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(log_probs, targets[..., None], -1).mean()

    fused = jax.grad(loss, argnums=1)(model, params)
    autodiff = jax.grad(loss, argnums=1)(model.clone(fused_backward=False), params)
    # Weight drop zeroes some recurrent-kernel gradients and scales the rest.
    assert np.mean(fused["lstm_1"]["recurrence"]["cell"]["recurrent_kernel"] == 0) > 0.3
    leaves = zip(jax.tree_util.tree_leaves(fused), jax.tree_util.tree_leaves(autodiff), strict=True)
    for a, b in leaves:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_regularisation_acts_only_in_training(model_and_params):
    model, params = model_and_params
    ids, carry = _ids(13), model.initialize_carry(B)
    _, plain = model.apply({"params": params}, carry, ids, train=False)
    regularised = model.clone(**REGULARISED)
    _, evaluated = regularised.apply({"params": params}, carry, ids, train=False)
    np.testing.assert_array_equal(evaluated, plain)
    rngs = {"dropout": jax.random.key(14)}
    _, trained = regularised.apply({"params": params}, carry, ids, train=True, rngs=rngs)
    assert not np.allclose(trained, plain)


def test_variational_dropout_keeps_one_mask_over_time():
    """With `variational_dropout` each row's dropped units are the same at every step."""
    model = CharLSTM(vocab_size=V, hidden_size=H, num_layers=1, drop_prob=0.5)
    model = model.clone(variational_dropout=True)
    carry = model.initialize_carry(B)
    params = model.init(jax.random.key(0), carry, _ids(15))["params"]
    # A head that passes the hidden units through: the logits are the dropped outputs.
    params = dict(params, head={"kernel": jnp.eye(H, V), "bias": jnp.zeros(V)})
    _, out = model.apply(
        {"params": params}, carry, _ids(15), train=True, rngs={"dropout": jax.random.key(16)}
    )
    dropped = np.asarray(out[..., :H] == 0)  # [B, T, H]
    assert dropped.any() and not dropped.all()
    np.testing.assert_array_equal(dropped, np.broadcast_to(dropped[:, :1], dropped.shape))


def test_dropout_drops_outputs_not_the_recurrence():
    """As in `nn.LSTM`: a unit of the output is zero or its eval value / (1 - p), and the
    carry that flows to the next step is the undropped one, so the final carry is eval's."""
    model = CharLSTM(vocab_size=V, hidden_size=H, num_layers=1, drop_prob=0.5)
    carry = model.initialize_carry(B)
    params = model.init(jax.random.key(0), carry, _ids(17))["params"]
    params = dict(params, head={"kernel": jnp.eye(H, V), "bias": jnp.zeros(V)})
    eval_carry, plain = model.apply({"params": params}, carry, _ids(17), train=False)
    train_carry, dropped = model.apply(
        {"params": params}, carry, _ids(17), train=True, rngs={"dropout": jax.random.key(18)}
    )
    plain, dropped = np.asarray(plain[..., :H]), np.asarray(dropped[..., :H])
    kept = dropped != 0
    assert 0.4 < kept.mean() < 0.6
    np.testing.assert_allclose(dropped[kept], 2 * plain[kept], rtol=1e-6)
    leaves = zip(*map(jax.tree_util.tree_leaves, (train_carry, eval_carry)), strict=True)
    for a, b in leaves:
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("rate", [0.5, 0.3, 0.1])
def test_dropout_masks_keep_one_minus_the_rate_and_scale_by_its_inverse(rate):
    """Masks take 16 random bits an entry: the keep probability is 1 - rate (to 2**-16)."""
    mask = np.asarray(LSTMLayer._keep(rate, jax.random.key(21), (400, 1001)))  # odd size
    kept = mask != 0
    np.testing.assert_allclose(mask[kept], 1.0 / (1.0 - rate), rtol=1e-6)
    # 400,400 entries: the kept share's standard deviation is under 0.0008.
    assert abs(kept.mean() - (1.0 - rate)) < 0.004
    again = np.asarray(LSTMLayer._keep(rate, jax.random.key(21), (400, 1001)))
    np.testing.assert_array_equal(mask, again)


def test_init_params_draws_pytorch_s_uniform_for_every_parameter(model_and_params):
    """`init_params` gives `model.init`'s tree, each parameter U(-1/sqrt(H), 1/sqrt(H))."""
    model, flax_params = model_and_params
    params = init_params(model, jax.random.key(3))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(flax_params)
    bound = H**-0.5
    for leaf, flax_leaf in zip(*map(jax.tree_util.tree_leaves, (params, flax_params)), strict=True):
        assert leaf.shape == flax_leaf.shape and leaf.dtype == flax_leaf.dtype
        assert np.all(np.abs(leaf) <= bound)
    values = np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(params)])
    # A uniform on [-b, b] has mean 0 and standard deviation b / sqrt(3).
    assert abs(values.mean()) < 0.05 * bound
    assert abs(values.std() - bound / np.sqrt(3)) < 0.05 * bound
    again = init_params(model, jax.random.key(3))
    other = init_params(model, jax.random.key(4))
    first = jax.tree_util.tree_leaves(params)[0]
    np.testing.assert_array_equal(first, jax.tree_util.tree_leaves(again)[0])
    assert not np.array_equal(first, jax.tree_util.tree_leaves(other)[0])
