"""A LoRA kernel inside :func:`lorax.lora`: its symbolic value, and the two ways a use can fail.

Inside the transform a kernel stands as a :class:`LoRAValue`: the node's frozen ``w``
(gradient-stopped), its factors, and a permutation that says how the value seen by the program
is laid out relative to the node's canonical ``(*stack, *in, *out)`` axes. The rules in
:mod:`lorax.rules` (consumers) and :mod:`lorax.view_rules` (layout changes) act on it. A use that
does not fit the node's layout raises :class:`LayoutError`; a use no rule can factorize
materializes ``w + s * a @ b`` with a :class:`LoRAFallbackWarning`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
from jax import lax

from lorax import routing
from lorax.node import LoRA


class LoRAFallbackWarning(UserWarning):
    """A LoRA kernel was consumed in a way lorax cannot factorize, so ``W + s·A·B`` was formed."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAValue:
    """A LoRA kernel as it flows through the interpreter (internal).

    ``perm[d]`` is the canonical axis (of ``(*stack, *in, *out)``, see
    :class:`lorax.kernel_axes.KernelAxes`) that the program's axis ``d`` holds: the program sees
    ``transpose(canonical(node.w + s * a @ b), perm)``. ``key`` is the dropout key of this
    kernel (``None`` when dropout is off).
    """

    node: LoRA
    key: Any
    perm: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    # Per-example adapters (lorax.routing): a, b carry a batch axis after the stack axes.
    routed: bool = dataclasses.field(default=False, metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.node.canonical_shape[p] for p in self.perm)

    @property
    def w_perm(self) -> tuple[int, ...]:
        """The axes of ``node.w`` (in its own layout) that the program's axes hold."""
        order = self.node.canonical_order
        return tuple(order[p] for p in self.perm)

    @property
    def ndim(self) -> int:
        return len(self.perm)

    def with_node(self, node: LoRA, perm: tuple[int, ...] | None = None) -> LoRAValue:
        return LoRAValue(node, self.key, self.perm if perm is None else perm, self.routed)

    def base(self) -> jax.Array:
        """The frozen kernel in the program's layout (dequantized when quantized)."""
        return transpose(self.node.float_w(), self.w_perm)

    def materialize(self, primitive: str) -> jax.Array:
        """``w + s * a @ b`` in the program's layout, with a warning: full-size cost."""
        if self.routed:
            raise routing.routing_error(self.node, f"`{primitive}` consumes it")
        warnings.warn(
            f"lorax.lora: `{primitive}` consumes the LoRA kernel at {self.node.path!r} in a way "
            "that cannot be factorized; materializing W + s*A@B (full-size compute and memory)",
            LoRAFallbackWarning,
            stacklevel=2,
        )
        return transpose(self.node.merged(), self.w_perm)


def concrete(values: Any, where: str) -> list[Any]:
    """``values`` with every :class:`LoRAValue` materialized (with the fallback warning)."""
    return [v.materialize(where) if isinstance(v, LoRAValue) else v for v in values]


def transpose(x: jax.Array, perm: tuple[int, ...]) -> jax.Array:
    """``lax.transpose``, skipped for the identity permutation."""
    return x if perm == tuple(range(len(perm))) else lax.transpose(x, perm)


class LayoutError(Exception):
    """A kernel is used along other axes than its factors were built for (internal).

    :func:`lorax.lora` catches it and re-raises a ``ValueError`` that names the ``axes=`` spec
    inferred from the whole function (:mod:`lorax.infer`).
    """

    def __init__(self, v: LoRAValue, primitive: str, detail: str):
        super().__init__(detail)
        self.node, self.primitive, self.detail = v.node, primitive, detail


def layout_error(v: LoRAValue, primitive: str, contracted=(), batch=()) -> LayoutError:
    """The :class:`LayoutError` for ``primitive`` contracting (and batching) axes of ``v``."""
    order = v.node.canonical_order
    what = f"contracts its axes {sorted(order[c] for c in contracted)}"
    if batch:
        what += f" and batches over its axes {sorted(order[c] for c in batch)}"
    return LayoutError(v, primitive, f"`{primitive}` {what}")
