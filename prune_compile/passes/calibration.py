"""Calibration data for the sensitivity policy, and the damage metrics it can measure with.

A calibration file is an `.npz` (numpy.savez) with one array per model input, named like the input (a model with
one input accepts any single array name), samples along the input's first axis: an input of shape [B, ...] takes
arrays of shape [N, ...] with N a multiple of B; the model runs on N / B batches. An optional integer array
`labels` holds the expected class of every row of the first output ([N] for [N, C] logits).

Metrics (damage of a pruned model, measured on the calibration batches; the unpruned model's value is subtracted):
- `output-change`: relative L2 change of all outputs (no labels needed; the default),
- `cross-entropy`: mean cross-entropy of the first output's softmax against the labels, or against the unpruned
  model's softmax without labels (a KL divergence up to a constant); outputs already in [0, 1] summing to 1 over
  the last axis are taken as probabilities,
- `top1`: error rate of the first output's argmax against the labels, or disagreement with the unpruned model's
  argmax without labels (coarse: it saturates once a group is pruned hard).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError

METRICS = ("output-change", "cross-entropy", "top1")
LABELS = "labels"


@dataclass
class Calibration:
    batches: list[dict[str, np.ndarray]]  # each batch has exactly the graph's input shapes
    labels: np.ndarray | None
    source: str
    samples: int

    def describe(self) -> str:
        n, b = self.samples, len(self.batches)
        what = f"'{os.path.basename(self.source)}' ({n} sample{'s' * (n != 1)} in {b} batch{'es' * (b != 1)}"
        return what + (", with labels)" if self.labels is not None else ")")


def load_calibration(path: str, graph) -> Calibration:
    """Read and check an .npz against the graph's inputs; errors name the file, the array and the input."""
    where = f"--calibration-data '{path}'"
    if not os.path.isfile(path):
        raise UsageError(f"{where}: no such file")
    if not zipfile.is_zipfile(path):
        raise UsageError(f"{where}: not an .npz file (numpy.savez writes one)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UsageError(f"{where}: not a readable .npz file ({str(e).splitlines()[0][:200]})") from None
    labels = arrays.pop(LABELS, None)
    inputs = list(graph.inputs)
    if len(inputs) == 1 and len(arrays) == 1 and inputs[0].name not in arrays:
        arrays = {inputs[0].name: next(iter(arrays.values()))}
    missing = [v.name for v in inputs if v.name not in arrays]
    if missing:
        raise UsageError(f"{where}: no array for model input(s) {missing} (arrays: {sorted(arrays) or 'none'})")
    extra = sorted(set(arrays) - {v.name for v in inputs})
    if extra:
        raise UsageError(f"{where}: arrays {extra} match no model input (inputs: {[v.name for v in inputs]}; "
                         f"labels go in '{LABELS}')")
    counts = set()
    for v in inputs:
        a, shape = arrays[v.name], tuple(int(d) for d in v.shape)
        if not shape:
            raise UsageError(f"{where}: input '{v.name}' is a scalar: calibration needs a batch axis")
        if a.ndim != len(shape) or tuple(a.shape[1:]) != shape[1:] or a.shape[0] % shape[0]:
            raise UsageError(f"{where}: array '{v.name}' has shape {list(a.shape)}; input '{v.name}' is "
                             f"{list(shape)}, so expected [k*{shape[0]}, {', '.join(map(str, shape[1:]))}]")
        dtype = np.dtype(v.dtype)
        if a.dtype.kind != dtype.kind and not (a.dtype.kind in "iu" and dtype.kind in "iu"):
            raise UsageError(f"{where}: array '{v.name}' is {a.dtype}, input '{v.name}' is {dtype}")
        arrays[v.name] = a.astype(dtype, copy=False)
        counts.add(a.shape[0] // shape[0])
    if len(counts) != 1:
        raise UsageError(f"{where}: the arrays hold different numbers of batches ({sorted(counts)})")
    n = counts.pop()
    if n == 0:
        raise UsageError(f"{where}: no samples")
    batches = []
    for i in range(n):
        batches.append({v.name: arrays[v.name][i * v.shape[0]:(i + 1) * v.shape[0]] for v in inputs})
    if labels is not None and labels.dtype.kind not in "iu":
        raise UsageError(f"{where}: '{LABELS}' must hold integer class indices (got {labels.dtype})")
    samples = sum(int(b[inputs[0].name].shape[0]) for b in batches)
    return Calibration(batches, labels, path, samples)


def run_batches(proto, batches: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Run `proto` on every batch (one ONNX Runtime session) and join each output along its first axis."""
    from ..backends import ort

    sess = ort.session(proto, threads=2)
    results = [ort.run(sess, b) for b in batches]
    if len(results) == 1:
        return results[0]
    joined = zip(*results, strict=True)
    return [np.concatenate(parts, axis=0) if np.ndim(parts[0]) else np.stack(parts) for parts in joined]


def _rows(output: np.ndarray, what: str) -> np.ndarray:
    out = np.asarray(output, np.float64)
    if out.ndim < 2:
        raise UsageError(f"sensitivity metric: the model's first output has shape {list(out.shape)}; {what} needs "
                         "class scores along its last axis")
    return out.reshape(-1, out.shape[-1])


def check_labels(labels: np.ndarray, rows_shape: Sequence[int]) -> None:
    """`labels` (one class index each) fit class scores of shape [rows, classes] (the model's first output)."""
    if len(labels) != rows_shape[0]:
        raise UsageError(f"--calibration-data: '{LABELS}' has {len(labels)} entries, the model's first "
                         f"output has {rows_shape[0]} rows of class scores")
    if labels.min() < 0 or labels.max() >= rows_shape[1]:
        raise UsageError(f"--calibration-data: '{LABELS}' holds classes outside [0, {rows_shape[1]})")


def are_probabilities(rows: np.ndarray) -> bool:
    """Whether class scores (one row per sample) are already probabilities: a softmax at the end of the model."""
    return bool(rows.min() >= 0 and rows.max() <= 1 and np.allclose(rows.sum(1), 1, atol=1e-3))


def _log_probs(scores: np.ndarray) -> np.ndarray:
    if are_probabilities(scores):
        return np.log(np.clip(scores, 1e-12, 1))
    z = scores - scores.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


Metric = Callable[[list[np.ndarray]], float]


def damage_metric(name: str, labels: np.ndarray | None = None,
                  reference: Callable[[], list[np.ndarray]] | None = None) -> Metric | None:
    """The `metric(outputs) -> damage` for `name` (None for output-change, the sensitivity pass's built-in), against
    `labels` (one class per row of the first output), or without labels against `reference()`, the unpruned
    model's outputs on the same samples. Also for the Python API: `prune_module(..., metric=damage_metric(
    "cross-entropy", labels))`."""
    if name not in METRICS:
        raise UsageError(f"sensitivity metric '{name}': expected one of {', '.join(METRICS)}")
    if name == "output-change":
        return None
    if labels is None and reference is None:
        raise UsageError(f"sensitivity metric '{name}' needs labels or the unpruned model's outputs")
    if labels is not None:
        target = labels.reshape(-1).astype(np.int64)
    else:
        ref = _rows(reference()[0], name)
        target = ref.argmax(1) if name == "top1" else np.exp(_log_probs(ref))

    def check(rows: np.ndarray) -> None:
        if labels is not None:
            check_labels(target, rows.shape)

    if name == "top1":
        def top1(outputs: list[np.ndarray]) -> float:
            rows = _rows(outputs[0], name)
            check(rows)
            return float(np.mean(rows.argmax(1) != target))
        return top1

    def cross_entropy(outputs: list[np.ndarray]) -> float:
        rows = _rows(outputs[0], name)
        check(rows)
        logp = _log_probs(rows)
        if labels is not None:
            return float(-logp[np.arange(len(rows)), target].mean())
        return float(-(target * logp).sum(1).mean())
    return cross_entropy
