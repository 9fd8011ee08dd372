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
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as prims

from lorax import compat, dora, routing
from lorax.node import LoRA
from lorax.qmatmul import frozen_product


class LoRAFallbackWarning(UserWarning):
    """A LoRA kernel was consumed in a way lorax cannot factorize, so ``W + s·A·B`` was formed."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAValue:
    """A LoRA kernel as it flows through the interpreter (internal).

    ``perm[d]`` is the canonical axis (of ``(*stack, *in, *out)``, see
    :class:`lorax.node.KernelAxes`) that the program's axis ``d`` holds: the program sees
    ``transpose(canonical(node.w + s * a @ b), perm)``. ``key`` is the dropout key of this
    kernel (``None`` when dropout is off).
    """

    node: LoRA
    key: Any
    perm: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    # Per-example adapters (lorax.routing): a, b carry a batch axis after the stack axes.
    routed: bool = dataclasses.field(default=False, metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.node.canonical_shape[p] for p in self.perm)

    @property
    def w_perm(self) -> tuple[int, ...]:
        """The axes of ``node.w`` (in its own layout) that the program's axes hold."""
        order = self.node.canonical_order
        return tuple(order[p] for p in self.perm)

    @property
    def ndim(self) -> int:
        return len(self.perm)

    def with_node(self, node: LoRA, perm: tuple[int, ...] | None = None) -> LoRAValue:
        return LoRAValue(node, self.key, self.perm if perm is None else perm, self.routed)

    def base(self) -> jax.Array:
        """The frozen kernel in the program's layout (dequantized when quantized)."""
        return _transpose(self.node.float_w(), self.w_perm)

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
        return _transpose(self.node.merged(), self.w_perm)


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


class LayoutError(Exception):
    """A kernel is used along other axes than its factors were built for (internal).

    :func:`lorax.lora` catches it and re-raises a ``ValueError`` that names the ``axes=`` spec
    inferred from the whole function (:mod:`lorax.infer`).
    """

    def __init__(self, v: LoRAValue, primitive: str, detail: str):
        super().__init__(detail)
        self.node, self.primitive, self.detail = v.node, primitive, detail


def _layout_error(v: LoRAValue, primitive: str, contracted=(), batch=()) -> LayoutError:
    order = v.node.canonical_order
    what = f"contracts its axes {sorted(order[c] for c in contracted)}"
    if batch:
        what += f" and batches over its axes {sorted(order[c] for c in batch)}"
    return LayoutError(v, primitive, f"`{primitive}` {what}")


def _dora_scale(node: LoRA, ndim: int, positions: dict[int, int], dtype: Any) -> jax.Array:
    """DoRA's ``m / ||W + sAB||_c`` laid out for an array of rank ``ndim`` (size-1 elsewhere).

    ``positions`` maps each canonical stack/output axis of the node to an axis of the target.
    The norm is gradient-stopped (the paper's section 4.3); ``m`` gets its gradient here.
    """
    norm = dora.adapted_norm(node.to_canonical(node.float_w()), node.a, node.b, node.scale,
                             node.n_stack, node.n_in)
    f = dora.factor(node.magnitude, lax.stop_gradient(norm))
    stack, _, outs = _axis_groups(node)
    canonical = [*stack, *outs]  # f's axes
    order = sorted(range(len(canonical)), key=lambda k: positions[canonical[k]])
    f = _transpose(f, tuple(order))
    shape = [1] * ndim
    for k in order:
        shape[positions[canonical[k]]] = node.canonical_shape[canonical[k]]
    return jnp.reshape(f, shape).astype(dtype)


def _rank_sharding(x: jax.Array, x_contract, x_batch, n_extra: int) -> Any:
    """On meshes with Explicit axes, the sharding of ``x·a`` (``None`` elsewhere): x's batch
    and free axes keep their mesh axes; the ``n_extra`` free stack axes and the rank axis are
    unsharded. JAX needs it spelled out when a contracted axis is sharded (row-parallel W, whose
    ``a`` is sharded the same way)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or jax.sharding.AxisType.Explicit not in tuple(mesh.axis_types or ()):
        return None
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    batch = [spec[d] for d in x_batch]
    free = [spec[d] for d in range(x.ndim) if d not in x_contract and d not in x_batch]
    rank_spec = (*batch, *free, *(None,) * n_extra, None)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*rank_spec))


def _lowrank_dot(v: LoRAValue, x: jax.Array, x_contract, x_batch, w_contract, w_batch, side,
                 params) -> jax.Array:
    """The low-rank term of ``dot_general`` with ``v`` on ``side`` (0 = lhs, 1 = rhs).

    ``t = x·first`` contracts the kernel's used axes with one factor (``a`` when the input axes
    are contracted, ``b`` for ``x @ W.T``), then ``t·second`` contracts the rank; stack axes the
    program batches over are batch axes of both products, the other ("free") stack axes become
    batch axes of the second one (e.g. Gemma's k/v selector axis). The result is transposed to
    the program's output order.
    """
    node = v.node
    stack, ins, outs = _axis_groups(node)
    cw = [v.perm[d] for d in w_contract]
    bw = [v.perm[d] for d in w_batch]
    if not set(bw) <= set(stack):
        raise _layout_error(v, "dot_general", cw, bw)
    if sorted(cw) == list(ins):
        first, second = node.a, node.b
        first_axes = cw  # a: (*stack, *in, r) keeps canonical stack/in positions
        second_r_axis = node.n_stack
        second_free = list(outs)
    elif sorted(cw) == list(outs):
        first, second = node.b, node.a
        first_axes = [c - node.n_in + 1 for c in cw]  # b: (*stack, r, *out)
        second_r_axis = node.n_stack + node.n_in  # a: (*stack, *in, r)
        second_free = list(ins)
    else:
        raise _layout_error(v, "dot_general", cw, bw)
    free_stack = [c for c in stack if c not in bw]
    dtype = x.dtype
    x = _dropout(x, v.key, node.dropout)
    first, second = first.astype(dtype), second.astype(dtype)
    precision, pref = params.get("precision"), params.get("preferred_element_type")
    # t: (*batch, *x_free, *free_stack, r)
    t = lax.dot_general(x, first, ((x_contract, first_axes), (x_batch, bw)), precision=precision,
                        out_sharding=_rank_sharding(x, x_contract, x_batch, len(free_stack)))
    t = t * jnp.asarray(node.scale, t.dtype)
    nb, n_xfree = len(bw), t.ndim - len(bw) - len(free_stack) - 1
    t_stack = [nb + n_xfree + k for k in range(len(free_stack))]
    # low: (*batch, *free_stack, *x_free, *second_free)
    low = lax.dot_general(t, second, (([t.ndim - 1], [second_r_axis]),
                                      ([*range(nb), *t_stack], [*bw, *free_stack])),
                          precision=precision, preferred_element_type=pref)
    # Label low's axes, then order them as the program's dot_general output.
    labels = ([("b", k) for k in range(nb)] + [("w", c) for c in free_stack]
              + [("x", k) for k in range(n_xfree)] + [("w", c) for c in second_free])
    w_free = [("w", v.perm[d]) for d in range(v.ndim) if d not in w_contract and d not in w_batch]
    x_free = [("x", k) for k in range(n_xfree)]
    batch = [("b", k) for k in range(nb)]
    wanted = [*batch, *x_free, *w_free] if side == 1 else [*batch, *w_free, *x_free]
    return _transpose(low, tuple(labels.index(label) for label in wanted))


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
    if node.magnitude is not None and not dora_out:
        if sorted(bw) != list(stack):
            return None  # DoRA with x @ W.T over free stack axes: materialize
        # W's output axes are contracted (``x @ W.T``, e.g. Embed.attend): scale x instead.
        positions = {**dict(zip(cw, xc, strict=True)), **dict(zip(bw, xb, strict=True))}
        x = x * _dora_scale(node, x.ndim, positions, x.dtype)
    low = _lowrank_dot(v, x, list(xc), list(xb), list(wc), list(wb), side, params)
    y = frozen_product(prims.dot_general_p, x, node.w, v.w_perm, params, side)
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
        contracted = [v.perm[d] for d in range(v.ndim) if d != out_feature]
        raise _layout_error(v, "conv_general_dilated", contracted)
    y = frozen_product(prims.conv_general_dilated_p, lhs, node.w, v.w_perm, params)
    x = _dropout(lhs, v.key, node.dropout)
    a_kernel = _transpose(node.a.astype(x.dtype), v.perm)  # program layout, out features -> r
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
    prims.slice_p: slice_rule,
    prims.dynamic_slice_p: dynamic_slice_rule,
    prims.squeeze_p: squeeze_rule,
}
