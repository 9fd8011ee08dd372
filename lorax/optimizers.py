"""`lorax.optimizer`: an optax transform that trains the factors and keeps nothing for W."""

from __future__ import annotations

from typing import Any

import jax
import optax

from lorax.partition import trainable

_TRAIN, _FREEZE = "lorax_trainable", "lorax_frozen"


def _labels(params: Any) -> Any:
    return jax.tree.map(lambda m: _TRAIN if m else _FREEZE, trainable(params))


def optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Applies ``tx`` to the LoRA factors and ``train`` leaves; frozen leaves get zero updates.

    Built on ``optax.multi_transform`` with ``optax.set_to_zero`` for frozen leaves, so the
    optimizer state holds no arrays for them (masked leaves are ``optax.MaskedNode``). The
    labels come from the tree alone (:func:`lorax.trainable`), so ``init`` and ``update`` work
    on the full wrapped tree or on the trainable half of :func:`lorax.split`.

    Always wrap the transform: a plain optax transform over the whole wrapped tree updates the
    frozen ``W`` too (``optax.adamw``'s decoupled weight decay moves it although its gradient
    is zero). The documented step differentiates the trainable half
    (:func:`lorax.value_and_grad`) and updates only that half.

    Args:
        tx: any optax transformation, e.g. ``optax.adamw(1e-3)``.

    Returns:
        An ``optax.GradientTransformation``.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lorax
        >>> lp = lorax.wrap({"kernel": jnp.ones((64, 64))}, rank=4)
        >>> state = lorax.optimizer(optax.adam(1e-3)).init(lp)
        >>> sum(x.size for x in jax.tree.leaves(state))  # Adam's mu, nu for a, b + count
        1025
    """
    if not isinstance(tx, optax.GradientTransformation):
        hint = (f" (call it: `{getattr(tx, '__name__', 'tx')}(learning_rate)`)"
                if callable(tx) else "")
        raise TypeError(f"expected `tx` to be an optax.GradientTransformation, got "
                        f"{type(tx).__name__}{hint}")
    return optax.multi_transform({_TRAIN: tx, _FREEZE: optax.set_to_zero()}, _labels)
