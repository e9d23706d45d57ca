"""Layout transforms lowered as gathers (backends/tvm/layout_transforms.py): the same values as TVM's lowering, an
injective op FuseOps can fuse, and TVM's own lowering kept where the transform pads."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

INJECTIVE = 2  # TVM's op patterns: 0 elementwise, 1 broadcast, 2 injective, ..., 8 opaque


def _lowered(shape, index_map, pad_value=None, ours: bool = True):
    """(module after LegalizeOps + AnnotateTIROpPattern, the transform's PrimFunc) for one layout_transform."""
    import tvm
    from tvm import relax

    from prune_compile.backends.tvm.layout_transforms import legalize_layout_transform

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.layout_transform(x, index_map, pad_value=pad_value))
        bb.emit_func_output(y)
    hooks = {"relax.layout_transform": legalize_layout_transform} if ours else {}
    # as in the build: our hooks first, whatever they leave to TVM in the zero pipeline's LegalizeOps
    mod = tvm.transform.Sequential([relax.transform.LegalizeOps(hooks), relax.transform.LegalizeOps(),
                                    relax.transform.AnnotateTIROpPattern()])(bb.get())
    (prim,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return mod, prim


def _run(mod, value: np.ndarray) -> np.ndarray:
    import tvm
    from tvm import relax

    from prune_compile.backends.tvm.targets import make_target

    target = make_target("cpu")
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(value)).numpy()


MAPS = {  # name: (input shape, index map, whether it moves channels into or out of blocks)
    "NCHW -> NCHW16c": ((1, 32, 5, 7), lambda n, c, h, w: (n, c // 16, h, w, c % 16), True),
    "NCHW8c -> NCHW": ((1, 4, 5, 7, 8), lambda n, cb, h, w, c: (n, cb * 8 + c, h, w), True),
    "OIHW -> OIHW16i16o": ((32, 48, 3, 3), lambda o, i, h, w: (o // 16, i // 16, h, w, i % 16, o % 16), True),
    "NCHW -> NHWC": ((1, 32, 5, 7), lambda n, c, h, w: (n, h, w, c), False),
}


@pytest.mark.parametrize("name", list(MAPS))
def test_gathers_compute_what_tvms_lowering_computes_and_are_injective(name: str) -> None:
    shape, index_map, blocks = MAPS[name]
    value = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ours, prim = _lowered(shape, index_map)
    theirs, their_prim = _lowered(shape, index_map, ours=False)
    assert int(prim.attrs["op_pattern"]) <= INJECTIVE
    if blocks:  # TVM writes these as scatters, which it calls opaque (a permutation's lowering is injective)
        assert int(their_prim.attrs["op_pattern"]) > INJECTIVE
    np.testing.assert_array_equal(_run(ours, value), _run(theirs, value))


def test_a_padding_transform_keeps_tvms_lowering() -> None:
    """20 channels in blocks of 16: the second block is padded, which the inverse map cannot name an input for;
    TVM lowers it as a gather with a guard (injective already)."""
    shape = (1, 20, 3, 3)
    value = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    mod, prim = _lowered(shape, lambda n, c, h, w: (n, c // 16, h, w, c % 16), pad_value=0.0)
    assert [gv.name_hint for gv, f in mod.functions_items() if f.same_as(prim)] == ["te_layout_transform_with_pad"]
    out = _run(mod, value)
    np.testing.assert_array_equal(out[:, 0], value[:, :16].transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(out[:, 1, :, :, :4], value[:, 16:].transpose(0, 2, 3, 1))
    assert not out[:, 1, :, :, 4:].any()


def test_a_transform_out_of_blocks_fuses_into_the_ops_after_it() -> None:
    """PP-OCR's detection head: the blocked 1x1 conv a transposed conv becomes feeds its pixel shuffle (NCHW); the
    transform between them was a kernel of its own."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from prune_compile.backends.tvm.build import converted_layouts, own_lowerings
    from prune_compile.backends.tvm.targets import make_target

    from .test_tvm_layout_guard import CONSUMERS, consumer_model

    model = consumer_model(*CONSUMERS["DB head (ConvTranspose, BN, ReLU, ConvTranspose, Sigmoid)"])
    mod = converted_layouts(from_onnx(model, keep_params_in_input=False), "NCHWc", 16)
    with make_target("cpu"):
        mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                        relax.transform.LegalizeOps(own_lowerings(16)),
                                        relax.get_pipeline("zero")])(mod)
    kernels = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    alone = [k for k in kernels if "layout_transform" in k and not k.startswith("fused_")]
    assert len(alone) == 1  # into the first conv's blocks: a conv fuses no producer
    assert any(k.startswith("fused_layout_transform") and "reshape" in k for k in kernels)
