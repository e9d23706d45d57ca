"""The `prune-compile` command. All logic lives in `prune_compile.api`; this file parses and reports.

Exit codes: 0 ok, 2 usage error, 3 unsupported model/op, 4 backend/toolchain failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence

from . import api
from .backends.tvm.targets import CONV_LAYOUTS
from .errors import PruneCompileError
from .passes.importance import CRITERIA


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep its one-line form
        self.print_usage(sys.stderr)
        print(f"prune-compile: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="prune-compile", description="Structural pruning compiler for PyTorch and ONNX models.")
    p.add_argument("model", help="an .onnx file, a .pt2 ExportedProgram, or package.module:factory")
    p.add_argument("-o", "--output", metavar="OUTDIR", help="directory for the outputs (required)")
    p.add_argument("--config", metavar="FILE.toml", default=None,
                   help="read options from a TOML file (keys are the long option names); command-line options "
                        "override it, list options (target, ignore, ...) add to it")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=d0,d1,...",
                   help="static shape of a model input (repeatable); required for dynamic dims and torch models")
    p.add_argument("--symbolic-dim", action="append", default=[], metavar="NAME:AXIS[=SYMBOL]",
                   help="make this input dim symbolic in model.pruned.onnx (repeatable), e.g. x:0=batch for a torch "
                        "model's batch; kept where the pruned model holds at other sizes, else a warning")
    p.add_argument("--static-shapes", action="store_true",
                   help="write model.pruned.onnx with --input-shape's sizes (default: the original ONNX's symbolic "
                        "input dims where they hold at other sizes)")
    p.add_argument("--ratio", type=float, default=0.0, help="fraction of channels to remove per group, in [0, 1)")
    p.add_argument("--target", action="append", choices=api.TARGETS, default=None,
                   help="compile target (repeatable); 'none' only exports ONNX")
    p.add_argument("--passes", metavar="PIPELINE", default=None,
                   help="textual pass pipeline, e.g. 'analyze,plan{policy=global ratio=0.5},rewrite,verify,"
                        "compile{target=cpu}'; the other options are its passes' defaults")
    p.add_argument("--plan", metavar="plan.json", default=None,
                   help="replay a plan made earlier for this model instead of planning")
    p.add_argument("--print-after-all", action="store_true", help="print the IR after every pass (stderr)")
    p.add_argument("--dump-ir", metavar="DIR", default=None, help="write the IR after every pass to DIR/NN-pass.ir")
    p.add_argument("--measure-latency", action="store_true",
                   help="time the original and pruned model on ONNX Runtime and each cpu library, and the arm "
                        "library on the --rpc-tracker/--rpc-key device (timings.json)")
    p.add_argument("--policy", choices=("uniform", "global", "sensitivity", "latency"), default="uniform",
                   help="uniform: every group loses the ratio; global: channels ranked across groups; "
                        "sensitivity: measure each group's damage, prune where it hurts least; "
                        "latency: measured per-layer latencies, to meet --target-latency")
    p.add_argument("--sensitivity-allocation", choices=("lagrange", "threshold", "greedy"), default="lagrange",
                   help="sensitivity policy: least total damage per MACs saved from the per-group curves (lagrange, "
                        "default), one damage threshold for all groups, or greedy steps each measured on the model "
                        "pruned so far (slower; sees damages compound)")
    p.add_argument("--calibration-data", metavar="FILE.npz", default=None,
                   help="sensitivity policy: inputs to measure on, one array per model input named like it (samples "
                        "along the first axis), optional integer 'labels' (default: seeded random inputs)")
    p.add_argument("--sensitivity-metric", choices=("output-change", "cross-entropy", "top1"),
                   default="output-change",
                   help="sensitivity policy: the damage measured: relative change of the outputs, or the first "
                        "output's cross-entropy / top-1 error against the labels (or the unpruned model)")
    p.add_argument("--importance", choices=CRITERIA, default="l2",
                   help="channel importance (group-level, over all members); taylor: |weight x gradient| of the "
                        "--calibration-data cross-entropy (labels, else the model's own top class), torch models")
    p.add_argument("--round-to", type=int, default=1, metavar="N",
                   help="kept channel counts are multiples of N (groups smaller than N excepted)")
    p.add_argument("--min-channels", type=int, default=1, metavar="N", help="channels every group keeps at least")
    p.add_argument("--max-ratio", type=float, default=None, metavar="R",
                   help="global and latency policies: the most any one group may lose (default 0.9 global, "
                        "0.7 latency)")
    p.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                   help="leave groups whole that contain a parameter matching GLOB (repeatable)")
    p.add_argument("--override", action="append", default=[], metavar="GLOB=R",
                   help="uniform policy: ratio R for groups with a parameter matching GLOB (repeatable)")
    p.add_argument("--target-macs", type=float, default=None, metavar="X",
                   help="prune until MACs fall by X times (e.g. 2.5); replaces --ratio")
    p.add_argument("--target-latency", type=_latency_factor, default=None, metavar="F[x]",
                   help="latency policy: prune until the measured latency is F times the original's (e.g. 0.5x)")
    p.add_argument("--latency-engine", choices=("ort", "tvm", "tvm-arm"), default="ort",
                   help="latency policy: what measures the layers and the model: ONNX Runtime (ort), or the code "
                        "TVM compiles, tuned, for the cpu target (tvm) or the arm target (tvm-arm); uses --tune-db, "
                        "--num-cores, --conv-layout, --arm-board, and measures on the --rpc-tracker/--rpc-key device "
                        "when given (tvm-arm needs one)")
    p.add_argument("--latency-trials", type=int, default=16, metavar="N",
                   help="latency policy with --latency-engine tvm: tuning trials per layer shape (whole models "
                        "get N per weight layer); records persist in the tuning database")
    p.add_argument("--tune", type=int, default=0, metavar="N",
                   help="MetaSchedule trial budget per target, split across tasks by FLOPs (0: default schedules)")
    p.add_argument("--tune-db", metavar="DIR", default=None,
                   help="tuning database root, shared across runs (default: ~/.cache/prune-compile/tuning); "
                        "a rebuild of the same graph and target runs 0 trials")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", default=None,
                   help="measure tuning candidates on devices registered with this TVM RPC tracker")
    p.add_argument("--rpc-key", metavar="KEY", default=None, help="device key at the RPC tracker")
    p.add_argument("--arm-board", default="generic", metavar="BOARD",
                   help="aarch64 board the arm target schedules for: generic, rasp4, rasp5, graviton2, graviton3, "
                        "jetson-orin")
    p.add_argument("--gpu-arch", default="sm_90", metavar="sm_XX", help="CUDA architecture of the gpu target")
    p.add_argument("--num-cores", type=int, default=None, metavar="N",
                   help="threads the compiled code uses (default: this machine's cores; the board's for arm, which "
                        "--tune needs when --arm-board gives none)")
    p.add_argument("--conv-layout", choices=CONV_LAYOUTS, default="auto",
                   help="data layout TVM schedules convolutions in (NHWC: channels innermost; NCHWc: channels "
                        "blocked by the vector width with a register-blocked schedule, CPU targets with --tune; "
                        "auto: NCHWc for the cpu target with --tune, else NCHW)")
    p.add_argument("--no-winograd", action="store_true",
                   help="compute every 3x3 conv directly (NCHWc builds compute stride-1 ones by Winograd's "
                        "F(4x4, 3x3) where it pays: 2-3x faster, about 1e-5 relative error per conv in float32)")
    p.add_argument("--attention", choices=("head_dim", "heads"), default="head_dim",
                   help="what attention pruning removes first: the same head_dim in every head, or whole heads")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check of the exported model")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        argv = config_arguments(parser, argv) + argv
    except PruneCompileError as e:
        print(f"prune-compile: error: {e}", file=sys.stderr)
        return e.exit_code
    args = parser.parse_args(argv)
    if args.output is None:
        parser.error("the following arguments are required: -o/--output")
    try:
        with _stdout_reserved():
            shapes = api.parse_input_shapes(args.input_shape)
            result = api.run(args.model, args.output, input_shapes=shapes, ratio=args.ratio,
                             targets=args.target or ["none"], verify=not args.no_verify,
                             attention=args.attention, tune=args.tune, tune_db=args.tune_db,
                             rpc=_rpc_settings(args), target_options=_target_options(args),
                             progress=None if args.quiet else _progress(), planning=_planning(args),
                             passes=args.passes, plan=args.plan, measure_latency=args.measure_latency,
                             print_after_all=args.print_after_all, dump_ir=args.dump_ir,
                             static_shapes=args.static_shapes,
                             symbolic_dims=api.parse_symbolic_dims(args.symbolic_dim))
    except PruneCompileError as e:
        print(f"prune-compile: error: {e}", file=sys.stderr)
        return e.exit_code
    for warning in result.report["pruning"].get("warnings", []):
        print(f"prune-compile: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.report, indent=2, sort_keys=True))
    elif not args.quiet:
        print(_summary(result))
    return 0


@contextlib.contextmanager
def _stdout_reserved() -> Iterator[None]:
    """stdout carries only our summary or `--json` report: while the job runs, whatever the libraries under it
    print (Python or C, or a compiler they start) goes to stderr."""
    sys.stdout.flush()
    saved = None
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no usable descriptors (an embedding host): the Python-level redirect still holds
        if saved is not None:
            os.close(saved)
            saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            sys.stderr.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _latency_factor(text: str) -> float:
    try:
        return float(text[:-1] if text.lower().endswith("x") else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a latency factor like 0.5x") from None


def config_arguments(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """The options of `--config FILE.toml` as command-line arguments, to go before the real ones (which win).

    Keys are long option names (`round-to` or `round_to`); a list repeats the option; `true` sets a flag."""
    import tomllib

    path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    if path is None:
        return []
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise api.UsageError(f"--config '{path}' does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise api.UsageError(f"--config '{path}': not a readable TOML file: {e}") from None
    options = {a.option_strings[-1]: a for a in parser._actions if a.option_strings}
    out: list[str] = []
    for key, value in table.items():
        flag = "--" + key.replace("_", "-")
        action = options.get(flag)
        if action is None or flag in ("--config", "--help"):
            raise api.UsageError(f"--config '{path}': unknown option '{key}'")
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not isinstance(action, argparse._AppendAction):
            raise api.UsageError(f"--config '{path}': option '{key}' takes one value, not a list")
        for v in values:
            if isinstance(v, bool):
                if action.nargs != 0:
                    raise api.UsageError(f"--config '{path}': option '{key}' takes a value, not true/false")
                out += [flag] if v else []
            elif isinstance(v, (str, int, float)) and action.nargs != 0:
                out += [flag, str(v)]
            else:
                raise api.UsageError(f"--config '{path}': option '{key}' has a value of the wrong type ({v!r})")
    return out


def _planning(args: argparse.Namespace):
    from .passes.policy import PlanningOptions, parse_overrides

    overrides = parse_overrides(args.override)
    return PlanningOptions(policy=args.policy, importance=args.importance, round_to=args.round_to,
                           min_channels=args.min_channels, max_ratio=args.max_ratio, ignore=tuple(args.ignore),
                           overrides=overrides, target_macs=args.target_macs,
                           target_latency=args.target_latency, latency_engine=args.latency_engine,
                           latency_trials=args.latency_trials,
                           sensitivity_allocation=args.sensitivity_allocation,
                           sensitivity_metric=args.sensitivity_metric, calibration_data=args.calibration_data)


def _rpc_settings(args: argparse.Namespace):
    if (args.rpc_tracker is None) != (args.rpc_key is None):
        raise api.UsageError("--rpc-tracker and --rpc-key go together")
    if args.rpc_tracker is None:
        return None
    from .backends.tvm.tuning import RPCSettings

    settings = RPCSettings(args.rpc_tracker, args.rpc_key)
    settings.host_port()  # validates HOST:PORT
    return settings


def _target_options(args: argparse.Namespace):
    from .backends.tvm.targets import TargetOptions

    if args.num_cores is not None and args.num_cores <= 0:
        raise api.UsageError(f"--num-cores {args.num_cores}: must be positive")
    return TargetOptions(arm_board=args.arm_board, gpu_arch=args.gpu_arch, num_cores=args.num_cores,
                         conv_layout=args.conv_layout, winograd=not args.no_winograd)


def _progress():
    from .progress import terminal_progress

    return terminal_progress()


def _summary(result: api.RunResult) -> str:
    r = result.report
    g = r["graph"]
    lines = [
        f"model      {r['model']['source']} ({r['model']['kind']})",
        "inputs     " + ", ".join(f"{k}{v}" for k, v in r["input_shapes"].items()),
        *(["symbolic   " + ", ".join(f"{k}[{a}]={s}" for k, dims in r["symbolic_dims"].items() for a, s in dims.items())
           + ": kept in the pruned model (checked at these sizes and doubled)"] if r.get("symbolic_dims") else []),
        f"graph      {g['nodes']} nodes, {g['constants']} constants, {g['parameters']:,} parameters, "
        f"{g['opaque']} opaque",
        "ops        " + ", ".join(f"{k}x{v}" for k, v in sorted(g["ops"].items(), key=lambda kv: -kv[1])[:12]),
    ]
    p, c = r["pruning"], r["cost"]
    lines.append(f"pipeline   {r['pipeline']}")
    how = (f"for latency {p['target_latency']}x" if p.get("target_latency") else
           f"for {p['target_macs']}x fewer MACs" if p.get("target_macs") else
           f"at ratio {p['ratio']}" if p.get("ratio") is not None else f"by {p['policy'] or 'no plan'}")
    lines.append(f"groups     {p['groups']} found, {p['prunable']} prunable, {p['frozen']} frozen; "
                 f"{p['pruned_groups']} pruned {how} ({p['channels_removed']} channels)")
    for reason, count in list(p["frozen_reasons"].items())[:5]:
        lines.append(f"  frozen   {count}x {reason}")
    lines.append(f"cost       MACs {c['before']['macs']:,} -> {c['after']['macs']:,} ({c['macs_ratio'] or '-'}x), "
                 f"parameters {c['before']['parameters']:,} -> {c['after']['parameters']:,}")
    searched = result.timings.get("planning")
    if searched:
        where = searched.get("measured_on", "this machine")
        where = "" if where == "this machine" else f" on {where}"
        lines.append(f"  latency  measured {searched['measured_ms']:.3f} ms{where} for target "
                     f"{searched['target_ms']:.3f} ms "
                     f"(original {searched['base_ms']:.3f} ms; {searched['table_entries']} layer shapes timed, "
                     f"{searched['steps']} search steps)")
    if "verification" in r:
        v = r["verification"]
        what = "consumer-zeroed original" if "zeroed" in v["oracle"] else "original"
        lines.append(f"verified   max relative error vs {what}: {v['max_relative_error']:.2e}"
                     + (f" ({v['note']})" if v.get("note") else ""))
    for target, t in sorted(r.get("targets", {}).items()):
        check = t.get("verification")
        lines.append(f"compiled   {target}: {t['library']} ({t['pipeline']})"
                     + (f", max relative error vs ONNX Runtime {check['max_relative_error']:.2e}" if check else ""))
        tu = result.timings.get("tuning", {}).get(target)
        if "tuning" not in t:
            lines.append("  untuned  TVM's default schedules, often 20-100x slower than ONNX Runtime on a CPU; "
                         "--tune N tunes them (resnet18, mobilenet_v2 here: 2000-3200, 10-25 min on 2 cores)")
        if tu:
            unneeded = (f"; {tu['trials_unneeded']} not needed: every schedule of {tu['tasks_exhausted']} tasks "
                        "measured" if tu.get("trials_unneeded") else "")
            lines.append(f"  tuning   {tu['trials_run']} trials run on {tu['tasks_tuned']}/{tu['tasks']} tasks "
                         f"(budget {tu['trials_requested']}{unneeded}); database {tu['database']}")
        if t.get("device_code"):
            d = t["device_code"]
            lines.append(f"  device   {d['format']} for {d['arch']} ({d['bytes']:,} bytes, {d['compiler']})")
    for engine, t in sorted(result.timings.get("engines", {}).items()):
        used = t.get("fma_peak_fraction")
        of_peak = f"; {used['before']:.2f} -> {used['after']:.2f} of the FMA peak" if used else ""
        where = f" on {t['measured_on']}" if "measured_on" in t else ""
        lines.append(f"latency    {engine}: {t['before']['median_ms']:.3f} -> {t['after']['median_ms']:.3f} ms "
                     f"({t['speedup']:.2f}x, median of {t['after']['runs']} runs{where}{of_peak})")
    peak = result.timings.get("fma_peak")
    if peak and "gflops" in peak:
        lines.append(f"           FMA peak {peak['gflops']:.0f} GFLOP/s ({peak['threads']} threads, measured); a "
                     "fraction near 1 leaves only fewer MACs to gain")
    for path in sorted(result.files.values()):
        lines.append(f"wrote      {path}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
