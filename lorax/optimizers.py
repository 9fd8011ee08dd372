"""`lorax.optimizer`: an optax transform that trains the factors and keeps nothing for W."""

from __future__ import annotations

from typing import Any

import jax
import optax

from lorax.partition import check_trainable, trainable

_TRAIN, _FREEZE = "lorax_trainable", "lorax_frozen"


def _labels(params: Any) -> Any:
    return jax.tree.map(lambda m: _TRAIN if m else _FREEZE, trainable(params))


def _signature(tree: Any) -> tuple:
    """What the structure of an optimizer state made from ``tree`` can depend on: its
    structure and its leaves' shapes and dtypes (hashable)."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


def _restructured(state: Any, expected: Any) -> Any:
    """``state``'s array leaves in the structure of ``expected`` (an abstract state), or a
    ``ValueError`` when they are not the same leaves.

    A state made by ``init`` on the whole wrapped tree and one made on its trainable half
    hold the same arrays in the same order; they differ only in the empty nodes standing for
    frozen leaves (``optax.MaskedNode`` against ``None``)."""
    leaves = jax.tree.leaves(state)
    wanted = jax.tree_util.tree_flatten_with_path(expected)[0]
    fix = ("pass the state that init made for this tree (lorax.optimizer(tx).init of the "
           "trainable half, lorax.split(tree)[0], or of the whole wrapped tree)")
    if len(leaves) != len(wanted):
        raise ValueError(f"expected `state` to hold {len(wanted)} arrays, the optimizer state "
                         f"of the tree the updates belong to, got {len(leaves)}: {fix}")
    for leaf, (keypath, aval) in zip(leaves, wanted, strict=True):
        if tuple(leaf.shape) != tuple(aval.shape):
            raise ValueError(
                f"expected `state` leaf {jax.tree_util.keystr(keypath)!r} of shape "
                f"{list(aval.shape)} for these updates, got shape {list(leaf.shape)}: {fix}")
    return jax.tree.unflatten(jax.tree.structure(expected), leaves)


def _aligned(params: Any, updates: Any) -> Any:
    """``params`` in the structure of ``updates``: ``None`` where ``updates`` has a hole (the
    whole tree's frozen ``W`` against a trainable half), and, where ``params`` has a hole that
    ``updates`` fills (a frozen leaf, never updated), the update as its stand-in."""
    try:
        return jax.tree.map(lambda u, p: None if u is None else u if p is None else p,
                            updates, params, is_leaf=lambda x: x is None)
    except (ValueError, TypeError) as err:
        raise ValueError("expected `params` to be the tree the updates belong to (its "
                         f"trainable half or the whole wrapped tree): {err}") from err


def optimizer(tx: Any) -> optax.GradientTransformationExtraArgs:
    """Applies ``tx`` to the LoRA factors and ``train`` leaves; frozen leaves get zero updates.

    Built on ``optax.multi_transform`` with ``optax.set_to_zero`` for frozen leaves, so the
    optimizer state holds no arrays for them (masked leaves are ``optax.MaskedNode``). The
    labels come from the tree alone (:func:`lorax.trainable`), so ``init`` takes the trainable
    half of :func:`lorax.split` (the documented pattern) or the whole wrapped tree, and
    ``update`` takes updates (and ``params``) of either. The two states hold the same arrays in
    two structures (``None`` or ``optax.MaskedNode`` for a frozen leaf); ``update`` accepts a
    state of either structure whatever the updates are, and returns the new state in the
    structure it was given. ``params``, when given, may be either tree too.

    Always wrap the transform: a plain optax transform over the whole wrapped tree updates the
    frozen ``W`` too (``optax.adamw``'s decoupled weight decay moves it although its gradient
    is zero). The documented step differentiates the trainable half
    (:func:`lorax.value_and_grad`) and updates only that half.

    Args:
        tx: any optax transformation, e.g. ``optax.adamw(1e-3)``; an ``optax.MultiSteps``
            (gradient accumulation) is taken as its ``gradient_transformation()``.

    Returns:
        An ``optax.GradientTransformationExtraArgs``.

    Raises:
        TypeError: ``tx`` is not an optax transformation (an optimizer factory such as
            ``optax.adam``, not called, is named with the call that fixes it).
        ValueError: from ``init``, for a tree without trainable leaves (not wrapped); from
            ``update``, for a state of another tree.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lorax
        >>> lp = lorax.wrap({"kernel": jnp.ones((64, 64))}, rank=4)
        >>> state = lorax.optimizer(optax.adam(1e-3)).init(lorax.split(lp)[0])
        >>> sum(x.size for x in jax.tree.leaves(state))  # Adam's mu, nu for a, b + count
        1025
    """
    if isinstance(tx, optax.MultiSteps):
        tx = tx.gradient_transformation()
    if not isinstance(tx, optax.GradientTransformation):
        hint = (f" (call it: `{getattr(tx, '__name__', 'tx')}(learning_rate)`)"
                if callable(tx) else "")
        raise TypeError(f"expected `tx` to be an optax.GradientTransformation, got "
                        f"{type(tx).__name__}{hint}")
    inner = optax.multi_transform({_TRAIN: tx, _FREEZE: optax.set_to_zero()}, _labels)
    structures: dict[tuple, Any] = {}  # abstract states, by the updates' signature

    def init(params: Any) -> Any:
        check_trainable(params, "`params` of init")
        return inner.init(params)

    def update(updates: Any, state: Any, params: Any = None, **extra_args: Any):
        key = _signature(updates)
        if key not in structures:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), updates)
            structures[key] = jax.eval_shape(inner.init, abstract)
        expected = structures[key]
        given = jax.tree.structure(state)
        if params is not None and jax.tree.structure(params) != jax.tree.structure(updates):
            params = _aligned(params, updates)
        if given == jax.tree.structure(expected):
            return inner.update(updates, state, params, **extra_args)
        updates, state = inner.update(updates, _restructured(state, expected), params,
                                      **extra_args)
        return updates, jax.tree.unflatten(given, jax.tree.leaves(state))

    return optax.GradientTransformationExtraArgs(init, update)
