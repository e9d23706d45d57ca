"""How a reshape regroups axes: the runs of axes whose sizes multiply to the same number on both sides."""

from __future__ import annotations

from collections.abc import Sequence


def reshape_runs(shape: Sequence[int], out_shape: Sequence[int]) -> tuple[list[tuple[list[int], list[int]]],
                                                                         list[int], list[int]]:
    """Match the axes of size other than 1 of `shape` and `out_shape` in runs, left to right: ([(input axes, output
    axes), ...], unmatched input axes, unmatched output axes). Axes stay unmatched where no run closes (the sizes
    do not divide: a reshape that interleaves), from the run that failed on."""
    axes = [a for a, d in enumerate(shape) if d != 1]
    out_axes = [a for a, d in enumerate(out_shape) if d != 1]
    runs: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(axes) and j < len(out_axes):
        run, out_run = [axes[i]], [out_axes[j]]
        size, out_size = shape[axes[i]], out_shape[out_axes[j]]
        i, j = i + 1, j + 1
        while size != out_size:
            if size < out_size and i < len(axes):
                run.append(axes[i])
                size *= shape[axes[i]]
                i += 1
            elif out_size < size and j < len(out_axes):
                out_run.append(out_axes[j])
                out_size *= out_shape[out_axes[j]]
                j += 1
            else:
                return runs, run + axes[i:], out_run + out_axes[j:]
        runs.append((run, out_run))
    return runs, axes[i:], out_axes[j:]
