"""The frozen product ``x·W`` of a LoRA kernel, with a quantized ``W`` dequantized on use.

:func:`frozen_product` is what the factorized rules (:mod:`lorax.rules`) bind for the frozen
half of ``x·(W + s·a·b)``. For a float ``W`` it is the primitive itself. For a
:class:`lorax.QuantizedArray` it is a ``jax.custom_vjp`` whose forward dequantizes
``W`` (to the dtype the program sees it in, e.g. bf16 after a cast), multiplies and drops it,
and whose backward dequantizes it again for the input gradient ``dy·Wᵀ``. The residuals are
the codes and scales themselves (already held as arguments), never the float kernel, so a step
holds one layer's float ``W`` at a time, also inside ``scan`` (the codes are sliced per layer
and dequantized in the body). Each dequantization takes a data dependence on its consumer's
operand (``x`` in the forward, ``dy`` in the backward), so XLA can neither run them all up
front nor merge the backward's with the forward's (either would keep the float kernel alive
between the passes).

``W`` gets no gradient (it is frozen; its codes are integers). Reverse mode only: forward-mode
autodiff (``jax.jvp``, ``jax.jacfwd``) through a quantized kernel raises a ``TypeError`` naming
the kernel and the fix, :func:`lorax.quantization.dequantize` (a float base, whose factorized
product supports both modes). A ``jax.jvp`` traced inside ``jax.jit`` only fails when JAX
compiles its tangent, with JAX's own ``custom_vjp`` error. (``jax.custom_derivatives.
linear_call`` could pair a forward-mode tangent with this backward pass, but it has no batching
rule, which ``vmap`` of a gradient, per-example gradients, needs.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lorax.quantized import QuantizedArray, is_quantized


def _view(w: Any, perm: tuple[int, ...]) -> jax.Array:
    """``w`` (dequantized when quantized) transposed by ``perm``."""
    if is_quantized(w):
        w = w.dequantize()
    return w if perm == tuple(range(len(perm))) else lax.transpose(w, perm)


@jax.custom_batching.custom_vmap
def _after(codes: jax.Array, x: jax.Array) -> jax.Array:
    """``codes`` unchanged, but computed from one element of ``x``.

    The data dependence makes a dequantization wait for its consumer's operand, so XLA can
    neither schedule it early nor merge the backward's with the forward's (either would keep
    the float kernel alive between the passes; CPU XLA drops ``optimization_barrier``s before
    common-subexpression elimination). The added term is zero for every bit pattern of ``x``
    (no bit pattern has more set bits than its width), but XLA's simplifier cannot prove it.
    Under ``vmap`` the element is taken from the whole batch, so unbatched codes stay unbatched
    (one dequantized kernel, not one per example).
    """
    first = lax.slice(x, (0,) * x.ndim, (1,) * x.ndim).reshape(())
    width = 8 * first.dtype.itemsize
    bits = lax.bitcast_convert_type(first, jnp.dtype(f"uint{width}"))
    return codes + (lax.population_count(bits) > width).astype(codes.dtype)


@_after.def_vmap
def _after_batched(axis_size: int, in_batched: list[bool], codes: jax.Array, x: jax.Array):
    del axis_size
    codes_batched, _ = in_batched
    return _after(codes, x), codes_batched


def frozen_product(primitive: Any, x: jax.Array, w: Any, perm: tuple[int, ...],
                   params: dict[str, Any], side: int = 1, extra: tuple = (),
                   path: str = "") -> jax.Array:
    """``primitive`` applied to ``x`` and the frozen kernel ``w`` in the program's layout.

    Args:
        primitive: a consumer (``dot_general``, ``ragged_dot_general``,
            ``conv_general_dilated``; ``gather`` with ``x`` the indices).
        x: the other operand.
        w: the frozen kernel: an array or a :class:`lorax.QuantizedArray`.
        perm: the program's view of ``w`` is ``transpose(w, perm)``.
        params: the primitive's parameters.
        side: 1 when ``w`` is the right operand, 0 when it is the left one.
        extra: further operands after the two (``ragged_dot``'s group sizes).
        path: the kernel's path, for the forward-mode error.

    Returns:
        ``primitive.bind(x, view(w), **params)`` (operands swapped for ``side == 0``),
        differentiable in ``x`` only (integer ``x``, a lookup's indices: not at all).

    Raises:
        TypeError: under forward-mode autodiff with a quantized ``w`` (reverse mode only).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jax.extend.core import primitives as prims
        >>> from lorax.quantized import quantize_array
        >>> q = quantize_array(jnp.eye(4), "int8", 16)
        >>> dims = {"dimension_numbers": (((1,), (0,)), ((), ())), "precision": None,
        ...         "preferred_element_type": None, "out_sharding": None}
        >>> x = jnp.arange(8.0).reshape(2, 4)
        >>> y = frozen_product(prims.dot_general_p, x, q, (0, 1), dims)
        >>> bool((y == x).all())
        True
        >>> g = jax.grad(lambda x: frozen_product(prims.dot_general_p, x, q, (1, 0), dims)
        ...              .sum())(x)
        >>> g.tolist()
        [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    """

    def apply(x: jax.Array, w_view: jax.Array) -> jax.Array:
        operands = (x, w_view) if side == 1 else (w_view, x)
        return primitive.bind(*operands, *extra, **params)

    if not is_quantized(w):
        return apply(x, _view(w, perm))
    if not jnp.issubdtype(x.dtype, jnp.inexact):  # nothing to differentiate
        return apply(x, _view(jax.tree.unflatten(jax.tree.structure(w), [
            _after(w.codes, x), w.scales]), perm))
    meta = jax.tree.structure(w)
    x_aval = jax.ShapeDtypeStruct(x.shape, x.dtype)

    def dequantized(codes: jax.Array, scales: jax.Array) -> jax.Array:
        q: QuantizedArray = jax.tree.unflatten(meta, [codes, scales])
        return _view(q, perm)

    def on_use(x: jax.Array, codes: jax.Array, scales: jax.Array) -> jax.Array:
        return apply(x, dequantized(_after(codes, x), scales))

    @jax.custom_vjp
    def product(x: jax.Array, codes: jax.Array, scales: jax.Array) -> jax.Array:
        return on_use(x, codes, scales)

    def forward(x: jax.Array, codes: jax.Array, scales: jax.Array):
        return on_use(x, codes, scales), (codes, scales)

    def backward(residuals: tuple[jax.Array, jax.Array], g: jax.Array):
        codes, scales = residuals
        w_view = dequantized(_after(codes, g), scales)
        (dx,) = jax.linear_transpose(lambda x: apply(x, w_view), x_aval)(g)
        return dx, None, None

    product.defvjp(forward, backward)
    try:
        return product(x, w.codes, w.scales)
    except TypeError as err:
        if "forward-mode" not in str(err):
            raise
        raise forward_mode_error(path) from None


def forward_mode_error(path: str) -> TypeError:
    """The error for forward-mode autodiff through the quantized kernel at ``path``."""
    where = f" at {path!r}" if path else ""
    return TypeError(
        f"forward-mode autodiff (jax.jvp, jax.jacfwd) through the quantized kernel{where} is "
        "not supported: lorax dequantizes a quantized "
        "W again in the backward pass (a jax.custom_vjp), which is reverse mode only. For "
        "forward mode, dequantize the base first: "
        "lorax.lora(fn)(lorax.quantization.dequantize(tree), ...)")
