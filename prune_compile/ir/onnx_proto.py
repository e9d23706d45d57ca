"""Editing ONNX protos in place (ONNX Runtime's fused ops lowered, symbolic dims restored): the default-domain
opset a node is read at, and fresh names for the values and nodes added."""

from __future__ import annotations

import onnx


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default domain ("" or "ai.onnx") the model imports; 0 if none."""
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    return opsets.get("ai.onnx", 0)


class FreshNames:
    """Names not yet used in `model` (initializers, inputs, node outputs, node names), or among `taken`: `hint`, or
    `hint_K`."""

    def __init__(self, model: onnx.ModelProto | None = None, taken: set[str] | None = None) -> None:
        self.taken = set(taken or ())
        if model is not None:
            g = model.graph
            self.taken |= {t.name for t in g.initializer} | {i.name for i in g.input}
            self.taken |= {o for n in g.node for o in n.output} | {n.name for n in g.node}

    def __call__(self, hint: str) -> str:
        k, name = 0, hint
        while name in self.taken:
            k += 1
            name = f"{hint}_{k}"
        self.taken.add(name)
        return name
