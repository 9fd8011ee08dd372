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
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lorax import dora
from lorax.kernel_axes import KernelAxes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRA(KernelAxes):
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
        magnitude: DoRA's trainable magnitude ``(*stack, *out_dims)``, or ``None`` for plain
            LoRA (keyword-only). With it the adapted kernel is ``magnitude * V / ||V||_c``,
            ``V = w + scale * a @ b``, the norm taken over the input axes (see
            :mod:`lorax.dora`).
        scale: ``alpha / rank`` (or ``alpha / sqrt(rank)`` with rsLoRA); static.
        rank: the rank ``r``; static.
        n_stack: number of axes of ``w`` that index a stack of kernels; static.
        n_in: number of axes of ``w`` that are inputs; static.
        path: the '/'-joined path of ``w`` in the tree it was wrapped in; static, for messages.
        dropout: LoRA dropout rate on the adapter branch's input; static.
        residual: whether ``w`` is not the original kernel but the residual left after
            PiSSA moved its top singular directions into ``a``/``b`` (``init="pissa"``);
            static. Such factors only make sense on this residual base, see
            :func:`lorax.pissa.to_lora`.
        layout: one letter per axis of ``w`` (``s`` stack, ``i`` input, ``o`` output), or
            ``None`` for ``(*stack, *in, *out)`` in that order (keyword-only; static). See
            :class:`KernelAxes`.

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
    magnitude: Any = dataclasses.field(default=None, kw_only=True)
    scale: float = dataclasses.field(metadata={"static": True})
    rank: int = dataclasses.field(metadata={"static": True})
    n_stack: int = dataclasses.field(metadata={"static": True})
    n_in: int = dataclasses.field(metadata={"static": True})
    path: str = dataclasses.field(default="", metadata={"static": True})
    dropout: float = dataclasses.field(default=0.0, metadata={"static": True})
    residual: bool = dataclasses.field(default=False, metadata={"static": True})
    layout: str | None = dataclasses.field(default=None, kw_only=True,
                                           metadata={"static": True})

    def as_lora(self) -> LoRA:
        """The node itself (a :class:`MultiLoRA` gives its active adapters as one LoRA)."""
        return self

    def named_factors(self) -> tuple[tuple[str, LoRA], ...]:
        """``(("", self),)``: one unnamed adapter (compare :meth:`MultiLoRA.named_factors`)."""
        return (("", self),)

    def with_specs(self, w: Any, a: Any, b: Any, magnitude: Any) -> LoRA:
        """This node's structure with stand-ins (sharding specs) for its arrays."""
        return dataclasses.replace(self, w=w, a=a, b=b,
                                   magnitude=None if self.magnitude is None else magnitude)

    def trainable_mask(self) -> LoRA:
        """This node with ``False`` for ``w`` and ``True`` for the factors (``None`` stays)."""
        return dataclasses.replace(self, w=_mark(self.w, False), a=_mark(self.a, True),
                                   b=_mark(self.b, True), magnitude=_mark(self.magnitude, True))

    def delta(self, dtype: Any = jnp.float32) -> jax.Array:
        """Materializes ``scale * a @ b`` with the kernel's shape, computed in ``dtype``.

        This costs a full-size array: it is for merging and analysis, never for training.
        """
        stack, ins, outs = self.groups(self.shape)
        a = jnp.reshape(self.a, (*stack, math.prod(ins), self.rank)).astype(dtype)
        b = jnp.reshape(self.b, (*stack, self.rank, math.prod(outs))).astype(dtype)
        delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
        delta = jnp.reshape(delta * jnp.asarray(self.scale, dtype), self.canonical_shape)
        return self.from_canonical(delta)

    @property
    def is_dora(self) -> bool:
        """Whether the node carries a DoRA magnitude."""
        return self.magnitude is not None

    def dora_factor(self) -> jax.Array:
        """DoRA's ``magnitude / ||w + scale * a @ b||_c`` (float32, ``(*stack, *out)``).

        The norm comes from the factors (:func:`lorax.dora.adapted_norm`), no full-size array.
        """
        if self.magnitude is None:
            raise ValueError(f"the LoRA node at {self.path!r} has no DoRA magnitude")
        norm = dora.adapted_norm(self.to_canonical(self.float_w()), self.a, self.b, self.scale,
                                 self.axes_layout)
        return dora.factor(self.magnitude, norm)

    def merged(self) -> jax.Array:
        """``w + scale * a @ b`` computed in float32 and cast to ``w``'s dtype.

        With a DoRA magnitude, ``magnitude * (w + scale * a @ b) / ||w + scale * a @ b||_c``.
        """
        w32 = jnp.asarray(self.float_w(), jnp.float32)
        v = w32 + self.delta(jnp.float32)
        if self.magnitude is not None:
            v = v * self.dora_columns()
        return v.astype(self.dtype)

    def dora_columns(self) -> jax.Array:
        """:meth:`dora_factor` laid out like ``w``: ``(*stack, 1..., *out)`` in ``w``'s axis
        order, so it broadcasts against the kernel."""
        f = jnp.reshape(self.dora_factor(),
                        (*self.stack_shape, *(1,) * self.n_in, *self.out_shape))
        return self.from_canonical(f)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Factors:
    """One named adapter's factors on a kernel of a :class:`MultiLoRA` node.

    Attributes:
        a: ``(*stack, *in_dims, rank)``.
        b: ``(*stack, rank, *out_dims)``.
        scale: the adapter's ``alpha / rank``; static.
        rank: static.
    """

    a: Any
    b: Any
    scale: float = dataclasses.field(metadata={"static": True})
    rank: int = dataclasses.field(metadata={"static": True})
    magnitude: ClassVar[None] = None  # named adapters are plain LoRA: no DoRA, no PiSSA
    residual: ClassVar[bool] = False


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MultiLoRA(KernelAxes):
    """A frozen kernel with several named adapters, of which a weighted selection is active.

    The adapted kernel is ``w + sum(weight_k * scale_k * a_k @ b_k)`` over the ``active``
    adapters. :func:`lorax.lora` computes it as one LoRA of rank ``sum(rank_k)`` with
    concatenated factors (:meth:`as_lora`), so it stays factorized. Built and edited with
    :mod:`lorax.adapters` (``add_adapter``, ``select``, ``drop_adapter``, ``combine_adapters``).

    Attributes:
        w: the frozen base kernel.
        adapters: ``{name: Factors}``.
        active: ``((name, weight), ...)``, the adapters the kernel computes; static.
        n_stack: stack axes; static.
        n_in: input axes; static.
        path: the kernel's '/'-joined path; static.
        dropout: LoRA dropout rate on the adapter input; static.
        layout: as :class:`LoRA`'s (keyword-only; static).

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> lp = lorax.add_adapter({"kernel": jnp.ones((4, 3))}, "fr", rank=2)
        >>> node = lp["kernel"]
        >>> sorted(node.adapters), node.active
        (['fr'], (('fr', 1.0),))
    """

    w: Any
    adapters: dict[str, Factors]
    active: tuple[tuple[str, float], ...] = dataclasses.field(metadata={"static": True})
    n_stack: int = dataclasses.field(metadata={"static": True})
    n_in: int = dataclasses.field(metadata={"static": True})
    path: str = dataclasses.field(default="", metadata={"static": True})
    dropout: float = dataclasses.field(default=0.0, metadata={"static": True})
    layout: str | None = dataclasses.field(default=None, kw_only=True,
                                           metadata={"static": True})

    def as_lora(self) -> LoRA | None:
        """The active adapters as one :class:`LoRA` node of rank ``sum(rank_k)`` and scale 1
        (``b_k`` pre-multiplied by ``weight_k * scale_k``), or ``None`` when none is active."""
        chosen = [(self.adapters[n], wt) for n, wt in self.active if n in self.adapters]
        if not chosen:
            return None
        a = jnp.concatenate([f.a for f, _ in chosen], axis=-1)
        b = jnp.concatenate([f.b * jnp.asarray(wt * f.scale, f.b.dtype) for f, wt in chosen],
                            axis=self.n_stack)
        return LoRA(w=self.w, a=a, b=b, scale=1.0, rank=sum(f.rank for f, _ in chosen),
                    n_stack=self.n_stack, n_in=self.n_in, path=self.path, dropout=self.dropout,
                    layout=self.layout)

    def named_factors(self) -> tuple[tuple[str, Factors], ...]:
        """``(("[name]", factors), ...)`` for every adapter, in name order."""
        return tuple((f"[{name}]", f) for name, f in sorted(self.adapters.items()))

    def with_specs(self, w: Any, a: Any, b: Any, magnitude: Any) -> MultiLoRA:
        """This node's structure with stand-ins (sharding specs) for its arrays: every named
        adapter gets the same ``a``, ``b`` (``magnitude`` is unused: no DoRA here)."""
        del magnitude
        adapters = {name: dataclasses.replace(f, a=a, b=b) for name, f in self.adapters.items()}
        return dataclasses.replace(self, w=w, adapters=adapters)

    def trainable_mask(self) -> MultiLoRA:
        """This node with ``False`` for ``w`` and ``True`` for every factor (``None`` stays)."""
        adapters = {name: dataclasses.replace(f, a=_mark(f.a, True), b=_mark(f.b, True))
                    for name, f in self.adapters.items()}
        return dataclasses.replace(self, w=_mark(self.w, False), adapters=adapters)

    def merged(self) -> jax.Array:
        """``w`` plus the active adapters, in float32, cast to ``w``'s dtype."""
        node = self.as_lora()
        if node is not None:
            return node.merged()
        return self.float_w()


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

    def trainable_mask(self) -> FullyTrained:
        """``FullyTrained(True)`` (``None`` stays)."""
        return FullyTrained(_mark(self.value, True))


def _mark(x: Any, value: bool) -> bool | None:
    # `None` holes (the halves made by `lorax.split`) stay holes, so masks and optax labels match.
    return None if x is None else value


def is_lora(x: Any) -> bool:
    """Whether ``x`` is a :class:`LoRA` node (use as ``is_leaf=`` in tree maps).

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> lorax.is_lora(jnp.zeros(2))
        False
    """
    return isinstance(x, LoRA)


def is_adapted(x: Any) -> bool:
    """Whether ``x`` is an adapted kernel: a :class:`LoRA` or :class:`MultiLoRA` node."""
    return isinstance(x, KernelAxes)


def is_node(x: Any) -> bool:
    """Whether ``x`` is a :class:`LoRA` or :class:`MultiLoRA` node or a :class:`FullyTrained`
    box."""
    return isinstance(x, (LoRA, MultiLoRA, FullyTrained))


def unbox(x: Any) -> Any:
    """The array a node stands for in a base model: ``w`` for LoRA, the value of a box."""
    if is_adapted(x):
        return x.w
    if isinstance(x, FullyTrained):
        return x.value
    return x


def is_array_like(x: Any) -> bool:
    """Arrays, abstract arrays and numpy scalars (not Python scalars or strings)."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)) or (
        hasattr(x, "shape") and hasattr(x, "dtype")
    )
