"""The `serial` marker under pytest-xdist (tests/conftest.py): `make test` runs the suite on several workers, and a
test marked serial (it times code on this machine) must run with no other test beside it."""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_serial_tests_run_alone_on_several_workers(tmp_path) -> None:
    log = tmp_path / "ran.txt"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider",
                           "--basetemp", str(tmp_path / "probe"), os.path.join(HERE, "serial_probe.py")],
                          cwd=os.path.dirname(HERE),
                          env=dict(os.environ, SERIAL_PROBE_LOG=str(log)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ran = {name: (float(began), float(ended)) for name, began, ended in
           (line.split() for line in log.read_text().splitlines())}
    assert len(ran) == 8
    shared = [span for name, span in ran.items() if name.startswith("shared")]
    assert any(a[0] < b[1] and b[0] < a[1] for a in shared for b in shared if a != b), "the workers never overlapped"
    for name, (began, ended) in ran.items():
        if name.startswith("serial"):
            beside = [other for other, (b, e) in ran.items() if other != name and b < ended and began < e]
            assert not beside, f"{name} ran beside {beside}"
