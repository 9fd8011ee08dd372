"""The pytree nodes that `lorax.wrap` puts into a parameter tree.

A :class:`LoRA` node stands where a kernel ``w`` stood and holds the frozen kernel together with
its trainable low-rank factors. A :class:`FullyTrained` box marks a leaf that is fine-tuned in
full (PEFT's ``modules_to_save``). Both are ordinary pytrees, so ``jax.jit``, ``jax.grad`` and
optax see their arrays as leaves; every tree map that must treat them as units passes
``is_leaf=is_lora`` (or :func:`is_node`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRA:
    """A frozen kernel ``w`` plus trainable factors ``a`` and ``b``.

    The adapted kernel is ``w + scale * a @ b`` where the product contracts the rank axis and
    keeps the leading stack axes shared::

        w: (*stack, *in_dims, *out_dims)
        a: (*stack, *in_dims, rank)
        b: (*stack, rank, *out_dims)

    Attributes:
        w: the frozen base kernel (never copied; the node holds the caller's array).
        a: the input-side factor.
        b: the output-side factor (zeros at initialisation).
        scale: ``alpha / rank`` (or ``alpha / sqrt(rank)`` with rsLoRA); static.
        rank: the rank ``r``; static.
        n_stack: number of leading axes of ``w`` that index a stack of layers; static.
        n_in: number of axes of ``w`` (after the stack axes) that are inputs; static.
        path: the '/'-joined path of ``w`` in the tree it was wrapped in; static, for messages.
        dropout: LoRA dropout rate on the adapter branch's input; static.

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> node = lorax.LoRA(w=jnp.ones((4, 3)), a=jnp.ones((4, 2)), b=jnp.zeros((2, 3)),
        ...                   scale=0.5, rank=2, n_stack=0, n_in=1, path="dense/kernel")
        >>> node.delta().shape
        (4, 3)
        >>> lorax.is_lora(node)
        True
    """

    w: Any
    a: Any
    b: Any
    scale: float = dataclasses.field(metadata={"static": True})
    rank: int = dataclasses.field(metadata={"static": True})
    n_stack: int = dataclasses.field(metadata={"static": True})
    n_in: int = dataclasses.field(metadata={"static": True})
    path: str = dataclasses.field(default="", metadata={"static": True})
    dropout: float = dataclasses.field(default=0.0, metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the adapted kernel (that of ``w``)."""
        return tuple(self.w.shape)

    @property
    def dtype(self) -> Any:
        """The dtype of the adapted kernel (that of ``w``)."""
        return self.w.dtype

    @property
    def in_shape(self) -> tuple[int, ...]:
        """The input axes of one (unstacked) kernel."""
        return self.shape[self.n_stack : self.n_stack + self.n_in]

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The output axes of one (unstacked) kernel."""
        return self.shape[self.n_stack + self.n_in :]

    def delta(self, dtype: Any = jnp.float32) -> jax.Array:
        """Materializes ``scale * a @ b`` with the kernel's shape, computed in ``dtype``.

        This costs a full-size array: it is for merging and analysis, never for training.
        """
        stack = self.shape[: self.n_stack]
        in_size = math.prod(self.in_shape)
        out_size = math.prod(self.out_shape)
        a = jnp.reshape(self.a, (*stack, in_size, self.rank)).astype(dtype)
        b = jnp.reshape(self.b, (*stack, self.rank, out_size)).astype(dtype)
        delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
        return jnp.reshape(delta * jnp.asarray(self.scale, dtype), self.shape)

    def merged(self) -> jax.Array:
        """``w + scale * a @ b`` computed in float32 and cast to ``w``'s dtype."""
        w32 = jnp.asarray(self.w, jnp.float32)
        return (w32 + self.delta(jnp.float32)).astype(self.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FullyTrained:
    """Marks a leaf to be fine-tuned in full (a classifier head, a bias, a LayerNorm scale).

    Attributes:
        value: the wrapped array.

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> lorax.FullyTrained(jnp.zeros(3)).value.shape
        (3,)
    """

    value: Any


def is_lora(x: Any) -> bool:
    """Whether ``x`` is a :class:`LoRA` node (use as ``is_leaf=`` in tree maps).

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> lorax.is_lora(jnp.zeros(2))
        False
    """
    return isinstance(x, LoRA)


def is_node(x: Any) -> bool:
    """Whether ``x`` is a :class:`LoRA` node or a :class:`FullyTrained` box."""
    return isinstance(x, (LoRA, FullyTrained))


def unbox(x: Any) -> Any:
    """The array a node stands for in a base model: ``w`` for LoRA, the value of a box."""
    if isinstance(x, LoRA):
        return x.w
    if isinstance(x, FullyTrained):
        return x.value
    return x


def is_array_like(x: Any) -> bool:
    """Arrays, abstract arrays and numpy scalars (not Python scalars or strings)."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)) or (
        hasattr(x, "shape") and hasattr(x, "dtype")
    )
