"""IR core: self-syncing use-def links, verify(), toposort, cleanup, dump."""

from __future__ import annotations

import numpy as np
import pytest

from prune_compile.errors import GraphError
from prune_compile.ir import Graph, Provenance, Value


def _small_graph() -> tuple[Graph, dict[str, Value]]:
    g = Graph(name="t")
    x = Value("x", (1, 4), np.float32)
    w = Value("w", (3, 4), np.float32, data=np.ones((3, 4), np.float32), provenance=Provenance("onnx_initializer", "w"))
    h = Value("h", (1, 3), np.float32)
    y = Value("y", (1, 3), np.float32)
    g.inputs.append(x)
    g.add_node("linear", [x, w], [h], name="fc")
    g.add_node("relu", [h], [y], name="act")
    g.outputs.append(y)
    return g, {"x": x, "w": w, "h": h, "y": y}


def test_use_def_links_follow_input_assignment() -> None:
    g, v = _small_graph()
    fc, act = g.nodes
    assert v["h"].producer is fc and v["h"].users == [act]
    assert v["x"].users == [fc]
    z = Value("z", (1, 3), np.float32)
    act.inputs = [z]
    assert v["h"].users == [] and z.users == [act]
    act.set_input(0, v["h"])
    assert v["h"].users == [act] and z.users == []


def test_a_value_has_one_producer() -> None:
    g, v = _small_graph()
    with pytest.raises(GraphError, match="already produced"):
        g.add_node("relu", [v["x"]], [v["h"]], name="dup")


def test_verify_accepts_a_good_graph_and_names_the_broken_node() -> None:
    g, v = _small_graph()
    g.verify()
    g.nodes[0].attrs["bogus"] = 1  # attributes the op ignores are harmless
    g.verify()
    v["h"].shape = (1, 5)
    with pytest.raises(GraphError, match="'fc'"):
        g.verify()


def test_verify_catches_shape_mismatch_in_weights() -> None:
    g, v = _small_graph()
    v["w"].data = np.ones((3, 5), np.float32)
    with pytest.raises(GraphError, match="constant 'w'"):
        g.verify()


def test_verify_catches_wrong_order_and_toposort_repairs_it() -> None:
    g, _ = _small_graph()
    g.nodes.reverse()
    with pytest.raises(GraphError, match="before its producer"):
        g.verify()
    g.toposort()
    assert [n.name for n in g.nodes] == ["fc", "act"]
    g.verify()


def test_cleanup_removes_dead_nodes_and_their_uses() -> None:
    g, v = _small_graph()
    dead = Value("dead", (1, 4), np.float32)
    g.add_node("sigmoid", [v["x"]], [dead], name="unused")
    assert g.cleanup() == 1
    assert v["x"].users == [g.nodes[0]]
    g.verify()


def test_replace_all_uses_and_remove_node() -> None:
    g, v = _small_graph()
    act = g.nodes[1]
    g.replace_all_uses(v["y"], v["h"])
    assert g.outputs == [v["h"]]
    g.remove_node(act)
    assert v["h"].users == []
    g.verify()


def test_dump_is_readable() -> None:
    g, _ = _small_graph()
    text = g.dump()
    assert "%h[1,3] = linear(%x, @w)" in text
    assert "input  %x: [1,4] float32" in text
    assert g.summary()["ops"] == {"linear": 1, "relu": 1}
