"""`lorax.wrap`: rewrite a parameter tree so selected kernels carry trainable low-rank factors."""

from __future__ import annotations

import math
import numbers
import re
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax import pissa
from lorax.dora import adapted_norm
from lorax.layouts import layout_order, resolve_layout, stored_layout
from lorax.node import FullyTrained, LoRA, is_array_like, is_node, unbox
from lorax.paths import PathSelector, Selector, first_match, hint, path_str, unmatched_keys
from lorax.sharding import place_factors

INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_<k>")
# Leaf names that regex `targets` select by their module's path alone (Flax's names for
# Dense/Conv/Einsum kernels and Embed tables, Gemma's einsum `w`); other leaves must be named
# by the regex itself.
KERNEL_NAMES = ("kernel", "embedding", "w")
# What `targets=None` adapts: Flax kernels, and Gemma's einsum weights (`q_einsum/w`, ...,
# `gating_einsum` or `gating_einsum/w`, `linear` or `linear/w`).
DEFAULT_TARGETS = re.compile(r"(^|/)(kernel|[^/]*einsum/w|[^/]*einsum|linear/w|linear)$")
def _is_float_array(leaf: Any) -> bool:
    return is_array_like(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating)


def _check_int(value: Any, argname: str, path: str | None, minimum: int) -> int:
    where = f" at {path!r}" if path else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"expected `{argname}` to be an int >= {minimum}, got {value!r}{where}")
    return int(value)


def _check_alpha(value: Any, path: str | None) -> float:
    where = f" at {path!r}" if path else ""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0
            or not math.isfinite(value)):
        raise ValueError(f"expected `alpha` to be a positive finite number, got {value!r}{where}")
    return float(value)


def _leaf_key(key: jax.Array, path: str) -> jax.Array:
    # A stable per-path key: factors do not depend on tree order or on which other leaves exist.
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _init_factors(shape: tuple[int, ...], w: Any, rank: int, n_stack: int, n_in: int, init: str,
                  key, dtype):
    """Fresh ``a``, ``b`` for a kernel whose canonical ``(*stack, *in, *out)`` shape is
    ``shape`` (abstract when ``w`` is)."""
    stack, ins, outs = shape[:n_stack], shape[n_stack : n_stack + n_in], shape[n_stack + n_in :]
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
) -> Any:
    """Replaces selected kernels of ``params`` with :class:`lorax.LoRA` nodes.

    The function is pure: ``params`` is not modified, and every LoRA node holds the caller's
    kernel array itself (no copy). ``b`` starts at zero, so the wrapped model computes exactly
    what the base model computes until the factors are trained. (With ``init="pissa"`` the
    node holds a new residual kernel instead and ``b`` is not zero; the model is unchanged all
    the same.)

    Args:
        params: a Flax Linen ``params`` dict (or FrozenDict), an ``nnx.State``, or any pytree of
            arrays; trees of ``jax.ShapeDtypeStruct`` give abstract factors.
        rank: the default rank ``r``.
        targets: which leaves to adapt. ``None`` selects every floating leaf of at least 2 dims
            named ``kernel`` (Flax) or Gemma's einsum weights (``q_einsum/w``, ``kv_einsum/w``,
            ``qkv_einsum/w``, ``attn_vec_einsum/w``, ``gating_einsum``, ``linear``), not
            embedding tables (target those explicitly). A regex is
            searched in the '/'-joined path; a list matches when any regex does; a callable
            ``(path, leaf) -> bool``. A regex selects the ``kernel``/``embedding`` leaves under
            the paths it matches (so ``"query"`` adapts a module's kernel, not its bias); any
            other leaf is selected only when the regex reaches into its name (``"w_q$"``).
        exclude: leaves never to adapt, in the same forms as ``targets``.
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
            reads every kernel's layout off the model. Default (:func:`default_layout`):
            Gemma's einsum names (``q_einsum`` ``'oio'``, ``kv_einsum``/``qkv_einsum``
            ``'soio'``, ...), ``nn.ConvLocal``, then ``in_axes``' default.
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
        dtype: dtype of the factors; default the kernel's dtype.
        dora: DoRA (arXiv 2402.09353): each node also gets a trainable ``magnitude`` per
            output unit, initialised to the column norms of ``w + scale * a @ b`` (the norm
            over the input axes), and computes ``magnitude * V / ||V||_c`` with
            ``V = w + scale * a @ b``; the model is unchanged at step 0. See
            :mod:`lorax.dora`.

    Returns:
        A tree of the same structure where each selected leaf is a :class:`lorax.LoRA` node and
        each ``train`` leaf a :class:`lorax.FullyTrained` box.

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
    _check_int(rank, "rank", None, 1)
    alpha = _check_alpha(alpha, None)
    is_pissa = isinstance(init, str) and init.startswith("pissa")
    if is_pissa:
        pissa.niter(init)  # validates "pissa_niter_<k>"
    elif init not in INITS:
        raise ValueError(f"expected `init` to be one of {INITS}, got {init!r}")
    if not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"expected `dropout` to be a float in [0, 1), got {dropout!r}")
    if not isinstance(rslora, bool | np.bool_):
        raise TypeError(f"expected `rslora` to be a bool, got {type(rslora).__name__}")
    if not isinstance(dora, bool | np.bool_):
        raise TypeError(f"expected `dora` to be a bool, got {type(dora).__name__}")
    if key is None:
        key = jax.random.key(0)
    if in_axes is not None and not isinstance(in_axes, Mapping):
        _check_int(in_axes, "in_axes", None, 1)
    for argname, mapping in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern),
                             ("stacked", stacked)) + ((("axes", axes),) if not isinstance(
                                 axes, str) else ()):
        if mapping is not None and not isinstance(mapping, Mapping):
            raise TypeError(
                f"expected `{argname}` to be a dict {{regex: value}}, got {type(mapping).__name__}"
            )
    if dtype is not None:
        try:
            floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            raise TypeError(f"expected `dtype` to be a floating dtype, got {dtype!r}")
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)) and not (
        is_array_like(key) and key.dtype == jnp.uint32 and tuple(key.shape) == (2,)
    ):
        raise TypeError(
            f"expected `key` to be a PRNG key (jax.random.key(...)), got {type(key).__name__}"
        )

    target_sel = PathSelector(targets, "targets")
    exclude_sel = PathSelector(exclude, "exclude")
    train_sel = PathSelector(train, "train")

    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)
    paths = [path_str(kp) for kp, _ in flat]
    for path, (_, leaf) in zip(paths, flat, strict=True):
        if is_node(leaf):
            raise ValueError(
                f"expected `params` without LoRA nodes, got an already wrapped leaf at {path!r}; "
                "call lorax.unwrap (or lorax.merge) first"
            )
    arrays = [(p, leaf) for p, (_, leaf) in zip(paths, flat, strict=True) if is_array_like(leaf)]
    array_paths = [p for p, _ in arrays]

    # Which leaves are trained in full, which are adapted.
    trained, adapted, exclude_hits = set(), [], set()
    pattern_hits: dict[str, list[tuple[str, Any]]] = {}
    for path, leaf in arrays:
        if train_sel(path, leaf):
            if not _is_float_array(leaf):
                raise ValueError(
                    f"expected `train` to select floating leaves, got {leaf.dtype} at {path!r}"
                )
            trained.add(path)
            continue
        excluded_by = exclude_sel.matching(path, leaf)
        if excluded_by:
            exclude_hits.update(excluded_by)
            continue
        if target_sel.is_none:
            if DEFAULT_TARGETS.search(path) and _is_float_array(leaf) and leaf.ndim >= 2:
                adapted.append(path)
            continue
        hits = target_sel.naming(path, leaf, KERNEL_NAMES)
        for pattern in hits:
            pattern_hits.setdefault(pattern, []).append((path, leaf))
        if hits and _is_float_array(leaf) and leaf.ndim >= 2:
            adapted.append(path)

    for pattern in exclude_sel.patterns:
        if pattern.pattern not in exclude_hits:
            raise ValueError(
                f"`exclude` pattern {pattern.pattern!r} matched no leaf; {hint(array_paths)}"
            )
    if not train_sel.is_none and not trained:
        raise ValueError(f"`train` matched no leaf; {hint(array_paths)}")
    for pattern in [p.pattern for p in target_sel.patterns] + (
        ["<callable>"] if target_sel.fn else []
    ):
        hits = pattern_hits.get(pattern, [])
        if not hits:
            raise ValueError(f"`targets` pattern {pattern!r} matched no leaf; {hint(array_paths)}")
        bad = [(p, x) for p, x in hits if not (_is_float_array(x) and x.ndim >= 2)]
        if len(bad) == len(hits) or (pattern == "<callable>" and bad):
            p, x = bad[0]
            raise ValueError(
                f"expected `targets` to select floating kernels with ndim >= 2, got "
                f"{x.dtype}{list(x.shape)} at {p!r}"
            )
    if not adapted:
        default = (" (the default `targets` picks floating leaves of ndim >= 2 named `kernel` or "
                   "Gemma's einsum weights; pass `targets=` regexes for other names)"
                   if target_sel.is_none else "")
        raise ValueError(f"no leaf was selected for adaptation{default}; {hint(array_paths)}")
    for argname, mapping in (
        ("rank_pattern", rank_pattern),
        ("alpha_pattern", alpha_pattern),
        ("in_axes", in_axes if isinstance(in_axes, Mapping) else None),
        ("stacked", stacked),
    ):
        missing = unmatched_keys(mapping, adapted, argname)
        if missing:
            raise ValueError(
                f"`{argname}` pattern {missing[0]!r} matched no adapted leaf; adapted paths: "
                + ", ".join(repr(p) for p in adapted[:8])
            )
    # `axes` may come from infer_axes, which lists every kernel the model uses: its keys need
    # only match some leaf.
    missing = unmatched_keys(None if isinstance(axes, str) else axes, array_paths, "axes")
    if missing:
        raise ValueError(f"`axes` pattern {missing[0]!r} matched no leaf; {hint(array_paths)}")

    adapted_set = set(adapted)
    new_leaves = []
    for path, (_, leaf) in zip(paths, flat, strict=True):
        if path in trained:
            new_leaves.append(FullyTrained(leaf))
        elif path in adapted_set:
            new_leaves.append(
                _adapt(path, leaf, rank, alpha, rank_pattern, alpha_pattern,
                       resolve_layout(path, leaf, in_axes, stacked, axes), init, rslora,
                       float(dropout), key, dtype, dora=bool(dora))
            )
        else:
            new_leaves.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, new_leaves)


def _adapt(path, w, rank, alpha, rank_pattern, alpha_pattern, layout, init, rslora, dropout, key,
           dtype, *, dora: bool = False) -> LoRA:
    n_stack, n_in = layout.count("s"), layout.count("i")
    order = layout_order(layout)
    canonical = tuple(w.shape[j] for j in order)
    r = first_match(rank_pattern, path, "rank_pattern")
    r = rank if r is None else _check_int(r, "rank_pattern", path, 1)
    fan_in = math.prod(canonical[n_stack : n_stack + n_in])
    fan_out = math.prod(canonical[n_stack + n_in :])
    if r > min(fan_in, fan_out):
        raise ValueError(
            f"expected `rank` <= min(in, out) = min({fan_in}, {fan_out}), got {r} at {path!r} "
            f"(layout {layout!r}; a stacked kernel needs `stacked=` or `axes=`)"
        )
    a_ = first_match(alpha_pattern, path, "alpha_pattern")
    a_ = alpha if a_ is None else _check_alpha(a_, path)
    scale = a_ / math.sqrt(r) if rslora else a_ / r
    factor_dtype = jnp.dtype(dtype) if dtype is not None else w.dtype
    stored = stored_layout(layout)  # canonical kernels keep the compact form
    residual = init.startswith("pissa")
    # PiSSA and DoRA work on the canonical (*stack, *in, *out) view of w.
    w_c = w if stored is None or not (residual or dora) else _transposed(w, order)
    if residual:  # PiSSA: w becomes the residual W - s·a·b
        a, b, w_c = pissa.init_factors(w_c, r, scale, n_stack, n_in, init, _leaf_key(key, path),
                                       factor_dtype)
        w = w_c if stored is None else _transposed(w_c, tuple(np.argsort(order)))
    else:
        a, b = _init_factors(canonical, w, r, n_stack, n_in, init, _leaf_key(key, path),
                             factor_dtype)
    a, b = place_factors(w, a, b, n_stack, n_in, layout)  # on w's NamedSharding, if it has one
    magnitude = _dora_magnitude(w_c, a, b, scale, n_stack, n_in, factor_dtype) if dora else None
    return LoRA(w=w, a=a, b=b, magnitude=magnitude, scale=scale, rank=r, n_stack=n_stack,
                n_in=n_in, path=path, dropout=dropout, residual=residual, layout=stored)


def _transposed(w: Any, order: tuple[int, ...]) -> Any:
    if isinstance(w, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(w.shape[j] for j in order), w.dtype)
    return jnp.transpose(w, order)


def _dora_magnitude(w, a, b, scale, n_stack, n_in, dtype):
    # ||w + s·a·b||_c, so m / ||.||_c = 1 and the model is unchanged at step 0; kept in at
    # least float32 (a bf16 magnitude would move the model by its rounding at step 0).
    dtype = jnp.promote_types(dtype, jnp.float32)
    shape = (*w.shape[:n_stack], *w.shape[n_stack + n_in :])
    if isinstance(w, jax.ShapeDtypeStruct) or isinstance(a, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(shape, dtype)
    return adapted_norm(w, a, b, scale, n_stack, n_in).astype(dtype)


def unwrap(tree: Any) -> Any:
    """Drops every adapter: LoRA nodes become their ``w``, boxes their value (no copies).

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> params = {"kernel": jnp.ones((4, 4))}
        >>> lorax.unwrap(lorax.wrap(params, rank=2))["kernel"] is params["kernel"]
        True
    """
    return jax.tree.map(unbox, tree, is_leaf=is_node)
