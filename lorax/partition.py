"""Which leaves of a wrapped tree train, and splitting a tree into its trainable/frozen halves."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from lorax.node import FullyTrained, LoRA, MultiLoRA, is_node
from lorax.paths import check_tree


def _mark(node: Any) -> Any:
    # `None` holes (the halves made by `split`) stay holes, so masks and optax labels match.
    def keep(x: Any, value: bool) -> bool | None:
        return None if x is None else value

    if isinstance(node, LoRA):
        return dataclasses.replace(node, w=keep(node.w, False), a=keep(node.a, True),
                                   b=keep(node.b, True), magnitude=keep(node.magnitude, True))
    if isinstance(node, MultiLoRA):
        adapters = {name: dataclasses.replace(f, a=keep(f.a, True), b=keep(f.b, True))
                    for name, f in node.adapters.items()}
        return dataclasses.replace(node, w=keep(node.w, False), adapters=adapters)
    if isinstance(node, FullyTrained):
        return FullyTrained(keep(node.value, True))
    return False


def trainable(tree: Any) -> Any:
    """A bool mask with the structure of ``tree``: True for factors and ``train`` leaves.

    LoRA nodes become ``LoRA(w=False, a=True, b=True)`` masks, so the mask flattens to one bool
    per array leaf of ``tree`` (optax's mask convention); a quantized ``w``
    (:class:`lorax.QuantizedArray`, codes and scales) gets one ``False``, so the mask is then a
    prefix of ``tree``, which optax also accepts.

    Example:
        >>> import jax, jax.numpy as jnp, lorax
        >>> lp = lorax.wrap({"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}, rank=2)
        >>> jax.tree.leaves(lorax.trainable(lp))  # bias, then kernel's w, a, b
        [False, False, True, True]
    """
    check_tree(tree, "tree", is_node, arrays=False)
    return jax.tree.map(_mark, tree, is_leaf=is_node)


def split(tree: Any) -> tuple[Any, Any]:
    """Splits ``tree`` into ``(trainable, frozen)`` halves with ``None`` holes.

    Differentiating only the trainable half is the cheapest gradient pattern::

        trainable, frozen = lorax.split(lp)
        grads = jax.grad(lambda t: loss(lorax.combine(t, frozen)))(trainable)

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> lp = lorax.wrap({"kernel": jnp.ones((4, 4))}, rank=2)
        >>> train, frozen = lorax.split(lp)
        >>> train["kernel"].w is None, frozen["kernel"].a is None
        (True, True)
    """
    mask = trainable(tree)  # a prefix of `tree` (a quantized w is one frozen unit)
    keep = jax.tree.map(lambda m, x: x if m else None, mask, tree)
    drop = jax.tree.map(lambda m, x: None if m else x, mask, tree)
    return keep, drop


def combine(trainable_part: Any, frozen_part: Any) -> Any:
    """Inverts :func:`split`: fills each ``None`` hole of one half from the other.

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> lp = lorax.wrap({"kernel": jnp.ones((4, 4))}, rank=2)
        >>> lorax.combine(*lorax.split(lp))["kernel"].w is lp["kernel"].w
        True
    """
    return jax.tree.map(
        lambda t, f: f if t is None else t,
        trainable_part,
        frozen_part,
        is_leaf=lambda x: x is None,
    )
