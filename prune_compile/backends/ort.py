"""ONNX Runtime: the reference runner (correctness oracles) and latency baseline."""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from collections.abc import Mapping

import numpy as np
import onnx

from ..errors import BackendError
from ..ir import onnx_io


def session(model: onnx.ModelProto | bytes | str | os.PathLike, threads: int | None = None,
            optimized_path: str | None = None, prepack: bool = True):
    """An ORT CPU session; warnings silenced (ORT's optimizer is chatty about shapes it re-derives).
    `optimized_path`: where ORT writes the graph its optimizer made for this CPU. `prepack=False` keeps ORT from
    repacking weights for its GEMMs (a second copy of each; worth it only for sessions run many times)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if isinstance(model, onnx.ModelProto):
        with onnx_io.loadable(model) as source:  # large or heavy: a temporary file with external data
            return session(source, threads, optimized_path, prepack)
    if not isinstance(model, bytes):
        model = os.fspath(model)
    try:
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise BackendError(f"ONNX Runtime cannot load the model: {str(e).splitlines()[0][:300]}") from e


def run(model, feeds: Mapping[str, np.ndarray], threads: int | None = 2) -> list[np.ndarray]:
    """Run `model` (a session, or a model for a session that runs once) on `feeds`; returns outputs in graph order.
    A session made here does not repack weights: that buys speed over many runs and costs a second copy of them
    (and every one-shot run computes alike, whatever the model's size)."""
    sess = model if hasattr(model, "run") else session(model, threads, prepack=False)
    try:
        return sess.run(None, dict(feeds))
    except Exception as e:
        raise BackendError(f"ONNX Runtime failed to run the model: {str(e).splitlines()[0][:300]}") from e


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs for every graph input (all dims must be static)."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if dtype.kind == "f":
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[inp.name] = rng.integers(0, 2, size=shape).astype(dtype)
        else:
            feeds[inp.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def relative_error(reference: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """max |a - r| / max |r| over all outputs (relative to each output's scale)."""
    worst = 0.0
    for r, a in zip(reference, actual, strict=True):
        r = np.asarray(r, dtype=np.float64)
        a = np.asarray(a, dtype=np.float64)
        if r.shape != a.shape:
            return float("inf")
        scale = float(np.abs(r).max()) if r.size else 0.0
        diff = float(np.abs(r - a).max()) if r.size else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


NCHWC_DOMAIN = "com.microsoft.nchwc"


def nchwc_conv_counts(model: onnx.ModelProto | str | os.PathLike) -> tuple[int, int]:
    """(convs ONNX Runtime runs in its blocked NCHWc kernels, convs it runs plain) in the graph its optimizer makes
    of `model` for this CPU (written to a temp file: the only way ORT shows it; fused convs count once)."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        session(model, optimized_path=optimized)
        nodes = onnx.load(optimized).graph.node
    blocked = sum(1 for n in nodes if n.domain == NCHWC_DOMAIN and n.op_type == "Conv")
    return blocked, sum(1 for n in nodes if n.domain != NCHWC_DOMAIN and n.op_type in ("Conv", "FusedConv"))


def conv_model(in_channels: int, out_channels: int, group: int = 1, size: int = 8) -> onnx.ModelProto:
    """A model of one 3x3 conv (padded, constant weights) on a [1, in_channels, size, size] input."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((out_channels, in_channels // group, 3, 3), 0.1, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], group=group, pads=[1, 1, 1, 1])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_channels, size, size])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@functools.cache
def nchwc_alignment() -> int:
    """The channel counts ONNX Runtime's NCHWc kernels take on this CPU: multiples of the returned number (0: it has
    no NCHWc kernels here). Asked of ORT itself: its optimizer gives a depthwise conv, or a dense conv's input of
    16 channels or more, the NCHWc form only for such counts (ORT 1.31 on AVX-512: multiples of 4, zero-padded to
    its 16-float block; any other count runs a plain conv between layout reorders)."""
    for count in (2, 4, 8, 16):
        try:
            blocked = nchwc_conv_counts(conv_model(count, count, group=count)) == (1, 0)
        except Exception as e:  # a probe must not fail the run: no writable temp dir, an ORT without NCHWc output
            warnings.warn(f"cannot ask ONNX Runtime for its NCHWc channel multiple: {e}", stacklevel=2)
            return 0
        if blocked:
            return count
    return 0
