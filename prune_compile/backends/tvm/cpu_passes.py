"""TIR passes our CPU builds skip: they leave the machine code of our kernels as it was and cost build time.

`tirx.RemoveNoOp` runs twice in TVM's TIR pipeline and walks every statement of a kernel; LLVM drops whatever no-op it
would have removed. Session 62: the best two records of 185 workloads (resnet18, its latency table's pruned widths,
mobilenet_v2) built without it gave the same assembly, byte for byte, in `tirx.build` 0.889x the time (a tuning
candidate is built this way, and every kernel of a build). `s_tir.HoistIfThenElse` as well would save a little
more (0.872x) but moved instructions in 10 of the 185: not skipped. Builds for the GPU run TVM's pipeline as is.
Candidates and the library skip the same passes, so the code tuning measured is the code that ships.
"""

from __future__ import annotations

SKIPPED = ("tirx.RemoveNoOp",)


def build_context(target):
    """The current PassContext with `SKIPPED` disabled for an LLVM (CPU) target; for others nothing changes."""
    import contextlib

    import tvm

    if target.kind.name != "llvm":
        return contextlib.nullcontext()
    current = tvm.transform.PassContext.current()
    return tvm.transform.PassContext(opt_level=current.opt_level, required_pass=list(current.required_pass),
                                     disabled_pass=[*current.disabled_pass, *SKIPPED],
                                     instruments=list(current.instruments), config=dict(current.config))
