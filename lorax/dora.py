"""DoRA (weight-decomposed low-rank adaptation, arXiv 2402.09353): the column-norm algebra.

A DoRA kernel is ``m * V / ||V||_c`` with ``V = W + s·A·B``: a trainable magnitude ``m`` per
output unit times the direction of the adapted kernel, where ``||·||_c`` is the L2 norm over the
input axes (one value per output unit, as PEFT's ``lora_magnitude_vector``). lorax computes the
norm from the factors without forming ``V``::

    ||v_j||² = ||w_j||² + 2s·w_jᵀ(A b_j) + s²·b_jᵀ(AᵀA)b_j

which costs ``O(in·out·r)`` (the ``WᵀA`` product), independent of the number of tokens. As the
paper suggests (section 4.3), the norm is a constant in the backward pass
(``stop_gradient``), so the gradient reaches ``m`` and the factors only through ``x·V``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lorax.layouts import Layout

_HIGHEST = lax.Precision.HIGHEST


def _canonical(w: Any, layout: Layout | int, n_in: int | None
               ) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
    if not isinstance(layout, Layout):  # the counts (n_stack, n_in), as before Layout
        layout = Layout.canonical(len(w.shape), layout, n_in)
    stack, ins, outs = layout.groups(w.shape)
    return stack, math.prod(ins), outs


def weight_norm(w: Any, layout: Layout | int, n_in: int | None = None) -> jax.Array:
    """The column norms ``||w_j||`` of a kernel ``(*stack, *in, *out)``: shape ``(*stack, *out)``.

    This is DoRA's initial magnitude (so a DoRA-wrapped model is unchanged at step 0).
    ``layout`` and ``n_in`` are as in :func:`adapted_norm`.

    Example:
        >>> import jax.numpy as jnp
        >>> weight_norm(jnp.array([[3.0, 0.0], [4.0, 1.0]]), Layout("io"))
        Array([5., 1.], dtype=float32)
    """
    stack, in_size, outs = _canonical(w, layout, n_in)
    w32 = jnp.reshape(jnp.asarray(w, jnp.float32), (*stack, in_size, math.prod(outs)))
    return jnp.reshape(jnp.sqrt(jnp.sum(w32 * w32, axis=-2)), (*stack, *outs))


def adapted_norm(w: Any, a: Any, b: Any, scale: float, layout: Layout | int,
                 n_in: int | None = None) -> jax.Array:
    """``||W + s·A·B||_c`` per output unit, from the factors (no full-size ``A·B``).

    Args:
        w: the kernel ``(*stack, *in, *out)``.
        a: ``(*stack, *in, r)``.
        b: ``(*stack, r, *out)``.
        scale: ``s``.
        layout: the kernel's :class:`lorax.layouts.Layout` (``w`` already in its canonical
            order), or the number of leading stack axes.
        n_in: with a count ``layout``: the input axes after the stack axes.

    Returns:
        A float32 array ``(*stack, *out)`` (not gradient-stopped; callers decide).

    Example:
        >>> import jax.numpy as jnp
        >>> w, a, b = jnp.eye(2), jnp.ones((2, 1)), jnp.array([[1.0, 0.0]])
        >>> adapted_norm(w, a, b, 1.0, Layout("io"))  # W + AB = [[2, 0], [1, 1]]
        Array([2.236068, 1.      ], dtype=float32)
    """
    stack, in_size, outs = _canonical(w, layout, n_in)
    out_size, rank = math.prod(outs), a.shape[-1]
    w32 = jnp.reshape(jnp.asarray(w, jnp.float32), (*stack, in_size, out_size))
    a32 = jnp.reshape(jnp.asarray(a, jnp.float32), (*stack, in_size, rank))
    b32 = jnp.reshape(jnp.asarray(b, jnp.float32), (*stack, rank, out_size))
    s = jnp.float32(scale)
    base = jnp.sum(w32 * w32, axis=-2)  # (*stack, out)
    wta = jnp.einsum("...io,...ir->...ro", w32, a32, precision=_HIGHEST)  # (*stack, r, out)
    cross = jnp.sum(wta * b32, axis=-2)
    gram = jnp.einsum("...ir,...is->...rs", a32, a32, precision=_HIGHEST)  # (*stack, r, r)
    gb = jnp.einsum("...rs,...so->...ro", gram, b32, precision=_HIGHEST)
    low = jnp.sum(gb * b32, axis=-2)
    squared = base + 2.0 * s * cross + s * s * low
    return jnp.reshape(jnp.sqrt(jnp.maximum(squared, 0.0)), (*stack, *outs))


def factor(magnitude: Any, norm: jax.Array) -> jax.Array:
    """``m / ||V||_c`` in float32, with zero-norm columns (all-zero ``V``) giving 0, not NaN.

    Example:
        >>> import jax.numpy as jnp
        >>> factor(jnp.array([2.0, 1.0]), jnp.array([4.0, 0.0]))
        Array([0.5, 0. ], dtype=float32)
    """
    m = jnp.asarray(magnitude, jnp.float32)
    safe = jnp.where(norm > 0, norm, jnp.ones_like(norm))
    return jnp.where(norm > 0, m / safe, jnp.zeros_like(m))
