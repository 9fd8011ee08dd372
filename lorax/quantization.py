"""`lorax.quantize`: QLoRA-style frozen bases (arXiv 2305.14314), float factors.

:func:`quantize` replaces the frozen kernel ``w`` of every LoRA node with a
:class:`lorax.QuantizedArray` (formats in :mod:`lorax.quantized`).

The factors (and a DoRA magnitude) stay in their float dtype and train as usual.
:func:`lorax.lora` gives the traced function an ordinary array of the kernel's shape and dtype,
but inside the transform the kernel stays quantized through layout primitives (transposes,
reshapes, casts: a cast only changes the dtype it will dequantize to) and ``scan``; its consumer
dequantizes it on use (:mod:`lorax.qmatmul`), and the backward pass dequantizes it again
instead of keeping the float kernel, so a train step holds about one layer's float kernel at a
time. :func:`lorax.merge` dequantizes. Quantization is not differentiable: take gradients of
the trainable half (:func:`lorax.value_and_grad`), not of the whole tree (its codes are
integers).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lorax import modules
from lorax.node import is_adapted, is_node
from lorax.quantized import check_format, is_quantized, quantize_array


@modules.on_modules
def quantize(tree: Any, kind: str = "nf4", block_size: int = 64) -> Any:
    """Quantizes the frozen kernel ``w`` of every LoRA (or MultiLoRA) node of ``tree``.

    Args:
        tree: a wrapped tree (from :func:`lorax.wrap`); abstract trees give abstract codes.
        kind: ``"int8"`` or ``"nf4"``.
        block_size: values per absmax block (QLoRA uses 64).

    Returns:
        ``tree`` with each node's ``w`` a :class:`lorax.QuantizedArray` (factors untouched).

    Raises:
        ValueError: for a bad ``kind`` or ``block_size``, a tree without LoRA nodes, or a node
            whose ``w`` is already quantized or not floating (naming its path).

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> lp = lorax.quantize(lorax.wrap({"kernel": jnp.ones((128, 64))}, rank=4), "nf4")
        >>> w = lp["kernel"].w
        >>> type(w).__name__, w.shape, w.nbytes, 128 * 64 * 4  # 7.1x fewer bytes than f32
        ('QuantizedArray', (128, 64), 4608, 32768)
        >>> bool((lorax.merge(lp)["kernel"] == 1.0).all())
        True
    """
    check_format(kind, block_size)
    found = []

    def go(node: Any) -> Any:
        if not is_adapted(node):
            return node
        found.append(node.path)
        if is_quantized(node.w):
            raise ValueError(f"expected a float kernel, got an already quantized one at "
                             f"{node.path!r}")
        if not jnp.issubdtype(node.w.dtype, jnp.floating):
            raise ValueError(f"expected a floating kernel, got {node.w.dtype} at {node.path!r}")
        # The stack axes that lead w (in any layout) are quantized layer by layer.
        n_lead = len(node.roles) - len(node.roles.lstrip("s"))
        return dataclasses.replace(node, w=quantize_array(node.w, kind, block_size, n_lead))

    out = jax.tree.map(go, tree, is_leaf=is_node)
    if not found:
        raise ValueError("expected `tree` to hold LoRA nodes (from lorax.wrap), got none")
    return out


@modules.on_modules
def dequantize(tree: Any) -> Any:
    """Undoes :func:`quantize`: every quantized ``w`` of a LoRA (or MultiLoRA) node becomes the
    float array it stands for, in its dtype (factors untouched, nothing else changes).

    The factorized product of a quantized base is reverse mode only (it dequantizes ``W``
    again in the backward pass); on the dequantized tree forward-mode autodiff (``jax.jvp``,
    ``jax.jacfwd``) works, with the same values.

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> qp = lorax.quantize(lorax.wrap({"kernel": jnp.ones((128, 64))}, rank=4), "int8")
        >>> w = lorax.quantization.dequantize(qp)["kernel"].w
        >>> type(w).__name__, w.dtype, bool((w == 1.0).all())
        ('ArrayImpl', dtype('float32'), True)
    """

    def go(node: Any) -> Any:
        if not (is_adapted(node) and is_quantized(node.w)):
            return node
        w = node.w
        if isinstance(w.codes, jax.ShapeDtypeStruct):  # an abstract tree
            return dataclasses.replace(node, w=jax.ShapeDtypeStruct(w.shape, jnp.dtype(w.dtype)))
        return dataclasses.replace(node, w=w.dequantize())

    return jax.tree.map(go, tree, is_leaf=is_node)
