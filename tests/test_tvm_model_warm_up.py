"""How long the TVM latency engines warm a whole model up before each timed slice: WARMUP_S, at most WARMUP_RUNS
runs, at least 3 (backends/tvm/board_timing.py). The search alternates two models in 0.2 s slices, and a model's
first dozen runs after the other's are slow whatever its size: a fast model is warm after those runs, long before
WARMUP_S."""

from __future__ import annotations

import pytest

from prune_compile.backends.tvm import board_timing, latency_timer


def _calls(monkeypatch, warm_up_s: float) -> int:
    monkeypatch.setattr(board_timing, "WARMUP_S", warm_up_s)
    calls: list[int] = []
    assert latency_timer._warm_up(lambda: calls.append(1)) > 0
    return len(calls)


def test_a_fast_model_warms_up_for_its_runs_not_for_the_seconds(monkeypatch) -> None:
    assert _calls(monkeypatch, 60.0) == board_timing.WARMUP_RUNS  # the runs come long before 60 s


def test_a_slow_model_warms_up_for_the_seconds_and_three_runs_at_least(monkeypatch) -> None:
    assert _calls(monkeypatch, 0.0) == 3


@pytest.mark.parametrize(("each", "runs"), [(1e-5, board_timing.WARMUP_RUNS),
                                            (board_timing.WARMUP_S / 5, 5), (1.0, 3)])
def test_a_board_warms_a_model_up_as_this_machine_does(each, runs) -> None:
    assert board_timing.warm_up_runs(each) == runs
