"""A value per model object, for the last few models: what timing a model again and again needs (an ONNX Runtime
session, a compiled executable's digest) without rebuilding it from the model's bytes each time."""

from __future__ import annotations

from collections.abc import Callable


class RecentModels:
    """A value per model object (a session, a reading) for the last `keep` models, each held so that its id stays
    its own: the search times a plan and the original in alternating slices, and building either again every slice
    cost up to half a slice. So a model must not be changed in place between two uses."""

    def __init__(self, keep: int = 2) -> None:
        self.keep, self._by_id = keep, {}

    def get(self, proto, make: Callable):
        if id(proto) not in self._by_id:
            if len(self._by_id) >= self.keep:
                del self._by_id[next(iter(self._by_id))]
            self._by_id[id(proto)] = (proto, make(proto))
        return self._by_id[id(proto)][1]
