"""Layout transforms written as gathers, so that TVM fuses them with the ops next to them.

Why: Relax legalizes `layout_transform` by scheduling a copy with `transform_layout` on its output: each element is
written at its new place (a scatter), which TVM's op-pattern analysis calls opaque, so FuseOps never fuses a layout
transform with anything. Every transform is a pass of its own over the tensor, before and after the ops that
cannot take a blocked layout. In PP-OCRv4 det (pruned, 640x640) the last one, out of the detection head's 1x1 conv
(64 channels at 160x160, NCHW16c) into its pixel shuffle, took 1.6 ms of a 21 ms profile on its own.

What: `legalize_layout_transform`, the LegalizeOps hook, computes each output element from the input element the
inverse index map names (out[j] = in[inverse(j)]): an injective op, which FuseOps fuses into its consumers
(reshapes, slices, resizes, elementwise tails) or its elementwise producers. Transforms that pad (a channel count
the block does not divide) keep TVM's lowering, which writes those as guarded gathers already.
"""

from __future__ import annotations


def legalize_layout_transform(bb, call):
    """LegalizeOps hook for relax.layout_transform (module doc); returns `call` itself where TVM's default applies."""
    from tvm import te, tirx

    attrs = call.attrs
    ty = call.args[0].ty
    if ty.shape is None:
        return call
    shape = list(ty.shape.values)
    index_map = attrs.index_map
    inverse, padding = index_map.non_surjective_inverse(shape)
    if not isinstance(padding, tirx.IntImm) or int(padding) != 0:
        return call

    def gather(data):
        return te.compute(index_map.map_shape(shape), lambda *out: data[tuple(inverse.map_indices(list(out)))],
                          name="layout_transform")

    return bb.call_te(gather, call.args[0], primfunc_name_hint="layout_transform")
