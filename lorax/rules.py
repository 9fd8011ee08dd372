"""Consumer rules: how each primitive that multiplies a LoRA kernel with an activation is
computed low-rank.

Inside :func:`lorax.lora`, a kernel stands as a :class:`lorax.lora_value.LoRAValue`; view
primitives (:mod:`lorax.view_rules`) update it for free, and the consumers here (``dot_general``,
``ragged_dot_general``, ``conv_general_dilated``, ``gather``) compute ``op(x, w) + s·op'(op(x,
a), b)``, so no full-size ``a @ b`` (nor its gradient) is ever formed. Each rule supplies only
its axis bookkeeping and its two low-rank products; the rest is shared: the kernel's use is
read and checked against its layout as :func:`lorax.infer_axes` reads it (:func:`_consumed`),
the frozen product is :func:`lorax.qmatmul.frozen_product` (a quantized ``w`` dequantized on
use, for lookups too), dropout applies to the adapter branch's input, and
:func:`_combined` adds ``s·low`` and DoRA's column scale. The matmul's low-rank term is
lowered by :mod:`lorax.lowrank`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lorax import dora, routing
from lorax.axis_views import (
    conv_use,
    dot_use,
    fits,
    gather_use,
    ragged_numbers,
    ragged_use,
    single_axes,
)
from lorax.lora_value import LoRAValue, layout_error, transpose
from lorax.lowrank import feature_product, lowrank_term, merge_pays, merged_product
from lorax.node import LoRA
from lorax.qmatmul import frozen_product
from lorax.quantized import is_quantized


def _dropout(x: jax.Array, key: Any, rate: float) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def _axis_groups(node: LoRA) -> tuple[range, range, range]:
    lay = node.axes_layout
    return lay.stack, lay.ins, lay.outs


def _dora_scale(node: LoRA, ndim: int, positions: dict[int, int], dtype: Any) -> jax.Array:
    """DoRA's ``m / ||W + sAB||_c`` laid out for an array of rank ``ndim`` (size-1 elsewhere).

    ``positions`` maps each canonical stack/output axis of the node to an axis of the target.
    The norm is gradient-stopped (the paper's section 4.3); ``m`` gets its gradient here.
    """
    norm = dora.adapted_norm(node.to_canonical(node.float_w()), node.a, node.b, node.scale,
                             node.axes_layout)
    f = dora.factor(node.magnitude, lax.stop_gradient(norm))
    stack, _, outs = _axis_groups(node)
    canonical = [*stack, *outs]  # f's axes
    order = sorted(range(len(canonical)), key=lambda k: positions[canonical[k]])
    f = transpose(f, tuple(order))
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

    The first factor contracts the kernel's used axes (``a`` when the input axes are
    contracted, ``b`` for ``x @ W.T``), the second the rank; stack axes the program batches over
    are batch axes of both products, the other ("free") stack axes batch axes of the second one
    (e.g. Gemma's k/v selector axis), and a routed kernel's per-example axis (its factors'
    axis after the stacks) is a batch axis paired with the input's leading axis. The operands
    are brought into :func:`lorax.lowrank.lowrank_term`'s canonical order (the factors are
    transposed, never the activation when its contracted axes already trail), and the result is
    transposed to the program's output order.
    """
    node = v.node
    stack, ins, outs = _axis_groups(node)
    cw = [v.perm[d] for d in w_contract]
    bw = [v.perm[d] for d in w_batch]
    if not set(bw) <= set(stack):
        raise layout_error(v, "dot_general", cw, bw)
    if sorted(cw) == list(ins):
        first, second, kept = node.a, node.b, list(outs)
    elif sorted(cw) == list(outs):
        first, second, kept = node.b, node.a, list(ins)
    else:
        raise layout_error(v, "dot_general", cw, bw)
    # Each canonical axis's position in a: (*stack, [E,] *in, r) and b: (*stack, [E,] r, *out).
    e, s, n_in = int(v.routed), node.n_stack, node.n_in
    a_axis = {**{c: c for c in stack}, **{c: c + e for c in ins}, "e": s, "r": s + e + n_in}
    b_axis = {**{c: c for c in stack}, **{c: c - n_in + 1 + e for c in outs}, "e": s,
              "r": s + e}
    first_axis, second_axis = (a_axis, b_axis) if first is node.a else (b_axis, a_axis)
    free_stack = [c for c in stack if c not in bw]
    # Batch pairs (x axis, factor axis label): the program's batch axes, then the routed
    # example axis (x's leading axis).
    batch = [*zip(x_batch, bw, strict=True), *([(0, "e")] if v.routed else [])]
    contract = sorted(zip(x_contract, cw, strict=True))  # in x's order
    x_free = [d for d in range(x.ndim)
              if d not in x_contract and d not in x_batch and (d, "e") not in batch]
    x = transpose(_dropout(x, v.key, node.dropout),
                  (*(d for d, _ in batch), *x_free, *(d for d, _ in contract)))
    first = transpose(first.astype(x.dtype), (*(first_axis[c] for _, c in batch),
                                              *(first_axis[c] for c in free_stack),
                                              *(first_axis[c] for _, c in contract),
                                              first_axis["r"]))
    second = transpose(second.astype(x.dtype), (*(second_axis[c] for _, c in batch),
                                                *(second_axis[c] for c in free_stack),
                                                second_axis["r"],
                                                *(second_axis[c] for c in kept)))
    low = lowrank_term(
        x, first, second, n_batch=len(batch), n_free_stack=len(free_stack), scale=node.scale,
        precision=params.get("precision"),
        preferred_element_type=params.get("preferred_element_type"),
        out_sharding=_rank_sharding(x, range(x.ndim - len(contract), x.ndim),
                                    range(len(batch)), len(free_stack)))
    # low: (*batch, *free_stack, *x_free, *kept); order it as the program's output.
    labels = [*(("x", d) for d, _ in batch), *(("w", c) for c in free_stack),
              *(("x", d) for d in x_free), *(("w", c) for c in kept)]
    prog_batch = [("x", d) for d in x_batch]
    prog_x_free = [("x", d) for d in range(x.ndim) if d not in x_contract and d not in x_batch]
    prog_w_free = [("w", v.perm[d]) for d in range(v.ndim)
                   if d not in w_contract and d not in w_batch]
    wanted = ([*prog_batch, *prog_x_free, *prog_w_free] if side == 1
              else [*prog_batch, *prog_w_free, *prog_x_free])
    return transpose(low, tuple(labels.index(label) for label in wanted))


def _merged_dot(v: LoRAValue, x: jax.Array, xc, xb, wc, wb, side, params) -> jax.Array | None:
    """``x·(W + s·A·B)`` (:func:`lorax.lowrank.merged_product`) where
    :func:`lorax.lowrank.merge_pays` says it is cheaper than the factorized term, else ``None``.

    Only for a plain matrix product ``x: (N, K) · W: (K, O)`` up to bitcasts: a float ``W`` on
    the right in canonical order and seen as such, no stack or batch axes, ``x``'s contracted
    axes trailing in ``W``'s input order, no Explicit mesh axes; and no DoRA, routing, dropout
    or other accumulation type.
    """
    node = v.node
    n_in = node.n_in
    plain = (side == 1 and not xb and not wb and node.n_stack == 0 and node.is_canonical
             and not is_quantized(node.w) and v.perm == tuple(range(v.ndim))
             and list(wc) == list(range(n_in))
             and list(xc) == list(range(x.ndim - n_in, x.ndim))
             and _rank_sharding(x, xc, xb, 0) is None
             and not v.routed and node.magnitude is None
             and (v.key is None or node.dropout == 0.0)
             and params.get("preferred_element_type") in (None, x.dtype))
    if not plain:
        return None
    free, k, o = x.shape[:x.ndim - n_in], math.prod(node.in_shape), math.prod(node.out_shape)
    if not merge_pays(math.prod(free), k, o):
        return None
    second = node.b.reshape(node.rank, o) * jnp.asarray(node.scale, node.b.dtype)
    y = merged_product(x.reshape(-1, k), node.w.reshape(k, o), node.a.reshape(k, node.rank),
                       second, params.get("precision"))
    return y.reshape(*free, *node.out_shape)


def _consumed(invals, eqn, use_of, routable: bool = False):
    """The kernel ``invals`` hold and its :class:`~lorax.axis_views.Use` by ``eqn`` (``None``
    for a form lorax does not factorize), checked against the kernel's layout: the check
    :func:`lorax.infer_axes` applies to the same use (:func:`lorax.axis_views.fits`)."""
    use = use_of([single_axes(x.perm) if isinstance(x, LoRAValue) else None for x in invals],
                 eqn)
    if use is None:
        return None
    v = invals[use.operand]
    name = eqn.primitive.name
    if v.routed and not routable:
        raise routing.routing_error(v.node, f"`{name}` consumes it")
    node = v.node
    if not fits(node.axes_layout.canonical_roles, use):
        raise layout_error(v, name, sorted(use.contracted), sorted(use.batch))
    return v, use


def _combined(v: LoRAValue, frozen: jax.Array, low: jax.Array,
              positions: dict[int, int] | None) -> jax.Array:
    """The one composition of every consumer: ``frozen + s·low`` (``low`` already scaled),
    then DoRA's column scale where ``positions`` maps each canonical stack/output axis of the
    kernel to an axis of the result."""
    y = frozen + low.astype(frozen.dtype)
    if v.node.magnitude is not None:
        y = y * _dora_scale(v.node, y.ndim, positions, y.dtype)
    return y


def dot_general_rule(invals, eqn):
    params = eqn.params
    checked = _consumed(invals, eqn, dot_use, routable=True)
    if checked is None:
        return None
    v, use = checked
    side = use.operand
    x = invals[1 - side]
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    xc, xb, wc, wb = (lc, lb, rc, rb) if side == 1 else (rc, rb, lc, lb)
    if v.routed:
        routing.check_routed(v, x, xc, xb, wc, wb, side)
    merged = _merged_dot(v, x, xc, xb, wc, wb, side, params)
    if merged is not None:
        return merged
    node = v.node
    stack, _, outs = _axis_groups(node)
    cw, bw = [v.perm[d] for d in wc], [v.perm[d] for d in wb]
    positions = None
    if node.magnitude is not None and sorted(cw) == list(outs):
        if sorted(bw) != list(stack):
            return None  # DoRA with x @ W.T over free stack axes: materialize
        # W's output axes are contracted (``x @ W.T``, e.g. Embed.attend): scale x instead.
        scaled = {**dict(zip(cw, xc, strict=True)), **dict(zip(bw, xb, strict=True))}
        x = x * _dora_scale(node, x.ndim, scaled, x.dtype)
        v = v.with_node(dataclasses.replace(node, magnitude=None))
    elif node.magnitude is not None:
        # y = (*batch, *x_free, *w_free) for rhs kernels, (*batch, *w_free, *x_free) for lhs.
        free = [v.perm[d] for d in range(v.ndim) if d not in wc and d not in wb]
        first = x.ndim - len(xc) if side == 1 else len(bw)
        positions = {c: k for k, c in enumerate(bw)}
        positions.update({c: first + j for j, c in enumerate(free)})
    low = _lowrank_dot(v, x, list(xc), list(xb), list(wc), list(wb), side, params)
    # The frozen product keeps the program's own form: flattened like the low-rank term, it
    # would save XLA's transposed copy of W for dy·Wᵀ on CPU, but under FSDP (sharded W, auto
    # axes) the partitioner then all-gathers W and all-reduces W-sized results the frozen
    # step does not (tests/test_distributed.py).
    frozen = frozen_product(eqn.primitive, x, node.w, v.w_perm, params, side, path=node.path)
    return _combined(v, frozen, low, positions)


def ragged_dot_rule(invals, eqn):
    """``lax.ragged_dot(x, W, group_sizes)`` (MoE experts: ``W`` a ``(g, k, n)`` stack, one
    kernel per group of rows): the low-rank term is two ragged products with the same group
    sizes, ``(x·A[g])·B[g]``, never a per-expert ``A·B``."""
    checked = _consumed(invals, eqn, ragged_use)
    if checked is None:
        return None
    v, use = checked
    x, _, group_sizes = invals
    node, params = v.node, eqn.params
    contract, ragged, _, _ = ragged_numbers(params)
    _, ins, outs = _axis_groups(node)
    transposed = use.contracted != frozenset(ins)  # x @ W.T per group
    if node.magnitude is not None and transposed:
        return None  # DoRA with x @ W.T per group: materialize
    frozen = frozen_product(eqn.primitive, x, node.w, v.w_perm, params, extra=(group_sizes,),
                            path=node.path)
    rows = transpose(_dropout(x, v.key, node.dropout), (ragged, contract))
    first, second = node.a, node.b  # (g, k, r), (g, r, n)
    if transposed:
        first, second = jnp.swapaxes(node.b, 1, 2), jnp.swapaxes(node.a, 1, 2)
    t = lax.ragged_dot(rows, first.astype(rows.dtype), group_sizes,
                       precision=params["precision"])
    t = t * jnp.asarray(node.scale, t.dtype)
    low = lax.ragged_dot(t, second.astype(t.dtype), group_sizes, precision=params["precision"],
                         preferred_element_type=params["preferred_element_type"])
    y = frozen + low.astype(frozen.dtype)
    if node.magnitude is not None:  # each row gets its group's column scale
        groups = jnp.repeat(jnp.arange(group_sizes.shape[0]), group_sizes,
                            total_repeat_length=rows.shape[0])
        columns = _dora_scale(node, 2, {0: 0, outs[0]: 1}, y.dtype)  # (g, n)
        y = y * columns[groups]
    return y


def conv_rule(invals, eqn):
    checked = _consumed(invals, eqn, conv_use)
    if checked is None:
        return None
    v, _ = checked
    lhs, params, node = invals[0], eqn.params, v.node
    frozen = frozen_product(eqn.primitive, lhs, node.w, v.w_perm, params, path=node.path)
    x = _dropout(lhs, v.key, node.dropout)
    a_kernel = transpose(node.a.astype(x.dtype), v.perm)  # program layout, out features -> r
    t = eqn.primitive.bind(x, a_kernel, **{**params, "preferred_element_type": None})
    t = t * jnp.asarray(node.scale, t.dtype)
    feature = params["dimension_numbers"].out_spec[1]
    low = feature_product(t, node.b, feature, params.get("precision"))
    return _combined(v, frozen, low, {_axis_groups(node)[2][0]: feature})


def gather_rule(invals, eqn):
    """An embedding lookup: the frozen rows come from the same (quantized) frozen product as a
    matmul's, the low-rank term from looking up rows of ``a``."""
    checked = _consumed(invals, eqn, gather_use)
    if checked is None:
        return None
    v, _ = checked
    indices, params, node = invals[1], eqn.params, v.node
    _, _, outs = _axis_groups(node)
    if node.n_stack or len(outs) != 1:
        return None
    out_axis = v.perm.index(outs[0])  # the program's axis holding the output features
    frozen = frozen_product(eqn.primitive, indices, node.w, v.w_perm, params, side=0,
                            path=node.path)
    slice_sizes = list(params["slice_sizes"])
    slice_sizes[out_axis] = node.rank
    t = eqn.primitive.bind(transpose(node.a, v.perm), indices,
                           **{**params, "slice_sizes": tuple(slice_sizes)})
    dn = params["dimension_numbers"]
    kept = [d for d in range(v.ndim) if d not in dn.collapsed_slice_dims]
    feature = dn.offset_dims[kept.index(out_axis)]
    t = _dropout(t, v.key, node.dropout) * jnp.asarray(node.scale, t.dtype)
    return _combined(v, frozen, feature_product(t, node.b, feature), {outs[0]: feature})
