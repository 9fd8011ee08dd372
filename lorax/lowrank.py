"""How the low-rank term ``s·(x·first)·second`` of a factorized consumer is lowered to XLA.

The consumer rules (:mod:`lorax.rules`) reduce every use of a LoRA kernel to one canonical
problem: an activation ``x`` laid out ``(*batch, *free, *contract)``, a first factor
``(*batch, *free_stack, *contract, r)`` and a second factor ``(*batch, *free_stack, r, *out)``.
:func:`lowrank_term` computes it so that its cost follows its FLOPs:

* **Flattened products.** The activation's free axes (e.g. batch × sequence) and the contracted
  axes (e.g. heads × head_dim) are merged before the two products (bitcasts, no copies), so both
  are plain matrix products ``(N, K)·(K, r)`` and ``(N, r)·(r, O)``. On 3-D activations XLA
  otherwise contracts two axes at once in the factor gradients (``tᵀ·dy``, ``xᵀ·g``) and on CPU
  materializes transposed copies of ``dy``/``x``, recomputing elementwise producers (GELU′, the
  logit gradient) in transposed order.
* **A fused epilogue.** With no batch or free-stack axes, ``(N, r)·(r, O)`` is written as ``r``
  broadcast multiply-adds (:func:`rank_expand`), which XLA fuses into the consumer's
  ``x·W + …`` add: no activation-sized temporary is written and read back. It is a
  ``jax.custom_jvp`` whose tangent is linear in plain products, arranged so that JAX's
  transpose of it is the backward pass a ``custom_vjp`` would spell: the two rank-``r`` matrix
  products, and the input gradient ``dt·firstᵀ`` as the same fused epilogue
  (:func:`rank_reduce`). Reverse mode costs what it did with a ``custom_vjp``, and forward
  mode (``jax.jvp``, ``jax.jacfwd``) works.

On meshes with Explicit axes nothing is reshaped (the merged axes would need shardings spelled
out); the products then contract the axes as they are.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

# The derivative rules below are jitted (static precision): JAX then traces each once per
# signature, not once per layer, and XLA inlines them where they are called.
EPILOGUE_MAX_RANK = 32
"""The largest rank written as broadcast multiply-adds (:func:`rank_expand`); above it the
second product is a matrix product (its arithmetic intensity is then worth a kernel)."""

_MATMUL = (((1,), (0,)), ((), ()))  # (N, K)·(K, M)


def _dot(a: jax.Array, b: jax.Array, precision: Any) -> jax.Array:
    return lax.dot_general(a, b, _MATMUL, precision=precision)


def _sum(terms: list[jax.Array]) -> jax.Array:
    out = terms[0]
    for term in terms[1:]:
        out = out + term
    return out


def _tangent_rule(fn: Any) -> Any:
    """``fn(precision, *operands)``, a tangent linear in its ``None``-or-array tangent operands,
    jitted (traced once per signature) and rematerialized: reverse mode keeps only its
    operands as residuals and recomputes the rest in the backward pass, as a ``custom_vjp``
    backward would."""
    return jax.jit(jax.checkpoint(fn, prevent_cse=False, static_argnums=(0,)),
                   static_argnums=0)


def _tangents(tangents: Sequence[Any]) -> list[Any]:
    """The tangents of a ``symbolic_zeros`` JVP rule with ``None`` for symbolic zeros."""
    return [None if isinstance(t, SymbolicZero) else t for t in tangents]


def rank_expand(t: jax.Array, second: jax.Array) -> jax.Array:
    """``t @ second`` for ``t: (N, r)``, ``second: (r, O)`` as ``r`` broadcast multiply-adds.

    Elementwise in the output, so XLA fuses it into whatever consumes it (the frozen
    product's ``y + …``) instead of writing an ``(N, O)`` temporary; accumulated in float32 at
    least.

    Example:
        >>> t, second = jnp.arange(6.0).reshape(3, 2), jnp.ones((2, 4))
        >>> bool((rank_expand(t, second) == t @ second).all())
        True
    """
    acc = jnp.promote_types(t.dtype, jnp.float32)
    t, second = t.astype(acc), second.astype(acc)
    out = t[:, 0:1] * second[0:1, :]
    for k in range(1, t.shape[1]):
        out = out + t[:, k:k + 1] * second[k:k + 1, :]
    return out


def rank_reduce(d: jax.Array, first: jax.Array) -> jax.Array:
    """``d @ first`` for ``d: (N, K)``, ``first: (K, r)`` as ``r`` row reductions, in ``d``'s
    dtype (accumulated in float32 at least): the transpose of :func:`rank_expand` with
    ``firstᵀ``, so JAX's transpose of this product *is* that fused epilogue.

    Example:
        >>> d, first = jnp.arange(6.0).reshape(2, 3), jnp.ones((3, 2))
        >>> bool((rank_reduce(d, first) == d @ first).all())
        True
    """
    acc = jnp.promote_types(d.dtype, jnp.float32)
    d32, first = d.astype(acc), first.astype(acc)
    columns = [jnp.sum(d32 * first[:, k][None, :], axis=1, keepdims=True)
               for k in range(first.shape[1])]
    return jnp.concatenate(columns, axis=1).astype(d.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _fused_lowrank(x: jax.Array, first: jax.Array, second: jax.Array, precision: Any):
    """``(x·first)·second`` for ``x: (N, K)``, with both activation-sized results (the forward
    output and, in reverse mode, the input gradient) written as :func:`rank_expand` epilogues.

    A ``custom_jvp`` whose tangent is linear in plain JAX products, so forward mode
    (``jax.jvp``, ``jax.jacfwd``) works, and JAX's transpose of it is the backward pass a
    ``custom_vjp`` would write: ``dt = g·secondᵀ``, ``d second = tᵀ·g``, ``d first = xᵀ·dt``,
    ``dx = dt·firstᵀ`` as a fused epilogue (the tangent's ``dx·first`` is
    :func:`rank_reduce`), residuals ``x``, ``first``, ``second`` and ``t = x·first``.
    """
    return _fused_forward(x, first, second, precision)[0]


@functools.partial(jax.jit, static_argnums=3)
def _fused_forward(x, first, second, precision):
    t = _dot(x, first, precision)
    return rank_expand(t, second).astype(x.dtype), t


@_tangent_rule
def _fused_tangent(precision, x, first, second, t, dx, dfirst, dsecond):
    dt = []
    if dx is not None:
        dt.append(rank_reduce(dx, first))
    if dfirst is not None:
        dt.append(_dot(x, dfirst, precision))
    dy = [_dot(_sum(dt), second, precision)] if dt else []
    if dsecond is not None:
        dy.append(_dot(t, dsecond, precision))
    return _sum(dy).astype(x.dtype)


def _fused_jvp(precision, primals, tangents):
    x, first, second = primals
    y, t = _fused_forward(x, first, second, precision)
    return y, _fused_tangent(precision, x, first, second, t, *_tangents(tangents))


_fused_lowrank.defjvp(_fused_jvp, symbolic_zeros=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _expand_product(t: jax.Array, second: jax.Array, precision: Any) -> jax.Array:
    """``t·second`` for ``t: (N, r)`` as a :func:`rank_expand` epilogue; its tangent is two
    plain products, so the backward pass is the two rank-``r`` matrix products ``g·secondᵀ``
    and ``tᵀ·g``."""
    return _expand_forward(t, second)


@jax.jit
def _expand_forward(t, second):
    return rank_expand(t, second).astype(t.dtype)


@_tangent_rule
def _expand_tangent(precision, t, second, dt, dsecond):
    dy = [] if dt is None else [_dot(dt, second, precision)]
    if dsecond is not None:
        dy.append(_dot(t, dsecond, precision))
    return _sum(dy).astype(t.dtype)


def _expand_jvp(precision, primals, tangents):
    t, second = primals
    return _expand_forward(t, second), _expand_tangent(precision, t, second,
                                                       *_tangents(tangents))


_expand_product.defjvp(_expand_jvp, symbolic_zeros=True)


MERGE_MIN_OUT = 4096
"""The narrowest output (``O``, the product of the kernel's output axes) for which
:func:`merge_pays` may choose the merged kernel."""


def merge_pays(n_rows: int, n_in: int, n_out: int) -> bool:
    """Whether ``x·(W + s·A·B)`` is cheaper than ``x·W + s·(x·A)·B`` for ``x: (N, K)``.

    The factorized term costs ``2·N·r·(K + O)`` FLOPs per pass, forming ``W + s·A·B`` costs
    ``2·K·O·r`` once: merging pays its FLOPs when ``N > K·O / (K + O)``. It pays in bytes only
    for wide outputs (``O >= MERGE_MIN_OUT``, a vocabulary head): there the factorized output
    ``x·W + …`` is an activation several consumers read (the softmax's max, exponent and
    gradient), so XLA writes and reads it once more, where a narrow layer's epilogue fuses
    into its single consumer.

    Example:
        >>> merge_pays(1024, 512, 8192), merge_pays(256, 512, 8192), merge_pays(1024, 512, 512)
        (True, False, False)
    """
    return n_out >= MERGE_MIN_OUT and n_rows * (n_in + n_out) > n_in * n_out


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def merged_product(x: jax.Array, w: jax.Array, first: jax.Array, second: jax.Array,
                   precision: Any = None) -> jax.Array:
    """``x·(w + first·second)`` for ``x: (N, K)``, ``w: (K, O)``, reverse mode without any
    full-size gradient: ``d first = xᵀ·(g·secondᵀ)``, ``d second = (x·first)ᵀ·g``,
    ``dx = g·(w + first·second)ᵀ`` (``w`` is frozen; in forward mode its tangent counts). The
    scale is folded into ``second``. A ``custom_jvp`` with a tangent linear in plain products,
    whose transpose by JAX is that backward pass (residuals ``x``, the merged kernel and the
    factors; ``x·first`` recomputed).

    Example:
        >>> x, w = jnp.ones((4, 3)), jnp.eye(3)
        >>> first, second = jnp.ones((3, 1)), jnp.full((1, 3), 0.5)
        >>> merged_product(x, w, first, second)[0].tolist()
        [2.5, 2.5, 2.5]
    """
    return _merged_forward(x, w, first, second, precision)[0]


@functools.partial(jax.jit, static_argnums=4)
def _merged_forward(x, w, first, second, precision):
    if first.shape[1] <= EPILOGUE_MAX_RANK:
        delta = rank_expand(first, second)  # fused into the one pass over w
    else:
        delta = _dot(first, second, precision)
    merged = (w + delta).astype(w.dtype)
    return _dot(x, merged.astype(x.dtype), precision), merged


@_tangent_rule
def _merged_tangent(precision, x, merged, first, second, dx, dw, dfirst, dsecond):
    dy = []
    if dx is not None:
        dy.append(_dot(dx, merged.astype(dx.dtype), precision))
    if dw is not None:
        dy.append(_dot(x, dw.astype(x.dtype), precision))
    if dfirst is not None:
        dy.append(_dot(_dot(x, dfirst.astype(x.dtype), precision), second.astype(x.dtype),
                       precision))
    if dsecond is not None:
        dy.append(_dot(_dot(x, first.astype(x.dtype), precision), dsecond.astype(x.dtype),
                       precision))
    return _sum(dy).astype(x.dtype)


def _merged_jvp(precision, primals, tangents):
    x, w, first, second = primals
    y, merged = _merged_forward(x, w, first, second, precision)
    return y, _merged_tangent(precision, x, merged, first, second, *_tangents(tangents))


merged_product.defjvp(_merged_jvp, symbolic_zeros=True)


def feature_product(t: jax.Array, second: jax.Array, feature: int,
                    precision: Any = None) -> jax.Array:
    """``t``'s rank axis ``feature`` contracted with ``second: (r, O)``, ``O`` in its place.

    The second product of the consumers whose first product is not a matrix product (a
    convolution with ``a``, an embedding lookup of ``a``): the other axes are flattened (a
    bitcast when the rank axis is last, as in NHWC convolutions and lookups) and the product
    is written as a fused epilogue (:func:`rank_expand`) up to :data:`EPILOGUE_MAX_RANK`.

    Example:
        >>> t = jnp.ones((2, 3, 4))  # rank 3 in the middle
        >>> feature_product(t, jnp.ones((3, 5)), feature=1).shape
        (2, 5, 4)
    """
    rank = t.shape[feature]
    t = jnp.moveaxis(t, feature, -1)
    lead = t.shape[:-1]
    flat = t.reshape(math.prod(lead), rank)
    second = second.astype(t.dtype)
    if rank <= EPILOGUE_MAX_RANK:
        low = _expand_product(flat, second, precision)
    else:
        low = lax.dot_general(flat, second, (((1,), (0,)), ((), ())), precision=precision)
    return jnp.moveaxis(low.reshape(*lead, second.shape[1]), -1, feature)


def lowrank_term(
    x: jax.Array,
    first: jax.Array,
    second: jax.Array,
    *,
    n_batch: int,
    n_free_stack: int,
    scale: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
    """``s·(x·first)·second``, contracting the trailing axes of ``x`` with ``first``.

    Args:
        x: ``(*batch, *free, *contract)``.
        first: ``(*batch, *free_stack, *contract, r)``.
        second: ``(*batch, *free_stack, r, *out)``.
        n_batch: Number of leading batch axes (shared by all three).
        n_free_stack: Number of stack axes of the factors that ``x`` does not batch over
            (e.g. Gemma's k/v selector): batch axes of the second product only.
        scale: The LoRA scale ``s`` (applied to the rank-sized intermediate).
        precision: ``dot_general``'s precision.
        preferred_element_type: The result's accumulation type (the consumer's).
        out_sharding: On meshes with Explicit axes, the sharding of ``x·first`` (nothing is
            flattened then); ``None`` elsewhere.

    Returns:
        ``(*batch, *free_stack, *free, *out)``.

    Example:
        >>> x = jnp.ones((2, 3, 4))
        >>> a, b = jnp.ones((4, 2)), jnp.ones((2, 5))
        >>> lowrank_term(x, a, b, n_batch=0, n_free_stack=0, scale=0.5).shape
        (2, 3, 5)
        >>> float(lowrank_term(x, a, b, n_batch=0, n_free_stack=0, scale=0.5)[0, 0, 0])
        4.0
    """
    nb, nf = n_batch, n_free_stack
    rank = first.shape[-1]
    batch_shape = x.shape[:nb]
    free_stack_shape = first.shape[nb:nb + nf]
    contract_shape = first.shape[nb + nf:-1]
    nc = len(contract_shape)
    free_shape = x.shape[nb:x.ndim - nc]
    out_shape = second.shape[nb + nf + 1:]
    flatten = out_sharding is None
    if flatten:
        x = x.reshape(*batch_shape, math.prod(free_shape), math.prod(contract_shape))
        first = first.reshape(*batch_shape, *free_stack_shape, math.prod(contract_shape), rank)
        second = second.reshape(*batch_shape, *free_stack_shape, rank, math.prod(out_shape))
        nc = 1
    n_free = x.ndim - nb - nc
    batch = tuple(range(nb))
    # t: (*batch, *free, *free_stack, r)
    if nb == 0 and nf == 0 and flatten and rank <= EPILOGUE_MAX_RANK:
        second = second * jnp.asarray(scale, second.dtype)
        low = _fused_lowrank(x, first, second, precision)
        if preferred_element_type is not None:
            low = low.astype(preferred_element_type)
    else:
        t = lax.dot_general(
            x, first,
            ((tuple(range(x.ndim - nc, x.ndim)), tuple(range(nb + nf, nb + nf + nc))),
             (batch, batch)),
            precision=precision, out_sharding=out_sharding)
        t = t * jnp.asarray(scale, t.dtype)
        # Free stack axes next to the batch: (*batch, *free_stack, *free, r).
        t = _move(t, [*batch, *range(nb + n_free, nb + n_free + nf), *range(nb, nb + n_free),
                      t.ndim - 1])
        stacked = tuple(range(nb + nf))
        low = lax.dot_general(t, second, (((t.ndim - 1,), (nb + nf,)), (stacked, stacked)),
                              precision=precision,
                              preferred_element_type=preferred_element_type)
    if flatten:
        low = low.reshape(*batch_shape, *free_stack_shape, *free_shape, *out_shape)
    return low


def _move(x: jax.Array, perm: Sequence[int]) -> jax.Array:
    perm = tuple(perm)
    return x if perm == tuple(range(x.ndim)) else lax.transpose(x, perm)
