"""Per-example adapter routing: ``lorax.lora(fn)(tree, x, adapter_ids=ids)``.

Example ``i`` of the batch uses the named adapter ``names[ids[i]]`` (:func:`adapter_names`:
the sorted names of the tree's adapters), or none when ``ids[i]`` is outside
``[0, len(names))`` (e.g. ``-1``), all in one traced call. At entry each
:class:`lorax.MultiLoRA` node's adapters are stacked (padded with zeros to the node's largest
rank, ``b`` pre-scaled, a zero adapter for "none") and gathered per example, giving factors
``a: (*stack, batch, *in, r)`` and ``b: (*stack, batch, r, *out)``; ``dot_general`` then
computes ``x·W + (x·a[ids])·b[ids]`` as two batched low-rank matmuls (the BGMV of S-LoRA and
Punica), never a per-example ``ΔW``.

Routing needs each routed kernel to be consumed by a ``dot_general`` whose input carries the
batch as its leading axis (Dense, DenseGeneral and attention projections on ``(batch, ...)``
inputs, also inside ``scan`` over stacked layers); other uses raise a ``ValueError`` naming the
kernel. Plain :class:`lorax.LoRA` nodes apply to every example; the ``active`` selection of
named adapters is ignored while routing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lorax.node import LoRA, MultiLoRA, is_node


def adapter_names(tree: Any) -> list[str]:
    """The adapter names ``adapter_ids`` index: sorted, over every MultiLoRA node of ``tree``.

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> lp = lorax.add_adapter({"kernel": jnp.ones((4, 4))}, "fr", rank=2)
        >>> adapter_names(lorax.add_adapter(lp, "de", rank=2))
        ['de', 'fr']
    """
    names: set[str] = set()
    for leaf in jax.tree.leaves(tree, is_leaf=is_node):
        if isinstance(leaf, MultiLoRA):
            names.update(leaf.adapters)
    return sorted(names)


def check_ids(ids: Any, names: list[str]) -> jax.Array:
    """Validates ``adapter_ids`` against the tree's adapters: one entry per example, either an
    adapter name (``None`` for no adapter) or an index into the sorted ``names``.

    Example:
        >>> check_ids(["fr", None, "de"], ["de", "fr"]).tolist()
        [1, -1, 0]
    """
    if not names:
        raise ValueError("`adapter_ids` needs named adapters (lorax.add_adapter); the arguments "
                         "hold no MultiLoRA node")
    if getattr(getattr(ids, "dtype", None), "kind", "") in ("U", "S"):
        ids = ids.tolist()  # a NumPy array of names
    if isinstance(ids, list | tuple) and any(isinstance(i, str) or i is None for i in ids):
        unknown = [i for i in ids if isinstance(i, str) and i not in names]
        if unknown:
            raise ValueError(f"expected `adapter_ids` to name adapters of the tree {names}, got "
                             f"{unknown[0]!r}")
        ids = [names.index(i) if isinstance(i, str) else -1 if i is None else i for i in ids]
    if not hasattr(ids, "shape") or not hasattr(ids, "dtype"):
        ids = jnp.asarray(ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"expected `adapter_ids` to be adapter names (None: no adapter) or a 1-d "
                         f"integer array of indices into the sorted names {names} (-1: no "
                         f"adapter), one per example; got {ids.dtype}{list(ids.shape)}")
    return jnp.asarray(ids)


def route(node: MultiLoRA, names: list[str], ids: jax.Array) -> LoRA:
    """A LoRA node whose factors carry a per-example axis after the stack axes."""
    s = node.n_stack
    rank = max(f.rank for f in node.adapters.values())
    a_zero = jnp.zeros((*node.stack_shape, *node.in_shape, rank), next(iter(
        node.adapters.values())).a.dtype)
    b_zero = jnp.zeros((*node.stack_shape, rank, *node.out_shape), a_zero.dtype)
    a_all, b_all = [], []
    for name in [*names, None]:  # the last is "no adapter"
        f = node.adapters.get(name) if name is not None else None
        if f is None:
            a_all.append(a_zero)
            b_all.append(b_zero)
            continue
        pad = rank - f.rank
        a_all.append(jnp.pad(f.a.astype(a_zero.dtype), [(0, 0)] * (f.a.ndim - 1) + [(0, pad)]))
        b = (f.b * jnp.asarray(f.scale, f.b.dtype)).astype(a_zero.dtype)
        b_all.append(jnp.pad(b, [(0, 0)] * s + [(0, pad)] + [(0, 0)] * (b.ndim - s - 1)))
    k = len(names)
    index = jnp.where((ids >= 0) & (ids < k), ids, k)
    a = jnp.moveaxis(jnp.stack(a_all)[index], 0, s)
    b = jnp.moveaxis(jnp.stack(b_all)[index], 0, s)
    return LoRA(w=node.w, a=a, b=b, scale=1.0, rank=rank, n_stack=s, n_in=node.n_in,
                path=node.path, dropout=node.dropout, layout=node.layout)


def routing_error(node: LoRA, what: str) -> ValueError:
    return ValueError(
        f"per-example adapters (`adapter_ids`) at {node.path!r}: {what}; routing needs the "
        "kernel consumed by dot_general on an input whose leading axis is the batch"
    )


def check_routed(v: Any, x: jax.Array, xc: Sequence[int], xb: Sequence[int],
                 wc: Sequence[int], wb: Sequence[int], side: int) -> None:
    """Raises the :func:`routing_error` unless ``dot_general(x, W)`` can be routed per example:
    ``W`` on the right, ``x``'s leading axis the batch of ``adapter_ids`` (neither contracted
    nor batched), every stack axis batched and the input axes contracted. The low-rank term is
    then :func:`lorax.rules.dot_general_rule`'s, with the example axis as one more batch axis."""
    node = v.node
    lay = node.axes_layout
    cw, bw = [v.perm[d] for d in wc], [v.perm[d] for d in wb]
    if side != 1 or 0 in xc or 0 in xb:
        raise routing_error(node, "the kernel is not applied to a batch-leading input")
    if sorted(bw) != list(lay.stack) or sorted(cw) != list(lay.ins):
        raise routing_error(node, "the kernel is contracted over other than its input axes")
    batch = node.a.shape[lay.n_stack]
    if x.shape[0] != batch:
        raise routing_error(node, f"its input has leading axis {x.shape[0]}, but adapter_ids "
                                  f"has {batch} entries")
