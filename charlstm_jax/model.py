"""The character-level LSTM of the reference: stacked LSTM layers, dropout, a Dense head.

Shapes: `B` batch rows, `T` window (time steps), `H` hidden size, `V` vocabulary size.
Gates are fused into one `[.., 4H]` product in PyTorch's order (input, forget, cell, output),
and each layer keeps PyTorch's two biases (`input_bias`, `recurrent_bias`): one bias would be
the same function, but Adam and global-norm clipping treat two parameters differently from
their sum, and training must follow the reference step for step. So weights map one to one
onto the reference's `nn.LSTM`.

Speed (see README, Performance): each layer's input product is taken out of the time loop
(one large product for all steps; for the first layer the one-hot product is a row gather),
so the scanned cell only does the recurrent product `h @ W_hh`. Its backward pass is written
by hand: the backward scan carries only `(dh, dc)` and emits each step's gate gradient, and the
recurrent-weight gradient is one large product after the loop, instead of autodiff's thin
per-step accumulation.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

# One layer's carry is (c, h), each [B, H]; the model's carry is a tuple over layers.
LayerCarry = tuple[jax.Array, jax.Array]
Carry = tuple[LayerCarry, ...]


def torch_uniform(bound: float):
    """PyTorch's LSTM and Linear initialiser: U(-bound, bound), bound = 1/sqrt(fan)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class LSTMCell(nn.Module):
    """One time step of the recurrence, given the step's precomputed input gates.

    `(carry, gate_inputs[B, 4H]) -> (carry, (h[B, H], gates[B, 4H], c[B, H]))`. The gate
    activations and cell state are emitted for the hand-written backward pass; when no gradient
    is taken they are unused and XLA drops them.
    """

    hidden_size: int

    @nn.compact
    def __call__(self, carry: LayerCarry, gate_inputs: jax.Array):
        c, h = carry
        bound = self.hidden_size**-0.5
        recurrent_kernel = self.param(
            "recurrent_kernel", torch_uniform(bound), (self.hidden_size, 4 * self.hidden_size)
        )
        z = gate_inputs + h @ recurrent_kernel
        i, f, g, o = jnp.split(z, 4, axis=-1)
        i, f, g, o = nn.sigmoid(i), nn.sigmoid(f), jnp.tanh(g), nn.sigmoid(o)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (c, h), (h, jnp.concatenate([i, f, g, o], axis=-1), c)


def _lstm_backward(residuals, cotangents, unroll: int = 1):
    """Backward pass of a window of LSTM steps.

    residuals: `recurrent_kernel[H, 4H]`, the initial carry, `gates[T, B, 4H]` (activations),
    `cs[T, B, H]` and `hs[T, B, H]`. cotangents: of the final carry and of `hs`.
    Returns the cotangents of the cell's params, of the initial carry and of `gate_inputs`.
    """
    recurrent_kernel, (c0, h0), gates, cs, hs = residuals
    (dc_last, dh_last), dhs = cotangents
    c_prev = jnp.concatenate([c0[None], cs[:-1]], axis=0)
    h_prev = jnp.concatenate([h0[None], hs[:-1]], axis=0)

    def step(carry, xs):
        dc, dh_next = carry
        gate, c, c_before, dh_out = xs
        i, f, g, o = jnp.split(gate, 4, axis=-1)
        dh = dh_next + dh_out
        tanh_c = jnp.tanh(c)
        dc = dc + dh * o * (1.0 - tanh_c * tanh_c)
        dz = jnp.concatenate(
            [
                dc * g * i * (1.0 - i),
                dc * c_before * f * (1.0 - f),
                dc * i * (1.0 - g * g),
                dh * tanh_c * o * (1.0 - o),
            ],
            axis=-1,
        )
        return (dc * f, dz @ recurrent_kernel.T), dz

    (dc0, dh0), dzs = jax.lax.scan(
        step, (dc_last, dh_last), (gates, cs, c_prev, dhs), reverse=True, unroll=unroll
    )
    # The recurrent-weight gradient as one large product over all steps and rows.
    d_kernel = jnp.einsum("tbh,tbg->hg", h_prev, dzs)
    return {"params": {"recurrent_kernel": d_kernel}}, (dc0, dh0), dzs


class Recurrence(nn.Module):
    """The LSTM cell scanned over a window with `nn.scan`.

    `(carry, gate_inputs[T, B, 4H]) -> (carry, hs[T, B, H])`. With `fused_backward` the
    gradient comes from `_lstm_backward`; without it, from autodiff of the scan (kept for tests
    and benchmarks: both give the same gradients).
    """

    hidden_size: int
    fused_backward: bool = True
    unroll: int = 1

    @nn.compact
    def __call__(self, carry: LayerCarry, gate_inputs: jax.Array):
        cell = nn.scan(
            LSTMCell,
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=0,
            out_axes=0,
            unroll=self.unroll,
        )(self.hidden_size, name="cell")

        def run(mdl, carry, gate_inputs):
            carry, (hs, _, _) = mdl(carry, gate_inputs)
            return carry, hs

        if not self.fused_backward or self.is_initializing():
            return run(cell, carry, gate_inputs)

        def forward(mdl, carry, gate_inputs):
            final, (hs, gates, cs) = mdl(carry, gate_inputs)
            kernel = mdl.variables["params"]["recurrent_kernel"]
            return (final, hs), (kernel, carry, gates, cs, hs)

        def backward(residuals, cotangents):
            d_params, d_carry, d_gate_inputs = _lstm_backward(residuals, cotangents, self.unroll)
            return d_params, d_carry, d_gate_inputs

        return nn.custom_vjp(run, forward_fn=forward, backward_fn=backward)(
            cell, carry, gate_inputs
        )


class LSTMLayer(nn.Module):
    """One LSTM layer over a window: the input product for all steps, then the recurrence.

    Input is either ids `[T, B]` (first layer: a row gather of the input kernel, the same
    function as a one-hot product) or activations `[T, B, D]`. Returns `(carry, hs[T, B, H])`.
    """

    hidden_size: int
    input_size: int
    fused_backward: bool = True
    unroll: int = 1

    @nn.compact
    def __call__(self, carry: LayerCarry, inputs: jax.Array):
        bound = self.hidden_size**-0.5
        shape = (self.input_size, 4 * self.hidden_size)
        input_kernel = self.param("input_kernel", torch_uniform(bound), shape)
        input_bias = self.param("input_bias", torch_uniform(bound), (4 * self.hidden_size,))
        recurrent_bias = self.param("recurrent_bias", torch_uniform(bound), (4 * self.hidden_size,))
        bias = input_bias + recurrent_bias  # both enter every step: add them once, outside
        if jnp.issubdtype(inputs.dtype, jnp.integer):
            gate_inputs = jnp.take(input_kernel, inputs, axis=0) + bias
        else:
            gate_inputs = inputs @ input_kernel + bias
        return Recurrence(self.hidden_size, self.fused_backward, self.unroll, name="recurrence")(
            carry, gate_inputs
        )


class CharLSTM(nn.Module):
    """The reference model: `num_layers` LSTM layers, dropout, a Dense head to logits.

    `(carry, ids[B, T], train) -> (carry, logits[B, T, V])`. Dropout with rate `drop_prob`
    acts between layers and on the top layer's outputs when `train` is true (rng stream
    `dropout`). The carry is a tuple over layers of `(c, h)`, each `[B, H]`.
    """

    vocab_size: int
    hidden_size: int = 512
    num_layers: int = 2
    drop_prob: float = 0.5
    fused_backward: bool = True
    unroll: int = 1

    @nn.compact
    def __call__(self, carry: Carry, ids: jax.Array, train: bool = False):
        x = ids.T  # time-major inside: the scan walks the leading axis
        new_carry = []
        for layer, layer_carry in enumerate(carry):
            input_size = self.vocab_size if layer == 0 else self.hidden_size
            layer_carry, x = LSTMLayer(
                self.hidden_size,
                input_size,
                self.fused_backward,
                self.unroll,
                name=f"lstm_{layer}",
            )(layer_carry, x)
            new_carry.append(layer_carry)
            x = nn.Dropout(self.drop_prob, deterministic=not train)(x)
        bound = self.hidden_size**-0.5
        logits = nn.Dense(
            self.vocab_size,
            kernel_init=torch_uniform(bound),
            bias_init=torch_uniform(bound),
            name="head",
        )(x)
        return tuple(new_carry), jnp.swapaxes(logits, 0, 1)

    def initialize_carry(self, batch_size: int) -> Carry:
        """A zero carry for `batch_size` rows: `num_layers` pairs of `(c, h)`, each `[B, H]`."""
        shape = (batch_size, self.hidden_size)
        # Distinct buffers, so the train step may donate each of them.
        return tuple(
            (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
            for _ in range(self.num_layers)
        )


def model_from_config(config, vocab_size: int) -> CharLSTM:
    """The `CharLSTM` a config describes (a ConfigDict or the dict saved in a checkpoint)."""
    return CharLSTM(
        vocab_size=vocab_size,
        hidden_size=config["hidden_size"],
        num_layers=config["num_layers"],
        drop_prob=config["drop_prob"],
        fused_backward=config.get("fused_backward", True),
        unroll=config.get("unroll", 1),
    )


def count_params(params) -> int:
    """Number of scalar parameters in a params tree."""
    return sum(x.size for x in jax.tree_util.tree_leaves(params))
