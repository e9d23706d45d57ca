"""Channel alignment: the report names the convs a plan moved off the CPU runtimes' channel blocks, checked against
the exported ONNX files and against what ONNX Runtime's optimizer does with them; a plan aligned with the advised
--round-to has none, and ORT runs all its convs blocked."""

from __future__ import annotations

import json
from collections.abc import Sequence

import onnx
import pytest
from onnx import numpy_helper

from prune_compile.backends.ort import conv_model, nchwc_alignment, nchwc_conv_counts
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


def test_host_vector_lanes_agree_with_the_cpu_target_tvm_compiles_for() -> None:
    """Read from /proc/cpuinfo to spare runs without a target TVM's import; the kernels' own width decides."""
    from prune_compile.backends.tvm.conv_nchwc import vector_lanes
    from prune_compile.backends.tvm.targets import make_target

    assert host_vector_lanes() == vector_lanes(make_target("cpu"))


ORT, TVM_CPU, TVM_ARM = "ONNX Runtime", "TVM cpu", "TVM arm"


@pytest.mark.parametrize("targets, ort, lanes, blocks", [
    ((), 4, 16, {ORT: 4}), (("cpu",), 4, 16, {ORT: 4, TVM_CPU: 8}), (("cpu",), 4, 8, {ORT: 4, TVM_CPU: 8}),
    (("cpu",), 0, 4, {TVM_CPU: 4}), (("arm",), 4, 16, {ORT: 4, TVM_ARM: 4}), (("gpu",), 0, 16, {}),
    (("arm", "cpu", "gpu"), 16, 16, {ORT: 16, TVM_CPU: 8, TVM_ARM: 4})])
def test_runtime_blocks_follow_the_runtimes_that_run_the_outputs(targets, ort, lanes, blocks) -> None:
    assert runtime_blocks(targets, ort, lanes) == blocks


def test_ort_alignment_holds_for_other_counts_and_dense_inputs() -> None:
    """The probe looks at one depthwise count; ORT's rule covers every multiple of it, and dense convs' inputs."""
    align = nchwc_alignment()
    if align == 0:  # the probe says ORT has no NCHWc kernels here: then it runs every conv plain
        assert all(nchwc_conv_counts(conv_model(c, c, c)) == (0, 1) for c in (4, 8, 16, 32))
        assert all(nchwc_conv_counts(conv_model(c, 32, 1)) == (0, 1) for c in (16, 32))
        return
    for count in (3 * align, 5 * align, 6 * align):
        assert nchwc_conv_counts(conv_model(count, count, count)) == (1, 0), count
        assert nchwc_conv_counts(conv_model(count + 16, 32, 1)) == (1, 0), count + 16
    if align > 1:
        for count in (3 * align + 1, 5 * align - 1, 3 * align // 2):  # the last: the probe found the smallest
            assert nchwc_conv_counts(conv_model(count, count, count)) == (0, 1), count
            assert nchwc_conv_counts(conv_model(count + 16, 32, 1)) == (0, 1), count + 16


def _conv_out_channels(path) -> dict[str, int]:
    model = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: weights[n.input[1]].shape[0] for n in model.graph.node if n.op_type == "Conv"}


def _block(targets=()) -> int:
    return max(runtime_blocks(targets, nchwc_alignment(), host_vector_lanes()).values())


def _check_against_ort(model: str, out, extra: Sequence[str]) -> dict:
    """Prune `model` at ratio 0.3 (no --round-to): the convs the report says ONNX Runtime can no longer run blocked
    are as many as the plain convs ORT's optimizer makes of the pruned model, beyond the original's (none, on a CPU
    where ORT has no NCHWc kernels). Returns the report's pruning section."""
    assert main([model, "-o", str(out), "-q", "--ratio", "0.3", *extra]) == 0
    pruning = json.loads((out / "report.json").read_text())["pruning"]
    misaligned = pruning.get("channel_alignment", {}).get("misaligned", [])
    ort_hit = [m for m in misaligned if "ONNX Runtime" in m["runtimes"]]
    original_plain = nchwc_conv_counts(model)[1] if model.endswith(".onnx") else 0
    assert len(ort_hit) == nchwc_conv_counts(out / "model.pruned.onnx")[1] - original_plain
    return pruning


def test_report_names_the_convs_onnx_runtime_runs_plain(tmp_path, capsys) -> None:
    """With the cpu target TVM's rule applies too, so the run warns on any CPU; ORT's part is checked against ORT."""
    out = tmp_path / "o"
    pruning = _check_against_ort(DEFAULT_MODEL, out, ["--target", "cpu"])
    err = capsys.readouterr().err
    alignment = pruning["channel_alignment"]
    block, after = _block(("cpu",)), _conv_out_channels(out / "model.pruned.onnx")
    assert alignment["block"] == block and alignment["convs"] == len(after) and TVM_CPU in alignment["runtimes"]
    assert all(m["after"] % block and not m["before"] % block for m in alignment["misaligned"])
    warning = next(w for w in pruning["warnings"] if "blocked kernels" in w)
    assert warning == alignment["warning"]
    advised = alignment["round_to"]
    assert advised % block == 0 and advised >= min(host_vector_lanes(), 8)
    assert f"--round-to {advised}" in warning
    for runtime in alignment["runtimes"]:
        hit = sum(runtime in m["runtimes"] for m in alignment["misaligned"])
        assert (f"{runtime} {hit} of {len(after)}" in warning) is bool(hit), runtime
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
    pruning = _check_against_ort(factory, tmp_path / "o", ["--input-shape", "x=1,3,224,224"])
    if nchwc_alignment():  # ratio 0.3 leaves counts like 23 and 45 in at least ten convs of either model
        assert len(pruning["channel_alignment"]["misaligned"]) >= 10


def test_aligned_plan_and_unpruned_run_have_no_alignment_warning(tmp_path) -> None:
    block = advised_round_to(runtime_blocks(("cpu",), nchwc_alignment(), host_vector_lanes()), host_vector_lanes())
    for name, extra in (("aligned", ["--ratio", "0.3", "--round-to", str(block)]), ("unpruned", [])):
        out = tmp_path / name
        assert main([DEFAULT_MODEL, "-o", str(out), "-q", "--target", "cpu", *extra]) == 0
        report = json.loads((out / "report.json").read_text())["pruning"]
        assert "channel_alignment" not in report and "warnings" not in report, name
        # the advice works: ONNX Runtime runs every conv of the pruned model blocked, as it did the original's
        # (every conv plain in both, on a CPU where it has no NCHWc kernels)
        plain = 0 if nchwc_alignment() else len(_conv_out_channels(DEFAULT_MODEL))
        assert nchwc_conv_counts(out / "model.pruned.onnx")[1] == nchwc_conv_counts(DEFAULT_MODEL)[1] == plain, name
    aligned, original = (_conv_out_channels(p) for p in (tmp_path / "aligned" / "model.pruned.onnx", DEFAULT_MODEL))
    assert aligned != original, "the aligned plan must prune something"
    assert all(c % block == 0 for n, c in aligned.items() if original[n] % block == 0)


def test_tvm_rule_is_the_output_channels_and_ort_rule_the_inputs(tmp_path) -> None:
    """Ratio 0.4 in multiples of 4 keeps 20 of 32 channels: on ONNX Runtime's multiple of 4, off the cpu target's 8.
    Each runtime's rule, applied to the same graphs: TVM names exactly the convs whose output count left 8, ORT
    (multiples of 4) none."""
    from prune_compile.ir import import_onnx
    from prune_compile.passes.alignment import misaligned_convs

    out = tmp_path / "o"
    assert main([DEFAULT_MODEL, "-o", str(out), "-q", "--ratio", "0.4", "--round-to", "4"]) == 0
    graphs = [import_onnx(onnx.load(str(p))) for p in (DEFAULT_MODEL, out / "model.pruned.onnx")]
    before, after = _conv_out_channels(DEFAULT_MODEL), _conv_out_channels(out / "model.pruned.onnx")
    expected = sorted((n, "out", before[n], c, (TVM_CPU,)) for n, c in after.items() if c % 8 and not before[n] % 8)
    assert expected, "ratio 0.4 in multiples of 4 must leave counts off 8"
    named = misaligned_convs(*graphs, {ORT: 4, TVM_CPU: 8}, lanes=16)
    assert sorted((m.node, m.side, m.before, m.after, m.runtimes) for m in named) == expected
    assert misaligned_convs(*graphs, {ORT: 4}, lanes=16) == []


def test_replayed_plan_is_checked_too(tmp_path) -> None:
    cpu = ["--target", "cpu"]  # TVM's rule: a warning on any CPU
    assert main([DEFAULT_MODEL, "-o", str(tmp_path / "a"), "-q", "--ratio", "0.3", *cpu]) == 0
    assert main([DEFAULT_MODEL, "-o", str(tmp_path / "b"), "-q", "--plan", str(tmp_path / "a" / "plan.json"),
                 *cpu]) == 0
    first, replayed = (json.loads((tmp_path / d / "report.json").read_text())["pruning"] for d in "ab")
    assert replayed["channel_alignment"] == first["channel_alignment"]
    assert replayed["warnings"] == [first["channel_alignment"]["warning"]]


@pytest.mark.serial  # the latency policy times models
def test_latency_policy_counts_are_not_second_guessed(tmp_path) -> None:
    """The latency policy chose its counts by timing them on the engine: no warning, whatever the counts."""
    from prune_compile.ir import import_onnx
    from prune_compile.passes.alignment import channel_alignment

    assert main([DEFAULT_MODEL, "-o", str(tmp_path / "a"), "-q", "--ratio", "0.3"]) == 0
    graphs = [import_onnx(onnx.load(str(p))) for p in (DEFAULT_MODEL, tmp_path / "a" / "model.pruned.onnx")]
    for policy, warned in (("uniform", True), ("latency", False)):
        assert bool(channel_alignment(*graphs, ["cpu"], policy)) is warned, policy


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
