"""What opening and asking a tuning database costs: TVM's JSONDatabase against ours (backends/tvm/tuning_database.py),
on a database directory tuned on this machine (one run).

    python tools/bench_tuning_database.py                  # the largest database under the default root
    python tools/bench_tuning_database.py ~/.cache/prune-compile/tuning/cpu-4d0c4c092e91 --rounds 3

Each variant runs in a process of its own, a fresh one per round, alternating. Steps, timed one after the other:
- `open`: constructing the database over the directory's two files;
- `tune`: what tuning asks before it runs anything: every task's measured run times (ours: `valid_means`; TVM's:
  the task's top-k records, all of them), here for every workload in the database;
- `build`: what a build asks per kernel (has_workload, commit_workload, the top record: MetaScheduleApplyDatabase's
  query), here for every workload; a model's build asks for its own kernels only, so `build_per_workload` is the
  number to scale.
Printed as JSON: per variant the median seconds of each step, `ours ÷ tvm` for each, and whether both answered every
query alike (each workload's run times and best record), which the ratios are worth nothing without.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

from prune_compile.backends.tvm.tuning import DATABASE_FILES as FILES

VARIANTS = ("tvm", "ours")


def largest_database(root: str) -> str:
    """The directory under `root` whose record file is the largest."""
    candidates = [os.path.join(root, d) for d in os.listdir(root)] if os.path.isdir(root) else []
    sized = [(os.path.getsize(os.path.join(d, FILES[1])), d) for d in candidates
             if os.path.exists(os.path.join(d, FILES[1]))]
    if not sized:
        sys.exit(f"error: no tuning database under {root}; tune something first (prune-compile ... --tune 300) or "
                 "name a database directory")
    return max(sized)[1]


def run_variant(variant: str, directory: str) -> dict:
    """One round of one variant, in this process: seconds per step and a digest of every answer."""
    from tvm.s_tir import meta_schedule as ms

    from prune_compile.backends.tvm.tuning_database import dumps, open_database

    paths = [os.path.join(directory, f) for f in FILES]
    mods = []
    with open(paths[0]) as f:
        for line in f:
            mods.append(ms.database.Workload.from_json(json.loads(line)).mod)
    times = {}
    start = time.perf_counter()
    database = open_database(*paths) if variant == "ours" else ms.database.JSONDatabase(*paths)
    times["open"] = time.perf_counter() - start
    start = time.perf_counter()
    if variant == "ours":
        seconds = [database.valid_means(mod) for mod in mods]
    else:
        seconds = [[sum(s.value for s in r.run_secs) / len(r.run_secs)
                    for r in database.get_top_k(database.commit_workload(mod), 1 << 30)]
                   if database.has_workload(mod) else [] for mod in mods]
    times["tune"] = time.perf_counter() - start
    start = time.perf_counter()
    best = [database.get_top_k(database.commit_workload(mod), 1) if database.has_workload(mod) else []
            for mod in mods]
    times["build"] = time.perf_counter() - start
    digest = hashlib.sha256(json.dumps(seconds).encode())
    for records in best:
        digest.update(b"".join(dumps(ms._ffi_api.TuningRecordAsJSON(r)).encode() for r in records) + b";")
    return {"seconds": times, "workloads": len(mods), "records": len(database), "answers": digest.hexdigest()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", nargs="?", help="a tuning database directory (default: the largest under "
                                                     "the default root)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.directory is None:
        from prune_compile.backends.tvm import default_database_root

        args.directory = largest_database(default_database_root())
    if not all(os.path.exists(os.path.join(args.directory, f)) for f in FILES):
        sys.exit(f"error: {args.directory} holds no tuning database ({' and '.join(FILES)})")
    if args.worker:
        print(json.dumps(run_variant(args.worker, args.directory)))
        return
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            proc = subprocess.run([sys.executable, __file__, args.directory, "--worker", variant],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"error: the {variant} round failed:\n{proc.stderr[-2000:]}")
            runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first = runs["ours"][0]
    result: dict = {"directory": args.directory, "workloads": first["workloads"], "records": first["records"],
                    "rounds": args.rounds,
                    "same_answers": len({r["answers"] for v in VARIANTS for r in runs[v]}) == 1}
    for variant in VARIANTS:
        medians = {step: statistics.median(r["seconds"][step] for r in runs[variant])
                   for step in ("open", "tune", "build")}
        medians["build_per_workload"] = medians["build"] / max(first["workloads"], 1)
        result[variant] = {step: round(s, 4) for step, s in medians.items()}
    result["ours_over_tvm"] = {step: round(result["ours"][step] / result["tvm"][step], 4) if result["tvm"][step]
                               else None for step in ("open", "tune", "build")}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
