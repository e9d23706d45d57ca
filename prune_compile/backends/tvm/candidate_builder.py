"""MetaSchedule's builder with its worker processes kept between calls.

TVM's LocalBuilder starts a new pool of worker processes for every batch of candidates it builds (a memory leak in
long-lived workers is its reason), and each worker imports TVM first: 2.5 s of CPU per worker here, on both cores at
once, while nothing else runs. A tuning run sends one batch per search iteration of each task (32 candidates at
most), and the TVM latency table tunes one small model per layer shape with a single 8-trial batch: a third of each
table entry's ~8 s was the two workers starting. Here the pool lives as long as the builder and each worker is
replaced after `MAX_USES` candidates, which bounds what it can leak; a worker that times out or crashes is replaced
at the next candidate (TVM's PopenPoolExecutor does both). One builder's workers are alive at a time: tuning for
another target (another builder) ends them.
"""

from __future__ import annotations

from collections.abc import Callable

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

# Candidates one worker builds before it is replaced: a bound on the leak TVM restarts its pools for, at one start
# per 64 candidates instead of one per batch. (Session 59: each of two workers went from 755 to 760 MB resident, most
# of it TVM's shared libraries, over 24 candidates of resnet18's convs.)
MAX_USES = 64


def _build_and_export(f_build: Callable, f_export: Callable | None, mod, target) -> str:
    """A worker's job: one candidate built and exported; the artifact's path goes back to the runner. MetaSchedule's
    default export is looked up here: a TVM global function does not pickle."""
    if f_export is None:
        from tvm.s_tir.meta_schedule.builder.local_builder import default_export as f_export
    return f_export(f_build(mod, target, None))


_active: KeptPoolBuilder | None = None  # the builder whose workers are alive


@derived_object
class KeptPoolBuilder(PyBuilder):
    """`LocalBuilder(f_build=..., f_export=..., timeout_sec=..., max_workers=...)` whose workers outlive a batch.
    `f_export` None is MetaSchedule's default export (a tar the local runner loads)."""

    def __init__(self, f_build: Callable, f_export: Callable | None, timeout_sec: float, max_workers: int) -> None:
        super().__init__()
        self.f_build, self.f_export = f_build, f_export
        self.timeout_sec, self.max_workers = timeout_sec, max_workers
        self._pool: PopenPoolExecutor | None = None

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        global _active
        if _active is not self:  # one kept pool per process: a process tuning for several targets keeps one
            if _active is not None:
                _active.shutdown()
            _active = self
        if self._pool is None:
            self._pool = PopenPoolExecutor(max_workers=self.max_workers, timeout=self.timeout_sec,
                                           maximum_process_uses=MAX_USES)
        jobs = [(self.f_build, self.f_export, b.mod, b.target) for b in build_inputs]
        results = []
        for done in self._pool.map_with_error_catching(lambda job: _build_and_export(*job), jobs):
            if done.status == StatusKind.COMPLETE:
                results.append(BuilderResult(done.value, None))
            elif done.status == StatusKind.TIMEOUT:
                results.append(BuilderResult(None, f"KeptPoolBuilder: timeout, killed after {self.timeout_sec} s"))
            else:
                results.append(BuilderResult(None, f"KeptPoolBuilder: an exception occurred\n{done.value}"))
        return results

    def shutdown(self) -> None:
        """End the workers now (they end with the process otherwise)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
