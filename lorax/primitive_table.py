"""The primitive table: every JAX primitive lorax understands, declared once for both walkers.

:func:`lorax.lora` (:mod:`lorax.interpreter`) and :func:`lorax.infer_axes` (:mod:`lorax.infer`)
walk the same jaxprs and look up every equation that touches a kernel here, so they agree by
construction. Each :class:`Entry` is one of:

* a **view** (``axes``: :mod:`lorax.axis_views`): how the result's axes hold the kernel's, used
  by ``infer_axes`` to follow axes and by ``lora``'s rule (:mod:`lorax.view_rules`) to update
  the symbolic kernel;
* a **consumer** (``use``): which kernel axes it contracts and batches over, checked by
  ``lora``'s rule (:mod:`lorax.rules`) with :func:`lorax.axis_views.fits` and recorded by
  ``infer_axes``;
* a **higher-order** primitive (:mod:`lorax.higher_order`): ``lora`` re-issues it with its
  bodies interpreted, ``infer_axes`` walks the bodies.

A primitive missing here consumes a kernel in a way lorax cannot factorize: ``lora`` then
materializes ``W + s·A·B`` with a :class:`lorax.LoRAFallbackWarning`, and ``infer_axes`` learns
no layout from that use (and warns the same when the kernel has factorizable uses too).
Primitives are keyed by name: several (``pvary``, ``ragged_dot_general``,
``optimization_barrier``, ``eval_jaxpr``) are not exported by ``jax.extend``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jax.extend.core import primitives as prims

from lorax import compat, higher_order, rules, view_rules
from lorax.axis_views import (
    conv_use,
    dot_use,
    gather_use,
    ragged_use,
    reshape_axes,
    same_axes,
    slice_axes,
    squeeze_axes,
    transpose_axes,
)


@dataclasses.dataclass(frozen=True)
class Entry:
    """How one primitive treats a kernel (exactly one of ``axes``, ``use``, ``infer`` is set).

    Attributes:
        lora: the interpreter's rule: ``(invals, eqn)`` for views and consumers (``None``
            result: fall back), ``(run, eqn, invals)`` for higher-order primitives.
        axes: a view's axis function ``(axes, eqn) -> View`` (per operand, for the kernels).
        use: a consumer's ``(views, eqn) -> Use | None``.
        infer: a higher-order primitive's walk ``(walker, eqn, views) -> out views``.
    """

    lora: Callable[..., Any]
    axes: Callable[..., Any] | None = None
    use: Callable[..., Any] | None = None
    infer: Callable[..., Any] | None = None

    @property
    def is_consumer(self) -> bool:
        return self.use is not None


def _view(rule, axes=same_axes) -> Entry:
    return Entry(rule, axes=axes)


def _higher(pair) -> Entry:
    return Entry(pair[0], infer=pair[1])


TABLE: dict[str, Entry] = {
    # Views.
    prims.transpose_p.name: _view(view_rules.transpose_rule, transpose_axes),
    prims.reshape_p.name: _view(view_rules.reshape_rule, reshape_axes),
    prims.slice_p.name: _view(view_rules.slice_rule, slice_axes),
    prims.dynamic_slice_p.name: _view(view_rules.dynamic_slice_rule, slice_axes),
    prims.squeeze_p.name: _view(view_rules.squeeze_rule, squeeze_axes),
    prims.convert_element_type_p.name: _view(view_rules.convert_rule),
    prims.copy_p.name: _view(view_rules.identity_rule),
    "copy_p": _view(view_rules.identity_rule),
    prims.stop_gradient_p.name: _view(view_rules.stop_gradient_rule),
    "pvary": _view(view_rules.per_array_rule),
    prims.reduce_precision_p.name: _view(view_rules.per_array_rule),
    "optimization_barrier": _view(view_rules.barrier_rule),
    "sharding_constraint": _view(view_rules.constraint_rule),
    # Consumers.
    prims.dot_general_p.name: Entry(rules.dot_general_rule, use=dot_use),
    "ragged_dot_general": Entry(rules.ragged_dot_rule, use=ragged_use),
    prims.conv_general_dilated_p.name: Entry(rules.conv_rule, use=conv_use),
    prims.gather_p.name: Entry(rules.gather_rule, use=gather_use),
    # Higher-order.
    prims.jit_p.name: _higher(higher_order.JIT),
    prims.closed_call_p.name: _higher(higher_order.CALL),  # eval_jaxpr after jax 0.11.0
    "eval_jaxpr": _higher(higher_order.CALL),
    compat.remat_p.name: _higher(higher_order.REMAT),
    prims.scan_p.name: _higher(higher_order.SCAN),
    prims.cond_p.name: _higher(higher_order.COND),
    prims.while_p.name: _higher(higher_order.WHILE),
    prims.custom_jvp_call_p.name: _higher(higher_order.CUSTOM_CALL),
    prims.custom_vjp_call_p.name: _higher(higher_order.CUSTOM_CALL),
}


def lookup(primitive: Any) -> Entry | None:
    """The table's entry for ``primitive`` (``None``: unknown, a fallback).

    Example:
        >>> from jax.extend.core import primitives as prims
        >>> lookup(prims.dot_general_p).is_consumer, lookup(prims.add_p)
        (True, None)
    """
    return TABLE.get(primitive.name)
