"""Rules for primitives that change how a LoRA kernel is viewed without consuming it.

Transposes, casts, reshapes, stack-axis slices and squeezes, copies and gradient stops update
the :class:`lorax.lora_value.LoRAValue` (its permutation, or each of ``w``, ``a``, ``b`` and a
DoRA magnitude) so the kernel stays factorized until a consumer in :mod:`lorax.rules` uses it.
A rule returns ``None`` when it cannot keep the kernel factorized; the interpreter then
materializes it with a warning.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from lorax import compat
from lorax.lora_value import LoRAValue
from lorax.node import LoRA


def transpose_rule(invals, params):
    (v,) = invals
    return v.with_node(v.node, tuple(v.perm[p] for p in params["permutation"]))


def convert_rule(invals, params):
    (v,) = invals
    dtype = params["new_dtype"]
    if not jnp.issubdtype(dtype, jnp.floating):
        return None
    n = v.node
    node = dataclasses.replace(n, w=n.w.astype(dtype), a=n.a.astype(dtype), b=n.b.astype(dtype))
    return v.with_node(node)


def reshape_rule(invals, params):
    (v,) = invals
    node = v.node
    if v.routed:
        return None  # materialize() names the kernel
    new = tuple(params["new_sizes"])
    s = node.n_stack
    if (params.get("dimensions") is not None or v.perm != tuple(range(v.ndim))
            or not node.is_canonical):
        return None
    if new[:s] != node.shape[:s]:
        return None
    in_size = math.prod(node.in_shape)
    for k in range(s + 1, len(new)):
        if math.prod(new[s:k]) == in_size:
            ins, outs = new[s:k], new[k:]
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
    return None


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
    w_axes = {v.node.canonical_order[c] for c in canon}
    roles = "".join(r for j, r in enumerate(v.node.roles) if j not in w_axes)
    node = dataclasses.replace(node, n_stack=node.n_stack - len(canon), layout=roles)
    perm = tuple(p - sum(c < p for c in canon) for d, p in enumerate(v.perm) if d not in dropped)
    return LoRAValue(node, v.key, perm, v.routed)


def _sliced_stack_axes(v: LoRAValue, sizes) -> list[int] | None:
    """The program axes a slice narrows, when all of them are stack axes (else ``None``)."""
    narrowed = [d for d, n in enumerate(sizes) if n != v.shape[d]]
    if v.routed or any(v.perm[d] >= v.node.n_stack for d in narrowed):
        return None
    return narrowed


def slice_rule(invals, params):
    """``w[i:j]`` along stack axes (e.g. ``w[0]`` of Gemma's gating kernel) slices every field."""
    (v,) = invals
    start, limit, strides = params["start_indices"], params["limit_indices"], params["strides"]
    narrowed = _sliced_stack_axes(v, [hi - lo for lo, hi in zip(start, limit, strict=True)])
    if narrowed is None:
        return None
    node = v.node
    for d in narrowed:
        step = 1 if strides is None else strides[d]
        node = _map_stack_axis(node, v.perm[d], lambda x, ax, d=d, step=step: lax.slice_in_dim(
            x, start[d], limit[d], step, ax))
    return v.with_node(node)


def dynamic_slice_rule(invals, params):
    """``lax.dynamic_slice`` (``w[i]`` with a traced ``i``) along stack axes."""
    v, *starts = invals
    if any(isinstance(i, LoRAValue) for i in starts):
        return None
    sizes = params["slice_sizes"]
    narrowed = _sliced_stack_axes(v, sizes)
    if narrowed is None:
        return None
    node = v.node
    for d in narrowed:
        node = _map_stack_axis(node, v.perm[d], lambda x, ax, d=d: lax.dynamic_slice_in_dim(
            x, starts[d], sizes[d], ax))
    return v.with_node(node)


def squeeze_rule(invals, params):
    """Dropping size-1 stack axes (after ``w[0]``) drops them from every field."""
    (v,) = invals
    dims = list(params["dimensions"])
    if v.routed or any(v.perm[d] >= v.node.n_stack for d in dims):
        return None
    node = dataclasses.replace(v.node, layout=v.node.roles)  # fixed while axes are dropped
    for c in sorted((v.perm[d] for d in dims), reverse=True):  # stack axes keep w's order
        node = _map_stack_axis(node, c, lambda x, ax: lax.squeeze(x, (ax,)))
    return without_stack_axes(v, dims, node)


def identity_rule(invals, params):
    del params
    return invals[0]


def stop_gradient_rule(invals, params):
    del params
    (v,) = invals
    n = v.node
    m = None if n.magnitude is None else lax.stop_gradient(n.magnitude)
    return v.with_node(dataclasses.replace(n, a=lax.stop_gradient(n.a), b=lax.stop_gradient(n.b),
                                           magnitude=m))


def per_array_rule(primitive):
    """A rule applying a shape-preserving primitive to ``w``, ``a``, ``b`` (and ``magnitude``)
    separately, so the kernel stays factorized (e.g. ``pvary``, which ``shard_map`` inserts to
    mark a replicated W as device-varying)."""

    def rule(invals, params):
        def apply(x):
            return None if x is None else compat.bind_each(primitive, x, params)

        def each(v):
            if not isinstance(v, LoRAValue):
                return apply(v)
            n = v.node
            w = jax.tree.map(apply, n.w)  # a quantized w: its codes and scales
            return v.with_node(dataclasses.replace(n, w=w, a=apply(n.a), b=apply(n.b),
                                                   magnitude=apply(n.magnitude)))

        return compat.as_results(primitive, [each(v) for v in invals])

    return rule
