"""A recurrent layer's steps (LSTM, GRU, RNN) as one CPU kernel: every step of every direction in a single call.

Why: unrolled into standard ops (recurrent_unroll.py), a 100-step bidirectional layer is ~1,000 tiny kernel calls
whose dispatch and parallel launches cost more than their arithmetic: a CRNN with two LSTM layers (hidden 128 after
pruning) ran 6.9 ms in tuned TVM against ONNX Runtime's 2.96 ms. Here one kernel loops over the steps, keeps each
64-column block of the state's product with Rᵀ in vector registers while it walks the state (Rᵀ's rows stream from
cache once per step), computes the gates with rational approximations that vectorize (libm's tanh and exp are scalar
calls), and runs the directions on separate threads (`T.parallel`). Rᵀ is packed block by block (`packed_rt`), so
a pass reads its block as one contiguous run: in Rᵀ's own layout each row of a block sits a row of 4H floats
(4 KB at hidden 256) past the last, a new page each row, which the hardware prefetchers do not follow. The input
projection X·Wᵀ + biases stays one MatMul of the whole sequence, outside (recurrent_unroll emits it).

The ONNX side is one node per layer in domain `prune_compile.tvm`, in ONNX's own layouts (Y [T, D, B, H], states
[D, B, H]) and gate orders (LSTM i, o, f, c; GRU z, r, h); attribute `reverse`, one flag per direction:
- LSTMSteps(XW [D, T, B, 4H] with both biases, Rᵀ packed [D, H·4H], h0, c0) -> Y, Y_h, Y_c. Gates Sigmoid, Tanh,
  Tanh.
- GRUSteps(XW [D, T, B, 3H] with W's bias, Rᵀ packed [D, H·3H], Rb [D, 1, 1, 3H], h0) -> Y, Y_h;
  `linear_before_reset` as ONNX's GRU. Gates Sigmoid, Tanh.
- RNNSteps(XW [D, T, B, H] with both biases, Rᵀ packed [D, H·H], h0) -> Y, Y_h; `activation` Tanh, Relu or Sigmoid.
TVM's ONNX frontend has no hook for converters of ours, so `recurrent_steps_frontend()` adds them to its converter
table while `from_onnx` runs. Forms with peepholes, clip, input_forget, sequence_lens or other activations unroll.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

DOMAIN = "prune_compile.tvm"
OPS = {"LSTM": "LSTMSteps", "GRU": "GRUSteps", "RNN": "RNNSteps"}
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
BLOCK = 64  # state-product columns one pass accumulates in registers: eight AVX2 vectors; a narrower tail follows

# tanh(x) ≈ x·p(x²)/q(x²) on [-9, 9] (a float32-accurate rational fit, as Eigen's and TVM's fast_tanh), clamped
# outside: |error| < 1e-6
_TANH_P = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
           -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)


def _tanh(x):
    from tvm.script import tirx as T

    x = T.max(T.min(x, T.float32(9.0)), T.float32(-9.0))
    x2 = x * x
    p, q = T.float32(_TANH_P[-1]), T.float32(_TANH_Q[-1])
    for a in reversed(_TANH_P[:-1]):
        p = p * x2 + T.float32(a)
    for b in reversed(_TANH_Q[:-1]):
        q = q * x2 + T.float32(b)
    return x * p / q


def _sigmoid(x):
    from tvm.script import tirx as T

    return T.float32(0.5) * _tanh(T.float32(0.5) * x) + T.float32(0.5)


def _relu(x):
    from tvm.script import tirx as T

    return T.max(x, T.float32(0.0))


ACTIVATIONS = {"Tanh": _tanh, "Sigmoid": _sigmoid, "Relu": _relu}


def _segments(cell: str, hidden: int, linear_before_reset: int) -> list[tuple[int, int]]:
    """(first column, columns) of Rᵀ each pass over the state covers: all gates at once, except a GRU whose reset
    gate comes before R (its h gate multiplies r ⊙ h, known only after z and r)."""
    if cell == "GRU" and not linear_before_reset:
        return [(0, 2 * hidden), (2 * hidden, hidden)]
    return [(0, GATES[cell] * hidden)]


def _blocks(first: int, count: int) -> list[tuple[int, int]]:
    """(first column, width) of the passes over `count` columns from `first`: BLOCK wide, then the tail."""
    tail = count % BLOCK
    return [(first + k * BLOCK, BLOCK) for k in range(count // BLOCK)] + [(first + count - tail, tail)] * (tail > 0)


def packed_rt(r: np.ndarray, cell: str, linear_before_reset: int = 0) -> np.ndarray:
    """ONNX's R [D, G, H] as the kernel reads it, [D, H·G]: each pass's block of Rᵀ (columns c .. c+w) holds its H
    rows of w floats one after another, from H·c on."""
    directions, gates, hidden = r.shape
    out = np.empty((directions, hidden * gates), r.dtype)
    for first, count in _segments(cell, hidden, linear_before_reset):
        for c, w in _blocks(first, count):
            out[:, hidden * c:hidden * (c + w)] = np.transpose(r[:, c:c + w, :], (0, 2, 1)).reshape(directions, -1)
    return out


def steps_func(cell: str, directions: int, steps: int, batch: int, hidden: int, reverse: tuple[int, ...], *,
               linear_before_reset: int = 0, activation: str = "Tanh"):
    """The PrimFunc for one `cell` ("LSTM", "GRU", "RNN") of these static sizes, its buffers in the node's input and
    output order (see the module doc); direction d walks the sequence backwards where reverse[d]."""
    from tvm.script import tirx as T

    D, S, B, H = directions, steps, batch, hidden
    G = GATES[cell] * H
    backwards = tuple(int(r) for r in reverse)
    assert len(backwards) == D
    act = ACTIVATIONS[activation]
    reset_after = bool(linear_before_reset)

    @T.macro
    def columns(pre, init, ti, bi, state, rt, d, b, lo, count, width):
        """pre[d, b, lo + c] = init[d, ti, bi, lo + c] + Σᵢ state[d, b, i]·Rᵀ[i, lo + c] for c < count, `width`
        columns per pass (each pass reads the whole state; rt is packed_rt's layout)."""
        for kb in range(count // width):
            acc = T.alloc_buffer((width,), "float32", scope="local")
            for k in T.vectorized(width):
                acc[k] = init[d, ti, bi, lo + kb * width + k]
            for i in range(H):
                for k in T.vectorized(width):
                    acc[k] = acc[k] + state[d, b, i] * rt[d, H * (lo + kb * width) + i * width + k]
            for k in T.vectorized(width):
                pre[d, b, lo + kb * width + k] = acc[k]

    @T.macro
    def state_product(pre, init, ti, bi, state, rt, d, b, lo, count):
        columns(pre, init, ti, bi, state, rt, d, b, lo, count, BLOCK)
        if count % BLOCK > 0:  # (static) the tail: one narrower pass
            columns(pre, init, ti, bi, state, rt, d, b, lo + count - count % BLOCK, count % BLOCK, count % BLOCK)

    def step_index(d, s):
        """The time step direction d is at on its s-th step."""
        return s + T.Select(d == 0, T.int32(backwards[0]), T.int32(backwards[-1])) * (S - 1 - 2 * s)

    if cell == "LSTM":
        @T.prim_func(private=True)
        def lstm_steps(xw: T.Buffer((D, S, B, G), "float32"), rt: T.Buffer((D, H * G), "float32"),
                       h0: T.Buffer((D, B, H), "float32"), c0: T.Buffer((D, B, H), "float32"),
                       y: T.Buffer((S, D, B, H), "float32"), y_h: T.Buffer((D, B, H), "float32"),
                       y_c: T.Buffer((D, B, H), "float32")):
            # scheduled by hand: the default schedules leave it alone, and tuning drops it (tuning.hand_scheduled)
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            pre = T.alloc_buffer((D, B, G), "float32")
            for d in T.parallel(D):
                for b, j in T.grid(B, H):  # y_h and y_c hold the state as it goes
                    y_h[d, b, j] = h0[d, b, j]
                    y_c[d, b, j] = c0[d, b, j]
                for s in range(S):
                    t = step_index(d, s)
                    for b in range(B):
                        state_product(pre, xw, t, b, y_h, rt, d, b, 0, G)
                        for j in T.vectorized(H):
                            y_c[d, b, j] = (_sigmoid(pre[d, b, 2 * H + j]) * y_c[d, b, j]
                                            + _sigmoid(pre[d, b, j]) * _tanh(pre[d, b, 3 * H + j]))
                            y_h[d, b, j] = _sigmoid(pre[d, b, H + j]) * _tanh(y_c[d, b, j])
                            y[t, d, b, j] = y_h[d, b, j]

        return lstm_steps

    if cell == "GRU":
        @T.prim_func(private=True)
        def gru_steps(xw: T.Buffer((D, S, B, G), "float32"), rt: T.Buffer((D, H * G), "float32"),
                      rb: T.Buffer((D, 1, 1, G), "float32"), h0: T.Buffer((D, B, H), "float32"),
                      y: T.Buffer((S, D, B, H), "float32"), y_h: T.Buffer((D, B, H), "float32")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            pre = T.alloc_buffer((D, B, G), "float32")
            reset = T.alloc_buffer((D, B, H), "float32")  # r ⊙ h, where the reset gate comes before R
            for d in T.parallel(D):
                for b, j in T.grid(B, H):
                    y_h[d, b, j] = h0[d, b, j]
                for s in range(S):
                    t = step_index(d, s)
                    for b in range(B):
                        if reset_after:  # (static) n = tanh(xw_h + r ⊙ (h·R_hᵀ + Rb_h))
                            state_product(pre, rb, 0, 0, y_h, rt, d, b, 0, G)
                            for j in T.vectorized(H):
                                pre[d, b, 2 * H + j] = _tanh(xw[d, t, b, 2 * H + j] + _sigmoid(
                                    xw[d, t, b, H + j] + pre[d, b, H + j]) * pre[d, b, 2 * H + j])
                                pre[d, b, j] = _sigmoid(xw[d, t, b, j] + pre[d, b, j])
                        else:  # n = tanh(xw_h + (r ⊙ h)·R_hᵀ + Rb_h): z and r first, then the h gate's product
                            state_product(pre, rb, 0, 0, y_h, rt, d, b, 0, 2 * H)
                            for j in T.vectorized(H):
                                reset[d, b, j] = _sigmoid(xw[d, t, b, H + j] + pre[d, b, H + j]) * y_h[d, b, j]
                                pre[d, b, j] = _sigmoid(xw[d, t, b, j] + pre[d, b, j])
                            state_product(pre, rb, 0, 0, reset, rt, d, b, 2 * H, H)
                            for j in T.vectorized(H):
                                pre[d, b, 2 * H + j] = _tanh(xw[d, t, b, 2 * H + j] + pre[d, b, 2 * H + j])
                        for j in T.vectorized(H):  # (1 - z)·n + z·h
                            y_h[d, b, j] = pre[d, b, 2 * H + j] + pre[d, b, j] * (y_h[d, b, j] - pre[d, b, 2 * H + j])
                            y[t, d, b, j] = y_h[d, b, j]

        return gru_steps

    @T.prim_func(private=True)
    def rnn_steps(xw: T.Buffer((D, S, B, G), "float32"), rt: T.Buffer((D, H * G), "float32"),
                  h0: T.Buffer((D, B, H), "float32"),
                  y: T.Buffer((S, D, B, H), "float32"), y_h: T.Buffer((D, B, H), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        pre = T.alloc_buffer((D, B, G), "float32")
        for d in T.parallel(D):
            for b, j in T.grid(B, H):
                y_h[d, b, j] = h0[d, b, j]
            for s in range(S):
                t = step_index(d, s)
                for b in range(B):
                    state_product(pre, xw, t, b, y_h, rt, d, b, 0, G)
                    for j in T.vectorized(H):
                        y_h[d, b, j] = act(pre[d, b, j])
                        y[t, d, b, j] = y_h[d, b, j]

    return rnn_steps


def _converters() -> dict:
    """TVM's ONNX-frontend converter classes for the three ops."""
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    def converter(cell: str):
        class Steps(OnnxOpConverter):
            @classmethod
            def _impl_v1(cls, bb, inputs, attr, params):
                inputs = [bb.normalize(x) for x in inputs]
                directions, steps, batch, gates = (int(v) for v in inputs[0].ty.shape.values)
                hidden = gates // GATES[cell]
                activation = attr.get("activation", b"Tanh")
                func = steps_func(cell, directions, steps, batch, hidden, tuple(attr["reverse"]),
                                  linear_before_reset=int(attr.get("linear_before_reset", 0)),
                                  activation=activation.decode() if isinstance(activation, bytes) else activation)
                gv = bb.add_func(func, f"{cell.lower()}_steps")
                state = relax.TensorType((directions, batch, hidden), "float32")
                outputs = [relax.TensorType((steps, directions, batch, hidden), "float32"), state]
                return bb.emit(relax.call_tir(gv, relax.Tuple(inputs), outputs + [state] * (cell == "LSTM")))

        Steps.__name__ = OPS[cell]
        return Steps

    return {op: converter(cell) for cell, op in OPS.items()}


@contextlib.contextmanager
def recurrent_steps_frontend() -> Iterator[None]:
    """TVM's ONNX frontend, for the duration, converts our Steps nodes (see the module doc)."""
    from tvm.relax.frontend.onnx import onnx_frontend

    table = onnx_frontend._get_convert_map
    converters = _converters()
    onnx_frontend._get_convert_map = lambda: {**table(), **converters}
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = table
