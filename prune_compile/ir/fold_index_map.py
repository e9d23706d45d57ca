"""Where each element of a constant folded at import comes from, axis by axis, in its source parameters.

Torch surgery slices the user's parameters, not the folded constants the graph holds; so for every folded
constant the torch importer records, per source and per axis of the folded tensor, which source axis that axis
reads and at which offset (`cat` places each input at an offset). This is exact bookkeeping through the ops that
move elements, apply pointwise arithmetic, standardize per channel (batch_norm over a weight) or project a constant
without sources (a conv or linear of a Fourier encoding); any other op (an index, a stack, a reduction, a matmul)
makes the map unknown (None), and surgery falls back to matching shapes or refuses, naming the constant.

A map is a tuple of `(source name, entries)`, one per use of a source (a source concatenated twice appears twice);
`entries[a]` is `(source axis, offset, length)`: folded indices `offset .. offset+length-1` on axis `a` are the
source's indices `0 .. length-1` on `source axis`; None: this source does not vary along `a` (broadcast); or
`("merged", pieces)`: axis `a` flattens several source axes, `pieces` = ((source axis or None, size), ...) outer to
inner; no slice of the source removes an index of such an axis, but a later reshape may split it back (NFNet's
weight.reshape(1, out, -1) ... reshape_as(weight)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .reshape_runs import reshape_runs

aten = torch.ops.aten

Entry = tuple[int, int, int] | tuple[str, tuple] | None
IndexMap = tuple[tuple[str, tuple[Entry, ...]], ...]

_SAME = {aten.clone.default, aten.detach.default, aten.alias.default, aten.contiguous.default,
         aten.lift_fresh_copy.default, aten._to_copy.default}
# batch_norm in training mode over a weight (weight standardization): output 0 is the input's elements, normalized per
# channel (axis 1) and scaled by weight/bias (channel-wise)
_BATCH_NORM = {aten._native_batch_norm_legit.no_stats, aten._native_batch_norm_legit.default,
               aten._native_batch_norm_legit_functional.default, aten.native_batch_norm.default,
               aten._native_batch_norm_legit_no_training.default}
# A weight projected by a linear map of a source-free constant (XCiT's Fourier position encoding through a 1x1 conv):
# the output channel axis is the weight's and bias's first axis
_PROJECTIONS = {aten.conv1d.default: 1, aten.conv2d.default: 1, aten.conv3d.default: 1,
                aten.convolution.default: 1, aten.linear.default: -1}
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
    nested = [x for a in args for x in (a if isinstance(a, (list, tuple)) else (a,))]
    maps = [map_of(t) for t in nested if is_tensor(t)]
    if any(m is None for m in maps):
        return None
    if not any(maps):
        return ()  # made from shapes, scalars and source-free constants only (arange, a Fourier encoding)
    if target is aten.cat.default:
        return _cat(args[0], args[1] if len(args) > 1 else 0, out_shape, map_of, shape_of)
    tensors = [a for a in args if is_tensor(a)]
    maps = [map_of(t) for t in tensors]
    if not tensors:
        return None  # tensors only inside a list (stack, index): not tracked
    src, src_shape = maps[0], tuple(shape_of(tensors[0]))
    if target in _SAME:
        return src
    if target in _RESHAPE:
        return _reshape(src, src_shape, out_shape)
    if target is aten.repeat.default:  # tiling: a broadcast outer piece times the axis
        lead = len(out_shape) - len(src_shape)
        return tuple((n, (None,) * lead + tuple(
            e if r == 1 else _entry([(None, r), *_pieces(e, d)]) for e, r, d in zip(
                entries, args[1][lead:], src_shape, strict=True))) for n, entries in src)
    if target is aten.permute.default:
        return tuple((n, tuple(e[d % len(e)] for d in args[1])) for n, e in src)
    if target in (aten.transpose.int, aten.t.default):
        a, b = (args[1], args[2]) if target is aten.transpose.int else (0, 1)
        return tuple((n, _swap(e, a % max(len(e), 1), b % max(len(e), 1))) for n, e in src)
    if target in _BATCH_NORM:  # the map of output 0; weight, bias and running statistics are per channel
        return tuple(src) + tuple(e for m in maps[1:] for e in _on_axis(m, 1, len(out_shape)))
    if target in _PROJECTIONS and len(tensors) >= 2 and tensors[0] is args[0]:
        if maps[0]:
            return None  # the input has sources: its channels mix into every output channel
        axis = _PROJECTIONS[target] % len(out_shape)
        return tuple(e for m in maps[1:3] for e in _on_axis(m, axis, len(out_shape)))
    if target is aten.expand.default or torch.Tag.pointwise in getattr(target, "tags", ()):
        out: list = []
        for t, m in zip(tensors, maps, strict=True):
            out.extend(_broadcast(m, tuple(shape_of(t)), out_shape))
        return tuple(out)
    return None


def _on_axis(m: IndexMap, axis: int, rank: int) -> IndexMap:
    """A per-channel tensor's map (axis 0 of the source) placed on `axis` of the output."""
    return tuple((name, tuple(e[0] if a == axis else None for a in range(rank))) for name, e in m)


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
    """Reshape: axes of size 1 come and go; the others are matched in runs whose sizes multiply to the same number,
    and a run's source axes are flattened into pieces and cut again at the output's sizes. A cut inside a piece
    (a (6,) viewed as (2, 3) where the 6 are one source axis) is not tracked."""
    runs, rest, out_rest = reshape_runs(shape, out_shape)
    if rest or out_rest:
        return None
    out = []
    for name, entries in m:
        new: list = [None] * len(out_shape)
        for axes, out_axes in runs:
            if len(axes) == 1 and len(out_axes) == 1:
                new[out_axes[0]] = entries[axes[0]]  # unchanged axis: keeps a cat's offset
                continue
            pieces = [p for a in axes for p in _pieces(entries[a], shape[a])]
            for oa in out_axes:
                take, size = [], 1
                while size < out_shape[oa] and pieces:
                    src_axis, n = pieces.pop(0)
                    want = out_shape[oa] // size
                    if src_axis is None and n > want and n % want == 0:  # a broadcast axis splits anywhere
                        pieces.insert(0, (None, n // want))
                        n = want
                    take.append((src_axis, n))
                    size *= n
                if size != out_shape[oa] or any(sa is False for sa, _ in take):
                    return None
                new[oa] = _entry(take)
        out.append((name, tuple(new)))
    return tuple(out)


def _pieces(entry: Entry, size: int) -> list[tuple[Any, int]]:
    """An axis as flattened pieces (source axis, size); False marks a piece no source axis matches whole."""
    if entry is None:
        return [(None, size)]
    if entry[0] == "merged":
        return list(entry[1])
    src_axis, offset, length = entry
    return [(src_axis, size)] if offset == 0 and length == size else [(False, size)]


def _entry(pieces: list[tuple[Any, int]]) -> Entry:
    if all(sa is None for sa, _ in pieces):
        return None
    if len(pieces) == 1:
        return (pieces[0][0], 0, pieces[0][1])
    return ("merged", tuple(pieces))


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
            if e[dim] is not None and e[dim][0] == "merged":
                return None  # a flattened axis at an offset: not tracked
            if e[dim] is not None:
                src_axis, off, length = e[dim]
                e[dim] = (src_axis, off + offset, length)
            out.append((name, tuple(e)))
        offset += shape[dim]
    return tuple(out)
