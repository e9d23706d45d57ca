"""Torch surgery: apply a plan to the user's own `nn.Module`, in place, so it can be fine-tuned.

Input is the `plan.json` document (made on this module through either importer). Each parameter or buffer named
in the plan is sliced along the planned axes (a new `nn.Parameter` keeps `requires_grad`); then the modules'
shape attributes are made consistent with their tensors: Conv (in/out channels, groups of depthwise convs), Linear,
BatchNorm/InstanceNorm (num_features), LayerNorm (normalized_shape), GroupNorm (num_channels), Embedding, LSTM, GRU
and RNN (input_size, hidden_size),
MultiheadAttention (embed_dim, head_dim; heads when whole heads went), and integer attributes that name a pruned
width (`hidden_dim`, `embed_dim`, `dim`, `num_features`, `channels`, `in_channels`, `width`, ...: torchvision's ViT
reshapes with one) on the modules that hold the pruned tensors, when that width became one new width there.

Constants the importer folded from parameters map back to them by the plan's element map (`maps`: a cat of
biases, a reshape round trip, a gain times a weight); without one (ONNX plans, untracked ops) a fold from one
parameter maps back when its shape leaves one reading (an expand, a size-1 reshape, a 2-D transpose), else this fails
naming the constant: never a guess. Split sizes, reshape widths and slice bounds the code keeps in
attributes follow the plan's `splits`, `reshapes` and `slices`.
Finally the module runs on the example inputs; a shape error names the module path (model code that hard-codes
a width cannot be fixed by slicing).
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import UnsupportedModelError, UsageError
from ..ir.ops import RECURRENT_GATES

WIDTH_ATTRIBUTES = ("hidden_dim", "embed_dim", "dim", "num_features", "channels", "in_channels", "out_channels",
                    "in_chs", "out_chs", "expand_chs", "width", "dim_out", "out_dim")  # RexNet, CSPNet, Hiera


def removals_from_plan(doc: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> dict[str, dict[int, set]]:
    """state_dict name → axis → removed indices (union over the groups touching that axis)."""
    out: dict[str, dict[int, set]] = {}
    for group in doc.get("groups", []):
        if not group.get("removed"):
            continue
        for m in group["members"]:
            if not m["removed"]:
                continue
            if "maps" in m:
                parts = _unfold_mapped(m)
            elif m.get("folded"):
                parts = [(*_unfold(m, shapes), set(m["removed"]))]
            else:
                parts = [(m["param"], m["axis"], set(m["removed"]))]
            for name, axis, removed in parts:
                if name not in shapes and m.get("role") == "passthrough":
                    continue  # a constant the importer made (GroupNorm's per-group scale): not module state
                if name not in shapes and "maps" in m:
                    raise UnsupportedModelError(f"plan prunes '{m['param']}', which is partly '{name}': not a "
                                                "parameter or buffer of this module (a tensor its code makes, or "
                                                "the plan was made for a different model)")
                if name not in shapes:
                    raise UnsupportedModelError(f"plan names '{name}', which this module does not have: the plan "
                                                "was made for a different model")
                out.setdefault(name, {}).setdefault(axis, set()).update(removed)
    return out


def _unfold_mapped(member: Mapping[str, Any]) -> list[tuple[str, int, set]]:
    """A folded constant's removed indices in its sources, by the importer's index map (`maps`: source, source
    axis, offset, length per segment, and the source's first index where it is not 0; a `cat` of q_bias, k_bias and
    v_bias has three, an LSTM's W one per gate block, each from its own rows of weight_ih)."""
    local: dict[tuple[str, int], dict[tuple[int, int], list[set]]] = {}
    for name, axis, offset, length, *start in member["maps"]:
        first = start[0] if start else 0
        local.setdefault((name, axis), {}).setdefault((first, length), []).append(
            {first + i - offset for i in member["removed"] if offset <= i < offset + length})
    parts = []
    for (name, axis), by_range in local.items():
        removed: set = set()
        for segments in by_range.values():
            if any(s != segments[0] for s in segments):  # cat((w, w)): one slice of w cannot remove different rows
                raise UnsupportedModelError(f"plan prunes '{member['param']}' (axis {member['axis']}), which repeats "
                                            f"'{name}' axis {axis} with different channels removed in each copy: "
                                            "torch surgery cannot slice the one parameter both ways")
            removed |= segments[0]
        if removed:
            parts.append((name, axis, removed))
    return parts


def _unfold(member: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> tuple[str, int]:
    """Map a folded constant's axis back to its single source parameter (broadcast or 2-D transpose only)."""
    param = member["param"]
    sources = param[len("folded("):-1].split("+") if param.startswith("folded(") else []
    if len(sources) != 1 or sources[0] not in shapes:
        raise UnsupportedModelError(f"plan prunes '{param}', a constant folded from {sources or 'unknown'}: cannot "
                                    "map it back to one parameter for torch surgery")
    src = sources[0]
    src_shape = tuple(shapes[src])
    folded_shape = member.get("shape")
    axis = member["axis"]
    if folded_shape is not None:
        folded_shape = tuple(folded_shape)
        lead = len(folded_shape) - len(src_shape)
        if lead >= 0 and axis - lead >= 0 and folded_shape[lead:] == src_shape:
            return src, axis - lead
        if len(src_shape) == 2 and folded_shape == src_shape[::-1] and src_shape[0] != src_shape[1]:
            return src, 1 - axis
        # A reshape that only adds or drops size-1 axes keeps the others in order (ConvNeXt's
        # gamma.reshape(1, -1, 1, 1)): the pruned axis is the source's axis of the same rank among them.
        wide = [a for a, d in enumerate(folded_shape) if d != 1]
        src_wide = [a for a, d in enumerate(src_shape) if d != 1]
        if axis in wide and [folded_shape[a] for a in wide] == [src_shape[a] for a in src_wide]:
            return src, src_wide[wide.index(axis)]
    raise UnsupportedModelError(f"plan prunes '{param}' (axis {axis}), folded from '{src}' by an operation whose "
                                "axis mapping is ambiguous: torch surgery cannot apply it")


def apply_plan_to_module(module, doc: Mapping[str, Any], example_inputs: Sequence[Any] | None = None):
    """Slice `module` in place according to the plan document; returns the module. See the module docstring. On
    any error the module is left as it was (tensors, attributes and submodules), so a refused plan costs nothing."""
    if doc.get("format") != "prune-compile.plan/1":
        raise UsageError(f"not a prune-compile plan (format {doc.get('format')!r})")
    states, storages = _snapshot(module)
    try:
        return _apply_plan(module, doc, example_inputs)
    except BaseException:
        for m, state in states:
            vars(m).clear()
            vars(m).update(state)
        for t, data in storages:
            t.data = data
        raise


def _snapshot(module) -> tuple[list[tuple[Any, dict[str, Any]]], list[tuple[Any, Any]]]:
    """Every submodule's attributes (its parameter, buffer and child dicts copied) and every tensor's storage, to
    put back if surgery fails. Surgery replaces tensors rather than editing them (in-place edits go to copies:
    _rescale_queries), so keeping the old objects is enough; no tensor is cloned."""
    states = []
    for m in module.modules():
        state = dict(vars(m))
        for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            if key in state:
                state[key] = state[key].copy()
        states.append((m, state))
    tensors = {id(t): t for m in module.modules() for t in [*m._parameters.values(), *m._buffers.values()]
               if t is not None}
    return states, [(t, t.data) for t in tensors.values()]


def _apply_plan(module, doc: Mapping[str, Any], example_inputs: Sequence[Any] | None):
    import torch

    # A tensor shared by several modules (tied weights, CoaT's shared position encoding) has several names; the
    # plan may use any of them. Slice it once, and give every owner the same new tensor so it stays shared.
    named = dict([*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)])
    aliases: dict[int, list[str]] = {}
    for n, t in named.items():
        aliases.setdefault(id(t), []).append(n)
    removals: dict[str, dict[int, set]] = {}
    for name, axes in removals_from_plan(doc, {n: tuple(t.shape) for n, t in named.items()}).items():
        for alias in aliases[id(named[name])]:
            for axis, removed in axes.items():
                removals.setdefault(alias, {}).setdefault(axis, set()).update(removed)
    old_sizes: dict[tuple[str, int], int] = {}
    done: set[str] = set()
    for name, axes in sorted(removals.items()):
        if name in done:
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        tensor = getattr(owner, attr)
        done.update(aliases[id(tensor)])
        new = tensor.detach()
        for axis, removed in sorted(axes.items()):
            size = new.shape[axis]
            if max(removed) >= size:
                raise UnsupportedModelError(f"plan removes index {max(removed)} of '{name}' axis {axis} (size {size})")
            keep = torch.as_tensor(np.setdiff1d(np.arange(size), sorted(removed)), dtype=torch.long,
                                   device=new.device)
            new = new.index_select(axis, keep)
        new = new.contiguous().clone()
        if isinstance(tensor, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=tensor.requires_grad)
        for alias in aliases[id(tensor)]:
            alias_path, _, alias_attr = alias.rpartition(".")
            alias_owner = module.get_submodule(alias_path) if alias_path else module
            for axis in axes:
                old_sizes[(alias, axis)] = tensor.shape[axis]
            if isinstance(new, torch.nn.Parameter):
                setattr(alias_owner, alias_attr, new)
            else:
                alias_owner.register_buffer(alias_attr, new,
                                            persistent=alias_attr not in alias_owner._non_persistent_buffers_set)
    # read before anything changes
    split_updates = _split_attribute_updates(module, doc.get("splits", []), doc.get("reshapes", []),
                                             doc.get("slices", []))
    _fix_module_attributes(module, old_sizes, removals, doc.get("analysis", {}).get("attention") == "heads")
    for (path, attr), (old, new, heads) in split_updates.items():
        owner = module.get_submodule(path)
        if heads is not None and getattr(owner, heads[0]) != heads[1]:
            continue  # whole heads went: the width per head stays
        # the graph's split beats the width map's guess for a list (InceptionNeXt's (in - 3 gc, gc, gc, gc)), not
        # a rule that knows the module (LeViT's key_dim)
        if isinstance(old, (list, tuple)) or getattr(owner, attr) == old:
            setattr(owner, attr, new)
    # (a constant folded from no module tensor, an RNN's zero initial state, is recomputed by nothing)
    computed = sorted({m["param"] for g in doc.get("groups", []) if g.get("removed") for m in g["members"]
                       if m.get("computed") and m["removed"] and m.get("maps", True)})
    if computed:
        warnings.warn(f"torch surgery: {', '.join(computed[:3])}{' ...' if len(computed) > 3 else ''} reach the "
                      "graph through arithmetic folded at import (weight standardization, say): the module "
                      "recomputes it from the kept channels, so where it mixes channels the pruned module differs "
                      "from the pruned graph (prune_module measures by how much)", stacklevel=2)
    if example_inputs is not None:
        _check_runs(module, example_inputs)
    return module


def _normalized_shape(m) -> tuple | None:
    shape = getattr(m, "normalized_shape", None)
    return tuple(shape) if isinstance(shape, (tuple, list)) else None


def _fix_module_attributes(root, old_sizes: Mapping[tuple[str, int], int], removals: Mapping[str, dict[int, set]],
                           heads_mode: bool) -> None:
    import torch
    from torch import nn

    handled = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
               nn.Embedding, nn.MultiheadAttention, nn.RNNBase)
    shrunk_from = _widths_shrunk(root, old_sizes)
    split_from = _removed_by_width(old_sizes, removals)
    for path, m in root.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            w = m.weight  # conv: [out, in/groups, ...]; transposed: [in, out/groups, ...]
            old_first = m.in_channels if m.transposed else m.out_channels
            if m.groups > 1 and m.groups == m.in_channels:  # depthwise: groups follow the channel count
                m.groups = w.shape[0] * m.groups // old_first
            if m.transposed:
                m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
            else:
                m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups
            if m.in_channels % m.groups or m.out_channels % m.groups:
                raise UnsupportedModelError(f"'{path}': channels {m.in_channels}->{m.out_channels} are not divisible "
                                            f"by groups={m.groups} after pruning")
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.Bilinear):
            m.out_features, m.in1_features, m.in2_features = m.weight.shape
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            ref = m.weight if m.weight is not None else m.running_mean
            if ref is not None:
                m.num_features = ref.shape[0]
        elif _normalized_shape(m) is not None and isinstance(getattr(m, "weight", None), torch.Tensor):
            # LayerNorm, RMSNorm and lookalikes (timm's RmsNorm): the shape follows the affine weight
            if m.weight.dim() == len(m.normalized_shape):
                m.normalized_shape = tuple(m.weight.shape)
        elif isinstance(m, nn.GroupNorm) and m.weight is not None:
            old_channels, m.num_channels = m.num_channels, m.weight.shape[0]
            removed = removals.get(f"{path}.weight", {}).get(0, set())
            m.num_groups = _groups_after(old_channels, m.num_groups, removed) or m.num_groups
            if m.num_channels % m.num_groups:
                raise UnsupportedModelError(f"'{path}': {m.num_channels} channels are not divisible by "
                                            f"num_groups={m.num_groups} after pruning")
        elif isinstance(m, nn.Embedding):
            m.num_embeddings, m.embedding_dim = m.weight.shape
        elif isinstance(m, nn.RNNBase):
            _fix_recurrent(path, m)
        elif isinstance(m, nn.MultiheadAttention):
            _fix_attention(path, m, heads_mode, old_sizes)
        elif type(m).__name__ in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2") and hasattr(m, "qkv"):
            _fix_window_attention(path, m, heads_mode, old_sizes)
        elif all(isinstance(vars(m).get(a), int) for a in ("key_dim", "val_dim", "num_heads")):
            _fix_key_value_dims(path, m, removals, old_sizes)
        elif _head_dim_attribute(m) is not None or (isinstance(vars(m).get("num_heads"), int)
                                                     and (hasattr(m, "qkv") or hasattr(m, "q"))):
            _fix_head_attributes(path, m, heads_mode, removals, old_sizes)
        widths = shrunk_from.get(path) if not isinstance(m, handled) else None
        for attr in WIDTH_ATTRIBUTES if widths else ():
            value = vars(m).get(attr)  # an instance attribute, not a property computed from the tensors
            if isinstance(value, int) and not isinstance(value, bool) and value in widths:
                setattr(m, attr, widths[value])
        for attr, value in list(vars(m).items()) if widths else ():
            # sizes kept as a tuple or list: MetaFormer's Scale (dim, 1, 1), FocalNet's split [dim, dim, L + 1]
            if isinstance(value, (tuple, list)) and value and all(type(d) is int for d in value):
                mapped = (_split_after(value, split_from.get(path, {}), widths)
                          or type(value)(widths.get(d, d) if d > 1 else d for d in value))
                if mapped != value:
                    setattr(m, attr, mapped)
        if widths and "norm" in type(m).__name__.lower() and isinstance(getattr(m, "groups", None), int):
            # a group normalization kept as a module attribute (timm's EvoNorm-S): its own tensors' channels
            own = next(((old_sizes[(n, 0)], axes[0]) for n, axes in sorted(removals.items())
                        if n.rpartition(".")[0] == path and 0 in axes), None)
            if own is not None and own[0] % m.groups == 0:
                m.groups = _groups_after(own[0], m.groups, own[1]) or m.groups


def _fix_recurrent(path: str, m) -> None:
    """nn.LSTM / GRU / RNN: input_size and hidden_size follow the sliced weights; every layer and direction must
    keep one hidden size (the importer ties their units through the initial state, so a plan of the torch path
    does), and the layer's flat weight list must point at the new tensors."""
    gates = RECURRENT_GATES.get(m.mode.lower(), 1)  # mode: LSTM, GRU, RNN_TANH, RNN_RELU
    m.input_size = m.weight_ih_l0.shape[1]
    hidden = {getattr(m, n).shape[1] for n in m._flat_weights_names if n.startswith("weight_hh")}
    rows = {getattr(m, n).shape[0] for n in m._flat_weights_names if n.startswith(("weight_ih", "weight_hh"))}
    if len(hidden) != 1 or rows != {gates * min(hidden)}:
        raise UnsupportedModelError(f"'{path}': nn.{type(m).__name__} needs one hidden size in every layer and "
                                    f"direction; the plan keeps {sorted(hidden)} (weight rows {sorted(rows)})")
    m.hidden_size = hidden.pop()
    m._init_flat_weights()


def _widths_shrunk(root, old_sizes: Mapping[tuple[str, int], int]) -> dict[str, dict[int, int]]:
    """Per module path: old width -> new width, over the tensors of the module and of every module inside it (an
    attention block's `embed_dim` is its projections' width, Res2Net's `width` its ModuleList's convs'). A width
    that became two different ones there is left out: the attribute cannot say which."""
    found: dict[str, dict[int, set[int]]] = {}
    for (name, axis), old in old_sizes.items():
        path, _, attr = name.rpartition(".")
        owner = root.get_submodule(path) if path else root
        new = getattr(owner, attr).shape[axis]
        parts = path.split(".") if path else []
        for depth in range(len(parts) + 1):
            found.setdefault(".".join(parts[:depth]), {}).setdefault(old, set()).add(new)
    return {p: {old: next(iter(new)) for old, new in widths.items() if len(new) == 1} for p, widths in found.items()}


_SPLIT_SIZE_NAME = re.compile(r"dim|split|chs|channels|^d[hkqv]?$")  # an integer attribute that may hold a width


def _split_attribute_updates(root, splits: Sequence[Mapping[str, Any]], reshapes: Sequence[Mapping[str, Any]] = (),
                             slices: Sequence[Mapping[str, Any]] = ()
                             ) -> dict[tuple[str, str], tuple[Any, Any, tuple[str, int] | None]]:
    """Split sizes, reshape targets and slice bounds the module keeps in attributes (the plan's `splits`, `reshapes`
    and `slices`) of the module that splits, reshapes or slices, or, for a split, of the innermost module around it
    that has such attributes (torch's decomposition can give a split the scope of its consumer: SKNet's split lands
    in each path's conv), torch.nn's own layers skipped (their attributes follow their tensors). (module path,
    attribute) -> (old, new, heads), only where every split, reshape and slice of that module agrees; see
    _split_attributes_of for what matches."""
    found: dict[tuple[str, str], set] = {}
    old: dict[tuple[str, str], Any] = {}
    per_head: dict[tuple[str, str], tuple[str, int] | None] = {}
    for split in [*splits, *map(_reshape_as_split, reshapes), *map(_slice_as_split, slices)]:
        parts = split["module"].split(".") if split["module"] else []
        for depth in range(len(parts), -1 if split.get("outward", True) else len(parts) - 1, -1):
            path = ".".join(parts[:depth])
            try:
                m = root.get_submodule(path)
            except AttributeError:
                break
            if type(m).__module__.startswith("torch.nn."):
                continue
            matches = _split_attributes_of(m, split)
            for attr, (values, heads) in matches.items():
                found.setdefault((path, attr), set()).update(values)
                old[(path, attr)] = vars(m)[attr]
                per_head[(path, attr)] = heads
            if matches:
                break
    updates = {}
    for key, values in found.items():
        if len(values) == 1:
            new = next(iter(values))
            updates[key] = (old[key], list(new) if isinstance(old[key], list) else new, per_head[key])
    return updates


def _reshape_as_split(reshape: Mapping[str, Any]) -> dict[str, Any]:
    """A reshape's changed target sizes, matched like a split's sizes but not as a whole (they are several axes),
    and only in the module that reshapes: reshapes are everywhere, and a module around one may hold an unrelated
    width of the same value (LeViT's attention downsampling holds key_attn_dim == the width its subsampling
    reshapes; taken for a key width, it broke the split of k and v)."""
    pairs = [(d, n) for d, n in zip(reshape["shape"], reshape["kept"], strict=True) if d != n]
    return {"module": reshape["module"], "sizes": [d for d, _ in pairs], "kept": [n for _, n in pairs],
            "whole": False, "outward": False}


def _slice_as_split(sl: Mapping[str, Any]) -> dict[str, Any]:
    """A slice's moved bounds, matched like a reshape's sizes (only in the module that slices), by any integer
    attribute name: a bound is where the model code parts a tensor, and it names that width as it likes (DPN's
    `num_1x1_c`). Bounds at either end of the axis are no width the code holds."""
    pairs = [(b, k) for b, k in zip(sl["bounds"], sl["kept"], strict=True) if b != k and 0 < b < sl["size"]]
    return {"module": sl["module"], "sizes": [b for b, _ in pairs], "kept": [k for _, k in pairs],
            "whole": False, "outward": False, "named": False}


def _split_attributes_of(m, split: Mapping[str, Any]) -> dict[str, tuple[set, tuple[str, int] | None]]:
    """The attributes of `m` that hold sizes of `split`, and the values they could take: a list or tuple equal to
    the sizes takes the kept sizes; an integer attribute named like a width (`dim_conv3`, `dim_qk`, `key_dim`, `d`,
    ...) equal to some sizes takes their kept size (several values: ambiguous), else one equal to their sum the kept
    sum (SKNet's in_channels), else one equal to some sizes over the module's head count (BoTNet's `dim_head_qk`,
    q's width per head) their kept size over it, as long as the head count stays (then the head attribute and its
    count come along). A slice's bounds (`named` false) match integer attributes of any name, by equality only, and
    only an attribute whose value no other attribute of the module holds (two of them: which one the code slices at
    is a guess)."""
    kept_of: dict[int, set[int]] = {}
    for size, kept in zip(split["sizes"], split["kept"], strict=True):
        kept_of.setdefault(size, set()).add(kept)
    heads_attr = _head_count_attribute(m)
    heads = vars(m)[heads_attr] if heads_attr else 0
    whole, named = split.get("whole", True), split.get("named", True)
    holders = Counter(v for v in vars(m).values() if type(v) is int)
    matches: dict[str, tuple[set, tuple[str, int] | None]] = {}
    for attr, value in vars(m).items():
        if whole and isinstance(value, (list, tuple)) and list(value) == split["sizes"]:
            matches[attr] = ({tuple(split["kept"])}, None)
        elif type(value) is int and attr != heads_attr and not named:
            if value in kept_of and holders[value] == 1:
                matches[attr] = (set(kept_of[value]), None)
        elif type(value) is int and attr != heads_attr and _SPLIT_SIZE_NAME.search(attr):
            if value in kept_of:
                matches[attr] = (set(kept_of[value]), None)
            elif whole and value == sum(split["sizes"]):
                matches[attr] = ({sum(split["kept"])}, None)
            elif heads > 1 and value * heads in kept_of:  # a count that does not divide is no width per head
                matches[attr] = ({k // heads if k % heads == 0 else -1 for k in kept_of[value * heads]},
                                 (heads_attr, heads))
    return matches


_HEAD_COUNT_NAMES = ("n_heads", "num_heads", "heads")


def _head_count_attribute(m) -> str | None:
    return next((a for a in _HEAD_COUNT_NAMES if type(vars(m).get(a)) is int), None)


def _removed_by_width(old_sizes: Mapping[tuple[str, int], int],
                      removals: Mapping[str, dict[int, set]]) -> dict[str, dict[int, frozenset]]:
    """Per module path: old width -> the indices removed from every tensor axis of that width in the module and the
    modules inside it, where that is one set (else left out)."""
    found: dict[str, dict[int, set[frozenset]]] = {}
    for (name, axis), old in old_sizes.items():
        path = name.rpartition(".")[0]
        parts = path.split(".") if path else []
        for depth in range(len(parts) + 1):
            found.setdefault(".".join(parts[:depth]), {}).setdefault(old, set()).add(frozenset(removals[name][axis]))
    return {p: {old: next(iter(r)) for old, r in by.items() if len(r) == 1} for p, by in found.items()}


def _split_after(sizes: Sequence[int], removed_by_width: Mapping[int, frozenset], widths: Mapping[int, int]):
    """Split sizes of a pruned axis (MambaOut's split_indices (hidden, hidden - conv, conv) over fc1's rows,
    FocalNet's [dim, dim, L + 1]): what each segment keeps of the removed indices. Only where the sizes sum to a
    pruned width of this module and one of them is a pruned width itself (a kernel size (3, 3) is neither)."""
    removed = removed_by_width.get(sum(sizes))
    if removed is None or len(sizes) < 2 or not any(d > 1 and d in widths for d in sizes):
        return None
    out, start = [], 0
    for d in sizes:
        out.append(d - sum(1 for i in removed if start <= i < start + d))
        start += d
    return type(sizes)(out)


def _groups_after(channels: int, groups: int, removed: set) -> int | None:
    """The group count once `removed` of `channels` in `groups` equal groups go. The dependency pass removes whole
    groups (GroupNorm's reshape nests them: the count follows) or the same offsets in every group (a split whose
    inner axis carries the channels: the count stays). Neither (None): the module does not group these channels
    on the path that was analyzed (EvoNorm-S without its activation), so its count is left alone."""
    width = channels // groups
    blocks = {i // width for i in removed}
    if len(removed) == len(blocks) * width:  # every group touched went entirely
        return groups - len(blocks)
    offsets = [sorted(i % width for i in removed if i // width == g) for g in range(groups)]
    return groups if all(o == offsets[0] for o in offsets) else None


def _rescale_queries(weight, bias, rows: slice | list[int], factor: float) -> None:
    """Multiply the query rows of a (fused qkv) projection by `factor`, in place."""
    import torch

    with torch.no_grad():
        for t in (weight, bias) if bias is not None else (weight,):
            t.data = t.data.clone()  # never the storage the module had: a refused plan restores it as it was
            t[rows] *= factor


def _fix_window_attention(path: str, m, heads_mode: bool, old_sizes) -> None:
    """torchvision's Swin attention: num_heads is an attribute; v1 scales queries by (C // num_heads) ** -0.5
    computed at run time, so a smaller head_dim would change the scale: fold the original scale into q."""
    old = old_sizes.get((f"{path}.qkv.weight", 0))
    if old is None:
        return
    old_c, new_c = old // 3, m.qkv.weight.shape[0] // 3
    old_head_dim = old_c // m.num_heads
    if heads_mode:
        if new_c % old_head_dim:
            raise UnsupportedModelError(f"'{path}': width {new_c} is not a whole number of heads of {old_head_dim}")
        m.num_heads = new_c // old_head_dim
    elif new_c % m.num_heads:
        raise UnsupportedModelError(f"'{path}': width {new_c} is not divisible by num_heads={m.num_heads}")
    new_head_dim = new_c // m.num_heads
    if type(m).__name__ == "ShiftedWindowAttention" and new_head_dim != old_head_dim:
        _rescale_queries(m.qkv.weight, m.qkv.bias, slice(0, new_c), (new_head_dim / old_head_dim) ** 0.5)


def _fix_head_attributes(path: str, m, heads_mode: bool, removals: Mapping[str, dict[int, set]], old_sizes) -> None:
    """Attention modules that keep a head width (`head_dim`, timm's `dim_head`) and a head count as attributes and
    project q, k, v with one fused Linear (`qkv`/`to_qkv`) or a separate `q` (torchvision's MaxViT; timm's ViTs,
    MaxViT, NextViT): update whichever the plan shrank. Whole heads go in heads mode, and also where the analysis
    could only prune whole heads (rotary position embeddings pair channels inside a head: EVA-02)."""
    heads_attr = next((a for a in _HEAD_COUNT_NAMES if isinstance(getattr(m, a, None), int)), None)
    proj = next((a for a in ("to_qkv", "qkv", "q") if hasattr(m, a) and hasattr(getattr(m, a), "weight")), None)
    dim_attr = _head_dim_attribute(m)
    if heads_attr is None or proj is None:
        return
    old = old_sizes.get((f"{path}.{proj}.weight", 0))
    if old is None:
        return
    heads = getattr(m, heads_attr)
    if dim_attr is None:  # head_dim derived from the width at run time (XCiT's XCA, CaiT's ClassAttn)
        parts = 1 if proj == "q" else 3
        if old % (parts * heads):
            return
        head_dim = old // (parts * heads)
    else:
        # q, k and v, only k and v where the queries come from elsewhere (GCViT's global attention), or a separate
        # q (NextViT): rows as the attention's width before pruning tell which
        head_dim = getattr(m, dim_attr)
        parts = old // (heads * head_dim) if old % (heads * head_dim) == 0 else 3
    new_width = getattr(m, proj).weight.shape[0] // parts
    removed = removals.get(f"{path}.{proj}.weight", {}).get(0, set())
    if dim_attr is None and (new_width % heads or len({sum(1 for i in removed if i // (old // parts) == p)
                                                        for p in range(parts)}) > 1):
        return  # not q, k, v of equal widths (a lambda layer's qkv): leave it, the run check names the module
    if heads_mode or _whole_heads(removed, old // parts, head_dim):
        if new_width % head_dim:
            raise UnsupportedModelError(f"'{path}': width {new_width} is not a whole number of heads of {head_dim}")
        setattr(m, heads_attr, new_width // head_dim)
    else:
        if new_width % heads:
            raise UnsupportedModelError(f"'{path}': width {new_width} is not divisible by {heads_attr}={heads}")
        if dim_attr is not None:
            setattr(m, dim_attr, new_width // heads)
        if isinstance(getattr(m, "fused_attn", None), bool) and new_width // heads != head_dim:
            _keep_timm_scale(path, m, proj, heads, head_dim, new_width // heads)
    if isinstance(getattr(m, "attn_dim", None), int):  # timm: the heads' output is reshaped to attn_dim
        m.attn_dim = new_width


def _whole_heads(removed_rows: set, width: int, head_dim: int) -> bool:
    """Whether the removed rows of a projection made of parts (q, k, v) of `width` rows each are whole heads."""
    blocks: dict[tuple[int, int], int] = {}
    for i in removed_rows:
        key = (i // width, i % width // head_dim)  # (part, head)
        blocks[key] = blocks.get(key, 0) + 1
    return bool(blocks) and all(n == head_dim for n in blocks.values())


def _fix_key_value_dims(path: str, m, removals: Mapping[str, dict[int, set]],
                        old_sizes: Mapping[tuple[str, int], int]) -> None:
    """LeViT-style attention (LeViT, TinyViT, EfficientFormer): each head's rows of the fused projection are
    [q (key_dim), k (key_dim), v (val_dim)] (`kv`: [k, v]), split by those attributes. Read the new dims off the
    rows the plan removed, which must be the same in every head."""
    heads, kd, vd = m.num_heads, m.key_dim, m.val_dim
    for proj, segments in (("qkv", (kd, kd, vd)), ("kv", (kd, vd))):
        block = sum(segments)
        rows = next((axes[0] for name, axes in removals.items() if name.startswith(f"{path}.{proj}.") and 0 in axes
                     and old_sizes.get((name, 0)) == heads * block), None)
        if rows is not None:
            break
    else:
        return
    bounds = np.cumsum((0, *segments))
    counts = {tuple(sum(1 for r in rows if r // block == h and lo <= r % block < hi)
                    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)) for h in range(heads)}
    if len(counts) != 1:
        raise UnsupportedModelError(f"'{path}': the plan removes different q/k/v dims in different heads")
    (removed,) = counts
    new_kd, new_vd = kd - removed[-2], vd - removed[-1]
    if len(segments) == 3 and removed[0] != removed[1]:
        raise UnsupportedModelError(f"'{path}': the plan removes {removed[0]} query dims but {removed[1]} key dims")
    m.key_dim, m.val_dim = new_kd, new_vd
    for attr, value in (("key_attn_dim", new_kd * heads), ("val_attn_dim", new_vd * heads)):
        if isinstance(vars(m).get(attr), int):
            setattr(m, attr, value)


def _head_dim_attribute(m) -> str | None:
    return next((a for a in ("head_dim", "dim_head") if isinstance(getattr(m, a, None), int)), None)


def _keep_timm_scale(path: str, m, proj: str, heads: int, old_head_dim: int, head_dim: int) -> None:
    """timm's attention scales by its stored `scale` unfused, but fused SDPA takes head_dim ** -0.5 from q's
    shape: fold the original scale into q (after its q_norm, if any) and store the new default, so both agree."""
    factor = (head_dim / old_head_dim) ** 0.5
    q_norm = getattr(m, "q_norm", None)
    if q_norm is not None and type(q_norm).__name__ != "Identity":
        weight = getattr(q_norm, "weight", None)
        if weight is None:
            raise UnsupportedModelError(f"'{path}': its q_norm has no weight to keep the attention scale in after "
                                        "head_dim shrank (prune whole heads: --attention heads)")
        _rescale_queries(weight, getattr(q_norm, "bias", None), slice(None), factor)
    else:
        qkv = getattr(m, proj)
        if getattr(m, "head_first", False):  # timm's MaxViT: rows [q k v] per head
            rows = [h * 3 * head_dim + i for h in range(heads) for i in range(head_dim)]
        else:
            rows = slice(0, heads * head_dim)
        _rescale_queries(qkv.weight, qkv.bias, rows, factor)
    if isinstance(getattr(m, "scale", None), float):
        m.scale = head_dim ** -0.5


def _fix_attention(path: str, m, heads_mode: bool, old_sizes) -> None:
    if m._qkv_same_embed_dim:
        inner = m.in_proj_weight.shape[0] // 3
        embed_in = m.in_proj_weight.shape[1]
    else:
        inner = m.q_proj_weight.shape[0]
        embed_in = m.q_proj_weight.shape[1]
    embed_out = m.out_proj.weight.shape[0]
    if not (inner == embed_in == embed_out == m.out_proj.weight.shape[1]):
        raise UnsupportedModelError(f"'{path}': nn.MultiheadAttention needs one width for its input, projections "
                                    f"and output; the plan gives {embed_in}/{inner}/{embed_out} (prune the "
                                    "attention and the residual stream by the same ratio, or ignore one of them)")
    if heads_mode and inner != m.embed_dim:  # whole heads went: head_dim stays
        if inner % m.head_dim:
            raise UnsupportedModelError(f"'{path}': width {inner} is not a whole number of heads of {m.head_dim}")
        m.num_heads = inner // m.head_dim
    if inner % m.num_heads:
        raise UnsupportedModelError(f"'{path}': width {inner} is not divisible by num_heads={m.num_heads}")
    old_head_dim = m.head_dim
    m.embed_dim = m.kdim = m.vdim = inner
    m.head_dim = inner // m.num_heads
    if m.head_dim != old_head_dim:  # attention scales by head_dim ** -0.5 at run time: keep the original scale
        factor = (m.head_dim / old_head_dim) ** 0.5
        if m._qkv_same_embed_dim:
            _rescale_queries(m.in_proj_weight, m.in_proj_bias, slice(0, inner), factor)
        else:
            _rescale_queries(m.q_proj_weight, m.in_proj_bias, slice(0, inner), factor)


def _check_runs(module, example_inputs: Sequence[Any]) -> None:
    import torch

    was_training = module.training
    module.eval()
    hooks = [m.register_forward_pre_hook(_group_norm_width_check(path))
             for path, m in module.named_modules() if isinstance(m, torch.nn.GroupNorm) and m.weight is None]
    hooks += [m.register_forward_pre_hook(_normalized_shape_follows)
              for m in module.modules() if _normalized_shape(m) is not None and getattr(m, "weight", None) is None]
    running: list[tuple[str, Any]] = []  # modules entered and not left: on an error, the last one raised it

    def leave(m, args, out) -> None:  # a hook's non-None return value would replace the output
        running.pop()

    for path, m in module.named_modules():
        hooks.append(m.register_forward_pre_hook(lambda m, args, path=path: running.append((path, m))))
        hooks.append(m.register_forward_hook(leave))
    try:
        with torch.no_grad():
            module(*example_inputs)
    except UnsupportedModelError:
        raise
    except Exception as e:
        where = next((f"in '{p}' ({type(m).__name__}): " for p, m in reversed(running) if p), "")
        what = (str(e).splitlines() or [""])[0][:300] or type(e).__name__  # an AssertionError may say nothing
        raise UnsupportedModelError(f"the pruned module does not run: {where}{what} (model code that hard-codes "
                                    "a width cannot be fixed by slicing tensors)") from e
    finally:
        module.train(was_training)
        for h in hooks:
            h.remove()


def _normalized_shape_follows(m, args) -> None:
    """A LayerNorm or RMSNorm without a weight has nothing in the plan either, but it normalizes whatever trailing
    axes it is given: it takes the pruned width it receives (its width is checked only by that shape)."""
    import torch

    if args and isinstance(args[0], torch.Tensor):
        k = len(m.normalized_shape)
        if tuple(args[0].shape[-k:]) != tuple(m.normalized_shape):
            m.normalized_shape = tuple(int(d) for d in args[0].shape[-k:])


def _group_norm_width_check(path: str):
    """A GroupNorm without affine parameters has nothing in the plan that says its width changed: one group
    takes the width it receives; with several, refuse to run rather than normalize over the wrong groups."""
    def check(m, args) -> None:
        if args and args[0].shape[1] != m.num_channels:
            if m.num_groups == 1:
                m.num_channels = int(args[0].shape[1])
                return
            raise UnsupportedModelError(f"'{path}': GroupNorm(affine=False) built for {m.num_channels} channels "
                                        f"receives {args[0].shape[1]}; its group count cannot be read from the plan "
                                        "(ignore the layers that feed it)")
    return check
