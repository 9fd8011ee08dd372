"""`lorax.lora`: run any JAX function on wrapped trees, computing adapted kernels factorized.

The transform traces ``fn`` once with each LoRA node replaced by its frozen kernel ``w`` (so the
function sees ordinary arrays of the usual shapes), then evaluates the resulting jaxpr equation
by equation. Values derived from a LoRA node stay symbolic (:class:`lorax.lora_value.LoRAValue`)
through layout primitives and are consumed by the factorized rules in :mod:`lorax.rules`.
Every equation that touches a kernel is looked up in :mod:`lorax.primitive_table`, the table
:func:`lorax.infer_axes` walks by too: views update the symbolic kernel, consumers compute it
factorized, higher-order primitives (``jit``, ``remat``, ``scan``, ``cond``, ``while``,
custom-derivative calls) are re-issued with their bodies interpreted the same way
(:mod:`lorax.higher_order`); a primitive the table does not know gets the materialized kernel,
with a :class:`LoRAFallbackWarning`. Every other equation is bound unchanged. Equations and
consumer rules are bound through inline ``jit`` functions cached by their signature
(:mod:`lorax.staging`), so JAX traces and differentiates a repeated layer once. Only public
APIs are used: ``jax.make_jaxpr``, ``jax.jit`` and ``jax.extend.core``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax import lax
from jax.extend.core import Literal

from lorax import compat, infer, modules, routing, staging
from lorax.layouts import Layout
from lorax.lora_value import LayoutError, LoRAValue, concrete
from lorax.node import LoRA, is_adapted, is_node, unbox
from lorax.primitive_table import lookup
from lorax.quantized import is_quantized


def lora(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Transforms ``fn`` so wrapped trees may appear anywhere in its arguments.

    Each LoRA kernel is computed as ``x·W + s·((x·a)·b)`` at the primitive that consumes it
    (``dot_general``, ``conv_general_dilated``, ``gather``), with ``W`` held constant: neither a
    full-size ``W + s·a·b`` nor a full-size gradient of ``W`` is formed. ``FullyTrained`` boxes
    are passed as their values. The transformed function takes one extra keyword, ``lora_key``:
    a PRNG key that turns on LoRA dropout (for kernels wrapped with ``dropout > 0``); without it
    the adapters are deterministic. Another, ``adapter_ids``, routes examples to named adapters
    (:mod:`lorax.routing`): example ``i`` uses adapter ``lorax.routing.adapter_names(tree)[
    adapter_ids[i]]`` (none for ids outside that range, e.g. ``-1``), in the same call.

    Args:
        fn: any function of pytrees of arrays, e.g. a Flax ``model.apply``, or
            ``lambda state, x: nnx.merge(graphdef, state)(x)``.

    Returns:
        A function with ``fn``'s signature plus the keyword-only ``lora_key`` and
        ``adapter_ids``.

    Raises:
        ValueError: when a kernel is used along other axes than its factors were built for
            (a ``scan`` over a kernel wrapped without its stack axis, a matmul contracting
            other axes than its inputs): the message names the ``axes=`` (or ``stacked=``)
            spec that fits every kernel's use, inferred from ``fn`` itself.

    Example:
        >>> import jax, jax.numpy as jnp, lorax
        >>> params = {"kernel": jnp.ones((8, 4))}
        >>> lp = lorax.wrap(params, rank=2)
        >>> y = lorax.lora(lambda p, x: x @ p["kernel"])(lp, jnp.ones((3, 8)))
        >>> bool(jnp.allclose(y, jnp.ones((3, 8)) @ params["kernel"]))
        True
    """
    if not callable(fn):
        raise TypeError(f"expected `fn` to be a callable (e.g. model.apply), got "
                        f"{type(fn).__name__}")
    if modules.is_module(fn):
        raise TypeError(
            f"expected `fn` to be a function of the wrapped tree, got the NNX module "
            f"{type(fn).__name__}: lorax.lora(model) cannot see its parameters. Wrap the module "
            "itself, model = lorax.wrap(model, rank=8), and call it (model(x) is factorized), "
            "or transform a function that takes the state as an argument: "
            "lorax.lora(lambda state, x: nnx.merge(graphdef, state)(x))(lorax.wrap(state), x)")

    @functools.wraps(fn)
    def wrapped(*args: Any, lora_key: jax.Array | None = None, adapter_ids: Any = None,
                **kwargs: Any) -> Any:
        return call(fn, args, kwargs, lora_key, adapter_ids)

    return wrapped


def _is_unit(x: Any) -> bool:
    return is_node(x) or is_quantized(x)


def _proxy(x: Any) -> Any:
    """What the trace sees for a leaf: a quantized kernel is an array of its shape and dtype."""
    x = unbox(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x) else x


def call(fn, args, kwargs, lora_key=None, adapter_ids=None):
    """``lora(fn)(*args, lora_key=lora_key, adapter_ids=adapter_ids, **kwargs)`` (internal)."""
    closed, out_shape, leaves, dynamic = infer.trace(fn, args, kwargs, _is_unit, _proxy)
    names = ids = None
    if adapter_ids is not None:
        names = routing.adapter_names(leaves)
        ids = routing.check_ids(adapter_ids, names)
    invals = []
    for position, i in enumerate(dynamic):
        x = leaves[i]
        if ids is not None and getattr(x, "adapters", None):  # MultiLoRA: per example
            invals.append(_enter(routing.route(x, names, ids), lora_key, position, routed=True))
            continue
        single = x.as_lora() if is_adapted(x) else None  # MultiLoRA: the active ones as one
        if single is not None:
            invals.append(_enter(single, lora_key, position))
        elif is_quantized(unbox(x)):  # a quantized frozen leaf, or no active adapter on one
            invals.append(lax.stop_gradient(unbox(x).dequantize()))
        else:
            invals.append(unbox(x))
    try:
        outs = eval_jaxpr(closed.jaxpr, closed.consts, invals)
    except LayoutError as err:
        raise _layout_mismatch(err, closed.jaxpr, invals) from None
    outs = concrete(outs, "the function's output")
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)


def _layout_mismatch(err: LayoutError, jaxpr, invals) -> ValueError:
    """The error for a kernel used along other axes than its factors: with the spec that fits
    every LoRA kernel's use in the whole function, inferred from its jaxpr."""
    nodes = {pos: v.node for pos, v in enumerate(invals) if isinstance(v, LoRAValue)}
    found = infer.layouts_from_jaxpr(jaxpr, {pos: (n.path, n.shape) for pos, n in nodes.items()},
                                     {pos: n.roles for pos, n in nodes.items()})
    node = err.node
    message = (f"the LoRA kernel at {node.path!r} (shape {list(node.shape)}, layout "
               f"{node.roles!r}) does not fit its use: {err.detail}.")
    fixes = {infer.path_pattern(nodes[pos].path): layout for pos, (layout, _) in found.items()
             if layout and layout != nodes[pos].roles}
    mine = fixes.get(infer.path_pattern(node.path))
    if mine is None:
        why = next((w for pos, (lay, w) in found.items() if nodes[pos].path == node.path), "")
        return ValueError(f"{message} No layout fits every use of it ({why or 'unknown'}); "
                          "wrap it with `exclude=` or merge it into a frozen kernel")
    message += f" The function uses it as layout {mine!r} (s stack, i input, o output): "
    message += f"pass axes={fixes!r} to lorax.wrap"
    old = _old_form(fixes)
    if old:
        message += f" (equivalently {old})"
    return ValueError(message + ", or axes=lorax.infer_axes(fn, params, *args).")


def _old_form(fixes: dict[str, str]) -> str:
    """The ``stacked=``/``in_axes=`` arguments that say the same as ``fixes``, when they can."""
    stacked, in_axes = {}, {}
    for key, layout in fixes.items():
        lay = Layout.of(layout)
        s, n_in = lay.n_stack, lay.n_in
        if not lay.is_canonical:
            return ""
        if s:
            stacked[key] = s
        if n_in != len(layout) - s - 1:  # not the default: all axes but the last
            in_axes[key] = n_in
    return ", ".join(f"{name}={value!r}" for name, value in
                     (("stacked", stacked), ("in_axes", in_axes)) if value)


def _enter(node: LoRA, lora_key, position: int, routed: bool = False) -> LoRAValue:
    key = None
    if lora_key is not None and node.dropout > 0:
        key = jax.random.fold_in(lora_key, position)
    # A quantized w stays quantized: its consumer dequantizes it on use (lorax.qmatmul).
    frozen = dataclasses.replace(node, w=lax.stop_gradient(node.w))
    # The program sees w in its own layout.
    return LoRAValue(frozen, key, node.canonical_axes, routed)


def _bind(eqn, invals):
    return staging.bind(eqn, invals)


def eval_jaxpr(jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluates ``jaxpr`` where some inputs may be :class:`LoRAValue` (internal)."""
    env: dict[Any, Any] = {}

    def read(var):
        return var.val if isinstance(var, Literal) else env[var]

    for var, value in zip(jaxpr.constvars, consts, strict=True):
        env[var] = value
    for var, value in zip(jaxpr.invars, args, strict=True):
        env[var] = value
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(isinstance(v, LoRAValue) for v in invals):
            outs = _lora_eqn(eqn, invals)
        else:
            outs = _bind(eqn, invals)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for var, value in zip(eqn.outvars, outs, strict=True):
            if not isinstance(var, compat.DropVar):
                env[var] = value
    return [read(v) for v in jaxpr.outvars]


def _lora_eqn(eqn, invals):
    compat.check_params(eqn.primitive, eqn.params)  # unknown layouts fail loudly
    entry = lookup(eqn.primitive)
    if entry is None:  # unknown: the fallback
        out = None
    elif entry.infer is not None:  # higher-order: its bodies interpreted
        out = entry.lora(eval_jaxpr, eqn, invals)
    elif entry.is_consumer:  # returns arrays: staged with JAX's caches
        out = staging.apply_rule(entry.lora, eqn, invals)
    else:
        out = entry.lora(invals, eqn)
    return out if out is not None else _bind(eqn, concrete(invals, eqn.primitive.name))
