"""How :func:`lorax.lora` applies a view primitive (one that changes how a kernel is seen without
consuming it) to a LoRA kernel.

Transposes, casts, reshapes, stack-axis slices and squeezes, copies, gradient stops, barriers
and per-array markers update the :class:`lorax.lora_value.LoRAValue` (its permutation, or each
of ``w``, ``a``, ``b`` and a DoRA magnitude) so the kernel stays factorized until a consumer in
:mod:`lorax.rules` uses it. Which kernel axes each result axis holds comes from
:mod:`lorax.axis_views`, the functions :func:`lorax.infer_axes` follows axes with. A rule returns
``None`` when it cannot keep the kernel factorized; the interpreter then materializes it with a
warning.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from lorax import compat
from lorax.axis_views import (
    View,
    reshape_axes,
    single_axes,
    slice_axes,
    squeeze_axes,
    transpose_axes,
)
from lorax.lora_value import LoRAValue
from lorax.node import LoRA
from lorax.quantized import is_quantized


def _view(v: LoRAValue, axes_of, eqn) -> View:
    """The view function's effect on ``v`` (canonical kernel axes)."""
    return axes_of(single_axes(v.perm), eqn)


def transpose_rule(invals, eqn):
    (v,) = invals
    axes = _view(v, transpose_axes, eqn).axes
    return v.with_node(v.node, tuple(min(a) for a in axes))


def convert_rule(invals, eqn):
    (v,) = invals
    dtype = eqn.params["new_dtype"]
    if not jnp.issubdtype(dtype, jnp.floating):
        return None
    n = v.node
    node = dataclasses.replace(n, w=n.w.astype(dtype), a=n.a.astype(dtype), b=n.b.astype(dtype))
    return v.with_node(node)


def reshape_rule(invals, eqn):
    """A reshape that regroups the kernel's input axes among themselves and its output axes
    among themselves (stack axes kept) reshapes ``w``, ``a`` and ``b`` alike."""
    (v,) = invals
    node = v.node
    axes = _view(v, reshape_axes, eqn).axes
    if v.routed or axes is None or v.perm != tuple(range(v.ndim)) or not node.is_canonical:
        return None  # materialize() names a routed kernel
    s = node.n_stack
    lay = node.axes_layout
    groups = {"s": set(lay.stack), "i": set(lay.ins), "o": set(lay.outs)}
    roles = []
    for a in axes:
        role = next((c for c, g in groups.items() if a <= g), None) if a else ""
        if role is None:
            return None  # an axis merging input with output (or stack) axes
        roles.append(role)
    # An inserted size-1 axis is an input before the first output axis, else an output.
    first_out = roles.index("o") if "o" in roles else len(roles)
    roles = "".join(r or ("i" if k < first_out else "o") for k, r in enumerate(roles))
    new = tuple(eqn.params["new_sizes"])
    if (roles[:s] != "s" * s or axes[:s] != single_axes(range(s)) or "s" in roles[s:]
            or roles[s:] != "i" * roles.count("i") + "o" * roles.count("o")):
        return None
    ins, outs = new[s:s + roles.count("i")], new[s + roles.count("i"):]
    node = dataclasses.replace(
        node,
        w=node.w.reshape(new),
        a=jnp.reshape(node.a, (*new[:s], *ins, node.rank)),
        b=jnp.reshape(node.b, (*new[:s], node.rank, *outs)),
        magnitude=None if node.magnitude is None
        else jnp.reshape(node.magnitude, (*new[:s], *outs)),
        n_in=len(ins),
    )
    return LoRAValue(node, v.key, tuple(range(len(new))))


def _map_stack_axis(node: LoRA, c: int, fn) -> LoRA:
    """Applies ``fn(array, axis)`` along canonical stack axis ``c`` of every data field: axis
    ``canonical_order[c]`` of ``w``, axis ``c`` of ``a``, ``b`` and a DoRA magnitude."""
    w_axis = node.canonical_order[c]
    m = node.magnitude
    # A quantized w is dequantized first: its codes are blocked per leading layer only.
    return dataclasses.replace(node, w=fn(node.float_w(), w_axis), a=fn(node.a, c),
                               b=fn(node.b, c), magnitude=None if m is None else fn(m, c))


def without_stack_axes(v: LoRAValue, dropped: list[int], node: LoRA) -> LoRAValue:
    """``v`` after the program axes ``dropped`` (size-1 or sliced-away stack axes) are gone.

    ``node`` already has those axes removed from its fields; this fixes its static layout and
    the view's permutation.
    """
    canon = sorted(v.perm[d] for d in dropped)
    lay = v.node.axes_layout.without([v.node.canonical_order[c] for c in canon])
    # The roles stay explicit (canonical or not) while squeeze drops axes one by one.
    node = dataclasses.replace(node, n_stack=lay.n_stack, layout=lay.roles)
    perm = tuple(p - sum(c < p for c in canon) for d, p in enumerate(v.perm) if d not in dropped)
    return LoRAValue(node, v.key, perm, v.routed)


def _stack_slice(v: LoRAValue, eqn) -> list[int] | None:
    """The program axes a slice or squeeze narrows, when they all hold stack axes (else
    ``None``)."""
    axes_of = squeeze_axes if eqn.primitive.name == "squeeze" else slice_axes
    if v.routed or any(c >= v.node.n_stack for c in _view(v, axes_of, eqn).indexed):
        return None
    if eqn.primitive.name == "squeeze":
        return list(eqn.params["dimensions"])
    return [d for d, n in enumerate(eqn.outvars[0].aval.shape) if n != v.shape[d]]


def slice_rule(invals, eqn):
    """``w[i:j]`` along stack axes (e.g. ``w[0]`` of Gemma's gating kernel) slices every field."""
    (v,) = invals
    params = eqn.params
    start, limit, strides = params["start_indices"], params["limit_indices"], params["strides"]
    narrowed = _stack_slice(v, eqn)
    if narrowed is None:
        return None
    node = v.node
    for d in narrowed:
        step = 1 if strides is None else strides[d]
        node = _map_stack_axis(node, v.perm[d], lambda x, ax, d=d, step=step: lax.slice_in_dim(
            x, start[d], limit[d], step, ax))
    return v.with_node(node)


def dynamic_slice_rule(invals, eqn):
    """``lax.dynamic_slice`` (``w[i]`` with a traced ``i``) along stack axes."""
    v, *starts = invals
    narrowed = _stack_slice(v, eqn)
    if narrowed is None or any(isinstance(i, LoRAValue) for i in starts):
        return None
    sizes = eqn.params["slice_sizes"]
    node = v.node
    for d in narrowed:
        node = _map_stack_axis(node, v.perm[d], lambda x, ax, d=d: lax.dynamic_slice_in_dim(
            x, starts[d], sizes[d], ax))
    return v.with_node(node)


def squeeze_rule(invals, eqn):
    """Dropping size-1 stack axes (after ``w[0]``) drops them from every field."""
    (v,) = invals
    dims = _stack_slice(v, eqn)
    if dims is None:
        return None
    node = dataclasses.replace(v.node, layout=v.node.roles)  # fixed while axes are dropped
    for c in sorted((v.perm[d] for d in dims), reverse=True):  # stack axes keep w's order
        node = _map_stack_axis(node, c, lambda x, ax: lax.squeeze(x, (ax,)))
    return without_stack_axes(v, dims, node)


def identity_rule(invals, eqn):
    del eqn
    return invals[0]


def stop_gradient_rule(invals, eqn):
    del eqn
    (v,) = invals
    n = v.node
    m = None if n.magnitude is None else lax.stop_gradient(n.magnitude)
    return v.with_node(dataclasses.replace(n, a=lax.stop_gradient(n.a), b=lax.stop_gradient(n.b),
                                           magnitude=m))


def per_array_rule(invals, eqn):
    """A shape-preserving primitive applied to ``w``, ``a``, ``b`` (and ``magnitude``)
    separately, so the kernel stays factorized: ``pvary`` (which ``shard_map`` inserts to mark
    a replicated W as device-varying) on every array, ``reduce_precision`` on the float ones
    (the factors are rounded like the kernel; a quantized ``w``'s codes are left alone)."""
    primitive, params = eqn.primitive, eqn.params
    floats_only = primitive.name == "reduce_precision"

    def apply(x):
        if x is None or floats_only and not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return compat.bind_each(primitive, x, params)

    def each(v):
        if not isinstance(v, LoRAValue):
            return apply(v)
        n = v.node
        w = jax.tree.map(apply, n.w)  # a quantized w: its codes and scales
        return v.with_node(dataclasses.replace(n, w=w, a=apply(n.a), b=apply(n.b),
                                               magnitude=apply(n.magnitude)))

    return compat.as_results(primitive, [each(v) for v in invals])


def barrier_rule(invals, eqn):
    """``lax.optimization_barrier`` over the operands, a kernel's arrays among them."""
    del eqn
    return list(lax.optimization_barrier(list(invals)))


def constraint_rule(invals, eqn):
    """A sharding constraint on the kernel constrains the frozen ``w`` (the factors have their
    own shapes and shardings, :func:`lorax.factor_specs`)."""
    (v,) = invals
    w = v.node.w
    if is_quantized(w) or v.w_perm != tuple(range(v.ndim)):
        return v  # the constraint names the program's axes, not w's
    return v.with_node(dataclasses.replace(v.node, w=compat.bind(eqn.primitive, [w], eqn.params)))
