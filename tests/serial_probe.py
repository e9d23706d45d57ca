"""Run by test_test_workers.py with pytest-xdist, not collected on its own (the name does not start with test_):
tests that append when they ran to $SERIAL_PROBE_LOG, two of them marked `serial`."""

from __future__ import annotations

import os
import time

import pytest


def _ran(name: str) -> None:
    began = time.monotonic()
    time.sleep(0.4)
    with open(os.environ["SERIAL_PROBE_LOG"], "a") as f:
        f.write(f"{name} {began} {time.monotonic()}\n")


@pytest.mark.serial
@pytest.mark.parametrize("i", range(2))
def test_alone(i: int) -> None:
    _ran(f"serial{i}")


@pytest.mark.parametrize("i", range(6))
def test_shared(i: int) -> None:
    _ran(f"shared{i}")
