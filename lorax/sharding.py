"""Sharding for wrapped trees: LoRA factors follow the sharding of the kernel they adapt.

For a kernel ``w`` laid out ``(*stack, *in, *out)`` with ``PartitionSpec(*stack_spec, *in_spec,
*out_spec)``, the factors get::

    a: (*stack, *in, rank)   PartitionSpec(*stack_spec, *in_spec, None)
    b: (*stack, rank, *out)  PartitionSpec(*stack_spec, None, *out_spec)

so ``x·a`` is computed where ``x·w``'s input shards are, ``(x·a)·b`` lands on ``w``'s output
shards, and the rank axis (tiny) is never split. A column-sharded kernel thus gets a replicated
``a`` and a column-sharded ``b``; a row-sharded kernel a row-sharded ``a`` and a replicated ``b``;
an FSDP-sharded kernel factors sharded along the same mesh axes wherever its own axes are.

:func:`lorax.wrap` applies this itself to kernels that are committed ``jax.Array``\\ s (or
``jax.ShapeDtypeStruct``\\ s) with a ``NamedSharding`` (each factor is made, then
``device_put`` on its sharding: a factor-sized transient on one device). :func:`partition_specs`
and :func:`shardings` turn the base model's specs into specs for the wrapped tree, for
``jax.jit(in_shardings=..., out_shardings=...)``.

Inside ``jax.jit`` the kernels are tracers, so ``lorax.wrap`` cannot place anything; give the
jitted function ``out_shardings`` instead and the factors are created sharded, each device
computing only its own shard::

    abstract = jax.eval_shape(lambda k: lorax.wrap(model.init(k, x)["params"], rank=8), key)
    out = lorax.shardings(abstract, base_specs, mesh)
    wrapped = jax.jit(lambda k: lorax.wrap(model.init(k, x)["params"], rank=8),
                      out_shardings=out)(key)

(To wrap already-placed params under ``jit``, pass ``donate_argnums=0`` so W is not copied.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lorax.layouts import Layout
from lorax.node import FullyTrained, LoRA, MultiLoRA, is_adapted, is_array_like, is_node
from lorax.partition import split
from lorax.paths import path_str

# Flax logical-axis rules: ((logical_name, mesh_axes_or_None), ...).
Rules = Sequence[tuple[str, Any]]


def _padded(spec: PartitionSpec, ndim: int, where: str) -> tuple[Any, ...]:
    entries = tuple(spec)
    if len(entries) > ndim:
        raise ValueError(
            f"expected a PartitionSpec of at most {ndim} entries for a {ndim}-dim kernel, got "
            f"{spec}{where}"
        )
    return entries + (None,) * (ndim - len(entries))


def factor_specs(
    spec: PartitionSpec,
    node_or_ndim: LoRA | MultiLoRA | int,
    *,
    n_stack: int = 0,
    n_in: int | None = None,
    layout: str | Layout | None = None,
) -> tuple[PartitionSpec, PartitionSpec]:
    """The ``(a_spec, b_spec)`` of the factors of a kernel partitioned by ``spec``.

    Args:
        spec: the kernel's ``PartitionSpec``; missing trailing entries mean ``None``.
        node_or_ndim: a :class:`lorax.LoRA` (or ``MultiLoRA``) node, whose ``n_stack``/``n_in``
            are used, or the kernel's number of dims.
        n_stack: with an int ``node_or_ndim``: leading stacked (``nn.scan``) axes.
        n_in: with an int ``node_or_ndim``: input axes after the stack; default all but the last
            (check it against the node for attention q/k/v kernels, where lorax uses 1).
        layout: with an int ``node_or_ndim``: the kernel's layout (a string of ``s``/``i``/``o``
            per axis or a :class:`lorax.layouts.Layout`), for axes in any order; it overrides
            ``n_stack``/``n_in``.

    Returns:
        ``(a_spec, b_spec)``, each with one entry per factor dim.

    Raises:
        ValueError: ``spec`` has more entries than the kernel has dims, or the axis counts do
            not leave an output axis.

    Example:
        >>> from jax.sharding import PartitionSpec as P
        >>> factor_specs(P(None, "model"), 2)  # column-sharded: b follows the columns
        (P(None, None), P(None, 'model'))
        >>> factor_specs(P("layers", "model", None, None), 4, n_stack=1, n_in=2)
        (P('layers', 'model', None, None), P('layers', None, None))
        >>> factor_specs(P("heads", None, None), 3, layout="oio")  # Gemma q_einsum (N, D, H)
        (P(None, None), P(None, 'heads', None))
    """
    if is_adapted(node_or_ndim):
        node = node_or_ndim
        ndim, where, layout = len(node.shape), f" at {node.path!r}", node.axes_layout
    else:
        ndim, where = int(node_or_ndim), ""
        if layout is None:
            n_in = ndim - n_stack - 1 if n_in is None else n_in
            if not (n_stack >= 0 and n_in >= 1 and n_stack + n_in < ndim):
                raise ValueError(
                    f"expected n_stack >= 0, n_in >= 1 and n_stack + n_in < ndim, got "
                    f"n_stack={n_stack}, n_in={n_in}, ndim={ndim}")
            layout = Layout.canonical(ndim, n_stack, n_in)
        layout = layout if isinstance(layout, Layout) else Layout(layout)
    if layout.ndim != ndim:
        raise ValueError(f"expected a layout of {ndim} axes, got {layout.roles!r}{where}")
    stack, ins, outs = layout.groups(layout.to_canonical(_padded(spec, ndim, where)))
    return PartitionSpec(*stack, *ins, None), PartitionSpec(*stack, None, *outs)


def _is_box(x: Any) -> bool:
    # Flax Linen's metadata boxes (nn.Partitioned, nn.LogicallyPartitioned, ...). Flax is only
    # imported when a leaf is none of the usual kinds.
    if x is None or isinstance(x, (PartitionSpec, NamedSharding)) or is_array_like(x):
        return False
    from flax.core import meta

    return isinstance(x, meta.AxisMetadata)


def _logical(names: tuple[Any, ...], rules: Rules | None, path: str) -> PartitionSpec:
    """Logical axis names to mesh axes with Flax's rules (``rules``, else the context's)."""
    import flax.linen as nn

    if rules is None:
        rules = nn.get_logical_axis_rules()
        if not rules and any(name is not None for name in names):
            raise ValueError(
                f"expected logical-axis rules for the logical names {names} at {path!r}: pass "
                "`rules=` or call inside `flax.linen.logical_axis_rules(...)`"
            )
    spec = nn.logical_to_mesh_axes(names, rules)
    return PartitionSpec(*([None] * len(names))) if spec is None else spec


def _base_spec(x: Any, rules: Rules | None, path: str) -> PartitionSpec:
    """One leaf of a base spec tree as a mesh ``PartitionSpec``."""
    if x is None:
        return PartitionSpec()
    if isinstance(x, NamedSharding):
        return x.spec
    if is_array_like(x):  # an array's own layout; P() without a NamedSharding
        sharding = None if isinstance(x, jax.core.Tracer) else getattr(x, "sharding", None)
        return sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
    if _is_box(x):
        import flax.linen as nn

        if isinstance(x, nn.LogicallyPartitioned):
            return _logical(tuple(x.names), rules if rules is not None else x.rules, path)
        if hasattr(x, "get_partition_spec"):  # nn.Partitioned: names are mesh axes
            return x.get_partition_spec()
    if isinstance(x, PartitionSpec):
        return x if rules is None else _logical(tuple(x), rules, path)
    raise TypeError(
        f"expected a PartitionSpec, NamedSharding, sharded array, None or Flax partitioning box "
        f"in `base_specs`, got {type(x).__name__} at {path!r}"
    )


def partition_specs(tree: Any, base_specs: Any, *, rules: Rules | None = None) -> Any:
    """A ``PartitionSpec`` tree for the wrapped ``tree``, from the base model's specs.

    Each :class:`lorax.LoRA` node becomes ``LoRA(w=spec, a=a_spec, b=b_spec, ...)`` with the
    node's static fields (so the result has the wrapped tree's structure, as ``jax.jit``'s
    ``in_shardings``/``out_shardings`` require), with the factor specs of :func:`factor_specs`;
    a DoRA ``magnitude`` ``(*stack, *out)`` gets the kernel's stack and output entries, each
    adapter of a ``MultiLoRA`` node the factor specs, and a quantized ``w`` (codes and scales)
    ``P()``. Each :class:`lorax.FullyTrained` box holds its leaf's spec; other leaves keep theirs.

    Args:
        tree: a wrapped tree (arrays or ``jax.ShapeDtypeStruct``\\ s, e.g. from
            ``jax.eval_shape(lambda p: lorax.wrap(p, ...), params)``).
        base_specs: a tree with the structure of the *unwrapped* params whose leaves are
            ``PartitionSpec``\\ s, ``NamedSharding``\\ s, arrays or ``ShapeDtypeStruct``\\ s (the
            spec of their ``NamedSharding``; ``P()`` without one), ``None`` (replicated,
            ``P()``), or Flax boxes: ``nn.Partitioned`` (its names are
            mesh axes) and ``nn.LogicallyPartitioned`` (its names are logical axes, mapped with
            ``rules``, else the box's rules, else the ``nn.logical_axis_rules`` context). The
            boxed variables of ``model.init`` and the output of ``nn.get_partition_spec`` or
            ``nnx.get_partition_spec`` all qualify.
        rules: Flax logical-axis rules ``((logical, mesh_axes), ...)``. When given, plain
            ``PartitionSpec`` leaves are read as logical axis names too (as
            ``nn.get_partition_spec`` returns them for ``nn.LogicallyPartitioned`` boxes).

    Returns:
        A tree shaped like ``tree`` with ``PartitionSpec`` leaves.

    Raises:
        ValueError: ``base_specs`` does not have the base params' structure, or a spec has
            more entries than its kernel has dims.
        TypeError: a leaf of ``base_specs`` is none of the accepted kinds.

    Example:
        >>> import jax, jax.numpy as jnp, lorax
        >>> from jax.sharding import PartitionSpec as P
        >>> params = {"up": {"kernel": jnp.ones((8, 32))}, "down": {"kernel": jnp.ones((32, 8))}}
        >>> lp = lorax.wrap(params, rank=2)
        >>> specs = lorax.partition_specs(
        ...     lp, {"up": {"kernel": P(None, "model")}, "down": {"kernel": P("model", None)}})
        >>> specs["up"]["kernel"].a, specs["up"]["kernel"].b
        (P(None, None), P(None, 'model'))
        >>> specs["down"]["kernel"].a, specs["down"]["kernel"].b
        (P('model', None), P(None, None))
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)
    try:
        spec_leaves = treedef.flatten_up_to(base_specs)
    except (ValueError, TypeError) as err:
        raise ValueError(
            "expected `base_specs` to have the structure of the unwrapped params (one spec per "
            f"array leaf, a LoRA kernel's spec at its kernel's place): {err}"
        ) from err
    out = []
    for (keypath, leaf), raw in zip(flat, spec_leaves, strict=True):
        path = path_str(keypath)
        spec = _base_spec(raw, rules, path)
        if is_adapted(leaf):
            out.append(node_specs(leaf, spec))
        elif isinstance(leaf, FullyTrained):
            out.append(FullyTrained(spec))
        else:
            out.append(spec)
    return jax.tree_util.tree_unflatten(treedef, out)


def node_specs(node: LoRA | MultiLoRA, spec: PartitionSpec) -> LoRA | MultiLoRA:
    """``node`` with every array replaced by its spec, given ``w``'s spec (static fields kept)."""
    a_spec, b_spec = factor_specs(spec, node)
    # A quantized w (lorax.quantize) stores flattened blocks with no axis matching the kernel's:
    # its codes and scales are replicated.
    w_is_leaf = jax.tree_util.treedef_is_leaf(jax.tree.structure(node.w))
    w_spec = spec if w_is_leaf else jax.tree.map(lambda _: PartitionSpec(), node.w)
    # DoRA's magnitude (*stack, *out) is sharded like w's stack and output axes.
    stack, _, outs = node.groups(_padded(spec, len(node.shape), f" at {node.path!r}"))
    return node.with_specs(w_spec, a_spec, b_spec, PartitionSpec(*stack, *outs))


def shardings(tree: Any, base_specs: Any, mesh: Mesh, *, rules: Rules | None = None) -> Any:
    """Like :func:`partition_specs`, with ``NamedSharding(mesh, spec)`` leaves.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, lorax
        >>> from jax.sharding import Mesh, PartitionSpec as P
        >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
        >>> lp = lorax.wrap({"kernel": jnp.ones((8, 4))}, rank=2)
        >>> lorax.shardings(lp, {"kernel": P("model", None)}, mesh)["kernel"].a.spec
        P('model', None)
    """
    specs = partition_specs(tree, base_specs, rules=rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def state_shardings(tx: Any, tree: Any, base_specs: Any, mesh: Mesh, *,
                    rules: Rules | None = None) -> tuple[Any, Any]:
    """The shardings of what a train step returns: the trainable half and the optimizer state.

    Give them to ``jax.jit(step, out_shardings=...)`` (and to ``jax.jit(tx.init,
    out_shardings=...)``): without them XLA chooses the outputs' shardings itself, and a factor
    may come back sharded differently from how it went in (``b`` of a row-parallel kernel,
    ``P(None, None)``, returned as ``P(None, 'fsdp')`` after one step).

    The trainable half's shardings are those of :func:`shardings` with the frozen leaves'
    holes of :func:`lorax.split`. The state is ``jax.eval_shape(tx.init, train)`` for
    ``train = lorax.split(tree)[0]`` (the documented pattern); each of its array leaves that
    mirrors a parameter (Adam's ``mu`` and ``nu``, an accumulator: its key path ends with the
    parameter's, and it has the parameter's shape) gets the parameter's sharding, every other
    one (a step count, a factored statistic of another shape) is replicated, ``P()``.

    Args:
        tx: the optimizer, e.g. ``lorax.optimizer(optax.adamw(1e-3))``.
        tree: the whole wrapped tree (arrays or ``jax.ShapeDtypeStruct``\\ s).
        base_specs: the base model's specs, as for :func:`partition_specs`.
        mesh: the ``Mesh``.
        rules: Flax logical-axis rules, as for :func:`partition_specs`.

    Returns:
        ``(train_shardings, opt_state_shardings)``, trees of ``NamedSharding`` with the
        structures of ``lorax.split(tree)[0]`` and of ``tx.init`` of it.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, optax, lorax
        >>> from jax.sharding import Mesh, PartitionSpec as P
        >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
        >>> lp = lorax.wrap({"kernel": jnp.ones((8, 4))}, rank=2)
        >>> tx = lorax.optimizer(optax.adam(1e-3))
        >>> train, state = state_shardings(tx, lp, {"kernel": P("model", None)}, mesh)
        >>> train["kernel"].a.spec, train["kernel"].w
        (P('model', None), None)
        >>> adam = state.inner_states["lorax_trainable"].inner_state[0]
        >>> adam.mu["kernel"].a.spec, adam.count.spec
        (P('model', None), P())
    """
    train_shardings = split(shardings(tree, base_specs, mesh, rules=rules))[0]
    train = split(tree)[0]
    abstract = jax.eval_shape(tx.init, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), train))
    params = [(tuple(keypath), tuple(leaf.shape), sharding) for (keypath, leaf), sharding in zip(
        jax.tree_util.tree_flatten_with_path(train)[0], jax.tree.leaves(train_shardings),
        strict=True)]
    replicated = NamedSharding(mesh, PartitionSpec())

    def of(keypath: Any, leaf: Any) -> NamedSharding:
        keypath = tuple(keypath)
        matches = [(len(path), sharding) for path, shape, sharding in params
                   if keypath[len(keypath) - len(path):] == path
                   and tuple(leaf.shape) == shape]
        return max(matches, key=lambda m: m[0])[1] if matches else replicated

    return train_shardings, jax.tree_util.tree_map_with_path(of, abstract)


def place_factors(w: Any, a: Any, b: Any, layout: Layout) -> tuple[Any, Any]:
    """Puts fresh factors where ``w`` (laid out as ``layout``) is: on the factor shardings of
    ``w``'s ``NamedSharding``.

    A committed ``jax.Array`` ``w`` gets ``device_put`` factors; a ``jax.ShapeDtypeStruct``
    with a ``NamedSharding`` gets abstract factors carrying theirs. Anything else (unsharded
    arrays, tracers under ``jax.jit``: use ``out_shardings`` there) is returned unchanged.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
        >>> w = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, P("model")))
        >>> a, b = place_factors(w, jax.ShapeDtypeStruct((8, 2), jnp.float32),
        ...                      jax.ShapeDtypeStruct((2, 4), jnp.float32), Layout("io"))
        >>> a.sharding.spec, b.sharding.spec
        (P('model', None), P(None, None))
    """
    if isinstance(w, jax.core.Tracer):
        return a, b
    sharding = getattr(w, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return a, b
    a_spec, b_spec = factor_specs(sharding.spec, w.ndim, layout=layout)
    if isinstance(w, jax.ShapeDtypeStruct):
        return (
            jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(sharding.mesh, a_spec)),
            jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=NamedSharding(sharding.mesh, b_spec)),
        )
    if isinstance(w, jax.Array) and w.committed:
        # Every process computes the same factors (same key), as device_put onto a multi-host
        # sharding requires.
        return (
            jax.device_put(a, NamedSharding(sharding.mesh, a_spec)),
            jax.device_put(b, NamedSharding(sharding.mesh, b_spec)),
        )
    return a, b
