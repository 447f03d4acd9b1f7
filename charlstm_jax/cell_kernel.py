"""The LSTM cell's step as a compiled CPU kernel (`kernels/lstm_cell.cc`), called through XLA's FFI.

XLA's CPU backend runs the scanned cell as a thin product plus a dozen small operations a step,
each with its own overhead, and starts its thread-pool tasks slowly; the kernel does a step in
one pass on two cores, with the kernel packed once per window into the order the product reads
it. It is the same function as the cell in `model.py` (the tests compare the two, gradients
included) and runs the same way every time, so results stay exactly reproducible; they differ
from the XLA path's by float rounding.

`pip install` compiles the library (see `setup.py`). Where it is missing, or the backend is not
the CPU, or the hidden size is not a multiple of 16, the model uses the XLA path.
"""

import ctypes
import functools
import importlib.util

import jax
import jax.numpy as jnp

_TARGETS = {
    "charlstm_lstm_forward_step": "LstmForwardStep",
    "charlstm_lstm_inference_step": "LstmInferenceStep",
    "charlstm_lstm_backward_step": "LstmBackwardStep",
    "charlstm_uninitialized": "Uninitialized",
}


@functools.cache
def available() -> bool:
    """Whether the compiled library loaded (its targets are then registered with XLA)."""
    spec = importlib.util.find_spec("charlstm_jax._lstm_cell")
    if spec is None or spec.origin is None:
        return False
    try:
        library = ctypes.CDLL(spec.origin)
    except OSError:
        return False
    for target, symbol in _TARGETS.items():
        capsule = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    return True


def usable(hidden_size: int) -> bool:
    """Whether the kernel serves a layer of `hidden_size` units on the current backend."""
    return hidden_size % 16 == 0 and jax.default_backend() == "cpu" and available()


def _call(target: str, results, **kwargs):
    """`jax.ffi.ffi_call` of one of the library's targets, once it is loaded and registered."""
    if not available():
        raise RuntimeError(
            "The compiled LSTM cell kernel is missing; reinstall the package with a C++20 "
            "compiler (pip install -e .) or build the model with cell_kernel=False."
        )
    return jax.ffi.ffi_call(target, results, **kwargs)


def pack_forward(kernel: jax.Array) -> jax.Array:
    """`kernel[H, 4H]` as `[H / 4, H, 4 gates, 4 units]`: for each block of 4 units, its 16
    columns of the kernel, row after row, in the order the forward step reads them."""
    hidden = kernel.shape[0]
    return kernel.reshape(hidden, 4, hidden // 4, 4).transpose(2, 0, 1, 3)


def pack_backward(kernel: jax.Array) -> jax.Array:
    """`kernel[H, 4H]` as `[H / 16, 4H, 16 units]`: for each block of 16 units, its 16 rows of
    the kernel, column after column, in the order the backward step reads them."""
    hidden = kernel.shape[0]
    return kernel.reshape(hidden // 16, 16, 4 * hidden).transpose(0, 2, 1)


def uninitialized(shape: tuple[int, ...]) -> jax.Array:
    """A float32 buffer left unwritten, for outputs the steps fill in entirely."""
    result = jax.ShapeDtypeStruct(shape, jnp.float32)
    # A side effect, so that XLA neither merges two such buffers nor drops one.
    return _call("charlstm_uninitialized", result, has_side_effect=True)()


def window_buffers(steps: int, units: int, residuals: bool):
    """The forward steps' outputs for a window: with `residuals`, what the backward pass
    reads, `(gate_scale[T, 4, N], dh_to_dc[T, N], forget[T, N], hs[T, N])` (see
    `model._lstm_backward`), else `(hs,)`."""
    if not residuals:
        return (uninitialized((steps, units)),)
    shapes = ((steps, 4, units), (steps, units), (steps, units), (steps, units))
    return tuple(uninitialized(shape) for shape in shapes)


def forward_step(t, gate_inputs, h0, packed, c, buffers):
    """Step `t` of a window: from the window's `gate_inputs[T, 4, H * B]`, the `h0` it starts
    from and the cell state `c`, returns the new `c` and `buffers` (`window_buffers`) with
    row `t` written. The step reads h from row `t - 1` of the window's `hs` (`h0` at step 0)
    and writes `c`, `buffers` in place: no carry is copied from step to step."""
    target = "charlstm_lstm_forward_step" if len(buffers) > 1 else "charlstm_lstm_inference_step"
    outputs = (c, *buffers)
    call = _call(
        target,
        tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in outputs),
        input_output_aliases={4 + i: i for i in range(len(outputs))},
        vmap_method="sequential",
    )
    c, *buffers = call(jnp.asarray(t, jnp.int32), gate_inputs, h0, packed, *outputs)
    return c, tuple(buffers)


def backward_step(t, dh_last, dhs, dh_to_dc, gate_scale, forget, packed, dc, dzs):
    """Step `t` of the backward pass (`model._lstm_backward`): from the cell gradient `dc`
    and the window's arrays, returns the previous step's `dc` and `dzs[T, 4, N]` with row `t`
    written, both in place. The gradient reaching h is `kernel @ dz` of step `t + 1`, read
    from `dzs` (`dh_last`, the final carry's, at the window's last step)."""
    call = _call(
        "charlstm_lstm_backward_step",
        (jax.ShapeDtypeStruct(dc.shape, dc.dtype), jax.ShapeDtypeStruct(dzs.shape, dzs.dtype)),
        input_output_aliases={7: 0, 8: 1},
        vmap_method="sequential",
    )
    return call(
        jnp.asarray(t, jnp.int32), dh_last, dhs, dh_to_dc, gate_scale, forget, packed, dc, dzs
    )
