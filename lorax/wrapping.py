"""`lorax.wrap`: rewrite a parameter tree so selected kernels carry trainable low-rank factors.

Three steps: the settings are checked once (:class:`lorax.LoRAConfig`), the leaves to adapt or
train in full are chosen (:mod:`lorax.selection`), and each chosen kernel becomes a node
(:func:`adapt`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lorax import modules, pissa
from lorax.config import LoRAConfig
from lorax.dora import adapted_norm
from lorax.layouts import Layout, stack_hint
from lorax.node import FullyTrained, LoRA, is_array_like, is_node, unbox
from lorax.paths import Selector, path_str
from lorax.selection import select
from lorax.sharding import place_factors
from lorax.stacks import named_leaves, stack_axes


def _init_factors(shape: tuple[int, ...], w: Any, rank: int, layout: Layout, init: str, key,
                  dtype):
    """Fresh ``a``, ``b`` for a kernel whose canonical ``(*stack, *in, *out)`` shape is
    ``shape`` (abstract when ``w`` is)."""
    stack, ins, outs = layout.groups(shape)
    a_shape, b_shape = (*stack, *ins, rank), (*stack, rank, *outs)
    if isinstance(w, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(a_shape, dtype), jax.ShapeDtypeStruct(b_shape, dtype)
    if init == "kaiming":
        # PEFT: kaiming_uniform_(A, a=sqrt(5)) on (r, fan_in) gives U(-1/sqrt(fan_in), ...).
        bound = 1.0 / math.sqrt(math.prod(ins))
        a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
    else:
        # PEFT's "gaussian": normal with standard deviation 1/r.
        a = jax.random.normal(key, a_shape, jnp.float32) / rank
    return a.astype(dtype), jnp.zeros(b_shape, dtype)


def wrap(
    params: Any,
    rank: int = 8,
    *,
    targets: Selector = None,
    exclude: Selector = None,
    alpha: float = 8.0,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    in_axes: int | Mapping[str, int] | None = None,
    stacked: Mapping[str, int] | None = None,
    axes: str | Mapping[str, str] | None = None,
    train: Selector = None,
    init: str = "kaiming",
    rslora: bool = False,
    dropout: float = 0.0,
    key: jax.Array | None = None,
    dtype: Any = None,
    dora: bool = False,
    config: LoRAConfig | None = None,
) -> Any:
    """Replaces selected kernels of ``params`` with :class:`lorax.LoRA` nodes.

    The function is pure: ``params`` is not modified, and every LoRA node holds the caller's
    kernel array itself (no copy). ``b`` starts at zero, so the wrapped model computes exactly
    what the base model computes until the factors are trained. (With ``init="pissa"`` the
    node holds a new residual kernel instead and ``b`` is not zero; the model is unchanged all
    the same.)

    Args:
        params: a Flax Linen ``params`` dict (or FrozenDict), an ``nnx.State``, or any pytree of
            arrays; trees of ``jax.ShapeDtypeStruct`` give abstract factors. Or an NNX
            module: then the result is a copy of the module whose adapted kernels compute
            factorized when it is called, with the factors as ``nnx.LoRAParam`` variables
            beside each kernel (``kernel_lora_a``, ``kernel_lora_b``); train it with
            ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` (see :mod:`lorax.modules`).
        rank: the default rank ``r``; it may exceed a kernel's ``min(in, out)``, as in PEFT
            (except with ``init="pissa"``).
        targets: which leaves to adapt. ``None`` selects every floating leaf of at least 2 dims
            named ``kernel`` (Flax) or Gemma's einsum weights (``q_einsum/w``, ``kv_einsum/w``,
            ``qkv_einsum/w``, ``attn_vec_einsum/w``, ``gating_einsum``, ``linear``; under
            ``kernel`` for ``nnx.Einsum``), not embedding tables (target those explicitly)
            and not a language model's output head (``lm_head``, ``logits_dense``,
            ``logitdense``: :data:`lorax.selection.OUTPUT_HEADS`). A string is a regex searched
            in the '/'-joined path. A list names modules, as PEFT's ``target_modules``: a plain
            name (``"q"``, ``"layers_1"``, ``"attention/query"``) matches whole path components
            (so ``["q", "v"]`` does not reach ``relative_attention_bias`` and ``"layers_1"``
            not ``layers_10``), an entry with regex syntax (``"layers_[0-3]"``, ``"^head/"``)
            is a regex searched in the path. A callable ``(path, leaf) -> bool`` decides
            itself. A string or list entry selects the ``kernel``/``embedding`` leaves under the
            paths it matches (so ``"query"`` adapts a module's kernel, not its bias); any other
            leaf is selected only when the pattern reaches into its name (``"w_q$"``).
        exclude: leaves never to adapt, in the same forms as ``targets``; it may name
            ``train`` leaves too (``exclude="head", train="head"``).
        alpha: the LoRA alpha; ``scale = alpha / rank`` (``alpha / sqrt(rank)`` with ``rslora``).
        rank_pattern: ``{regex: rank}``; the first regex found in a path overrides ``rank``.
        alpha_pattern: ``{regex: alpha}``, likewise for ``alpha``.
        in_axes: how many leading (non-stacked) axes of a kernel are inputs: an int for all, or
            ``{regex: int}``. Default: 1 for Flax attention q/k/v kernels ``(d, heads,
            head_dim)``, otherwise all axes but the last.
        stacked: ``{regex: n}``: the first ``n`` axes index a stack of layers (``nn.scan``);
            each layer gets its own factors.
        axes: the general form of ``in_axes``/``stacked``: a layout string with one letter
            per axis of the kernel, ``s`` (stack: each index has its own factors), ``i`` (input,
            contracted with the activation) or ``o`` (output), in any order; one string for all
            adapted kernels or ``{regex: layout}``. ``lorax.infer_axes(fn, params, *args)``
            reads every kernel's layout off the model. Default: the stack axes the tree
            tells (:func:`lorax.stacks.stack_axes`: layer-like axis names of Flax boxes and
            NNX variables, a scanned module's shared depth axis), then
            :func:`lorax.layouts.default_layout`: Gemma's einsum names (``q_einsum``
            ``'oio'``, ``kv_einsum``/``qkv_einsum`` ``'soio'``, ...), ``nn.ConvLocal``, then
            ``in_axes``' default.
        train: leaves to fine-tune in full (PEFT's ``modules_to_save``), boxed as
            :class:`lorax.FullyTrained`; they take precedence over ``targets``.
        init: ``"kaiming"`` (``a`` uniform in ±1/sqrt(fan_in), as PEFT) or ``"gaussian"``
            (``a`` normal with std ``1/r``), with ``b`` zero; or ``"pissa"``: ``a``, ``b`` from
            the kernel's top-``r`` singular triplets and ``w`` replaced by the residual
            ``W - scale * a @ b`` (a new array, node marked ``residual=True``; see
            :mod:`lorax.pissa`), ``"pissa_niter_<k>"`` likewise with a randomized SVD of ``k``
            power iterations (fast for big kernels).
        rslora: use rank-stabilised scaling ``alpha / sqrt(rank)``.
        dropout: LoRA dropout rate on the adapter input, applied only when the
            :func:`lorax.lora`-transformed function gets a ``lora_key``.
        key: PRNG key for ``a``; ``None`` means ``jax.random.key(0)``. Each leaf's key is
            derived from its path, so the same key gives bit-identical factors.
        dtype: dtype of the factors; default the kernel's dtype promoted to at least
            float32 (a bf16 or fp16 kernel gets float32 factors, as PEFT's
            ``autocast_adapter_dtype``; see :meth:`lorax.LoRAConfig.factor_dtype`).
        dora: DoRA (arXiv 2402.09353): each node also gets a trainable ``magnitude`` per
            output unit, initialised to the column norms of ``w + scale * a @ b`` (the norm
            over the input axes), and computes ``magnitude * V / ||V||_c`` with
            ``V = w + scale * a @ b``; the model is unchanged at step 0. See
            :mod:`lorax.dora`.
        config: all of the above in one :class:`lorax.LoRAConfig`, instead of the keywords
            (giving both is a ``TypeError``).

    Returns:
        A tree of the same structure where each selected leaf is a :class:`lorax.LoRA` node and
        each ``train`` leaf a :class:`lorax.FullyTrained` box; for a module, the wrapped
        module (``train`` leaves become ``nnx.LoRAParam`` variables).

    Raises:
        ValueError: for a bad argument, naming it and the offending path.
        TypeError: for an argument of the wrong type.

    A kernel wrapped with the wrong layout is reported by :func:`lorax.lora` with the ``axes``
    that fit its use.

    Example:
        >>> import jax, jax.numpy as jnp, lorax
        >>> params = {"dense": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}}
        >>> lp = lorax.wrap(params, rank=4)
        >>> node = lp["dense"]["kernel"]
        >>> node.a.shape, node.b.shape, node.scale
        ((16, 4), (4, 8), 2.0)
        >>> node.w is params["dense"]["kernel"]
        True
        >>> gemma = {"attn": {"q_einsum": {"w": jnp.ones((4, 32, 8))}}}  # (heads, d, head_dim)
        >>> lorax.wrap(gemma, rank=4)["attn"]["q_einsum"]["w"].layout
        'oio'
    """
    settings = dict(rank=rank, targets=targets, exclude=exclude, alpha=alpha,
                    rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, in_axes=in_axes,
                    stacked=stacked, axes=axes, train=train, init=init, rslora=rslora,
                    dropout=dropout, key=key, dtype=dtype, dora=dora)
    config = _config(config, settings)
    if modules.is_module(params):
        return modules.wrap_module(params, lambda state: wrap(state, config=config), config.key)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)
    paths = [path_str(kp) for kp, _ in flat]
    for path, (_, leaf) in zip(paths, flat, strict=True):
        if is_node(leaf):
            raise ValueError(
                f"expected `params` without LoRA nodes, got an already wrapped leaf at {path!r}; "
                "call lorax.unwrap (or lorax.merge) first"
            )
    arrays = [(p, leaf) for p, (_, leaf) in zip(paths, flat, strict=True) if is_array_like(leaf)]
    chosen = select(arrays, config)
    adapted, trained = set(chosen.adapted), set(chosen.trained)
    stacks = _tree_stacks(params, chosen.adapted, config)
    leaves = [FullyTrained(leaf) if path in trained else adapt(path, leaf, config,
                                                                stacks.get(path))
              if path in adapted else leaf for path, (_, leaf) in zip(paths, flat, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LoRAConfig)}


def _tree_stacks(params: Any, adapted: list[str], config: LoRAConfig
                 ) -> dict[str, tuple[int, ...]]:
    """The stack axes the tree tells for the adapted kernels (:func:`lorax.stacks.stack_axes`;
    an ``axes``/``stacked``/``in_axes`` setting that names a kernel overrides them)."""
    if isinstance(config.axes, str) or isinstance(config.in_axes, int):
        return {}
    return stack_axes(named_leaves(params), adapted)


def _config(config: LoRAConfig | None, settings: dict[str, Any]) -> LoRAConfig:
    if config is None:
        return LoRAConfig(**settings)
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"expected `config` to be a lorax.LoRAConfig, got {type(config).__name__}")
    given = [name for name, value in settings.items() if value is not _DEFAULTS[name]
             and not (isinstance(value, int | float | str) and value == _DEFAULTS[name])]
    if given:
        raise TypeError(f"expected the settings either in `config` or as keywords, got `config` "
                        f"and `{given[0]}`; use dataclasses.replace(config, {given[0]}=...)")
    return config


def adapt(path: str, w: Any, config: LoRAConfig, stack: tuple[int, ...] | None = None) -> LoRA:
    """The LoRA node ``config`` makes of the kernel ``w`` at ``path`` (abstract when ``w`` is);
    ``stack``: its stack axes as the tree tells them (:func:`lorax.stacks.stack_axes`).

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> node = adapt("q_einsum/w", jnp.ones((4, 32, 8)), lorax.LoRAConfig(rank=2))
        >>> node.layout, node.a.shape, node.b.shape  # Gemma's (heads, d, head_dim)
        ('oio', (32, 2), (2, 4, 8))
    """
    layout = Layout(config.layout_at(path, w, stack))
    canonical = layout.to_canonical(w.shape)
    # A rank above min(in, out) is allowed, as in PEFT: a (in, r) and b (r, out) stay well
    # defined (a Dense(1) head at the default rank 8 just has a redundant adapter).
    r = config.rank_at(path)
    _, ins, outs = layout.groups(canonical)
    if config.residual and r > min(math.prod(ins), math.prod(outs)):
        raise ValueError(
            f"expected `rank` <= min(in, out) = min({math.prod(ins)}, {math.prod(outs)}) with "
            f"init={config.init!r} (the top-r singular directions of W), got {r} at {path!r} "
            f"(layout {layout.roles!r})" + (stack_hint(path, tuple(w.shape), layout.roles) or ""))
    scale = config.scale_at(path, r)
    dtype = config.factor_dtype(w)
    # PiSSA and DoRA work on the canonical (*stack, *in, *out) view of w.
    moved = not layout.is_canonical and (config.residual or config.dora)
    w_c = _transposed(w, layout.order) if moved else w
    if config.residual:  # PiSSA: w becomes the residual W - s·a·b
        a, b, w_c = pissa.init_factors(w_c, r, scale, layout, config.init, config.key_at(path),
                                       dtype)
        w = _transposed(w_c, layout.inverse) if moved else w_c
    else:
        a, b = _init_factors(canonical, w, r, layout, config.init, config.key_at(path), dtype)
    a, b = place_factors(w, a, b, layout)  # on w's NamedSharding, if it has one
    magnitude = _dora_magnitude(w_c, a, b, scale, layout, dtype) if config.dora else None
    return LoRA(w=w, a=a, b=b, magnitude=magnitude, scale=scale, rank=r, path=path,
                dropout=config.dropout, residual=config.residual, **layout.node_fields)


def _transposed(w: Any, order: tuple[int, ...]) -> Any:
    if isinstance(w, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(w.shape[j] for j in order), w.dtype)
    return jnp.transpose(w, order)


def _dora_magnitude(w, a, b, scale, layout, dtype):
    # ||w + s·a·b||_c, so m / ||.||_c = 1 and the model is unchanged at step 0; kept in at
    # least float32 (a bf16 magnitude would move the model by its rounding at step 0).
    dtype = jnp.promote_types(dtype, jnp.float32)
    stack, _, outs = layout.groups(w.shape)
    if isinstance(w, jax.ShapeDtypeStruct) or isinstance(a, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((*stack, *outs), dtype)
    return adapted_norm(w, a, b, scale, layout).astype(dtype)


@modules.on_modules
def unwrap(tree: Any) -> Any:
    """Drops every adapter: LoRA nodes become their ``w``, boxes their value (no copies).

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> params = {"kernel": jnp.ones((4, 4))}
        >>> lorax.unwrap(lorax.wrap(params, rank=2))["kernel"] is params["kernel"]
        True
    """
    return jax.tree.map(unbox, tree, is_leaf=is_node)
