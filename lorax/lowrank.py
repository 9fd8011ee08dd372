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
  broadcast multiply-adds (:func:`rank_expand`, a ``jax.custom_vjp`` whose backward is the two
  plain rank-``r`` products), which XLA fuses into the consumer's ``x·W + …`` add: no
  activation-sized temporary is written and read back.

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

from lorax import compat

# The custom_vjp rules below are jitted (static precision): JAX then traces each once per
# signature, not once per layer, and XLA inlines them where they are called.
EPILOGUE_MAX_RANK = 32
"""The largest rank written as broadcast multiply-adds (:func:`rank_expand`); above it the
second product is a matrix product (its arithmetic intensity is then worth a kernel)."""


def _like(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """``cotangent`` summed over the manual mesh axes it varies over and ``primal`` does not
    (inside ``shard_map``: a replicated factor's gradient from device-varying activations),
    in ``primal``'s dtype. Plain autodiff inserts the same ``psum`` (the transpose of the
    implicit ``pvary``); a ``custom_vjp`` backward must do it itself."""
    extra = _vma(cotangent) - _vma(primal)
    if extra:
        cotangent = lax.psum(cotangent, tuple(sorted(extra)))
    return cotangent.astype(primal.dtype)


def _vma(x: jax.Array) -> frozenset:
    return compat.varying_axes(x)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_lowrank(x: jax.Array, first: jax.Array, second: jax.Array, precision: Any):
    """``(x·first)·second`` for ``x: (N, K)``, with both activation-sized results (the forward
    output and the input gradient) written as :func:`rank_expand` epilogues."""
    return _fused_forward(x, first, second, precision)[0]


@functools.partial(jax.jit, static_argnums=3)
def _fused_forward(x, first, second, precision):
    t = lax.dot_general(x, first, (((1,), (0,)), ((), ())), precision=precision)
    return rank_expand(t, second).astype(x.dtype), (x, first, second, t)


@functools.partial(jax.jit, static_argnums=0)
def _fused_backward(precision, residuals, g):
    x, first, second, t = residuals
    dt = lax.dot_general(g, second.astype(g.dtype), (((1,), (1,)), ((), ())),
                         precision=precision)
    dsecond = lax.dot_general(t.astype(g.dtype), g, (((0,), (0,)), ((), ())),
                              precision=precision)
    dfirst = lax.dot_general(x, dt.astype(x.dtype), (((0,), (0,)), ((), ())),
                             precision=precision)
    dx = rank_expand(dt, first.T)
    return _like(dx, x), _like(dfirst, first), _like(dsecond, second)


_fused_lowrank.defvjp(_fused_forward, _fused_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _expand_product(t: jax.Array, second: jax.Array, precision: Any) -> jax.Array:
    """``t·second`` for ``t: (N, r)`` as a :func:`rank_expand` epilogue; the backward is the two
    rank-``r`` matrix products."""
    return rank_expand(t, second).astype(t.dtype)


@functools.partial(jax.jit, static_argnums=2)
def _expand_product_forward(t, second, precision):
    return _expand_product(t, second, precision), (t, second)


@functools.partial(jax.jit, static_argnums=0)
def _expand_product_backward(precision, residuals, g):
    t, second = residuals
    dt = lax.dot_general(g, second.astype(g.dtype), (((1,), (1,)), ((), ())),
                         precision=precision)
    dsecond = lax.dot_general(t.astype(g.dtype), g, (((0,), (0,)), ((), ())),
                              precision=precision)
    return _like(dt, t), _like(dsecond, second)


_expand_product.defvjp(_expand_product_forward, _expand_product_backward)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def merged_product(x: jax.Array, w: jax.Array, first: jax.Array, second: jax.Array,
                   precision: Any = None) -> jax.Array:
    """``x·(w + first·second)`` for ``x: (N, K)``, ``w: (K, O)``, gradients of ``x`` and the
    factors only, none of them full-size: ``d first = xᵀ·(g·secondᵀ)``, ``d second =
    (x·first)ᵀ·g``, ``dx = g·(w + first·second)ᵀ``. The scale is folded into ``second``.

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
        delta = lax.dot_general(first, second, (((1,), (0,)), ((), ())), precision=precision)
    merged = (w + delta).astype(w.dtype)
    y = lax.dot_general(x, merged.astype(x.dtype), (((1,), (0,)), ((), ())),
                        precision=precision)
    return y, (x, merged, first, second)


@functools.partial(jax.jit, static_argnums=0)
def _merged_backward(precision, residuals, g):
    x, merged, first, second = residuals
    dims = (((1,), (1,)), ((), ()))
    dx = lax.dot_general(g, merged.astype(g.dtype), dims, precision=precision)
    t = lax.dot_general(x, first.astype(x.dtype), (((1,), (0,)), ((), ())),
                        precision=precision)
    dsecond = lax.dot_general(t, g, (((0,), (0,)), ((), ())), precision=precision)
    dfirst = lax.dot_general(x, lax.dot_general(g, second.astype(g.dtype), dims,
                                                precision=precision),
                             (((0,), (0,)), ((), ())), precision=precision)
    return _like(dx, x), None, _like(dfirst, first), _like(dsecond, second)


merged_product.defvjp(_merged_forward, _merged_backward)


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
