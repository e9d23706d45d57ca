"""The machine's float32 FMA peak, measured (prune_compile/backends/fma_peak.py). Prints JSON.

Run: .venv/bin/python tools/fma_peak.py [--threads N] [--seconds S] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import os

from prune_compile.backends.fma_peak import measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seconds", type=float, default=0.3, help="each run's length")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(json.dumps(measure(args.threads, args.seconds, args.repeats)))


if __name__ == "__main__":
    main()
