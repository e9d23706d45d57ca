"""TIR passes our CPU builds skip: they leave the machine code of our kernels as it was and cost build time.

`tirx.RemoveNoOp` runs twice in TVM's TIR pipeline and walks every statement of a kernel; LLVM drops whatever no-op it
would have removed. Session 62: 271 tuned schedules (the best two of ~140 workloads of resnet18, its latency
table's pruned widths, mobilenet_v2 and the arm demo) built without it gave the same assembly, byte for byte, in
0.90x the `tirx.build` time. `s_tir.HoistIfThenElse` as well would save a little more but moved instructions in 10
of 185 schedules: not skipped. Builds for the GPU run TVM's pipeline as is.
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
