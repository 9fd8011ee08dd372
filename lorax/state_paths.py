"""The leaf layout of an optimizer state (or any pytree), recorded at save time and compared at
restore time, so a like-tree of another structure is refused before orbax fills it."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from lorax.paths import path_str


def _is_hole(x: Any) -> bool:
    # `None` holes (a state made on the trainable half of lorax.split) and optax's MaskedNode
    # (a state made on the whole tree) are both childless nodes: kept as leaves here so the
    # two layouts differ.
    return x is None or type(x).__name__ == "MaskedNode"


def leaf_layout(tree: Any) -> dict[str, Any]:
    """``{path: [shape, dtype] | "None" | "MaskedNode" | type name}`` for every leaf and hole.

    Example:
        >>> import jax.numpy as jnp
        >>> leaf_layout({"mu": {"w": None, "a": jnp.zeros((4, 2))}})
        {'mu/a': [[4, 2], 'float32'], 'mu/w': 'None'}
    """
    layout = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_hole)[0]:
        if _is_hole(leaf):
            layout[path_str(keypath)] = type(leaf).__name__.replace("NoneType", "None")
        elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            layout[path_str(keypath)] = [list(leaf.shape), str(np.dtype(leaf.dtype))]
        else:
            layout[path_str(keypath)] = type(leaf).__name__
    return layout


def layout_mismatch(saved: dict[str, Any], given: Any, argname: str) -> str | None:
    """Why ``given`` cannot receive a state saved with layout ``saved`` (``None`` if it can).

    Example:
        >>> import jax.numpy as jnp
        >>> saved = leaf_layout({"mu": {"w": None, "a": jnp.zeros((4, 2))}})
        >>> print(layout_mismatch(saved, {"mu": {"w": jnp.zeros(3), "a": jnp.zeros((4, 2))}},
        ...                       "opt_state"))
        expected `opt_state` to have the structure of the saved state, got a different leaf at
        'mu/w': saved None, given [[3], 'float32'] (1 of 2 paths differ); the state was saved
        from the trainable half ...
    """
    have = leaf_layout(given)
    if have == saved:
        return None
    paths = sorted(set(have) | set(saved))
    bad = [p for p in paths if have.get(p, "absent") != saved.get(p, "absent")]
    p = bad[0]
    was, now = saved.get(p, "absent"), have.get(p, "absent")
    fix = ""
    if was == "None" or now == "MaskedNode":
        fix = ("; the state was saved from the trainable half (tx.init(train) with train, frozen "
               "= lorax.split(tree)): pass opt_state=tx.init(lorax.split(like)[0])")
    elif was == "MaskedNode" or now == "None":
        fix = "; the state was saved from the whole wrapped tree: pass opt_state=tx.init(like)"
    return (f"expected `{argname}` to have the structure of the saved state, got a different "
            f"leaf at {p!r}: saved {was}, given {now} "
            f"({len(bad)} of {len(paths)} paths differ){fix}")
