"""ONNX models over protobuf's 2 GiB message limit.

Such a model cannot be serialized as one message: not for onnx's checker and shape inference (which serialize the
model to reach C++), not for ONNX Runtime (which loads bytes or a file), not for the output file. Below the limit
nothing here changes what the callers did before. Above it:
- checking and shape inference run on a weightless view: the large initializers become graph inputs of the same
  type and shape (the checker and shape inference need only their shapes), and the inferred shapes are copied back;
- a model is written as `NAME` plus `NAME.data` holding the large tensors (ONNX's external data, one file, offsets
  in the tensors' order), built tensor by tensor so the in-memory model is never copied or changed;
- ONNX Runtime loads such a model from a temporary directory written that way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np
import onnx
from google.protobuf.message import EncodeError
from onnx import helper, numpy_helper

PROTOBUF_LIMIT = 2**31 - 1  # protobuf's hard limit on one serialized message
EXTERNAL_MIN_BYTES = 1024  # tensors at least this large go to the data file of a large model (onnx's default)
HEAVY_BYTES = 64 * 2**20  # weights from this size on are kept out of onnx's shape inference (it copies them twice)


def is_large(model: onnx.ModelProto) -> bool:
    """Whether `model` is too large to serialize as one protobuf message."""
    if sum(_tensor_bytes(t) for t in model.graph.initializer) < PROTOBUF_LIMIT // 2:
        return False  # far below the limit: no need to size the whole message (upb serializes to size it)
    try:
        return model.ByteSize() > PROTOBUF_LIMIT
    except EncodeError:  # upb cannot even size a message past the limit
        return True


def data_file_name(path: str | os.PathLike) -> str:
    """The external data file written beside a large model at `path` (a name relative to its directory)."""
    return os.path.basename(os.fspath(path)) + ".data"


def _tensor_bytes(t: onnx.TensorProto) -> int:
    item = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize if t.data_type else 0
    return int(np.prod(t.dims, dtype=np.int64)) * item


def _copy_fields(src, dst, skip: set[str]) -> None:
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _shell(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """A copy of `model` without its initializers (which are returned), copying nothing large."""
    light = onnx.ModelProto()
    _copy_fields(model, light, {"graph"})
    _copy_fields(model.graph, light.graph, {"initializer"})
    return light, list(model.graph.initializer)


def weightless(model: onnx.ModelProto, min_bytes: int = EXTERNAL_MIN_BYTES) -> onnx.ModelProto:
    """`model` with every initializer of at least `min_bytes` turned into a graph input of its type and shape."""
    light, inits = _shell(model)
    for t in inits:
        if _tensor_bytes(t) >= min_bytes:
            light.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            light.graph.initializer.append(t)
    return light


def without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose tensors of EXTERNAL_MIN_BYTES or more keep their name, type and shape only (marked
    external, with no data file): for a model whose file still holds them, so that they need not stay in memory."""
    light, inits = _shell(model)
    for t in inits:
        if _tensor_bytes(t) < EXTERNAL_MIN_BYTES:
            light.graph.initializer.append(t)
        else:
            light.graph.initializer.append(onnx.TensorProto(name=t.name, dims=t.dims, data_type=t.data_type,
                                                            data_location=onnx.TensorProto.EXTERNAL))
    return light


def check_model(model: onnx.ModelProto) -> None:
    """onnx's checker; a large model is checked without its large weights' data."""
    onnx.checker.check_model(weightless(model) if is_large(model) else model)


def is_heavy(model: onnx.ModelProto) -> bool:
    """Whether `model`'s weights are worth not copying: onnx's shape inference serializes the model and parses the
    result, two transient copies of every weight."""
    return sum(_tensor_bytes(t) for t in model.graph.initializer) >= HEAVY_BYTES


def infer_shapes(model: onnx.ModelProto, in_place: bool = False, **options) -> onnx.ModelProto:
    """onnx's shape inference (same options): a new model, `model` left as it is. A heavy model gets the shapes
    inferred on its weightless view, and with `in_place` (always when large) gets them in place and is returned
    itself (a copy would double the memory it takes)."""
    if not is_heavy(model) and not is_large(model):
        return onnx.shape_inference.infer_shapes(model, **options)
    if not in_place and not is_large(model):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    inferred = onnx.shape_inference.infer_shapes(weightless(model), **options)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    outputs = {o.name: o for o in inferred.graph.output}
    for o in model.graph.output:
        o.type.CopyFrom(outputs[o.name].type)
    return model


def _external_form(model: onnx.ModelProto, data_name: str, data) -> onnx.ModelProto:
    """The proto to write for a large model: its tensors of EXTERNAL_MIN_BYTES or more written to the open binary
    file `data` (referenced as `data_name`), in order, each offset aligned to 64 bytes for memory mapping."""
    light, inits = _shell(model)
    for t in inits:
        if _tensor_bytes(t) < EXTERNAL_MIN_BYTES:
            light.graph.initializer.append(t)
            continue
        raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
        write_external(light.graph.initializer.add(), t.name, list(t.dims), t.data_type, raw, data, data_name)
    return light


def write_external(t: onnx.TensorProto, name: str, dims: list[int], data_type: int, raw, data,
                   data_name: str) -> None:
    """Make `t` a reference to `raw` (bytes, or a buffer such as an array's memoryview: not copied), appended to
    the open binary file `data` (referenced as `data_name`) at an offset aligned to 64 bytes for memory mapping."""
    data.write(b"\0" * (-data.tell() % 64))
    offset = data.tell()
    length = data.write(raw)
    t.name, t.data_type, t.data_location = name, data_type, onnx.TensorProto.EXTERNAL
    t.dims.extend(dims)
    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def save(model: onnx.ModelProto, path: str | os.PathLike, external: bool | None = None) -> list[str]:
    """Write `model` to `path` atomically (temp files and renames: never a half-written model), with the external
    data file beside it when the model is large (or `external` says so). Returns the paths written (model first)."""
    from ..util import atomic_write_bytes

    path = os.fspath(path)
    if not (is_large(model) if external is None else external):
        atomic_write_bytes(path, model.SerializeToString(deterministic=True))
        return [path]
    data_path = os.path.join(os.path.dirname(path), data_file_name(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as data:
            light = _external_form(model, data_file_name(path), data)
        os.replace(tmp, data_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    atomic_write_bytes(path, light.SerializeToString(deterministic=True))
    return [path, data_path]


def sha256(paths: list[str]) -> str:
    """One digest over the files `save` wrote (the model alone when it was not large)."""
    digest = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def loadable(model: onnx.ModelProto) -> Iterator[bytes | str]:
    """What ONNX Runtime can load `model` from: its bytes, or for a large or heavy model the path of a temporary copy
    with external data (removed on exit; ORT has read or mapped it by then), which costs no copy of the weights in
    memory (bytes would cost two: the serialized message, and ORT's parse of it)."""
    if not is_large(model) and not is_heavy(model):
        yield model.SerializeToString()
        return
    directory = tempfile.mkdtemp(prefix="prune-compile-onnx-")
    try:
        path = os.path.join(directory, "model.onnx")
        save(model, path, external=True)
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)
