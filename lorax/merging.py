"""Merging adapters into kernels for zero-latency inference, and taking them back out."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lorax import modules
from lorax.node import FullyTrained, is_adapted, is_node
from lorax.paths import check_tree, paired_leaves


@modules.on_modules
def merge(tree: Any) -> Any:
    """Returns plain params of the original structure with every adapter folded in.

    Each LoRA node becomes ``w + scale * a @ b``, computed in float32 and cast to ``w``'s dtype
    (a bf16 base merges with a single bf16 rounding); ``FullyTrained`` boxes become their
    values. The result runs through the unmodified model at the base model's cost. DoRA nodes
    merge to ``magnitude * V / ||V||_c``. For PiSSA nodes (``residual=True``) ``w`` is the
    residual base, so the merged kernel ``w + scale * a @ b`` is the complete fine-tuned kernel
    (the original one at initialisation); :func:`lorax.unwrap` of such a tree gives residuals,
    not the original model.

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> params = {"kernel": jnp.ones((4, 4))}
        >>> merged = lorax.merge(lorax.wrap(params, rank=2))  # b = 0 at init
        >>> bool((merged["kernel"] == params["kernel"]).all())
        True
    """

    check_tree(tree, "tree", is_node)

    def fold(node: Any) -> Any:
        if is_adapted(node):  # MultiLoRA: its active adapters
            return node.merged()
        if isinstance(node, FullyTrained):
            return node.value
        return node

    return jax.tree.map(fold, tree, is_leaf=is_node)


def unmerge(merged: Any, tree: Any) -> Any:
    """Recovers the wrapped tree from merged params: ``w = merged - scale * a @ b``.

    Args:
        merged: plain params, as returned by :func:`merge` (possibly after other edits).
        tree: the wrapped tree whose adapters were merged (supplies ``a``, ``b`` and ``scale``).

    Returns:
        ``tree`` with each ``w`` recomputed from ``merged`` (in float32, cast back) and each
        ``train`` leaf taken from ``merged``. For float32 kernels this recovers ``w`` up to
        float32 rounding of the add and subtract. A DoRA node's merged kernel
        ``m * V / ||V||_c`` fixes ``V = w + s·a·b`` only up to a positive scale per output
        unit, so, as PEFT caches the norm when merging, the norm ``||V||_c`` is taken from
        ``tree``'s own ``w`` and factors: ``w = merged * ||V||_c / m - s·a·b``.

    Raises:
        ValueError: if ``merged`` and ``tree`` differ in structure or a kernel's shape.

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> lp = lorax.wrap({"kernel": jnp.ones((4, 4))}, rank=2)
        >>> back = lorax.unmerge(lorax.merge(lp), lp)
        >>> bool(jnp.allclose(back["kernel"].w, lp["kernel"].w))
        True
    """
    pairs, treedef = paired_leaves(tree, merged, "merged", is_node)
    out = []
    for where, node, value in pairs:
        if is_node(node) and tuple(value.shape) != tuple(node_shape(node)):
            raise ValueError(
                f"expected `merged` leaf of shape {list(node_shape(node))} at {where!r}, got "
                f"{list(value.shape)}"
            )
        if is_adapted(node):
            single = node.as_lora()  # a MultiLoRA's active adapters (None when none is)
            w = value
            if single is not None:
                w = jnp.asarray(value, jnp.float32)
                if single.magnitude is not None:
                    w = w / single.dora_columns()
                w = (w - single.delta(jnp.float32)).astype(node.dtype)
            out.append(dataclasses.replace(node, w=w))
        elif isinstance(node, FullyTrained):
            out.append(FullyTrained(value))
        else:
            out.append(value)
    return jax.tree_util.tree_unflatten(treedef, out)


def node_shape(node: Any) -> tuple[int, ...]:
    """The array shape a node stands for."""
    return tuple(node.w.shape if is_adapted(node) else node.value.shape)
