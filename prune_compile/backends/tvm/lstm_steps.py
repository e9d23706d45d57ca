"""An LSTM's recurrence as one CPU kernel: every step of every direction in a single call.

Why: unrolled into standard ops (recurrent_unroll.py), a 100-step bidirectional layer is ~1,000 tiny kernel calls
whose dispatch and parallel launches cost more than their arithmetic: a CRNN with two such layers (hidden 128 after
pruning) ran 6.9 ms in tuned TVM against ONNX Runtime's 2.96 ms. Here one kernel loops over the steps, keeps each
output block's gate accumulators in vector registers while it walks the state (Rᵀ's rows stream from cache once per
step), computes the gates with rational approximations that vectorize (libm's tanh and exp are scalar calls), and
runs the directions on separate threads (`T.parallel`). The input projection X·Wᵀ + biases stays one MatMul of the
whole sequence, outside (recurrent_unroll emits it).

The ONNX side is a node `LSTMSteps` of domain `prune_compile.tvm` (inputs XW [D, T, B, 4H] with both biases added,
Rᵀ [D, H, 4H], h0 and c0 [D, B, H]; outputs Y [T, D, B, H], Y_h and Y_c [D, B, H]: ONNX's own layouts; attribute
`reverse`, one flag per direction). TVM's ONNX frontend has no hook for a converter of ours, so `lstm_steps_frontend()`
adds one to its converter table while `from_onnx` runs. Only the LSTM form torch exports is fused (gates Sigmoid,
Tanh, Tanh; no peepholes, clip, input_forget or sequence_lens); the rest unrolls as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

DOMAIN = "prune_compile.tvm"
OP = "LSTMSteps"

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


def output_block(gates: int) -> int:
    """Gate columns one pass accumulates in registers: 64 (eight AVX2 vectors) or the largest power of two that
    divides 4H (4H is always a multiple of 4)."""
    return next(n for n in (64, 32, 16, 8, 4) if gates % n == 0)


def lstm_steps_func(directions: int, steps: int, batch: int, hidden: int, reverse: tuple[int, ...]):
    """The PrimFunc (xw, rt, h0, c0, y, y_h, y_c) for these static sizes; direction d walks the sequence backwards
    where reverse[d]."""
    from tvm.script import tirx as T

    D, S, B, H = directions, steps, batch, hidden
    G = 4 * H
    K = output_block(G)
    backwards = tuple(int(r) for r in reverse)
    assert len(backwards) == D

    @T.prim_func(private=True)
    def lstm_steps(xw: T.Buffer((D, S, B, G), "float32"), rt: T.Buffer((D, H, G), "float32"),
                   h0: T.Buffer((D, B, H), "float32"), c0: T.Buffer((D, B, H), "float32"),
                   y: T.Buffer((S, D, B, H), "float32"), y_h: T.Buffer((D, B, H), "float32"),
                   y_c: T.Buffer((D, B, H), "float32")):
        # scheduled by hand: MetaSchedule and the default schedules leave it alone
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        pre = T.alloc_buffer((D, B, G), "float32")
        for d in T.parallel(D):
            for b, j in T.grid(B, H):  # y_h and y_c hold the state as it goes
                y_h[d, b, j] = h0[d, b, j]
                y_c[d, b, j] = c0[d, b, j]
            for s in range(S):
                back = T.Select(d == 0, T.int32(backwards[0]), T.int32(backwards[-1]))
                t = s + back * (S - 1 - 2 * s)  # the step this direction is at
                for b in range(B):
                    for kb in range(G // K):
                        acc = T.alloc_buffer((K,), "float32", scope="local")
                        for k in T.vectorized(K):
                            acc[k] = xw[d, t, b, kb * K + k]
                        for i in range(H):
                            for k in T.vectorized(K):
                                acc[k] = acc[k] + y_h[d, b, i] * rt[d, i, kb * K + k]
                        for k in T.vectorized(K):
                            pre[d, b, kb * K + k] = acc[k]
                    for j in T.vectorized(H):  # gates in ONNX's order i, o, f, c
                        y_c[d, b, j] = (_sigmoid(pre[d, b, 2 * H + j]) * y_c[d, b, j]
                                        + _sigmoid(pre[d, b, j]) * _tanh(pre[d, b, 3 * H + j]))
                        y_h[d, b, j] = _sigmoid(pre[d, b, H + j]) * _tanh(y_c[d, b, j])
                        y[t, d, b, j] = y_h[d, b, j]

    return lstm_steps


def _converter():
    """TVM's ONNX-frontend converter class for LSTMSteps."""
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    class LSTMSteps(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            xw, rt, h0, c0 = (bb.normalize(x) for x in inputs)
            directions, steps, batch, gates = (int(v) for v in xw.ty.shape.values)
            hidden = gates // 4
            func = lstm_steps_func(directions, steps, batch, hidden, tuple(attr["reverse"]))
            gv = bb.add_func(func, "lstm_steps")
            state = relax.TensorType((directions, batch, hidden), "float32")
            return bb.emit(relax.call_tir(gv, relax.Tuple([xw, rt, h0, c0]),
                                          [relax.TensorType((steps, directions, batch, hidden), "float32"),
                                           state, state]))

    return LSTMSteps


@contextlib.contextmanager
def lstm_steps_frontend() -> Iterator[None]:
    """TVM's ONNX frontend, for the duration, converts LSTMSteps nodes (see the module doc)."""
    from tvm.relax.frontend.onnx import onnx_frontend

    table = onnx_frontend._get_convert_map
    converter = _converter()
    onnx_frontend._get_convert_map = lambda: {**table(), OP: converter}
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = table
