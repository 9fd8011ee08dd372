"""`KernelAxes`: an adapted kernel's stack, input and output axes, shared by the node types.

The base of :class:`lorax.LoRA` and :class:`lorax.MultiLoRA`: the layout views (which axes of
``w`` are stack, input and output axes, and the canonical ``(*stack, *in, *out)`` order the
factors follow), ``w`` as a float array, and the refusal to be used as an array outside
:func:`lorax.lora`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import jax.numpy as jnp

from lorax.layouts import Layout
from lorax.quantized import QuantizedArray

T = TypeVar("T")
_ARRAY_ATTRS = frozenset({"T", "astype", "reshape", "transpose", "ndim", "size", "at", "sum",
                          "mean", "squeeze", "swapaxes", "ravel", "flatten", "item", "mT"})


class KernelAxes:
    """Which axes of a node's kernel ``w`` are stack, input and output axes.

    A node's ``layout`` holds one letter per axis of ``w``: ``s`` (an axis that indexes a stack
    of independent kernels: ``nn.scan`` layers, Gemma's k/v selector), ``i`` (contracted with the
    activation) or ``o`` (an output axis). ``w`` keeps its own axis order; the factors are
    canonical, each group in ``w``'s order::

        a: (*stack, *in, rank)        b: (*stack, rank, *out)

    ``layout=None`` means the canonical order ``(*stack, *in, *out)`` itself.
    """

    w: Any
    n_stack: int
    n_in: int
    layout: str | None

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the adapted kernel (that of ``w``)."""
        return tuple(self.w.shape)

    def _not_an_array(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"a lorax {type(self).__name__} node (the kernel at {getattr(self, 'path', '')!r}) "
            "was used as an array: transform the function that consumes the wrapped tree with "
            "lorax.lora, e.g. lorax.lora(model.apply)({'params': lp}, x) (Linen) or "
            "lorax.lora(lambda state, x: nnx.merge(graphdef, state)(x))(lp, x) (NNX), and pass "
            "the wrapped tree to it as an argument: a tree the transformed function closes over "
            "(a global, a captured module) is not seen by lorax.lora. An NNX module can be "
            "wrapped itself instead, model = lorax.wrap(model), and called as is. Or fold the "
            "adapters in with lorax.merge(lp) for inference")

    # Whatever touches the node first outside lorax.lora (jnp's conversion, NNX's
    # `kernel[...]`, `x @ kernel`, `kernel.T`) names the fix.
    __array__ = __jax_array__ = __getitem__ = _not_an_array
    __matmul__ = __rmatmul__ = __mul__ = __rmul__ = __add__ = __radd__ = _not_an_array
    __sub__ = __rsub__ = __truediv__ = __rtruediv__ = __neg__ = __pow__ = _not_an_array
    __float__ = __int__ = _not_an_array

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the node does not have: array methods get the message.
        if name in _ARRAY_ATTRS:
            try:
                self._not_an_array()
            except TypeError as err:
                raise AttributeError(f"{type(self).__name__} has no {name!r}: {err}") from None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def dtype(self) -> Any:
        """The dtype of the adapted kernel (that of ``w``, or of a quantized ``w``'s original)."""
        return jnp.dtype(self.w.dtype)

    @property
    def axes_layout(self) -> Layout:
        """The kernel's :class:`lorax.layouts.Layout` (from ``layout``, else the counts)."""
        return (Layout.of(self.layout) if self.layout is not None
                else Layout.canonical(len(self.shape), self.n_stack, self.n_in))

    roles = property(lambda self: self.axes_layout.roles,
                     doc="The full layout string, one of ``s``/``i``/``o`` per axis of ``w``.")
    canonical_order = property(lambda self: self.axes_layout.order,
                               doc="``w``'s axes in canonical ``(*stack, *in, *out)`` order.")
    canonical_axes = property(lambda self: self.axes_layout.inverse,
                              doc="For each axis of ``w``, the canonical axis it is.")
    is_canonical = property(lambda self: self.axes_layout.is_canonical,
                            doc="Whether ``w`` is already laid out as ``(*stack, *in, *out)``.")
    canonical_shape = property(lambda self: self.axes_layout.to_canonical(self.shape),
                               doc="The kernel's shape in ``(*stack, *in, *out)`` order.")
    stack_shape = property(lambda self: self.groups(self.shape)[0],
                           doc="The stack axes (each indexes an independent kernel).")
    in_shape = property(lambda self: self.groups(self.shape)[1],
                        doc="The input axes of one (unstacked) kernel.")
    out_shape = property(lambda self: self.groups(self.shape)[2],
                         doc="The output axes of one (unstacked) kernel.")

    def groups(self, per_axis: Sequence[T]) -> tuple[tuple[T, ...], tuple[T, ...], tuple[T, ...]]:
        """One entry per axis of ``w`` (a shape, a spec) as canonical ``(stack, in, out)``."""
        return self.axes_layout.groups(self.axes_layout.to_canonical(per_axis))

    def float_w(self) -> Any:
        """``w`` as an array: dequantized when it is a :class:`lorax.QuantizedArray`."""
        return self.w.dequantize() if isinstance(self.w, QuantizedArray) else self.w

    def to_canonical(self, x: Any) -> Any:
        """An array in ``w``'s layout transposed to ``(*stack, *in, *out)`` (no-op if it is)."""
        return x if self.is_canonical else jnp.transpose(x, self.canonical_order)

    def from_canonical(self, x: Any) -> Any:
        """The inverse of :meth:`to_canonical`."""
        return x if self.is_canonical else jnp.transpose(x, self.canonical_axes)
