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
per-step accumulation. Dropout on a layer's outputs is applied in its scan, so the dropped
outputs are written once, and the weight gradients' operands are transposed by plain copies.

Regularisation beyond the reference (AWD-LSTM's, Merity et al. 2017), all off by default:
`variational_dropout` keeps each row's dropout mask the same at every time step, `weight_drop`
drops entries of each recurrent kernel (DropConnect, one mask per batch, shared by all steps),
and `embed_drop` drops whole characters (rows of the first layer's input kernel).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# One layer's carry is (c, h), each [B, H]; the model's carry is a tuple over layers.
LayerCarry = tuple[jax.Array, jax.Array]
Carry = tuple[LayerCarry, ...]


def torch_uniform(bound: float):
    """PyTorch's LSTM and Linear initialiser: U(-bound, bound), bound = 1/sqrt(fan)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def gate_activations(z: jax.Array) -> jax.Array:
    """Sigmoid on the input, forget and output gates of `z[..., 4H]`, tanh on the cell gate.

    As one tanh over all four gates, since sigmoid(x) = tanh(x / 2) / 2 + 1 / 2: on the CPU,
    XLA's separate sigmoid and tanh ops made the cell's elementwise work cost as much as half
    its recurrent product.
    """
    hidden = z.shape[-1] // 4
    half = jnp.where(jnp.arange(4 * hidden) // hidden == 2, 1.0, 0.5)  # 1 on the cell gate
    return jnp.tanh(z * half) * half + (1.0 - half)


def matmul(x: jax.Array, kernel: jax.Array, product_dtype: Any = None) -> jax.Array:
    """`x @ kernel`; with `product_dtype` (bfloat16) both are rounded to it, summed in float32.

    Only the sampler asks for bfloat16 (`sampling.with_precision`): on CPUs with bfloat16
    instructions (and on GPUs and TPUs) the products run about 1.8x faster, at the cost of
    logits that differ from float32's by about 1e-2. Training is always float32.
    """
    if product_dtype is None:
        return x @ kernel
    return jnp.dot(
        x.astype(product_dtype), kernel.astype(product_dtype), preferred_element_type=jnp.float32
    )


class LSTMCell(nn.Module):
    """One time step of the recurrence, given the step's precomputed input gates.

    `(carry, gate_inputs[B, 4H], output_mask) -> (carry, (out[B, H], h[B, H], gates[B, 4H],
    c[B, H]))`: `out` is `h` times the step's scaled dropout mask (`h` when it is None). The gate
    activations, cell state and `h` are emitted for the hand-written backward pass; when no
    gradient is taken they are unused and XLA drops them.
    """

    hidden_size: int
    product_dtype: Any = None

    @nn.compact
    def __call__(self, carry: LayerCarry, gate_inputs: jax.Array, output_mask, kernel_mask):
        c, h = carry
        bound = self.hidden_size**-0.5
        recurrent_kernel = self.param(
            "recurrent_kernel", torch_uniform(bound), (self.hidden_size, 4 * self.hidden_size)
        )
        if kernel_mask is not None:  # weight drop: the same scaled mask at every step
            recurrent_kernel = recurrent_kernel * kernel_mask
        gates = gate_activations(gate_inputs + matmul(h, recurrent_kernel, self.product_dtype))
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        # Dropout on the layer's output here rather than after the scan: the loop writes the
        # dropped outputs once, where XLA otherwise recomputed the mask inside the transpose
        # that the next layer's weight gradient needs (6.6 ms a step, against 0.5 for a copy).
        out = h if output_mask is None else h * output_mask
        return (c, h), (out, h, gates, c)


def transposed(x: jax.Array) -> jax.Array:
    """`x.T` laid out in memory as a matrix of its own, once, for the products in backward.

    For a kernel, XLA would otherwise fold the transpose into each of the backward scan's 100
    products, which ran slower. For the operand of a weight gradient, XLA would fuse the
    transpose with whatever computed the operand (a concatenation, a dropout mask) into one
    pass with strided reads, measured 4x slower than this plain copy.
    """
    return jax.lax.optimization_barrier(x.T)


@jax.custom_vjp
def project(inputs: jax.Array, kernel: jax.Array) -> jax.Array:
    """`inputs[..., D] @ kernel[D, G]`, whose input gradient uses a `transposed` kernel."""
    return inputs @ kernel


def _project_forward(inputs, kernel):
    return inputs @ kernel, (inputs, kernel)


def _project_backward(residuals, d_out):
    inputs, kernel = residuals
    rows_t = transposed(inputs.reshape(-1, inputs.shape[-1]))
    d_kernel = rows_t @ d_out.reshape(-1, d_out.shape[-1])
    return d_out @ transposed(kernel), d_kernel


project.defvjp(_project_forward, _project_backward)


def _lstm_backward(residuals, cotangents, unroll: int = 1):
    """Backward pass of a window of LSTM steps.

    residuals: `recurrent_kernel[H, 4H]`, the initial carry, `gates[T, B, 4H]` (activations),
    `cs[T, B, H]` and `hs[T, B, H]`. cotangents: of the final carry and of `hs`.
    Returns the cotangents of the cell's params, of the initial carry and of `gate_inputs`.
    """
    recurrent_kernel, (c0, h0), gates, cs, hs = residuals
    (dc_last, dh_last), dhs = cotangents
    kernel_t = transposed(recurrent_kernel)
    c_prev = jnp.concatenate([c0[None], cs[:-1]], axis=0)
    h_prev = jnp.concatenate([h0[None], hs[:-1]], axis=0)
    # Everything that does not depend on the recurrence, for all steps at once (outside the
    # loop, where it vectorises): with dc and dh of a step, its gate gradient is
    # dz = [dc, dc, dc, dh] * gate_scale, and dc gains dh * dh_to_dc.
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    tanh_c = jnp.tanh(cs)
    dh_to_dc = o * (1.0 - tanh_c * tanh_c)
    gate_scale = jnp.concatenate(
        [g * i * (1.0 - i), c_prev * f * (1.0 - f), i * (1.0 - g * g), tanh_c * o * (1.0 - o)],
        axis=-1,
    )

    def step(carry, xs):
        dc, dh_next = carry
        dh_out, to_dc, scale, forget = xs
        dh = dh_next + dh_out
        dc = dc + dh * to_dc
        dz = jnp.concatenate([dc, dc, dc, dh], axis=-1) * scale
        return (dc * forget, dz @ kernel_t), dz

    (dc0, dh0), dzs = jax.lax.scan(
        step, (dc_last, dh_last), (dhs, dh_to_dc, gate_scale, f), reverse=True, unroll=unroll
    )
    # The recurrent-weight gradient as one large product over all steps and rows.
    h_prev_t = transposed(h_prev.reshape(-1, h_prev.shape[-1]))
    d_kernel = h_prev_t @ dzs.reshape(-1, dzs.shape[-1])
    return {"params": {"recurrent_kernel": d_kernel}}, (dc0, dh0), dzs


class Recurrence(nn.Module):
    """The LSTM cell scanned over a window with `nn.scan`.

    `(carry, gate_inputs[T, B, 4H], output_mask, kernel_mask) -> (carry, outs[T, B, H])`:
    `output_mask` is None or a scaled `[T, B, H]` dropout mask on the outputs, `kernel_mask`
    None or a scaled `[H, 4H]` weight-drop mask applied to the recurrent kernel at every step.
    With `fused_backward` the gradient comes from `_lstm_backward`; without it, from autodiff
    of the scan (kept for tests and benchmarks: both give the same gradients).
    """

    hidden_size: int
    fused_backward: bool = True
    unroll: int = 1
    product_dtype: Any = None

    @nn.compact
    def __call__(self, carry: LayerCarry, gate_inputs: jax.Array, output_mask, kernel_mask):
        cell = nn.scan(
            LSTMCell,
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=(0, 0, nn.broadcast),
            out_axes=0,
            unroll=self.unroll,
        )(self.hidden_size, self.product_dtype, name="cell")

        def run(mdl, carry, gate_inputs, output_mask, kernel_mask):
            carry, (outs, _, _, _) = mdl(carry, gate_inputs, output_mask, kernel_mask)
            return carry, outs

        if not self.fused_backward or self.is_initializing():
            return run(cell, carry, gate_inputs, output_mask, kernel_mask)

        def forward(mdl, carry, gate_inputs, output_mask, kernel_mask):
            final, (outs, hs, gates, cs) = mdl(carry, gate_inputs, output_mask, kernel_mask)
            kernel = mdl.variables["params"]["recurrent_kernel"]
            if kernel_mask is not None:
                kernel = kernel * kernel_mask
            return (final, outs), (kernel, carry, gates, cs, hs, output_mask, kernel_mask)

        def backward(residuals, cotangents):
            *residuals, output_mask, kernel_mask = residuals
            d_carry_out, d_outs = cotangents
            d_hs = d_outs if output_mask is None else d_outs * output_mask
            d_params, d_carry, d_gate_inputs = _lstm_backward(
                residuals, (d_carry_out, d_hs), self.unroll
            )
            d_output_mask = None if output_mask is None else jnp.zeros_like(output_mask)
            if kernel_mask is None:
                return d_params, d_carry, d_gate_inputs, d_output_mask, None
            d_kernel = d_params["params"]["recurrent_kernel"] * kernel_mask  # chain rule
            d_params = {"params": {"recurrent_kernel": d_kernel}}
            return d_params, d_carry, d_gate_inputs, d_output_mask, jnp.zeros_like(kernel_mask)

        return nn.custom_vjp(run, forward_fn=forward, backward_fn=backward)(
            cell, carry, gate_inputs, output_mask, kernel_mask
        )


class LSTMLayer(nn.Module):
    """One LSTM layer over a window: the input product for all steps, then the recurrence.

    Input is either ids `[T, B]` (first layer: a row gather of the input kernel, the same
    function as a one-hot product) or activations `[T, B, D]`. Returns `(carry, hs[T, B, H])`,
    with dropout at rate `output_drop` on `hs` in training (one mask per row for the whole
    window with `variational_dropout`).
    """

    hidden_size: int
    input_size: int
    fused_backward: bool = True
    unroll: int = 1
    output_drop: float = 0.0
    variational_dropout: bool = False
    weight_drop: float = 0.0
    embed_drop: float = 0.0  # only for ids input: drops whole rows of the input kernel
    product_dtype: Any = None

    @nn.compact
    def __call__(self, carry: LayerCarry, inputs: jax.Array, train: bool = False):
        bound = self.hidden_size**-0.5
        shape = (self.input_size, 4 * self.hidden_size)
        input_kernel = self.param("input_kernel", torch_uniform(bound), shape)
        input_bias = self.param("input_bias", torch_uniform(bound), (4 * self.hidden_size,))
        recurrent_bias = self.param("recurrent_bias", torch_uniform(bound), (4 * self.hidden_size,))
        bias = input_bias + recurrent_bias  # both enter every step: add them once, outside
        if jnp.issubdtype(inputs.dtype, jnp.integer):
            if train and self.embed_drop > 0:
                input_kernel = input_kernel * self._mask(self.embed_drop, (self.input_size, 1))
            # Bias added to the 71 rows before the gather, not to the T * B rows after it.
            # Ids are checked against the vocabulary upstream: "clip" spares the gather the
            # select over all its rows that the default out-of-range fill costs.
            gate_inputs = jnp.take(input_kernel + bias, inputs, axis=0, mode="clip")
        else:
            if self.product_dtype is None:
                gate_inputs = project(inputs, input_kernel) + bias
            else:
                gate_inputs = matmul(inputs, input_kernel, self.product_dtype) + bias
        output_mask = None
        if train and self.output_drop > 0:
            steps, rows = gate_inputs.shape[:2]
            mask_shape = (1 if self.variational_dropout else steps, rows, self.hidden_size)
            output_mask = self._mask(self.output_drop, mask_shape)
            output_mask = jnp.broadcast_to(output_mask, (steps, rows, self.hidden_size))
        kernel_mask = None
        if train and self.weight_drop > 0:
            kernel_mask = self._mask(self.weight_drop, (self.hidden_size, 4 * self.hidden_size))
        recurrence = Recurrence(
            self.hidden_size,
            self.fused_backward,
            self.unroll,
            self.product_dtype,
            name="recurrence",
        )
        return recurrence(carry, gate_inputs, output_mask, kernel_mask)

    def _mask(self, rate: float, shape) -> jax.Array:
        """A dropout mask scaled by `1 / (1 - rate)`, from the `dropout` rng stream."""
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, shape)
        return keep.astype(jnp.float32) / (1.0 - rate)


class CharLSTM(nn.Module):
    """The reference model: `num_layers` LSTM layers, dropout, a Dense head to logits.

    `(carry, ids[B, T], train) -> (carry, logits[B, T, V])`. Dropout with rate `drop_prob`
    acts between layers and on the top layer's outputs when `train` is true (rng stream
    `dropout`); with `variational_dropout` its mask is the same at every time step. The carry
    is a tuple over layers of `(c, h)`, each `[B, H]`.
    """

    vocab_size: int
    hidden_size: int = 512
    num_layers: int = 2
    drop_prob: float = 0.5
    fused_backward: bool = True
    unroll: int = 1
    variational_dropout: bool = False
    weight_drop: float = 0.0
    embed_drop: float = 0.0
    product_dtype: Any = None  # None: float32; bfloat16 only for sampling (see `matmul`)

    @nn.compact
    def __call__(self, carry: Carry, ids: jax.Array, train: bool = False):
        if train and self.product_dtype is not None:
            raise ValueError("product_dtype is for sampling only; train with product_dtype=None.")
        x = ids.T  # time-major inside: the scan walks the leading axis
        new_carry = []
        for layer, layer_carry in enumerate(carry):
            input_size = self.vocab_size if layer == 0 else self.hidden_size
            layer_carry, x = LSTMLayer(
                self.hidden_size,
                input_size,
                self.fused_backward,
                self.unroll,
                output_drop=self.drop_prob,
                variational_dropout=self.variational_dropout,
                weight_drop=self.weight_drop,
                embed_drop=self.embed_drop if layer == 0 else 0.0,
                product_dtype=self.product_dtype,
                name=f"lstm_{layer}",
            )(layer_carry, x, train)
            new_carry.append(layer_carry)
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


def init_params(model: CharLSTM, key: jax.Array) -> dict:
    """Params as PyTorch initialises the reference: every one U(-1/sqrt(H), 1/sqrt(H)).

    The same distribution as `model.init` (`torch_uniform` on every parameter), drawn in one
    random call and cut into the parameters: compiling flax's per-parameter draws took 0.9 s
    of a fresh run's start-up, this 0.1 s (`train.create_train_state` jits it).
    """
    ids = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(model.init, key, model.initialize_carry(1), ids)["params"]
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    sizes = [leaf.size for leaf in leaves]
    flat = torch_uniform(model.hidden_size**-0.5)(key, (sum(sizes),))
    pieces = jnp.split(flat, np.cumsum(sizes)[:-1])
    params = [piece.reshape(leaf.shape) for piece, leaf in zip(pieces, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, params)


def model_from_config(config, vocab_size: int) -> CharLSTM:
    """The `CharLSTM` a config describes (a ConfigDict or the dict saved in a checkpoint)."""
    return CharLSTM(
        vocab_size=vocab_size,
        hidden_size=config["hidden_size"],
        num_layers=config["num_layers"],
        drop_prob=config["drop_prob"],
        fused_backward=config.get("fused_backward", True),
        unroll=config.get("unroll", 1),
        variational_dropout=config.get("variational_dropout", False),
        weight_drop=config.get("weight_drop", 0.0),
        embed_drop=config.get("embed_drop", 0.0),
    )


def count_params(params) -> int:
    """Number of scalar parameters in a params tree."""
    return sum(x.size for x in jax.tree_util.tree_leaves(params))
