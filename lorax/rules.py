"""Factorized rules: how each primitive that consumes a LoRA kernel is computed low-rank.

Inside :func:`lorax.lora`, a kernel stands as a :class:`LoRAValue`: the node's frozen ``w``
(gradient-stopped), its factors, and a permutation that says how the value seen by the program
is laid out relative to the node's canonical ``(*stack, *in, *out)`` axes. Layout primitives
(transpose, reshape, dtype casts) update that view for free; consumers (``dot_general``,
``conv_general_dilated``, ``gather``) compute ``op(x, w) + s * op'(op(x, a), b)`` so no
full-size ``a @ b`` (nor its gradient) is ever formed. Anything else materializes
``w + s * a @ b`` with a :class:`LoRAFallbackWarning` naming the primitive and the path.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as prims

from lorax import compat, dora, routing
from lorax.node import LoRA


class LoRAFallbackWarning(UserWarning):
    """A LoRA kernel was consumed in a way lorax cannot factorize, so ``W + s·A·B`` was formed."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAValue:
    """A LoRA kernel as it flows through the interpreter (internal).

    The program sees ``transpose(node.w + s * a @ b, perm)``. ``key`` is the dropout key of this
    kernel (``None`` when dropout is off).
    """

    node: LoRA
    key: Any
    perm: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    # Per-example adapters (lorax.routing): a, b carry a batch axis after the stack axes.
    routed: bool = dataclasses.field(default=False, metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.node.shape[p] for p in self.perm)

    @property
    def ndim(self) -> int:
        return len(self.perm)

    def with_node(self, node: LoRA, perm: tuple[int, ...] | None = None) -> LoRAValue:
        return LoRAValue(node, self.key, self.perm if perm is None else perm, self.routed)

    def base(self) -> jax.Array:
        """The frozen kernel in the program's layout."""
        return _transpose(self.node.w, self.perm)

    def materialize(self, primitive: str) -> jax.Array:
        """``w + s * a @ b`` in the program's layout, with a warning: full-size cost."""
        if self.routed:
            raise routing.routing_error(self.node, f"`{primitive}` consumes it")
        warnings.warn(
            f"lorax.lora: `{primitive}` consumes the LoRA kernel at {self.node.path!r} in a way "
            "that cannot be factorized; materializing W + s*A@B (full-size compute and memory)",
            LoRAFallbackWarning,
            stacklevel=2,
        )
        return _transpose(self.node.merged(), self.perm)


def _transpose(x: jax.Array, perm: tuple[int, ...]) -> jax.Array:
    return x if perm == tuple(range(len(perm))) else lax.transpose(x, perm)


def _dropout(x: jax.Array, key: Any, rate: float) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def _axis_groups(node: LoRA) -> tuple[range, range, range]:
    s, i = node.n_stack, node.n_in
    return range(0, s), range(s, s + i), range(s + i, len(node.shape))


def _split_error(v: LoRAValue, primitive: str, contracted: list[int]) -> ValueError:
    node = v.node
    _, ins, _ = _axis_groups(node)
    width = len(node.shape) - node.n_stack
    rel = sorted(c - node.n_stack for c in contracted)
    suggestion, key = "", "^" + re.escape(node.path) + "$"
    if rel == list(range(len(rel))):
        suggestion = f" pass in_axes={{{key!r}: {len(rel)}}} to lorax.wrap"
    elif rel == list(range(width - len(rel), width)):
        suggestion = f" pass in_axes={{{key!r}: {width - len(rel)}}} to lorax.wrap"
    return ValueError(
        f"the LoRA kernel at {node.path!r} (shape {list(node.shape)}) is contracted by "
        f"`{primitive}` over its axes {sorted(contracted)}, but its factors were built with "
        f"in_axes={node.n_in} (input axes {list(ins)});"
        + (suggestion or " its factors cannot express this use; choose `in_axes` to match")
    )


def _dora_scale(node: LoRA, ndim: int, positions: dict[int, int], dtype: Any) -> jax.Array:
    """DoRA's ``m / ||W + sAB||_c`` laid out for an array of rank ``ndim`` (size-1 elsewhere).

    ``positions`` maps each canonical stack/output axis of the node to an axis of the target.
    The norm is gradient-stopped (the paper's section 4.3); ``m`` gets its gradient here.
    """
    norm = dora.adapted_norm(node.w, node.a, node.b, node.scale, node.n_stack, node.n_in)
    f = dora.factor(node.magnitude, lax.stop_gradient(norm))
    stack, _, outs = _axis_groups(node)
    canonical = [*stack, *outs]  # f's axes
    order = sorted(range(len(canonical)), key=lambda k: positions[canonical[k]])
    f = _transpose(f, tuple(order))
    shape = [1] * ndim
    for k in order:
        shape[positions[canonical[k]]] = node.shape[canonical[k]]
    return jnp.reshape(f, shape).astype(dtype)


def _rank_sharding(x: jax.Array, x_contract, x_batch, side: int) -> Any:
    """On meshes with Explicit axes, the sharding of ``x·a`` (``None`` elsewhere): x's batch
    and free axes keep their mesh axes, the rank axis is unsharded. JAX needs it spelled out
    when a contracted axis is sharded (row-parallel W, whose ``a`` is sharded the same way)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or jax.sharding.AxisType.Explicit not in tuple(mesh.axis_types or ()):
        return None
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    batch = [spec[d] for d in x_batch]
    free = [spec[d] for d in range(x.ndim) if d not in x_contract and d not in x_batch]
    rank_spec = (*batch, *free, None) if side == 1 else (*batch, None, *free)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*rank_spec))


def _lowrank_dot(v: LoRAValue, x: jax.Array, x_contract, x_batch, w_contract, w_batch, side,
                 params) -> jax.Array | None:
    """The low-rank term of ``dot_general`` with ``v`` on ``side`` (0 = lhs, 1 = rhs)."""
    node = v.node
    stack, ins, outs = _axis_groups(node)
    cw = [v.perm[d] for d in w_contract]
    bw = [v.perm[d] for d in w_batch]
    if sorted(bw) != list(stack):
        return None
    if sorted(cw) == list(ins):
        first, second = node.a, node.b
        first_axes, second_r_axis = cw, node.n_stack  # a keeps canonical stack/in positions
        free_canonical = list(outs)
    elif sorted(cw) == list(outs):
        first, second = node.b, node.a
        first_axes = [c - node.n_in + 1 for c in cw]  # b: (*stack, r, *out)
        second_r_axis = node.n_stack + node.n_in  # a: (*stack, *in, r)
        free_canonical = list(ins)
    else:
        raise _split_error(v, "dot_general", cw)
    dtype = x.dtype
    x = _dropout(x, v.key, node.dropout)
    first, second = first.astype(dtype), second.astype(dtype)
    nb = len(w_batch)
    precision, pref = params.get("precision"), params.get("preferred_element_type")
    if side == 1:
        t = lax.dot_general(x, first, ((x_contract, first_axes), (x_batch, bw)),
                            precision=precision,
                            out_sharding=_rank_sharding(x, x_contract, x_batch, side))
        t = t * jnp.asarray(node.scale, t.dtype)
        y = lax.dot_general(t, second, (([t.ndim - 1], [second_r_axis]), (range(nb), bw)),
                            precision=precision, preferred_element_type=pref)
        n_lead = y.ndim - len(free_canonical)  # batch + x-free axes come first
    else:
        t = lax.dot_general(first, x, ((first_axes, x_contract), (bw, x_batch)),
                            precision=precision,
                            out_sharding=_rank_sharding(x, x_contract, x_batch, side))
        t = t * jnp.asarray(node.scale, t.dtype)
        # t: (*batch, r, *x_free); contract r with the second factor's rank axis.
        y = lax.dot_general(second, t, (([second_r_axis], [nb]), (bw, range(nb))),
                            precision=precision, preferred_element_type=pref)
        n_lead = nb
    # The program wants w's free axes in its own order, not canonical order.
    wanted = [v.perm[d] for d in range(v.ndim) if d not in w_contract and d not in w_batch]
    order = [free_canonical.index(c) for c in wanted]
    if order != sorted(order):
        lead = list(range(n_lead))
        free = [n_lead + o for o in order]
        rest = list(range(n_lead + len(order), y.ndim))
        y = lax.transpose(y, (*lead, *free, *rest))
    return y


def dot_general_rule(invals, params):
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    lhs, rhs = invals
    if isinstance(lhs, LoRAValue) and isinstance(rhs, LoRAValue):
        return None
    side = 1 if isinstance(rhs, LoRAValue) else 0
    v, x = (rhs, lhs) if side == 1 else (lhs, rhs)
    xc, xb, wc, wb = (lc, lb, rc, rb) if side == 1 else (rc, rb, lc, lb)
    if v.routed:
        return routing.routed_dot(v, x, list(xc), list(xb), list(wc), list(wb), side, params,
                                  _dropout)
    node = v.node
    stack, _, outs = _axis_groups(node)
    cw, bw = [v.perm[d] for d in wc], [v.perm[d] for d in wb]
    dora_out = node.magnitude is not None and sorted(cw) != list(outs)
    if node.magnitude is not None and not dora_out and sorted(bw) == list(stack):
        # W's output axes are contracted (``x @ W.T``, e.g. Embed.attend): scale x instead.
        positions = {**dict(zip(cw, xc, strict=True)), **dict(zip(bw, xb, strict=True))}
        x = x * _dora_scale(node, x.ndim, positions, x.dtype)
    low = _lowrank_dot(v, x, list(xc), list(xb), list(wc), list(wb), side, params)
    if low is None:
        return None
    operands = (x, v.base()) if side == 1 else (v.base(), x)
    y = prims.dot_general_p.bind(*operands, **params)
    y = y + low.astype(y.dtype)
    if dora_out:
        # y = (*batch, *x_free, *w_free) for rhs kernels, (*batch, *w_free, *x_free) for lhs.
        free = [v.perm[d] for d in range(v.ndim) if d not in wc and d not in wb]
        first = y.ndim - len(free) if side == 1 else len(bw)
        positions = {c: k for k, c in enumerate(bw)}
        positions.update({c: first + j for j, c in enumerate(free)})
        y = y * _dora_scale(node, y.ndim, positions, y.dtype)
    return y


def conv_rule(invals, params):
    lhs, rhs = invals
    if isinstance(lhs, LoRAValue) or params["feature_group_count"] != 1:
        return None
    if rhs.routed:
        raise routing.routing_error(rhs.node, "a convolution consumes it")
    if params["batch_group_count"] != 1:
        return None
    v = rhs
    node = v.node
    _, ins, outs = _axis_groups(node)
    dn = params["dimension_numbers"]
    out_feature = dn.rhs_spec[0]
    if node.n_stack or len(outs) != 1 or v.perm[out_feature] != outs[0]:
        if node.n_stack == 0 and len(outs) == 1:
            contracted = [v.perm[d] for d in range(v.ndim) if d != out_feature]
            raise _split_error(v, "conv_general_dilated", contracted)
        return None
    y = prims.conv_general_dilated_p.bind(lhs, v.base(), **params)
    x = _dropout(lhs, v.key, node.dropout)
    a_kernel = _transpose(node.a.astype(x.dtype), v.perm)  # same layout, out features -> r
    t = prims.conv_general_dilated_p.bind(x, a_kernel, **{**params, "preferred_element_type": None})
    t = t * jnp.asarray(node.scale, t.dtype)
    feature = dn.out_spec[1]
    low = lax.dot_general(t, node.b.astype(t.dtype), (([feature], [0]), ([], [])),
                          precision=params.get("precision"))
    y = y + jnp.moveaxis(low, -1, feature).astype(y.dtype)
    if node.magnitude is not None:
        y = y * _dora_scale(node, y.ndim, {outs[0]: feature}, y.dtype)
    return y


def gather_rule(invals, params):
    operand, indices = invals
    if not isinstance(operand, LoRAValue) or isinstance(indices, LoRAValue):
        return None
    v, node = operand, operand.node
    if v.routed:
        raise routing.routing_error(node, "a gather (embedding lookup) consumes it")
    _, ins, outs = _axis_groups(node)
    dn = params["dimension_numbers"]
    if node.n_stack or len(outs) != 1 or dn.operand_batching_dims:
        return None
    out_axis = v.perm.index(outs[0])  # the program's axis holding the output features
    indexed = set(dn.collapsed_slice_dims) | set(dn.start_index_map)
    if out_axis in indexed or params["slice_sizes"][out_axis] != v.shape[out_axis]:
        return None
    y = prims.gather_p.bind(v.base(), indices, **params)
    a_view = _transpose(node.a, v.perm)
    slice_sizes = list(params["slice_sizes"])
    slice_sizes[out_axis] = node.rank
    t = prims.gather_p.bind(a_view, indices, **{**params, "slice_sizes": tuple(slice_sizes)})
    kept = [d for d in range(v.ndim) if d not in dn.collapsed_slice_dims]
    feature = dn.offset_dims[kept.index(out_axis)]
    t = _dropout(t, v.key, node.dropout) * jnp.asarray(node.scale, t.dtype)
    low = lax.dot_general(t, node.b.astype(t.dtype), (([feature], [0]), ([], [])))
    y = y + jnp.moveaxis(low, -1, feature).astype(y.dtype)
    if node.magnitude is not None:
        y = y * _dora_scale(node, y.ndim, {outs[0]: feature}, y.dtype)
    return y


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
    if params.get("dimensions") is not None or v.perm != tuple(range(v.ndim)):
        return None
    if new[:s] != node.shape[:s]:
        return None
    in_size = math.prod(node.in_shape)
    for k in range(s + 1, len(new)):
        if math.prod(new[s:k]) == in_size:
            ins, outs = new[s:k], new[k:]
            node = dataclasses.replace(
                node,
                w=jnp.reshape(node.w, new),
                a=jnp.reshape(node.a, (*new[:s], *ins, node.rank)),
                b=jnp.reshape(node.b, (*new[:s], node.rank, *outs)),
                magnitude=None if node.magnitude is None
                else jnp.reshape(node.magnitude, (*new[:s], *outs)),
                n_in=len(ins),
            )
            return LoRAValue(node, v.key, tuple(range(len(new))))
    return None


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
            return v.with_node(dataclasses.replace(n, w=apply(n.w), a=apply(n.a), b=apply(n.b),
                                                   magnitude=apply(n.magnitude)))

        return compat.as_results(primitive, [each(v) for v in invals])

    return rule


# Primitives that `jax.extend` does not export, matched by name.
NAMED_RULES = {"pvary": per_array_rule}

RULES = {
    prims.dot_general_p: dot_general_rule,
    prims.conv_general_dilated_p: conv_rule,
    prims.gather_p: gather_rule,
    prims.transpose_p: transpose_rule,
    prims.convert_element_type_p: convert_rule,
    prims.reshape_p: reshape_rule,
    prims.copy_p: identity_rule,
    prims.stop_gradient_p: stop_gradient_rule,
}
