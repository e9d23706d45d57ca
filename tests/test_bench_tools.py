"""The benchmark tools run and report what they claim (numbers themselves are measured by hand, not here)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from prune_compile.passes.latency import QUIET

from .test_cli import DEFAULT_MODEL

# The tools time models on this machine. Tests whose tool's numbers feed what it decides (how long a search goes, which
# rounds are quiet, what a profile adds up to) are `serial`; the others check mechanics that hold beside other workers.
TOOLS = os.path.join(os.path.dirname(__file__), "..", "tools")


@pytest.mark.serial  # its kernels add up to the model's time
def test_bench_latency_profile_accounts_for_the_model_time() -> None:
    """Per-kernel profiles (TVM through the VM instrument hook, ORT from its node profile) name real kernels and
    add up to about the whole model's latency: the table the README's "what limits it" reads from."""
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, "bench_latency.py"), DEFAULT_MODEL, "--engines",
                           "ort,tvm_untuned", "--profile", "--repeat", "20", "--rounds", "2", "--threads", "1"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    # Interleaved rounds: one median per round, ratios taken within a round and summarized by median and range,
    # over the rounds quiet for both sides (within 10% of each side's fastest); 2 to 4 rounds until 2 are quiet.
    count = len(result["latency_ms"]["ort"]["pruned"]["rounds_ms"])
    assert 2 <= count <= 4
    for engine, repeat in (("ort", 20), ("tvm_untuned", 3)):
        for variant in ("unpruned", "pruned"):
            measured = result["latency_ms"][engine][variant]
            assert len(measured["rounds_ms"]) == count and measured["runs"] == count * repeat
            fastest = min(measured["rounds_ms"])
            assert measured["quiet_rounds"] == [i for i, ms in enumerate(measured["rounds_ms"]) if ms <= 1.1 * fastest]
            assert measured["median_ms"] == pytest.approx(
                np.median([measured["rounds_ms"][i] for i in measured["quiet_rounds"]]), abs=1e-4)
        rounds = result["latency_ms"][engine]
        both = sorted(set(rounds["unpruned"]["quiet_rounds"]) & set(rounds["pruned"]["quiet_rounds"]))
        use = both if both else range(count)
        per_round = [rounds["unpruned"]["rounds_ms"][i] / rounds["pruned"]["rounds_ms"][i] for i in use]
        low, high = result["speedup_range"][engine]
        assert low == round(min(per_round), 4) and high == round(max(per_round), 4)
        assert low <= result["speedup"][engine] <= high
        assert abs(result["speedup_over_macs_ratio"][engine] - result["speedup"][engine] / result["macs_ratio"]) < 1e-3
    for engine, prefix in (("ort", "Conv "), ("tvm_untuned", "conv2d")):
        measured = result["latency_ms"][engine]["pruned"]
        kernels = measured["kernels"]
        assert any(k["kernel"].startswith(prefix) for k in kernels["top"]), kernels
        assert all(k["ms"] >= 0 for k in kernels["top"])
        assert sum(k["share"] for k in kernels["top"]) <= 1.0 + 1e-6
        # kernels run inside the model call, timed over the same runs: their sum cannot exceed it, and covers most
        # of it (against the timed rounds' median it would not hold: the machine's speed moves 2x between minutes)
        assert 0.3 * kernels["model_ms"] <= kernels["total_ms"] <= 1.01 * kernels["model_ms"], (engine, kernels)
    # each engine's MACs per second over the machine's FMA peak, measured before and after the rounds (the faster)
    peak = result["fma_peak"]
    assert peak["threads"] == 1 and len(peak["readings_gflops"]) == 6 and peak["gflops"] == max(peak["readings_gflops"])
    for engine, per_variant in result["latency_ms"].items():
        for variant, measured in per_variant.items():
            fraction = result["fma_peak_fraction"][engine][variant]
            expected = 2 * result["macs"][variant] / (measured["median_ms"] * 1e-3) / (peak["gflops"] * 1e9)
            assert fraction == pytest.approx(expected, abs=1e-4)
            assert 0 < fraction < 1, (engine, variant, fraction)  # a model cannot outrun the FMA pipes
    # TVM's outputs (of the BN-folded graph) checked against ONNX Runtime's on the same feeds, per variant
    errors = result["max_relative_error_vs_ort"]
    assert set(errors) == {"tvm_untuned"} and set(errors["tvm_untuned"]) == {"unpruned", "pruned"}
    assert all(0 <= e < 1e-4 for e in errors["tvm_untuned"].values()), errors


def test_bench_latency_names_an_engine_whose_outputs_disagree_with_onnx_runtime(tmp_path) -> None:
    """`agreement`: each engine's saved outputs against ONNX Runtime's of the same variant; a wrong output (one
    element off by 1% of the output's scale, or a wrong shape) is named, rounding differences are not."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_latency", os.path.join(TOOLS, "bench_latency.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(0)
    reference = [rng.standard_normal((1, 10)).astype(np.float32), rng.standard_normal((1, 4, 3)).astype(np.float32)]
    rounded = [r + np.float32(1e-7) * rng.standard_normal(r.shape).astype(np.float32) for r in reference]
    off = [r.copy() for r in reference]
    off[1][0, 2, 1] += 0.01 * np.abs(off[1]).max()
    outputs = {}
    for (engine, label), arrays in {("ort", "pruned"): reference, ("tvm_tuned", "pruned"): rounded,
                                    ("torch", "pruned"): off, ("ort", "unpruned"): reference,
                                    ("tvm_tuned", "unpruned"): [reference[0], reference[1][:, :2]]}.items():
        outputs[engine, label] = str(tmp_path / f"{engine}.{label}.npz")
        np.savez(outputs[engine, label], *arrays)
    outputs["tvm_untuned", "pruned"] = str(tmp_path / "missing.npz")  # its worker failed: nothing to compare
    errors, wrong = bench.agreement(outputs)
    assert errors["tvm_tuned"]["pruned"] < 1e-5 and errors["torch"]["pruned"] == pytest.approx(0.01, rel=1e-3)
    assert errors["tvm_tuned"]["unpruned"] == float("inf")
    assert sorted(wrong) == ["torch pruned", "tvm_tuned unpruned"] and "tvm_untuned" not in errors


@pytest.mark.serial  # reads this machine's peak
def test_fma_peak_runs_fused_multiply_adds_as_wide_as_this_cpu_has() -> None:
    """tools/fma_peak.py compiles its probe for this CPU: AVX-512 vectors where the CPU has them, fused multiply-adds
    where it has FMA (a probe built for a baseline x86 would read a third of the peak, and every fraction of it
    bench_latency reports would be three times too high). One reading per thread, summed."""
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, "fma_peak.py"), "--threads", "2", "--seconds", "0.1",
                           "--repeats", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = json.loads(proc.stdout)
    from tvm.target import codegen

    from prune_compile.backends.tvm import make_target
    from prune_compile.backends.tvm.conv_nchwc import vector_lanes

    host = make_target("cpu")  # what our kernels are compiled for: the same vectors
    assert peak["vector_bytes"] == 4 * vector_lanes(host), (peak, str(host))
    assert peak["fused"] == bool(codegen.target_has_features("fma", host))
    assert peak["threads"] == 2 and len(peak["per_thread_gflops"]) == 2 and len(peak["readings_gflops"]) == 2
    assert peak["gflops"] == max(peak["readings_gflops"]) == pytest.approx(sum(peak["per_thread_gflops"]), abs=0.02)
    assert min(peak["per_thread_gflops"]) > 0


@pytest.mark.serial  # reads this machine's peak
def test_fma_peak_measures_half_width_vectors_on_avx512_cpus(tmp_path) -> None:
    """The probe built for 256-bit vectors runs them (`wide_vector_speedup` compares the two rates to decide whether
    8-channel conv blocks compute in pairs); its speedup is a rate ratio: 1 without AVX-512, else between the
    double-pumped (Zen 4, ~1) and the full-width (Zen 5, ~2) cases, with room for a noisy reading."""
    from prune_compile.backends import fma_peak

    half = fma_peak.run_probe(fma_peak.compile_probe(str(tmp_path), 32), 1, 0.05)
    assert half["vector_bytes"] == 32 and half["gflops"] > 0
    wide = fma_peak.run_probe(fma_peak.compile_probe(str(tmp_path)), 1, 0.01)["vector_bytes"]
    speedup = fma_peak.wide_vector_speedup()
    assert speedup == 1.0 if wide != 64 else 0.6 < speedup < 2.6


@pytest.mark.serial  # reads this machine's peak
def test_fma_peak_reads_the_quiet_peak_beside_busy_processes() -> None:
    """A thread's rate is its fastest ~0.2 ms block: two busy loops sharing the cores halve the average rate and leave
    the peak as it was quiet (the average read low, and a model timed by its fastest runs seemed to outrun it)."""
    from prune_compile.backends import fma_peak

    quiet = fma_peak.measure(2, 0.3, 2)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        loaded = fma_peak.measure(2, 0.3, 2)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert loaded["sustained_gflops"] < 0.8 * loaded["gflops"], loaded  # the busy loops took their share
    assert loaded["gflops"] >= 0.9 * quiet["gflops"], (quiet, loaded)


def test_bench_latency_compare_times_built_artifacts_against_the_first(tmp_path) -> None:
    """`--compare`: a `--keep` directory's ONNX models and TVM library timed in interleaved rounds, each against the
    first within the rounds quiet for both; a path that is no artifact exits non-zero, naming it."""
    keep = tmp_path / "keep"
    bench = os.path.join(TOOLS, "bench_latency.py")
    proc = subprocess.run([sys.executable, bench, DEFAULT_MODEL, "--engines", "ort,tvm_untuned", "--repeat", "5",
                           "--rounds", "1", "--threads", "1", "--keep", str(keep)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the library twice: as it is, and with an environment variable set for its worker processes
    artifacts = [str(keep / name) for name in ("pruned.onnx", "pruned.untuned.so", "unpruned.onnx")] + \
        [str(keep / "pruned.untuned.so") + "@PRUNE_COMPILE_TVM_LAUNCHER=tvm"]
    proc = subprocess.run([sys.executable, bench, "--compare", *artifacts, "--repeat", "10", "--rounds", "2",
                           "--threads", "1"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["feeds"] == str(keep / "feeds.npz")
    assert [(a["artifact"], a["engine"]) for a in result["artifacts"]] == [
        (artifacts[0], "ort"), (artifacts[1], "tvm"), (artifacts[2], "ort"), (artifacts[3], "tvm")]
    first = result["artifacts"][0]
    for measured in result["artifacts"]:
        count = len(measured["rounds_ms"])
        assert 2 <= count <= 4 and measured["runs"] == 10 * count
        both = sorted(set(measured["quiet_rounds"]) & set(first["quiet_rounds"]))
        ratios = [measured["rounds_ms"][i] / first["rounds_ms"][i] for i in (both or range(count))]
        assert result["over_first"][measured["artifact"]] == pytest.approx(np.median(ratios), abs=1e-4)
        assert result["over_first_range"][measured["artifact"]] == [round(min(ratios), 4), round(max(ratios), 4)]
    assert result["over_first"][artifacts[0]] == 1.0
    proc = subprocess.run([sys.executable, bench, "--compare", str(keep / "feeds.npz")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "feeds.npz" in proc.stderr
    proc = subprocess.run([sys.executable, bench, "--compare", artifacts[1] + "@TVM_NUM_THREADS"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "@TVM_NUM_THREADS: the environment after '@'" in proc.stderr
    # the environment reaches the artifact's worker process (one in which Python cannot start) and only that one
    proc = subprocess.run([sys.executable, bench, "--compare", artifacts[0], artifacts[0] + "@PYTHONHOME=/nowhere",
                           "--repeat", "2", "--rounds", "1", "--threads", "1"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ok, broken = json.loads(proc.stdout)["artifacts"]
    assert "error" not in ok and "error" in broken, (ok, broken)


def test_bench_latency_times_a_zoo_models_torch_module(tmp_path) -> None:
    """A pickled tests/zoo.py module (the CRNN bench models) loads in the torch worker, whose script's directory is
    tools/: its class must be found there too."""
    import torch

    from .zoo import bench_model

    module, shapes = bench_model("crnn_gru")
    torch.save(module, tmp_path / "crnn_gru.pt")
    np.savez(tmp_path / "feeds.npz", x=np.zeros(shapes["x"], np.float32))
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, "bench_latency.py"), "--compare",
                           str(tmp_path / "crnn_gru.pt"), "--repeat", "2", "--rounds", "1", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (measured,) = json.loads(proc.stdout)["artifacts"]
    assert measured["engine"] == "torch" and "error" not in measured and measured["median_ms"] > 0, measured


@pytest.mark.serial  # a latency search
def test_bench_latency_plan_without_uniform_plans_reports_the_search_alone() -> None:
    """`--uniform-candidates 0`: what a search costs and what its plan measures, no uniform bisection (on TVM seven
    tuned builds): the JSON has the original and the latency plan, and no comparison. `--table` picks the table."""
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, "bench_latency_plan.py"), "demo", "--rounds", "2",
                           "--uniform-candidates", "0", "--target-latency", "0.7", "--table", "lazy"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert set(result["rows"]) == {"original", "latency_plan"} and result["uniform_curve"] == []
    assert result["macs_kept_latency_over_uniform"] is None and result["latency_vs_target"] > 0
    assert result["search"]["table_entries"] > 0 and result["search"]["step"] == 8
    assert result["search"]["lazy_table"]  # --table lazy on ONNX Runtime, whose table is exact by default
    assert 0 < result["rows"]["latency_plan"]["macs_kept"] < 1


@pytest.mark.serial  # latency searches
def test_bench_latency_plan_compares_with_the_uniform_plan_nearest_in_remeasured_latency() -> None:
    """The uniform plan of "equal latency" is picked from interleaved re-measurements, not from a single bisection
    timing; fractions are medians of per-round ratios; the interpolated MACs lie on the re-measured curve."""
    # 0.7x, not the tool's default 0.5x: how deep the small demo model can go is a property of the machine (CI's
    # machine measured its deepest plan at 0.55x twice, where ours reach 0.5x), and this test is about the comparison
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, "bench_latency_plan.py"), "demo", "--rounds", "2",
                           "--uniform-candidates", "3", "--target-latency", "0.7"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    rows, curve = result["rows"], result["uniform_curve"]
    assert 1 <= len(curve) <= 3
    # a fraction is the median of ratios taken within a round (not a ratio of medians, which can pair a fast
    # minute with a slow one), and the uniform plan of equal latency is the one whose per-round ratio to the
    # latency plan is nearest 1
    # only the quiet rounds count (the original within QUIET, 4%, of its fastest, or of the search's reading); rounds
    # go on until 2 are, at most 8
    used = result["rounds_used"]
    everything = np.array(rows["original"]["rounds_ms"])
    search = result["search"]
    fastest = min([everything.min(), search["base_ms"]] + [t["original_ms"] for t in search["trajectory"]])
    assert 2 <= len(everything) <= 8 and used == sorted(used) and len(used) >= 1
    assert used == [i for i, o in enumerate(everything) if o <= QUIET * fastest] or len(used) == len(everything)
    original = everything[used]
    for row in [*rows.values(), *curve]:
        assert len(row["rounds_ms"]) == len(everything)
        ratios = np.array(row["rounds_ms"])[used] / original
        assert row["latency_fraction"] == pytest.approx(np.median(ratios), rel=2e-3)
        if "latency_fraction_range" in row:
            assert row["latency_fraction_range"] == pytest.approx([ratios.min(), ratios.max()], rel=2e-3)
    assert [c["latency_fraction"] for c in curve] == sorted(c["latency_fraction"] for c in curve)
    plan_ms = np.array(rows["latency_plan"]["rounds_ms"])[used]
    nearest = min(curve, key=lambda c: abs(np.median(plan_ms / np.array(c["rounds_ms"])[used]) - 1))
    assert rows["uniform_plan"]["ratio"] == nearest["ratio"]
    assert result["latency_plan_over_uniform_latency"] == pytest.approx(
        np.median(plan_ms / np.array(nearest["rounds_ms"])[used]), rel=2e-3)
    # where each plan pruned: every weight layer's shape, no dimension larger than the original's, and the plans'
    # kept parameters are what those shapes hold (a bias per output channel aside: within it)
    shapes = {k: row["weight_shapes"] for k, row in rows.items()}
    assert shapes["original"] and all(s.keys() == shapes["original"].keys() for s in shapes.values())
    for name, full in shapes["original"].items():
        for k in ("latency_plan", "uniform_plan"):
            assert all(a <= b for a, b in zip(shapes[k][name], full, strict=True))
    weights = {k: sum(int(np.prod(v)) for v in s.values()) for k, s in shapes.items()}
    for k in ("latency_plan", "uniform_plan"):
        assert weights[k] < weights["original"]
        assert rows[k]["parameters_kept"] == pytest.approx(weights[k] / weights["original"], abs=0.05)
    assert result["latency_vs_target"] == round(rows["latency_plan"]["latency_fraction"] / 0.7, 4)
    assert 0 < rows["latency_plan"]["macs_kept"] < 1 and 0 < rows["uniform_plan"]["macs_kept"] < 1
    assert result["macs_kept_latency_over_uniform"] == round(
        rows["latency_plan"]["macs_kept"] / rows["uniform_plan"]["macs_kept"], 4)
    lat = rows["latency_plan"]["latency_fraction"]
    bracket = [(a, b) for a, b in itertools.pairwise(curve) if a["latency_fraction"] <= lat <= b["latency_fraction"]]
    if result["macs_kept_latency_over_uniform_interpolated"] is None:
        assert not [(a, b) for a, b in bracket if b["latency_fraction"] > a["latency_fraction"]]
    else:
        interpolated = rows["latency_plan"]["macs_kept"] / result["macs_kept_latency_over_uniform_interpolated"]
        a, b = bracket[0]
        assert min(a["macs_kept"], b["macs_kept"]) - 1e-3 <= interpolated <= max(a["macs_kept"], b["macs_kept"]) + 1e-3
    assert result["search"]["engine"] == "onnxruntime" and result["search"]["layers"] > 0


@pytest.mark.serial  # latency searches; trains on torch's threads
@pytest.mark.big
def test_bench_accuracy_latency_compares_plans_of_equal_measured_latency(model_cache_dir) -> None:
    """Latency plans are searched for the aligned uniform plan's measured latency, everything is re-measured
    interleaved, and every plan's accuracies come from the trained model sliced by that plan (MNIST ResNet, one
    epoch each: the mechanics, not the numbers; at most one re-search per plan, which bounds the test's time: each
    search is a minute or two)."""
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, "bench_accuracy_latency.py"), "mnist", "--epochs", "1",
                           "--finetune-epochs", "1", "--rounds", "2", "--max-ratios", "0.7,0.9", "--researches", "1",
                           "--wheel-dir", os.path.join(model_cache_dir, "wheels")],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    rows, sizes, used = result["rows"], result["group_sizes"], result["rounds_used"]
    uniform = "uniform_0.5_round_to_16"
    latency = {0.7: "latency_max_ratio_0.7", 0.9: "latency_max_ratio_0.9"}
    assert set(rows) - {"original"} <= {uniform, *latency.values()} and uniform in rows
    assert all(name in rows or name in result["unreachable"] for name in latency.values())
    original = np.array(rows["original"]["rounds_ms"])[used]
    for name, row in rows.items():
        if name == "original":
            continue
        ms = np.array(row["rounds_ms"])[used]
        assert row["latency_fraction"] == pytest.approx(np.median(ms / original), rel=2e-3)
        assert row["latency_over_uniform"] == pytest.approx(
            np.median(ms / np.array(rows[uniform]["rounds_ms"])[used]), rel=2e-3)
        assert 0 < row["macs_kept"] < 1 and 0 < row["params_kept"] < 1
        assert row["kept"].keys() == sizes.keys()
        for group, kept in row["kept"].items():
            size = sizes[group]
            if name == uniform:  # ratio 0.5, counts rounded to 16 (groups smaller than that stay whole)
                assert kept == size or kept % 16 == 0, (group, kept)
            else:  # multiples of 8, and never more removed than max_ratio allows
                max_ratio = 0.7 if name.endswith("0.7") else 0.9
                assert kept == size or kept % 8 == 0, (group, kept)
                assert kept >= size - int(max_ratio * size), (name, group, kept)
                assert row["searched_target"] > 0 and 1 <= row["chosen_search"] <= row["searches"] <= 2
        for key in ("one_shot", "bn_recalibrated"):
            assert 0 <= row[key] <= 100
        assert len(row["finetuned"]) == result["seeds"] == 1 and 0 <= row["finetuned_mean"] <= 100
    assert any(kept < sizes[g] for g, kept in rows[uniform]["kept"].items())
    assert len(rows["original"]["finetuned"]) == 1


def test_gpu_check_builds_then_runs_libraries_against_onnx_runtime(tmp_path) -> None:
    """tools/gpu_check.py's two steps, dry-run on the CPU: `build` runs the user's pipeline unpruned and pruned and
    keeps ONNX Runtime's outputs; `run` (in a runtime-only TVM, as on the GPU machine) reproduces them and reports
    the pruned model's speedup against its MACs ratio."""
    tool = os.path.join(TOOLS, "gpu_check.py")
    built = subprocess.run([sys.executable, tool, "build", str(tmp_path), "--target", "cpu", "--models", "demonet"],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    ran = subprocess.run([sys.executable, tool, "run", str(tmp_path), "--rounds", "2", "--runs", "3", "--profile"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "TVM_USE_RUNTIME_LIB": "1"})
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    report = json.loads(ran.stdout)
    assert report["ok"] and [(r["variant"], r["ok"]) for r in report["libraries"]] == [("unpruned", True),
                                                                                       ("pruned", True)]
    assert all(r["max_relative_error"] <= 1e-4 and r["latency_ms"] > 0 for r in report["libraries"])
    for r in report["libraries"]:  # --profile: every fused kernel timed, the slowest listed by their share
        kernels = r["kernels"]
        assert kernels["count"] >= len(kernels["top"]) > 0 and kernels["total_ms"] > 0
        assert sum(k["share"] for k in kernels["top"]) <= 1.0001
    (speedup,) = report["speedups"]
    assert speedup["macs_ratio"] > 3  # ratio 0.5 on both sides of each conv
    # A wrong reference must fail the check (the comparison can fail).
    data = dict(np.load(tmp_path / "demonet-pruned.npz"))
    data["out:0"] = data["out:0"] + 1.0
    np.savez(tmp_path / "demonet-pruned.npz", **data)
    ran = subprocess.run([sys.executable, tool, "run", str(tmp_path), "--rounds", "1", "--runs", "1"],
                         capture_output=True, text=True, timeout=600)
    assert ran.returncode == 1
    assert [r["ok"] for r in json.loads(ran.stdout)["libraries"]] == [True, False]


@pytest.mark.serial  # measured savings against tables
def test_bench_latency_table_compares_both_tables_with_whole_model_measurements() -> None:
    """tools/bench_latency_table.py: each plan measured against the original, each table's predicted saving, and a
    correlation per table (what the README's table-fidelity numbers come from)."""
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, "bench_latency_table.py"), "demo", "--plans", "4",
                           "--pairs", "2", "--seconds", "0.05"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert len(result["plans"]) == 4 and result["original_ms"] > 0
    for row in result["plans"]:
        assert -1 < row["measured_saving"] < 1 and set(row["predicted_saving_ms"]) == {"in_model", "alone"}
    for table in ("in_model", "alone"):
        assert result["layer_shapes"][table] > 0
        assert -1 <= result[table]["pearson"] <= 1 and -1 <= result[table]["spearman"] <= 1


def test_bench_memory_reports_the_jobs_peak_over_the_models_bytes() -> None:
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, "bench_memory.py"), "--width", "1024"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    weights = result["model"]["weight_bytes"]
    assert weights == 2 * 1024 * 1024 * 4
    base, large = result["baseline"]["peak_rss_bytes"], result["large"]["peak_rss_bytes"]
    assert 0 < base < large  # the job on 8 MiB of weights holds more than on 32 KiB
    assert result["peak_over_model"] == round(large / weights, 2)
    assert result["peak_above_baseline_over_model"] == round((large - base) / weights, 2)


@pytest.mark.big
def test_bench_tuning_search_times_both_builders_and_searches_on_the_same_shapes() -> None:
    """Each variant tunes the same layer shapes for the same trials in its own process; the JSON has both, and
    the ratios are of the numbers beside them."""
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, "bench_tuning_search.py"), "--shapes", "1",
                           "--rounds", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["shapes"] == [[64, 64, 56, 3, 1]] and result["trials_per_shape"] == 8
    stock, ours = result["stock"], result["ours"]
    assert all(len(v["seconds"]) == 1 and v["total_s"] > 0 and v["best_ms"][0] > 0 for v in (stock, ours))
    ratios = result["ours_over_stock"]
    assert ratios["time"] == pytest.approx(ours["total_s"] / stock["total_s"], abs=1e-3)
    assert ratios["best_ms_geomean"] == pytest.approx(ours["best_ms"][0] / stock["best_ms"][0], abs=1e-3)


def test_bench_tuning_database_times_both_databases_on_the_same_answers(tmp_path) -> None:
    """Both databases open the same directory in processes of their own, answer alike, and the ratios are of the
    medians beside them."""
    from tvm.s_tir import meta_schedule as ms

    from .test_tvm_tuning_database import RUN_SECS, commit_all, database_paths, workload_module

    commit_all(ms.database.JSONDatabase(*database_paths(tmp_path)), [workload_module(rows) for rows in (8, 12)])
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, "bench_tuning_database.py"), str(tmp_path),
                           "--rounds", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["same_answers"] is True and result["workloads"] == 2 and result["records"] == 2 * len(RUN_SECS)
    for step in ("open", "tune", "build"):
        assert result["ours_over_tvm"][step] == pytest.approx(result["ours"][step] / result["tvm"][step], rel=1e-2,
                                                              abs=1e-3)
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, "bench_tuning_database.py"), str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "holds no tuning database" in proc.stderr
