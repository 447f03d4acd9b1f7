"""The character-level LSTM of the reference: stacked LSTM layers, dropout, a Dense head.

Shapes: `B` batch rows, `T` window (time steps), `H` hidden size, `V` vocabulary size.
Gates are fused into one `[4H, ..]` product in PyTorch's order (input, forget, cell, output),
and each layer keeps PyTorch's two biases (`input_bias`, `recurrent_bias`): one bias would be
the same function, but Adam and global-norm clipping treat two parameters differently from
their sum, and training must follow the reference step for step. So weights map one to one
onto the reference's `nn.LSTM`.

Speed (see README, Performance): inside a layer, arrays are feature-major and flat: the
carry's `[B, H]` is held as `[H * B]` (unit-major, row-minor), a window's outputs as
`[T, H * B]` and its gates as `[T, 4, H * B]`. The recurrent product is then
`kernel.T[4H, H] @ h[H, B]`, which XLA's CPU libraries run about 1.4x faster than
`h[B, H] @ kernel[H, 4H]` at batch 16, and the cell's elementwise work runs over rows of
`H * B` values instead of 16 (XLA's CPU loops slowed several-fold on short rows). Each layer's
input product is taken out of the time loop (one large product for all steps; for the first
layer the one-hot product is a row gather), so the scanned cell only does the recurrent
product. Its backward pass is written by hand: the backward scan carries only `(dh, dc)` and
emits each step's gate gradient, and the recurrent-weight gradient is one large product after
the loop, instead of autodiff's thin per-step accumulation. On the CPU, the scanned step itself,
forward and backward, is a compiled kernel (`cell_kernel`, on by default where it is built:
`cell_kernel=True`), the same function as the XLA operations it replaces. The model's inputs
and outputs keep the usual batch-major shapes.

Dropout masks are drawn per row, from `fold_in(key, row)`: a row's mask is the same however the
rows are split over devices (`batch_axis` names the `shard_map` axis that splits them).

Regularisation beyond the reference (AWD-LSTM's, Merity et al. 2017), all off by default:
`variational_dropout` keeps each row's dropout mask the same at every time step, `weight_drop`
drops entries of each recurrent kernel (DropConnect, one mask per batch, shared by all steps),
and `embed_drop` drops whole characters (rows of the first layer's input kernel).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from charlstm_jax import cell_kernel

# One layer's carry is (c, h), each [B, H]; the model's carry is a tuple over layers.
LayerCarry = tuple[jax.Array, jax.Array]
Carry = tuple[LayerCarry, ...]

# Per gate (input, forget, cell, output): sigmoid(x) = tanh(x / 2) / 2 + 1 / 2 on three, tanh
# on the cell gate, so all four take one tanh.
_GATE_SCALE = np.array([0.5, 0.5, 1.0, 0.5], np.float32)[:, None]


def torch_uniform(bound: float):
    """PyTorch's LSTM and Linear initialiser: U(-bound, bound), bound = 1/sqrt(fan)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def feature_major(x: jax.Array) -> jax.Array:
    """`[..., B, D] -> [..., D * B]`: the layout inside a layer (see the module docstring)."""
    return jnp.swapaxes(x, -1, -2).reshape(*x.shape[:-2], -1)


def batch_major(x: jax.Array, batch: int) -> jax.Array:
    """`[..., D * B] -> [..., B, D]`, the inverse of `feature_major`."""
    return jnp.swapaxes(x.reshape(*x.shape[:-1], -1, batch), -1, -2)


def gate_activations(z: jax.Array) -> jax.Array:
    """Sigmoid on the input, forget and output gates of `z[..., 4, N]`, tanh on the cell gate.

    As one tanh over all four gates: on the CPU, XLA's loops with several tanh (or a sigmoid
    and a tanh) in one fusion ran several times slower than with one.
    """
    return jnp.tanh(z * _GATE_SCALE) * _GATE_SCALE + (1.0 - _GATE_SCALE)


def lstm_update(z: jax.Array, c: jax.Array):
    """The LSTM update from pre-activations `z[..., 4, N]` (gate axis second to last) and the
    cell state `c[..., N]`: `(gates, c, h)`, the gates' activations as `z`."""
    gates = gate_activations(z)
    c = gates[..., 1, :] * c + gates[..., 0, :] * gates[..., 2, :]
    return gates, c, gates[..., 3, :] * jnp.tanh(c)


def matmul(x: jax.Array, y: jax.Array, product_dtype: Any = None) -> jax.Array:
    """`x @ y`; with `product_dtype` (bfloat16) both are rounded to it, summed in float32.

    Only the sampler asks for bfloat16 (`sampling.with_precision`): on CPUs with bfloat16
    instructions (and on GPUs and TPUs) the products run about 2x faster, at the cost of
    logits that differ from float32's by about 1e-2. Training is always float32.
    """
    if product_dtype is None:
        return x @ y
    return jnp.dot(
        x.astype(product_dtype), y.astype(product_dtype), preferred_element_type=jnp.float32
    )


def transposed(x: jax.Array) -> jax.Array:
    """`x.T` laid out in memory as a matrix of its own, once, for the products that read it.

    For a kernel, XLA would otherwise fold the transpose into each of the time loop's 100
    products, which ran slower. For the operand of a weight gradient, XLA would fuse the
    transpose with whatever computed the operand into one pass with strided reads, measured
    4x slower than this plain copy.
    """
    return jax.lax.optimization_barrier(x.T)


class LSTMCell(nn.Module):
    """One time step of the recurrence on feature-major arrays, given its input gates.

    `(carry, gate_inputs[4, H * B], output_mask, kernel_t[4H, H]) -> (carry, (out, h, gates,
    c))`, the carry `(c, h)` each `[H * B]`: `out` is `h` times the step's scaled dropout mask
    (`h` when it is None). The gate activations `[4, H * B]`, cell state and `h` are emitted
    for the hand-written backward pass; when no gradient is taken XLA drops them.
    """

    product_dtype: Any = None

    @nn.compact
    def __call__(self, carry: LayerCarry, gate_inputs: jax.Array, output_mask, kernel_t):
        c, h = carry
        recurrent = matmul(kernel_t, h.reshape(kernel_t.shape[1], -1), self.product_dtype)
        gates, c, h = lstm_update(gate_inputs + recurrent.reshape(4, -1), c)
        # Dropout on the layer's output here rather than after the scan: the loop writes the
        # dropped outputs once.
        out = h if output_mask is None else h * output_mask
        return (c, h), (out, h, gates, c)


class KernelCell(nn.Module):
    """One time step of the recurrence as the compiled CPU kernel (`cell_kernel`), the same
    function as `LSTMCell`: `((c, buffers), t, gate_inputs[T, 4, H * B], h0, packed) ->
    ((c, buffers), None)`, where `buffers` are the window's `h` and, when a gradient will be
    taken, the factors the backward pass reads (`cell_kernel.window_buffers`), whose row `t`
    the step writes in place; h before step `t` is row `t - 1` of the window's `h` (`h0`, the
    carry's, at step 0)."""

    @nn.compact
    def __call__(self, state, t, gate_inputs: jax.Array, h0: jax.Array, packed: jax.Array):
        c, buffers = state
        return cell_kernel.forward_step(t, gate_inputs, h0, packed, c, buffers), None


class RecurrentKernel(nn.Module):
    """A layer's recurrent kernel `[H, 4H]`, held by a module of its own so that its path,
    `.../recurrence/cell/recurrent_kernel`, is the one earlier versions' checkpoints use."""

    hidden_size: int

    @nn.compact
    def __call__(self) -> jax.Array:
        bound = self.hidden_size**-0.5
        shape = (self.hidden_size, 4 * self.hidden_size)
        return self.param("recurrent_kernel", torch_uniform(bound), shape)


def finished_together(*gradients):
    """`gradients`, none of them handed on before all are computed.

    For a layer's weight gradients and the gradient it passes down: XLA's CPU runtime otherwise
    ran a weight-gradient product at the same time as the layer below's backward loop, the two
    sharing two cores slower than one after the other (measured: 3% of a train step).
    """
    return jax.lax.optimization_barrier(gradients)


@jax.custom_vjp
def project(inputs: jax.Array, kernel: jax.Array) -> jax.Array:
    """`inputs[N, D] @ kernel[D, G]`, whose input gradient uses a `transposed` kernel."""
    return inputs @ kernel


def _project_forward(inputs, kernel):
    return inputs @ kernel, (inputs, kernel)


def _project_backward(residuals, d_out):
    inputs, kernel = residuals
    return finished_together(d_out @ transposed(kernel), transposed(inputs) @ d_out)


project.defvjp(_project_forward, _project_backward)


def _backward_factors(c0, gates, cs):
    """What the backward pass needs of the forward pass, from its `gates[T, 4, H * B]` and
    `cs[T, H * B]`: `(gate_scale[T, 4, H * B], dh_to_dc[T, H * B], forget[T, H * B])`.

    All that does not depend on the recurrence, for all steps at once (outside the loop, where
    it vectorises): with dc and dh of a step, its gate gradient is
    dz = [dc, dc, dc, dh] * gate_scale, dc gains dh * dh_to_dc, and dc * forget goes back a
    step. The compiled kernel's forward steps save these three instead of the gates and cs.
    """
    c_prev = jnp.concatenate([c0[None], cs[:-1]], axis=0)
    i, f, g, o = gates[:, 0], gates[:, 1], gates[:, 2], gates[:, 3]
    tanh_c = jnp.tanh(cs)
    dh_to_dc = o * (1.0 - tanh_c * tanh_c)
    gate_scale = jnp.stack(
        [g * i * (1.0 - i), c_prev * f * (1.0 - f), i * (1.0 - g * g), tanh_c * o * (1.0 - o)],
        axis=1,
    )
    return gate_scale, dh_to_dc, f


def _lstm_backward(residuals, cotangents, unroll: int = 1, compiled: bool = False):
    """Backward pass of a window of LSTM steps, on feature-major arrays.

    residuals: `recurrent_kernel[H, 4H]`, the initial carry, what the forward pass saved and
    `hs[T, H * B]`. cotangents: of the final carry and of `hs`. Returns the cotangents of the
    kernel, of the initial carry and of `gate_inputs`. The forward pass saves `(gates, cs)`;
    with `compiled`, the compiled kernel's forward steps saved `_backward_factors` of them
    instead, and its backward steps run the scan.
    """
    kernel, (c0, h0), saved, hs = residuals
    (dc_last, dh_last), dhs = cotangents
    hidden, steps = kernel.shape[0], hs.shape[0]
    h_prev = jnp.concatenate([h0[None], hs[:-1]], axis=0)
    if compiled:
        gate_scale, dh_to_dc, forget = saved
        packed = cell_kernel.pack_backward(kernel)

        def compiled_step(state, t):  # the step below, dc and the window's dzs in place
            dc, dzs = state
            args = (dh_last, dhs, dh_to_dc, gate_scale, forget, packed, dc, dzs)
            return cell_kernel.backward_step(t, *args), None

        times = jnp.arange(steps, dtype=jnp.int32)
        state = (dc_last, cell_kernel.uninitialized(gate_scale.shape))
        (dc0, dzs), _ = jax.lax.scan(compiled_step, state, times, reverse=True)
        # The gradient reaching h0: the steps took each dh from the step after's dz.
        dh0 = (kernel @ dzs[0].reshape(4 * hidden, -1)).reshape(-1)
    else:
        gate_scale, dh_to_dc, forget = _backward_factors(c0, *saved)

        def step(carry, xs):
            dc, dh_next = carry
            dh_out, to_dc, scale, forget = xs
            dh = dh_next + dh_out
            dc = dc + dh * to_dc
            dz = jnp.stack([dc, dc, dc, dh]) * scale
            dh_prev = kernel @ dz.reshape(4 * hidden, -1)  # [H, B]
            return (dc * forget, dh_prev.reshape(-1)), dz

        xs = (dhs, dh_to_dc, gate_scale, forget)
        (dc0, dh0), dzs = jax.lax.scan(step, (dc_last, dh_last), xs, reverse=True, unroll=unroll)
    # The recurrent-weight gradient as one large product over all steps and rows:
    # [H, T * B] @ [T * B, 4H].
    batch = hs.shape[-1] // hidden
    h_prev_rows = jnp.moveaxis(h_prev.reshape(steps, hidden, batch), 1, 0)
    dz_rows = batch_major(dzs.reshape(steps, -1), batch)  # [T, B, 4H]
    d_kernel = h_prev_rows.reshape(hidden, -1) @ dz_rows.reshape(-1, 4 * hidden)
    return d_kernel, (dc0, dh0), dzs


class Recurrence(nn.Module):
    """The LSTM cell scanned over a window with `nn.scan`, on feature-major arrays.

    `(carry, gate_inputs[T, 4, H * B], output_mask, kernel_mask) -> (carry, outs[T, H * B])`:
    `output_mask` is None or a scaled `[T, H * B]` dropout mask on the outputs, `kernel_mask`
    None or a scaled `[H, 4H]` weight-drop mask applied to the recurrent kernel at every step.
    With `fused_backward` the gradient comes from `_lstm_backward`; without it, from autodiff
    of the scan (kept for tests and benchmarks: both give the same gradients). With
    `cell_kernel` (and `fused_backward`), where `cell_kernel.usable`, the scanned step forward
    and backward is the compiled CPU kernel.
    """

    hidden_size: int
    fused_backward: bool = True
    unroll: int = 1
    product_dtype: Any = None
    cell_kernel: bool = True

    @nn.compact
    def __call__(self, carry: LayerCarry, gate_inputs: jax.Array, output_mask, kernel_mask):
        kernel = RecurrentKernel(self.hidden_size, name="cell")()
        if kernel_mask is not None:  # weight drop: the same scaled mask at every step
            kernel = kernel * kernel_mask
        compiled = (
            self.cell_kernel
            and self.fused_backward
            and self.product_dtype is None
            and not self.is_initializing()
            and cell_kernel.usable(self.hidden_size)
        )
        if compiled:
            step = nn.scan(
                KernelCell,
                variable_broadcast="params",
                split_rngs={"params": False},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                out_axes=0,
            )(name="step")
        else:
            step = nn.scan(
                LSTMCell,
                variable_broadcast="params",
                split_rngs={"params": False},
                in_axes=(0, 0, nn.broadcast),
                out_axes=0,
                unroll=self.unroll,
            )(self.product_dtype, name="step")

        def window(mdl, carry, gate_inputs, output_mask, kernel, residuals=True):
            """`(final carry, (outs, hs, saved))` of the window, `saved` what `_lstm_backward`
            reads; without `residuals` (no gradient taken), the compiled steps save nothing."""
            if not compiled:
                final, (outs, hs, gates, cs) = mdl(
                    carry, gate_inputs, output_mask, transposed(kernel)
                )
                return final, (outs, hs, (gates, cs))
            steps, units = gate_inputs.shape[0], gate_inputs.shape[-1]
            c0, h0 = carry
            state = (c0, cell_kernel.window_buffers(steps, units, residuals))
            times = jnp.arange(steps, dtype=jnp.int32)
            packed = cell_kernel.pack_forward(kernel)
            (c, buffers), _ = mdl(state, times, gate_inputs, h0, packed)
            *saved, hs = buffers
            outs = hs if output_mask is None else hs * output_mask
            return (c, hs[-1]), (outs, hs, tuple(saved))

        def run(mdl, carry, gate_inputs, output_mask, kernel):
            carry, (outs, *_) = window(mdl, carry, gate_inputs, output_mask, kernel, False)
            return carry, outs

        if not self.fused_backward or self.is_initializing():
            return run(step, carry, gate_inputs, output_mask, kernel)

        def forward(mdl, carry, gate_inputs, output_mask, kernel):
            final, (outs, hs, saved) = window(mdl, carry, gate_inputs, output_mask, kernel)
            return (final, outs), (kernel, carry, saved, hs, output_mask)

        def backward(residuals, cotangents):
            *residuals, output_mask = residuals
            d_carry_out, d_outs = cotangents
            d_hs = d_outs if output_mask is None else d_outs * output_mask
            d_kernel, d_carry, d_gate_inputs = _lstm_backward(
                residuals, (d_carry_out, d_hs), self.unroll, compiled
            )
            d_kernel, d_carry, d_gate_inputs = finished_together(d_kernel, d_carry, d_gate_inputs)
            d_output_mask = None if output_mask is None else jnp.zeros_like(output_mask)
            return {}, d_carry, d_gate_inputs, d_output_mask, d_kernel

        return nn.custom_vjp(run, forward_fn=forward, backward_fn=backward)(
            step, carry, gate_inputs, output_mask, kernel
        )


class LSTMLayer(nn.Module):
    """One LSTM layer over a window: the input product for all steps, then the recurrence.

    Input is either ids `[T, B]` (first layer: a row gather of the input kernel, the same
    function as a one-hot product) or feature-major activations `[T, D * B]`; the carry is
    feature-major, `(c, h)` each `[H * B]`. Returns `(carry, hs[T, H * B])`, with dropout at
    rate `output_drop` on `hs` in training (one mask per row for the whole window with
    `variational_dropout`).
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
    batch_axis: str | None = None
    cell_kernel: bool = True

    @nn.compact
    def __call__(self, carry: LayerCarry, inputs: jax.Array, train: bool = False):
        bound = self.hidden_size**-0.5
        shape = (self.input_size, 4 * self.hidden_size)
        input_kernel = self.param("input_kernel", torch_uniform(bound), shape)
        input_bias = self.param("input_bias", torch_uniform(bound), (4 * self.hidden_size,))
        recurrent_bias = self.param("recurrent_bias", torch_uniform(bound), (4 * self.hidden_size,))
        bias = input_bias + recurrent_bias  # both enter every step: add them once, outside
        steps, batch = inputs.shape[0], carry[0].shape[-1] // self.hidden_size
        if jnp.issubdtype(inputs.dtype, jnp.integer):
            if train and self.embed_drop > 0:
                keep = self._keep(self.embed_drop, self.make_rng("dropout"), (self.input_size, 1))
                input_kernel = input_kernel * keep
            # Bias added to the 71 rows before the gather, not to the T * B rows after it.
            # Ids are checked against the vocabulary upstream: "clip" spares the gather the
            # select over all its rows that the default out-of-range fill costs.
            gate_rows = jnp.take(input_kernel + bias, inputs, axis=0, mode="clip")  # [T, B, 4H]
        else:
            rows = batch_major(inputs, batch).reshape(steps * batch, -1)
            if self.product_dtype is None:
                gate_rows = project(rows, input_kernel) + bias
            else:
                gate_rows = matmul(rows, input_kernel, self.product_dtype) + bias
            gate_rows = gate_rows.reshape(steps, batch, -1)
        gate_inputs = feature_major(gate_rows).reshape(steps, 4, -1)
        output_mask = None
        if train and self.output_drop > 0:
            output_mask = self._output_mask(steps, batch)
        kernel_mask = None
        if train and self.weight_drop > 0:
            shape = (self.hidden_size, 4 * self.hidden_size)
            kernel_mask = self._keep(self.weight_drop, self.make_rng("dropout"), shape)
        recurrence = Recurrence(
            self.hidden_size,
            self.fused_backward,
            self.unroll,
            self.product_dtype,
            self.cell_kernel,
            name="recurrence",
        )
        return recurrence(carry, gate_inputs, output_mask, kernel_mask)

    def _output_mask(self, steps: int, batch: int) -> jax.Array:
        """A scaled `[T, H * B]` dropout mask; row `r` draws from `fold_in(key, r)`."""
        first_row = 0
        if self.batch_axis is not None:  # rows split over devices: this device's first row
            first_row = jax.lax.axis_index(self.batch_axis) * batch
        row_keys = jax.vmap(jax.random.fold_in, (None, 0))(
            self.make_rng("dropout"), first_row + jnp.arange(batch)
        )
        shape = (1 if self.variational_dropout else steps, self.hidden_size)
        draw = jax.vmap(lambda key: self._keep(self.output_drop, key, shape), out_axes=-1)
        mask = draw(row_keys).reshape(shape[0], -1)  # [T or 1, H * B]
        return jnp.broadcast_to(mask, (steps, mask.shape[-1]))

    @staticmethod
    def _keep(rate: float, key: jax.Array, shape) -> jax.Array:
        """A dropout mask scaled by `1 / (1 - rate)`: each entry kept with probability
        `1 - rate`, rounded to a multiple of 2**-16 (exact for 0.5).

        Two entries from each random 32-bit word: the random bits were about 4% of a train
        step at the reference configuration with one word an entry (`jax.random.bernoulli`).
        """
        size = math.prod(shape)
        bits = jax.random.bits(key, ((size + 1) // 2,), jnp.uint32)
        halves = jnp.stack([bits & 0xFFFF, bits >> 16], axis=-1).reshape(-1)[:size]
        keep = halves.reshape(shape) < jnp.uint32(round((1.0 - rate) * 2**16))
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
    batch_axis: str | None = None  # the `shard_map` axis that splits the rows, if any
    cell_kernel: bool = True  # the compiled CPU kernel for the cell's step, where usable

    @nn.compact
    def __call__(self, carry: Carry, ids: jax.Array, train: bool = False):
        if train and self.product_dtype is not None:
            raise ValueError("product_dtype is for sampling only; train with product_dtype=None.")
        batch = ids.shape[0]
        x = ids.T  # time-major inside: the scan walks the leading axis
        new_carry = []
        for layer, (c, h) in enumerate(carry):
            input_size = self.vocab_size if layer == 0 else self.hidden_size
            (c, h), x = LSTMLayer(
                self.hidden_size,
                input_size,
                self.fused_backward,
                self.unroll,
                output_drop=self.drop_prob,
                variational_dropout=self.variational_dropout,
                weight_drop=self.weight_drop,
                embed_drop=self.embed_drop if layer == 0 else 0.0,
                product_dtype=self.product_dtype,
                batch_axis=self.batch_axis,
                cell_kernel=self.cell_kernel,
                name=f"lstm_{layer}",
            )((feature_major(c), feature_major(h)), x, train)
            new_carry.append((batch_major(c, batch), batch_major(h, batch)))
        bound = self.hidden_size**-0.5
        logits = nn.Dense(
            self.vocab_size,
            kernel_init=torch_uniform(bound),
            bias_init=torch_uniform(bound),
            name="head",
        )(batch_major(x, batch))  # [T, B, V]
        return tuple(new_carry), jnp.swapaxes(logits, 0, 1)

    def initialize_carry(self, batch_size: int) -> Carry:
        """A zero carry for `batch_size` rows: `num_layers` pairs of `(c, h)`, each `[B, H]`."""
        shape = (batch_size, self.hidden_size)
        # Distinct buffers, so the train step may donate each of them.
        return tuple(
            (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
            for _ in range(self.num_layers)
        )


def decode_step(model: CharLSTM, params, carry: Carry, ids: jax.Array):
    """One step of `model` on `ids[B]`, as generation runs it: `(carry, logits[B, V])`.

    The same function as `model.apply` on a one-step window, computed batch-major: the
    feature-major layout pays off over a window's many steps, while a single step at a time
    ran 1.3-1.6x slower with it on the CPU (its layout changes and product shapes).
    """
    new_carry = []
    x = None
    for layer, (c, h) in enumerate(carry):
        p = params[f"lstm_{layer}"]
        bias = p["input_bias"] + p["recurrent_bias"]
        if layer == 0:
            z = jnp.take(p["input_kernel"] + bias, ids, axis=0, mode="clip")  # [B, 4H]
        else:
            z = matmul(x, p["input_kernel"], model.product_dtype) + bias
        kernel = p["recurrence"]["cell"]["recurrent_kernel"]
        z = z + matmul(h, kernel, model.product_dtype)
        _, c, h = lstm_update(z.reshape(-1, 4, model.hidden_size), c)
        x = h
        new_carry.append((c, h))
    logits = x @ params["head"]["kernel"] + params["head"]["bias"]
    return tuple(new_carry), logits


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
        cell_kernel=config.get("cell_kernel", True),
    )


def count_params(params) -> int:
    """Number of scalar parameters in a params tree."""
    return sum(x.size for x in jax.tree_util.tree_leaves(params))
