"""Calibration data for the sensitivity policy (--calibration-data, --sensitivity-metric): the .npz is checked
against the model's inputs with errors naming the array, the metrics compute what they say, and the sensitivity
scan really measures on the given samples (through the CLI, no half-written outputs on bad data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from prune_compile.api import load_model
from prune_compile.errors import UsageError
from prune_compile.passes.calibration import damage_metric, load_calibration

DEMO = os.path.join(os.path.dirname(__file__), "..", "prune_compile", "data", "default_model.onnx")


@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO).graph


def _npz(tmp_path, name="calib.npz", **arrays) -> str:
    path = str(tmp_path / name)
    np.savez(path, **arrays)
    return path


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)


def test_batches_follow_the_model_batch_and_labels_are_kept(tmp_path, demo) -> None:
    x = _images(5)
    cal = load_calibration(_npz(tmp_path, image=x.astype(np.float64), labels=np.arange(5)), demo)
    assert cal.samples == 5 and len(cal.batches) == 5 and cal.labels.tolist() == list(range(5))
    assert all(b["image"].shape == (1, 3, 64, 64) and b["image"].dtype == np.float32 for b in cal.batches)
    assert np.array_equal(np.concatenate([b["image"] for b in cal.batches]), x)
    # a model with one input takes any single array name
    assert load_calibration(_npz(tmp_path, "any.npz", pictures=x), demo).samples == 5


@pytest.mark.parametrize("arrays, message", [
    ({"image": np.zeros((4, 2, 64, 64), np.float32)}, "array 'image' has shape [4, 2, 64, 64]"),
    ({"image": np.zeros((4, 3, 64, 64), np.float32), "mask": np.zeros(4)}, "arrays ['mask'] match no model input"),
    ({"labels": np.zeros(4, np.int64)}, "no array for model input(s) ['image']"),
    ({"image": np.zeros((0, 3, 64, 64), np.float32)}, "no samples"),
    ({"image": np.zeros((2, 3, 64, 64), np.float32), "labels": np.zeros(2)}, "'labels' must hold integer"),
    ({"image": np.zeros((2, 3, 64, 64), np.int32)}, "array 'image' is int32, input 'image' is float32"),
])
def test_bad_calibration_files_name_the_array(tmp_path, demo, arrays, message) -> None:
    with pytest.raises(UsageError, match=None) as e:
        load_calibration(_npz(tmp_path, **arrays), demo)
    assert message in str(e.value)


def test_not_an_npz(tmp_path, demo) -> None:
    with pytest.raises(UsageError, match="not an .npz file"):
        load_calibration(DEMO, demo)
    with pytest.raises(UsageError, match="no such file"):
        load_calibration(str(tmp_path / "missing.npz"), demo)


def test_metrics_compute_what_they_say() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((6, 4))
    got = rng.standard_normal((6, 4))
    labels = np.array([0, 1, 2, 3, 0, 1])

    ce = damage_metric("cross-entropy", labels)
    logp = got - got.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    assert ce([got]) == pytest.approx(-logp[np.arange(6), labels].mean())
    # probabilities (a softmax at the model's end) are not softmaxed again
    probs = np.exp(logp)
    assert ce([probs]) == pytest.approx(ce([got]), rel=1e-6)
    assert damage_metric("top1", labels)([got]) == pytest.approx(np.mean(got.argmax(1) != labels))
    # without labels: agreement with the unpruned model
    assert damage_metric("top1", None, lambda: [ref])([ref]) == 0.0
    assert damage_metric("top1", None, lambda: [ref])([got]) == pytest.approx(np.mean(got.argmax(1) != ref.argmax(1)))
    kl = damage_metric("cross-entropy", None, lambda: [ref])
    assert kl([got]) > kl([ref])
    assert damage_metric("output-change") is None
    with pytest.raises(UsageError, match="'labels' has 5 entries"):
        damage_metric("top1", np.arange(5))([got])
    with pytest.raises(UsageError, match="needs labels"):
        damage_metric("top1")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prune_compile.cli", DEMO, "-q", "--json", *args],
                          capture_output=True, text=True, timeout=600)


def test_sensitivity_measures_on_the_calibration_samples(tmp_path) -> None:
    """The seeded example inputs given as calibration data reproduce the default scan's curves exactly; other
    samples change them: so the scan runs on the file's samples, batch by batch."""
    common = ["--policy", "sensitivity", "--target-macs", "1.5"]

    def curves(*extra: str, name: str) -> dict:
        r = _cli("-o", str(tmp_path / name), *common, *extra)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["pruning"]["sensitivity"]

    default = curves(name="default")
    assert default["calibration"] == "the seeded example inputs"
    same = curves("--calibration-data", _npz(tmp_path, "same.npz", image=load_model(DEMO).example_inputs["image"]),
                  name="same")
    assert same["calibration"] == "'same.npz' (1 sample in 1 batch)"
    assert same["curves"] == default["curves"]
    other = curves("--calibration-data", _npz(tmp_path, image=_images(3, seed=5), labels=np.array([1, 2, 3])),
                   name="other")
    assert other["calibration"] == "'calib.npz' (3 samples in 3 batches, with labels)"
    assert [c["ratios"] for c in other["curves"]] == [c["ratios"] for c in default["curves"]]
    assert [c["damage"] for c in other["curves"]] != [c["damage"] for c in default["curves"]]


def test_cross_entropy_against_labels_through_the_cli_and_pipeline(tmp_path) -> None:
    x = _images(4, seed=3)
    (tmp_path / "my data").mkdir()
    path = _npz(tmp_path, "my data/calib.npz", image=x, labels=np.array([0, 3, 5, 9]))  # a space: quoted
    out = tmp_path / "ce"
    r = _cli("-o", str(out), "--policy", "sensitivity", "--target-macs", "1.5", "--calibration-data", path,
             "--sensitivity-metric", "cross-entropy", "--sensitivity-allocation", "greedy")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert "cross-entropy" in report["pruning"]["sensitivity"]["damage"]
    assert report["pruning"]["sensitivity"]["allocation"] == "greedy"
    assert "calibration=" in report["pipeline"] and "metric=cross-entropy" in report["pipeline"]
    # the same job spelled as a pipeline gives the same plan
    r2 = _cli("-o", str(tmp_path / "ce2"), "--passes", report["pipeline"])  # the recorded pipeline replays
    assert r2.returncode == 0, r2.stderr
    assert (out / "plan.json").read_bytes() == (tmp_path / "ce2" / "plan.json").read_bytes()


def test_bad_calibration_data_exits_2_and_writes_nothing(tmp_path) -> None:
    bad = _npz(tmp_path, image=np.zeros((2, 1, 64, 64), np.float32))
    out = tmp_path / "out"
    r = _cli("-o", str(out), "--policy", "sensitivity", "--ratio", "0.3", "--calibration-data", bad)
    assert r.returncode == 2
    assert "array 'image' has shape [2, 1, 64, 64]" in r.stderr
    assert not out.exists() or not os.listdir(out)
    r = _cli("-o", str(out), "--ratio", "0.3", "--calibration-data", bad)
    assert r.returncode == 2 and "policy 'uniform' with importance 'l2' does not use it" in r.stderr


def taylor_net():
    """A small classifier for the CLI (`tests.test_calibration:taylor_net`): the same weights on every call."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def _removed(doc: dict) -> list:
    return [g["removed"] for g in doc["groups"]]


@pytest.mark.parametrize("labelled", [True, False])
def test_taylor_importance_through_the_cli_is_the_calibration_cross_entropys(tmp_path, labelled: bool) -> None:
    """`--importance taylor` on a torch model: the plan is the one the gradients of the calibration samples'
    cross-entropy give (computed here independently: against the labels, or the model's own top class), and not
    the magnitude plan."""
    import torch

    from prune_compile.cli import main
    from prune_compile.ir.fx_importer import import_torch_module
    from prune_compile.passes.deps import analyze
    from prune_compile.passes.plan import plan_to_json
    from prune_compile.passes.policy import PlanningOptions, make_plan

    x, labels = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32), np.arange(8) % 10
    data = _npz(tmp_path, input=x, **({"labels": labels} if labelled else {}))
    common = ["tests.test_calibration:taylor_net", "--input-shape", "input=4,3,8,8", "--ratio", "0.5", "-q"]
    assert main([*common, "-o", str(tmp_path / "t"), "--importance", "taylor", "--calibration-data", data]) == 0
    assert main([*common, "-o", str(tmp_path / "m")]) == 0
    taylor, magnitude = (json.loads((tmp_path / d / "plan.json").read_text()) for d in ("t", "m"))

    module = taylor_net().eval()
    logits = torch.cat([module(torch.from_numpy(x[i:i + 4])) for i in (0, 4)]).double()
    target = torch.from_numpy(labels) if labelled else logits.argmax(1)
    torch.nn.functional.cross_entropy(logits, target).backward()
    grads = {n: p.grad.numpy() for n, p in module.named_parameters()}
    graph = import_torch_module(module, (torch.from_numpy(x[:4]),))
    deps = analyze(graph)
    expected = make_plan(graph, deps, PlanningOptions(ratio=0.5, importance="taylor"), gradients=grads).plan
    assert _removed(taylor) == _removed(plan_to_json(deps, expected))
    assert _removed(taylor) != _removed(magnitude)


def test_taylor_importance_refusals_exit_2_and_write_nothing(tmp_path) -> None:
    """No gradients (an ONNX model), no samples to take them from, or weights already folded with batch norm."""
    r = _cli("-o", str(tmp_path / "onnx"), "--ratio", "0.5", "--importance", "taylor")
    assert r.returncode == 2 and "needs gradients, so a torch model" in r.stderr

    def torch_cli(out: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "prune_compile.cli", "tests.test_calibration:taylor_net", "-q",
                               "--input-shape", "input=1,3,8,8", "-o", str(tmp_path / out), *args],
                              capture_output=True, text=True, timeout=600,
                              cwd=os.path.join(os.path.dirname(__file__), ".."))

    r = torch_cli("torch", "--ratio", "0.5", "--importance", "taylor")
    assert r.returncode == 2 and "needs --calibration-data" in r.stderr, r.stderr
    data = _npz(tmp_path, input=np.zeros((2, 3, 8, 8), np.float32))
    r = torch_cli("folded", "--passes",
                  f"fold-bn,analyze,plan{{importance=taylor calibration={data} ratio=0.5}},rewrite")
    assert r.returncode == 2 and "run fold-bn after plan" in r.stderr, r.stderr
    assert not any((tmp_path / d).exists() and os.listdir(tmp_path / d) for d in ("onnx", "torch", "folded"))


def test_taylor_importance_on_an_exported_program_equals_the_modules(tmp_path) -> None:
    """A .pt2 of the same module gives the same Taylor plan: its gradients come from the exported program's module."""
    import torch

    from prune_compile.cli import main

    torch.export.save(torch.export.export(taylor_net().eval(), (torch.randn(4, 3, 8, 8),)), str(tmp_path / "t.pt2"))
    data = _npz(tmp_path, input=np.random.default_rng(2).standard_normal((8, 3, 8, 8)).astype(np.float32),
                labels=np.arange(8) % 10)
    common = ["--ratio", "0.5", "-q", "--importance", "taylor", "--calibration-data", data]
    assert main([str(tmp_path / "t.pt2"), "-o", str(tmp_path / "pt2"), *common]) == 0
    assert main(["tests.test_calibration:taylor_net", "--input-shape", "input=4,3,8,8", "-o", str(tmp_path / "f"),
                 *common]) == 0
    plans = [json.loads((tmp_path / d / "plan.json").read_text()) for d in ("pt2", "f")]
    assert _removed(plans[0]) == _removed(plans[1]) and any(_removed(plans[0]))
