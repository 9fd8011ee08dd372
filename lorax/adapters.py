"""Named adapters: several LoRA adapters on one frozen base, selected, weighted and combined.

Each adapted kernel becomes a :class:`lorax.MultiLoRA` node holding ``{name: Factors}`` and a
static ``active`` selection ``((name, weight), ...)``. :func:`lorax.lora` computes the active
adapters as one LoRA of rank ``sum(rank_k)`` (concatenated factors, ``b_k`` scaled by
``weight_k * scale_k``), so a mixture costs what a single adapter of that rank costs.

* :func:`add_adapter` adds an adapter (wrapping like :func:`lorax.wrap`; a plain LoRA tree's
  adapter is kept under the name ``"default"``);
* :func:`select` chooses the active adapters and their weights;
* :func:`drop_adapter` removes one;
* :func:`combine_adapters` makes a new adapter from a weighted set (``"linear"``, ``"cat"``,
  ``"svd"``);
* :func:`get_adapter` / :func:`put_adapter` convert one adapter to and from an ordinary wrapped
  tree, which is how one adapter is checkpointed (:func:`lorax.save`) or exported
  (:func:`lorax.peft.save`) by name.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lorax import modules
from lorax.node import Factors, LoRA, MultiLoRA, is_adapted, is_node
from lorax.paths import paired_leaves
from lorax.wrapping import unwrap, wrap

METHODS = ("linear", "cat", "svd")
DEFAULT = "default"
"""The name a plain :class:`lorax.LoRA` node's adapter gets when a second one is added."""


def _check_name(name: Any, argname: str = "name") -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"expected `{argname}` to be a non-empty str, got {name!r}")
    return name


def _multi(node: Any) -> MultiLoRA | None:
    """``node`` as a MultiLoRA (a plain LoRA's adapter named ``"default"``), else None."""
    if isinstance(node, MultiLoRA):
        return node
    if isinstance(node, LoRA):
        if node.magnitude is not None or node.residual:
            raise ValueError(
                f"named adapters are plain LoRA; the node at {node.path!r} is DoRA or PiSSA"
            )
        return MultiLoRA(w=node.w, adapters={DEFAULT: Factors(node.a, node.b, node.scale,
                                                              node.rank)},
                         active=((DEFAULT, 1.0),), path=node.path, dropout=node.dropout,
                         **node.axes_layout.node_fields)
    return None


def _names(tree: Any) -> set[str]:
    names: set[str] = set()
    for leaf in jax.tree.leaves(tree, is_leaf=is_node):
        if isinstance(leaf, MultiLoRA):
            names.update(leaf.adapters)
        elif isinstance(leaf, LoRA):
            names.add(DEFAULT)
    return names


def _map(fn, tree: Any) -> Any:
    return jax.tree.map(lambda x: fn(x) if is_adapted(x) else x, tree,
                        is_leaf=is_node)


@modules.on_modules
def put_adapter(tree: Any, name: str, lora_tree: Any, *, activate: bool = False) -> Any:
    """Inserts the LoRA factors of ``lora_tree`` (a wrapped tree of the same base) as ``name``.

    Args:
        tree: base params, a wrapped tree or a multi-adapter tree.
        name: the adapter's name (replaces an adapter of that name).
        lora_tree: a tree of the same structure whose :class:`lorax.LoRA` nodes give the factors.
        activate: add ``(name, 1.0)`` to the active selection of the nodes it lands on.

    Raises:
        ValueError: for structures that differ, or a node whose axes differ (naming its path).

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> params = {"kernel": jnp.ones((4, 4))}
        >>> tree = lorax.add_adapter(params, "en", rank=2)
        >>> tree = lorax.adapters.put_adapter(tree, "fr", lorax.wrap(params, rank=1))
        >>> sorted(tree["kernel"].adapters)
        ['en', 'fr']
    """
    _check_name(name)
    pairs, treedef = paired_leaves(tree, lora_tree, "lora_tree", is_node)
    out = []
    for _, leaf, new in pairs:
        if not isinstance(new, LoRA):
            out.append(leaf)
            continue
        if new.magnitude is not None or new.residual:
            raise ValueError(f"named adapters are plain LoRA; the node at {new.path!r} is "
                             "DoRA or PiSSA")
        if is_node(leaf) and not is_adapted(leaf):
            raise ValueError(f"the leaf at {new.path!r} is trained in full; it cannot also "
                             "carry an adapter")
        multi = _multi(leaf)
        if multi is None:
            multi = MultiLoRA(w=leaf, adapters={}, active=(), path=new.path,
                              dropout=new.dropout, **new.axes_layout.node_fields)
        if (multi.roles, multi.shape) != (new.roles, new.shape):
            raise ValueError(
                f"adapter {name!r} at {new.path!r} has layout {new.roles!r} of shape "
                f"{list(new.shape)}, the node has layout {multi.roles!r} of shape "
                f"{list(multi.shape)}"
            )
        active = tuple((n, w) for n, w in multi.active if n != name)
        if activate or not multi.adapters:
            active += ((name, 1.0),)
        adapters = {**multi.adapters, name: Factors(new.a, new.b, new.scale, new.rank)}
        out.append(dataclasses.replace(multi, adapters=adapters, active=active))
    return jax.tree_util.tree_unflatten(treedef, out)


@modules.on_modules
def add_adapter(tree: Any, name: str, *, activate: bool = False, **wrap_kwargs: Any) -> Any:
    """Adds a new adapter ``name`` to ``tree``, wrapping its base like :func:`lorax.wrap`.

    ``b`` starts at zero, so adding (even activating) an adapter does not change the model.
    A node's first adapter is active; later ones are inactive until :func:`select` (or
    ``activate=True``).

    Args:
        tree: base params, a wrapped tree (its adapter becomes ``"default"``) or a
            multi-adapter tree.
        name: the new adapter's name.
        activate: make the new adapter active (weight 1) besides the active ones.
        **wrap_kwargs: :func:`lorax.wrap`'s arguments (``rank``, ``targets``, ``alpha``,
            ``key``, ...) except ``train``, ``dora`` and PiSSA inits.

    Raises:
        ValueError: for an existing ``name``, a bad argument, or DoRA/PiSSA options.

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> lp = lorax.wrap({"kernel": jnp.ones((8, 4))}, rank=2)
        >>> lp = lorax.add_adapter(lp, "de", rank=4)
        >>> node = lp["kernel"]
        >>> sorted(node.adapters), node.active, node.adapters["de"].rank
        (['de', 'default'], (('default', 1.0),), 4)
    """
    _check_name(name)
    if name in _names(tree):
        raise ValueError(f"adapter {name!r} already exists; drop_adapter it first")
    for bad in ("train", "dora"):
        if wrap_kwargs.get(bad):
            raise ValueError(f"`{bad}` is not supported for named adapters")
    if str(wrap_kwargs.get("init", "")).startswith("pissa"):
        raise ValueError("`init` 'pissa' is not supported for named adapters")
    return put_adapter(tree, name, wrap(unwrap(tree), **wrap_kwargs), activate=activate)


@modules.on_modules
def get_adapter(tree: Any, name: str) -> Any:
    """One adapter as an ordinary wrapped tree (:class:`lorax.LoRA` nodes; the others dropped).

    Use it to checkpoint or export one adapter: ``lorax.save(d, get_adapter(tree, "fr"))``,
    ``lorax.peft.save(d, get_adapter(tree, "fr"), name_map=...)``; and :func:`put_adapter` to
    bring a restored one back.

    Raises:
        ValueError: when no node has an adapter ``name``.

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> tree = lorax.add_adapter({"kernel": jnp.ones((4, 4))}, "en", rank=2)
        >>> node = lorax.get_adapter(tree, "en")["kernel"]
        >>> lorax.is_lora(node), node.rank
        (True, 2)
    """
    _require(tree, [name], "name")

    def one(node: Any) -> Any:
        multi = _multi(node)
        factors = multi.adapters.get(name)
        if factors is None:
            return multi.w
        return LoRA(w=multi.w, a=factors.a, b=factors.b, scale=factors.scale, rank=factors.rank,
                    path=multi.path, dropout=multi.dropout, **multi.axes_layout.node_fields)

    return _map(one, tree)


def _require(tree: Any, names: Sequence[str], argname: str) -> None:
    known = _names(tree)
    for n in names:
        _check_name(n, argname)
        if n not in known:
            raise ValueError(f"`{argname}`: no adapter {n!r}; adapters: {sorted(known)}")


@modules.on_modules
def select(tree: Any, names: str | Sequence[str], weights: Sequence[float] | None = None) -> Any:
    """Makes ``names`` the active adapters, with ``weights`` (default 1 each).

    The adapted kernel is then ``w + sum(weight_k * scale_k * a_k @ b_k)``. Nodes that lack a
    selected adapter use those they have. An empty list deactivates all (the base model).

    Raises:
        ValueError: for an unknown name, repeated names, or weights of another length.

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> lp = lorax.add_adapter({"kernel": jnp.ones((8, 4))}, "a", rank=2)
        >>> lp = lorax.add_adapter(lp, "b", rank=2)
        >>> lorax.select(lp, ["a", "b"], [0.5, 0.5])["kernel"].active
        (('a', 0.5), ('b', 0.5))
    """
    names = [names] if isinstance(names, str) else list(names)
    _require(tree, names, "names")
    if len(set(names)) != len(names):
        raise ValueError(f"expected distinct `names`, got {names}")
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names) or not all(
            isinstance(w, numbers.Real) and math.isfinite(w) for w in weights):
        raise ValueError(f"expected `weights` to be {len(names)} finite numbers, got {weights}")
    active = tuple(zip(names, (float(w) for w in weights), strict=True))
    return _map(lambda n: dataclasses.replace(
        _multi(n), active=tuple((k, w) for k, w in active if k in _multi(n).adapters)), tree)


@modules.on_modules
def drop_adapter(tree: Any, name: str) -> Any:
    """Removes adapter ``name`` everywhere; a node left without adapters becomes its ``w``.

    Raises:
        ValueError: when no node has an adapter ``name``.

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> params = {"kernel": jnp.ones((4, 4))}
        >>> tree = lorax.add_adapter(lorax.add_adapter(params, "en", rank=2), "fr", rank=1)
        >>> sorted(lorax.drop_adapter(tree, "fr")["kernel"].adapters)
        ['en']
        >>> lorax.drop_adapter(lorax.drop_adapter(tree, "fr"), "en")["kernel"] is params["kernel"]
        True
    """
    _require(tree, [name], "name")

    def drop(node: Any) -> Any:
        multi = _multi(node)
        adapters = {k: v for k, v in multi.adapters.items() if k != name}
        if not adapters:
            return multi.w
        return dataclasses.replace(multi, adapters=adapters,
                                   active=tuple((k, w) for k, w in multi.active if k != name))

    return _map(drop, tree)


@modules.on_modules
def combine_adapters(tree: Any, weights: Mapping[str, float], method: str = "cat", *,
                     name: str = "combined", rank: int | None = None) -> Any:
    """Adds adapter ``name`` made from a weighted set of adapters (they are kept).

    Methods, per kernel, with ``c_k = weight_k * scale_k``:

    * ``"cat"``: exact: ``a = [a_1 … a_K]``, ``b = [c_1 b_1; …; c_K b_K]`` (rank ``sum r_k``).
    * ``"linear"``: PEFT's: ``a = sum √|c_k| a_k``, ``b = sum sign(c_k) √|c_k| b_k``; needs equal
      ranks; not the sum of the ``ΔW_k`` (it has cross terms) unless one adapter is non-zero.
    * ``"svd"``: the weighted sum ``sum c_k a_k b_k`` (formed in full, offline) truncated to
      ``rank`` (default the largest ``r_k``) by SVD: the best rank-``rank`` approximation.

    The new adapter has scale 1 and is inactive (use :func:`select`).

    Raises:
        ValueError: for an unknown method or adapter, unequal ranks with ``"linear"``, an
            existing ``name``, or a bad ``rank``.

    Example:
        >>> import jax, jax.numpy as jnp, lorax
        >>> lp = lorax.add_adapter({"kernel": jnp.ones((8, 4))}, "a", rank=2)
        >>> lp = lorax.add_adapter(lp, "b", rank=1)
        >>> both = lorax.combine_adapters(lp, {"a": 1.0, "b": 1.0}, "cat")
        >>> both["kernel"].adapters["combined"].rank
        3
    """
    if method not in METHODS:
        raise ValueError(f"expected `method` to be one of {METHODS}, got {method!r}")
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"expected `weights` to be a non-empty {{name: weight}}, got {weights!r}")
    _require(tree, list(weights), "weights")
    _check_name(name)
    if name in _names(tree):
        raise ValueError(f"`name`: adapter {name!r} already exists")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral)
                             or rank < 1):
        raise ValueError(f"expected `rank` to be a positive int, got {rank!r}")

    def combine(node: Any) -> Any:
        multi = _multi(node)
        parts = [(multi.adapters[k], float(w) * multi.adapters[k].scale)
                 for k, w in weights.items() if k in multi.adapters]
        if not parts:
            return multi
        if method == "cat":
            a = jnp.concatenate([f.a for f, _ in parts], axis=-1)
            b = jnp.concatenate([f.b * jnp.asarray(c, f.b.dtype) for f, c in parts],
                                axis=multi.n_stack)
        elif method == "linear":
            ranks = {f.rank for f, _ in parts}
            if len(ranks) > 1:
                raise ValueError(f"method 'linear' needs equal ranks, got {sorted(ranks)} at "
                                 f"{multi.path!r}; use 'cat' or 'svd'")
            a = sum(f.a * jnp.asarray(math.sqrt(abs(c)), f.a.dtype) for f, c in parts)
            b = sum(f.b * jnp.asarray(math.copysign(math.sqrt(abs(c)), c), f.b.dtype)
                    for f, c in parts)
        else:
            a, b = _svd(multi, parts, rank or max(f.rank for f, _ in parts))
        factors = Factors(a, b, 1.0, a.shape[-1])
        return dataclasses.replace(multi, adapters={**multi.adapters, name: factors})

    return _map(combine, tree)


def _svd(multi: MultiLoRA, parts, rank: int):
    stack, ins, outs = multi.stack_shape, multi.in_shape, multi.out_shape
    i, o = math.prod(ins), math.prod(outs)
    if rank > min(i, o):
        raise ValueError(f"expected `rank` <= min(in, out) = {min(i, o)}, got {rank} at "
                         f"{multi.path!r}")
    delta = sum(c * jnp.matmul(jnp.reshape(f.a, (*stack, i, f.rank)).astype(jnp.float32),
                               jnp.reshape(f.b, (*stack, f.rank, o)).astype(jnp.float32),
                               precision=jax.lax.Precision.HIGHEST) for f, c in parts)
    u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
    root = jnp.sqrt(s[..., :rank])
    dtype = parts[0][0].a.dtype
    a = (u[..., :rank] * root[..., None, :]).astype(dtype)
    b = (root[..., :, None] * vt[..., :rank, :]).astype(dtype)
    return jnp.reshape(a, (*stack, *ins, rank)), jnp.reshape(b, (*stack, rank, *outs))
