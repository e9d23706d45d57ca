"""Where each element of a constant folded at import comes from, axis by axis, in its source parameters.

Torch surgery slices the user's parameters, not the folded constants the graph holds; so for every folded
constant the torch importer records, per source and per axis of the folded tensor, which source axis that axis
reads and at which offset (`cat` places each input at an offset). This is exact bookkeeping through the ops that
move elements or apply pointwise arithmetic; any other op (an index, a reduction, a matmul, weight standardization)
makes the map unknown (None), and surgery falls back to matching shapes or refuses, naming the constant.

A map is a tuple of `(source name, entries)`, one per use of a source (a source concatenated twice appears twice);
`entries[a]` is `(source axis, offset, length)`: folded indices `offset .. offset+length-1` on axis `a` are the
source's indices `0 .. length-1` on `source axis`; or None: this source does not vary along `a` (broadcast).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

aten = torch.ops.aten

Entry = tuple[int, int, int] | None
IndexMap = tuple[tuple[str, tuple[Entry, ...]], ...]

_SAME = {aten.clone.default, aten.detach.default, aten.alias.default, aten.contiguous.default,
         aten.lift_fresh_copy.default, aten._to_copy.default}
_RESHAPE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
            aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default}


def identity_map(name: str, shape: Sequence[int]) -> IndexMap:
    """The map of a parameter or buffer itself."""
    return ((name, tuple((a, 0, int(d)) for a, d in enumerate(shape))),)


def fold_index_map(target: Any, args: Sequence[Any], out_shape: Sequence[int],
                   map_of: Callable[[Any], IndexMap | None], shape_of: Callable[[Any], Sequence[int]],
                   is_tensor: Callable[[Any], bool]) -> IndexMap | None:
    """The map of `target(*args)`, given its tensor arguments' maps; None where the op's indexing is not known."""
    out_shape = tuple(int(d) for d in out_shape)
    tensors = [a for a in args if is_tensor(a)]
    maps = [map_of(t) for t in tensors]
    if any(m is None for m in maps):
        return None
    if target is aten.cat.default:
        return _cat(args[0], args[1] if len(args) > 1 else 0, out_shape, map_of, shape_of)
    if not tensors:
        return ()  # made from shapes and scalars only (zeros, arange): no source
    src, src_shape = maps[0], tuple(shape_of(tensors[0]))
    if target in _SAME:
        return src
    if target in _RESHAPE:
        return _reshape(src, src_shape, out_shape)
    if target is aten.permute.default:
        return tuple((n, tuple(e[d % len(e)] for d in args[1])) for n, e in src)
    if target in (aten.transpose.int, aten.t.default):
        a, b = (args[1], args[2]) if target is aten.transpose.int else (0, 1)
        return tuple((n, _swap(e, a % max(len(e), 1), b % max(len(e), 1))) for n, e in src)
    if target is aten.expand.default or torch.Tag.pointwise in getattr(target, "tags", ()):
        out: list = []
        for t, m in zip(tensors, maps, strict=True):
            out.extend(_broadcast(m, tuple(shape_of(t)), out_shape))
        return tuple(out)
    return None


def _swap(entries: tuple[Entry, ...], a: int, b: int) -> tuple[Entry, ...]:
    e = list(entries)
    e[a], e[b] = e[b], e[a]
    return tuple(e)


def _broadcast(m: IndexMap, shape: tuple[int, ...], out_shape: tuple[int, ...]) -> IndexMap:
    """Right-aligned broadcasting: an axis of size 1 that became wider no longer follows the source."""
    lead = len(out_shape) - len(shape)
    out = []
    for name, entries in m:
        new: list[Entry] = [None] * lead
        for a, e in enumerate(entries):
            new.append(None if shape[a] == 1 and out_shape[lead + a] != 1 else e)
        out.append((name, tuple(new)))
    return tuple(out)


def _reshape(m: IndexMap, shape: tuple[int, ...], out_shape: tuple[int, ...]) -> IndexMap | None:
    """A reshape that only adds or drops size-1 axes keeps the other axes in order; any other is not tracked."""
    wide = [a for a, d in enumerate(shape) if d != 1]
    out_wide = [a for a, d in enumerate(out_shape) if d != 1]
    if [shape[a] for a in wide] != [out_shape[a] for a in out_wide]:
        return None
    out = []
    for name, entries in m:
        new: list[Entry] = [None] * len(out_shape)
        for a, oa in zip(wide, out_wide, strict=True):
            new[oa] = entries[a]
        out.append((name, tuple(new)))
    return tuple(out)


def _cat(tensors: Sequence[Any], dim: int, out_shape: tuple[int, ...], map_of, shape_of) -> IndexMap | None:
    dim %= len(out_shape)
    out = []
    offset = 0
    for t in tensors:
        shape, m = tuple(shape_of(t)), map_of(t)
        if shape == (0,) and len(out_shape) != 1:
            continue  # cat skips legacy empty tensors
        if m is None or len(shape) != len(out_shape):
            return None
        for name, entries in m:
            e = list(entries)
            if e[dim] is not None:
                src_axis, off, length = e[dim]
                e[dim] = (src_axis, off + offset, length)
            out.append((name, tuple(e)))
        offset += shape[dim]
    return tuple(out)
