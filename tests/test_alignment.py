"""Channel alignment: the report names the convs a plan moved off the CPU runtimes' channel blocks, checked against
the exported ONNX files and against what ONNX Runtime's optimizer does with them; a plan aligned with the advised
--round-to has none, and ORT runs all its convs blocked."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from prune_compile.backends.ort import nchwc_alignment, nchwc_conv_counts
from prune_compile.cli import main
from prune_compile.passes.alignment import advised_round_to, host_vector_lanes, runtime_blocks

from .test_cli import DEFAULT_MODEL

AVX512 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n"
AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
SSE = "processor\t: 0\nflags\t\t: fpu sse2 sse4_2\n"
AARCH64 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n"


@pytest.mark.parametrize("cpuinfo, lanes", [(AVX512, 16), (AVX2, 8), (SSE, 4), (AARCH64, 4)])
def test_host_vector_lanes(cpuinfo, lanes) -> None:
    assert host_vector_lanes(cpuinfo) == lanes


ORT, TVM_CPU, TVM_ARM = "ONNX Runtime", "TVM cpu", "TVM arm"


@pytest.mark.parametrize("targets, ort, lanes, blocks", [
    ((), 4, 16, {ORT: 4}), (("cpu",), 4, 16, {ORT: 4, TVM_CPU: 8}), (("cpu",), 4, 8, {ORT: 4, TVM_CPU: 8}),
    (("cpu",), 0, 4, {TVM_CPU: 4}), (("arm",), 4, 16, {ORT: 4, TVM_ARM: 4}), (("gpu",), 0, 16, {}),
    (("arm", "cpu", "gpu"), 16, 16, {ORT: 16, TVM_CPU: 8, TVM_ARM: 4})])
def test_runtime_blocks_follow_the_runtimes_that_run_the_outputs(targets, ort, lanes, blocks) -> None:
    assert runtime_blocks(targets, ort, lanes) == blocks


def _one_conv(cin: int, cout: int, group: int) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    weight = numpy_helper.from_array(np.full((cout, cin // group, 3, 3), 0.1, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], group=group, pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, 8, 8])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_ort_alignment_holds_for_other_counts_and_dense_inputs() -> None:
    """The probe looks at one depthwise count; ORT's rule covers every multiple of it, and dense convs' inputs."""
    align = nchwc_alignment()
    if align == 0:
        pytest.skip("ONNX Runtime has no NCHWc kernels on this CPU")
    for count in (3 * align, 5 * align, 6 * align):
        assert nchwc_conv_counts(_one_conv(count, count, count)) == (1, 0), count
        assert nchwc_conv_counts(_one_conv(count + 16, 32, 1)) == (1, 0), count + 16
    if align > 1:
        for count in (3 * align + 1, 5 * align - 1, 3 * align // 2):  # the last: the probe found the smallest
            assert nchwc_conv_counts(_one_conv(count, count, count)) == (0, 1), count
            assert nchwc_conv_counts(_one_conv(count + 16, 32, 1)) == (0, 1), count + 16


def _conv_out_channels(path) -> dict[str, int]:
    model = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: weights[n.input[1]].shape[0] for n in model.graph.node if n.op_type == "Conv"}


def _block(targets=()) -> int:
    return max(runtime_blocks(targets, nchwc_alignment(), host_vector_lanes()).values())


def _check_against_ort(model: str, out, extra: Sequence[str]) -> dict:
    """Prune `model` at ratio 0.3 (no --round-to, no compile target): the convs the report says ONNX Runtime can no
    longer run blocked are as many as the plain convs ORT's optimizer makes of the pruned model, beyond the
    original's. Returns the report's pruning section."""
    assert main([model, "-o", str(out), "-q", "--ratio", "0.3", *extra]) == 0
    pruning = json.loads((out / "report.json").read_text())["pruning"]
    ort_hit = [m for m in pruning["channel_alignment"]["misaligned"] if "ONNX Runtime" in m["runtimes"]]
    original_plain = nchwc_conv_counts(model)[1] if model.endswith(".onnx") else 0
    assert len(ort_hit) == nchwc_conv_counts(out / "model.pruned.onnx")[1] - original_plain
    return pruning


def test_report_names_the_convs_onnx_runtime_runs_plain(tmp_path, capsys) -> None:
    if nchwc_alignment() <= 1:
        pytest.skip("ONNX Runtime has no NCHWc kernels on this CPU")
    out = tmp_path / "o"
    pruning = _check_against_ort(DEFAULT_MODEL, out, [])
    err = capsys.readouterr().err
    alignment = pruning["channel_alignment"]
    block, after = _block(), _conv_out_channels(out / "model.pruned.onnx")
    assert alignment["block"] == block and alignment["convs"] == len(after)
    assert all(m["after"] % block and not m["before"] % block for m in alignment["misaligned"])
    warning = next(w for w in pruning["warnings"] if "blocked kernels" in w)
    assert warning == alignment["warning"]
    advised = alignment["round_to"]
    assert advised % block == 0 and advised >= min(host_vector_lanes(), 8)
    assert f"--round-to {advised}" in warning and f"ONNX Runtime {len(alignment['misaligned'])} of {len(after)}" \
        in warning
    assert f"warning: {warning}" in err
    html = (out / "report.html").read_text()
    assert "class=\"warnings\"" in html
    # the layer table marks the rows of the groups whose kept count left the block: every pruned group here
    plan = json.loads((out / "plan.json").read_text())
    off = [g for g in plan["groups"] if g["prunable"] and not g["channels"] % block
           and (g["channels"] - len(g["removed"])) % block]
    assert off and html.count(f"not a multiple of {block} (CPU blocks)") >= len(off)


@pytest.mark.big
@pytest.mark.parametrize("factory", ["torchvision.models:mobilenet_v2", "torchvision.models:resnet18"])
def test_report_matches_onnx_runtime_on_torchvision_models(tmp_path, factory) -> None:
    if nchwc_alignment() <= 1:
        pytest.skip("ONNX Runtime has no NCHWc kernels on this CPU")
    pruning = _check_against_ort(factory, tmp_path / "o", ["--input-shape", "x=1,3,224,224"])
    assert len(pruning["channel_alignment"]["misaligned"]) >= 10


def test_aligned_plan_and_unpruned_run_have_no_alignment_warning(tmp_path) -> None:
    block = advised_round_to(runtime_blocks(("cpu",), nchwc_alignment(), host_vector_lanes()), host_vector_lanes())
    for name, extra in (("aligned", ["--ratio", "0.3", "--round-to", str(block)]), ("unpruned", [])):
        out = tmp_path / name
        assert main([DEFAULT_MODEL, "-o", str(out), "-q", "--target", "cpu", *extra]) == 0
        report = json.loads((out / "report.json").read_text())["pruning"]
        assert "channel_alignment" not in report and "warnings" not in report, name
        # the advice works: ONNX Runtime runs every conv of the pruned model blocked, as it did the original's
        assert nchwc_conv_counts(out / "model.pruned.onnx")[1] == nchwc_conv_counts(DEFAULT_MODEL)[1] == 0, name
    aligned, original = (_conv_out_channels(p) for p in (tmp_path / "aligned" / "model.pruned.onnx", DEFAULT_MODEL))
    assert aligned != original, "the aligned plan must prune something"
    assert all(c % block == 0 for n, c in aligned.items() if original[n] % block == 0)


def test_compiled_targets_raise_the_block(tmp_path) -> None:
    """Ratio 0.4 in multiples of 4 keeps 20 of 32 channels: ONNX Runtime's multiple, not the cpu target's 8 (x86)."""
    if _block(("cpu",)) <= _block():
        pytest.skip("TVM's cpu block is no larger than ONNX Runtime's on this CPU")
    for targets, warned in (([], False), (["--target", "cpu"], True)):
        out = tmp_path / str(warned)
        assert main([DEFAULT_MODEL, "-o", str(out), "-q", "--ratio", "0.4", "--round-to", "4", *targets]) == 0
        pruning = json.loads((out / "report.json").read_text())["pruning"]
        assert ("channel_alignment" in pruning) is warned
    # TVM blocks a conv by its output channels: the convs named are those whose output count left the multiple
    block = _block(("cpu",))
    before, after = _conv_out_channels(DEFAULT_MODEL), _conv_out_channels(out / "model.pruned.onnx")
    assert sorted((m["node"], m["side"], m["before"], m["after"], tuple(m["runtimes"]))
                  for m in pruning["channel_alignment"]["misaligned"]) == \
        sorted((n, "out", before[n], c, (TVM_CPU,)) for n, c in after.items() if c % block and not before[n] % block)


def test_replayed_plan_is_checked_too(tmp_path) -> None:
    assert main([DEFAULT_MODEL, "-o", str(tmp_path / "a"), "-q", "--ratio", "0.3"]) == 0
    assert main([DEFAULT_MODEL, "-o", str(tmp_path / "b"), "-q", "--plan", str(tmp_path / "a" / "plan.json")]) == 0
    first, replayed = (json.loads((tmp_path / d / "report.json").read_text())["pruning"] for d in "ab")
    assert replayed["channel_alignment"] == first["channel_alignment"]
    assert replayed["warnings"] == [first["channel_alignment"]["warning"]]


def test_latency_policy_counts_are_not_second_guessed(tmp_path) -> None:
    """The latency policy chose its counts by timing them on the engine: no warning, whatever the counts."""
    from types import SimpleNamespace

    from prune_compile.api import _channel_alignment
    from prune_compile.ir import import_onnx

    assert main([DEFAULT_MODEL, "-o", str(tmp_path / "a"), "-q", "--ratio", "0.3"]) == 0
    graphs = {"initial": import_onnx(onnx.load(DEFAULT_MODEL)),
              "graph": import_onnx(onnx.load(str(tmp_path / "a" / "model.pruned.onnx")))}
    for policy, warned in (("uniform", True), ("latency", False)):
        state = SimpleNamespace(planning=SimpleNamespace(policy=policy), targets={}, **graphs)
        assert bool(_channel_alignment(state)) is warned, policy


def test_a_failing_probe_costs_the_check_not_the_run(tmp_path, monkeypatch) -> None:
    """Without a writable temp directory ORT cannot show its optimized graph: the run goes on, without the ORT
    part of the check, and says why."""
    import tempfile

    def unwritable(*_a, **_k):
        raise OSError(30, "Read-only file system")

    nchwc_alignment.cache_clear()
    monkeypatch.setattr(tempfile, "TemporaryDirectory", unwritable)
    try:
        with pytest.warns(UserWarning, match="NCHWc channel multiple: .*Read-only"):
            assert nchwc_alignment() == 0
        assert main([DEFAULT_MODEL, "-o", str(tmp_path / "o"), "-q", "--ratio", "0.3"]) == 0
        assert "channel_alignment" not in json.loads((tmp_path / "o" / "report.json").read_text())["pruning"]
    finally:
        nchwc_alignment.cache_clear()
