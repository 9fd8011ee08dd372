"""`lorax.lora`: run any JAX function on wrapped trees, computing adapted kernels factorized.

The transform traces ``fn`` once with each LoRA node replaced by its frozen kernel ``w`` (so the
function sees ordinary arrays of the usual shapes), then evaluates the resulting jaxpr equation
by equation. Values derived from a LoRA node stay symbolic (:class:`lorax.lora_value.LoRAValue`)
through layout primitives and are consumed by the factorized rules in :mod:`lorax.rules`.
Higher-order primitives (``jit``, ``remat``, ``scan``, ``cond``, ``while``) are re-issued with
their bodies interpreted the same way; every other equation is bound unchanged. Equations and
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
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Literal
from jax.extend.core import primitives as prims

from lorax import compat, infer, routing, staging
from lorax.layouts import canonical_layout
from lorax.lora_value import LayoutError, LoRAValue
from lorax.node import LoRA, is_adapted, is_node, unbox
from lorax.quantized import is_quantized
from lorax.rules import NAMED_RULES, RULES
from lorax.view_rules import without_stack_axes


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

    @functools.wraps(fn)
    def wrapped(*args: Any, lora_key: jax.Array | None = None, adapter_ids: Any = None,
                **kwargs: Any) -> Any:
        return _call(fn, args, kwargs, lora_key, adapter_ids)

    return wrapped


def _is_unit(x: Any) -> bool:
    return is_node(x) or is_quantized(x)


def _proxy(x: Any) -> Any:
    """What the trace sees for a leaf: a quantized kernel is an array of its shape and dtype."""
    x = unbox(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x) else x


def _call(fn, args, kwargs, lora_key, adapter_ids=None):
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
    outs = _concrete(outs, "the function's output")
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
        s = layout.count("s")
        n_in = layout.count("i")
        if layout != canonical_layout(len(layout), s, n_in):
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


def _concrete(values: Sequence[Any], where: str) -> list[Any]:
    return [v.materialize(where) if isinstance(v, LoRAValue) else v for v in values]


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
    higher = _HIGHER_ORDER.get(eqn.primitive) or _HIGHER_ORDER_BY_NAME.get(eqn.primitive.name)
    if higher is not None:
        return higher(eqn.params, invals)
    rule = RULES.get(eqn.primitive)
    if rule is None and eqn.primitive.name in NAMED_RULES:
        rule = NAMED_RULES[eqn.primitive.name](eqn.primitive)
    if rule is not None:
        if eqn.primitive in _CONSUMERS:  # returns arrays: staged with JAX's caches
            out = staging.apply_rule(rule, eqn, invals)
        else:
            out = rule(invals, eqn.params)
        if out is not None:
            return out
    return _bind(eqn, _concrete(invals, eqn.primitive.name))


# Primitives whose rules return arrays (the layout rules return LoRA values).
_CONSUMERS = frozenset({prims.dot_general_p, prims.conv_general_dilated_p, prims.gather_p})


def _inline(body):
    def run(params, invals):
        closed = body(params)
        return eval_jaxpr(closed.jaxpr, closed.consts, invals)

    return run


def _remat(params, invals):
    jaxpr = params["jaxpr"]

    def body(*values):
        return _concrete(eval_jaxpr(jaxpr, (), values), "remat output")

    checkpointed = jax.checkpoint(body, prevent_cse=params["prevent_cse"], policy=params["policy"])
    return checkpointed(*invals)


def _scan(params, invals):
    closed = params["jaxpr"]
    n_consts, n_carry = compat.scan_counts(params)
    length = params["length"]
    consts = invals[:n_consts]
    init = _concrete(invals[n_consts : n_consts + n_carry], "scan carry")
    xs, templates = [], []
    for x in invals[n_consts + n_carry :]:
        if not isinstance(x, LoRAValue):
            xs.append(x)
            templates.append(None)
            continue
        c = x.perm[0]  # the canonical axis that scan slices: must be a stack axis
        if c >= x.node.n_stack or x.routed and (c, x.node.canonical_order[0]) != (0, 0):
            raise LayoutError(x, "scan", "`scan` slices its axis "
                              f"{x.node.canonical_order[c]}, which is not a stack axis")
        keys = None if x.key is None else jax.random.split(x.key, length)
        xs.append((_stack_leading(x.node, c), keys))
        templates.append(x)

    def body(carry, x_slices):
        values = []
        for template, x in zip(templates, x_slices, strict=True):
            if template is None:
                values.append(x)
                continue
            fields, key = x
            node = jax.tree.unflatten(jax.tree.structure(template.node), fields)
            v = LoRAValue(template.node, key, template.perm, template.routed)
            values.append(without_stack_axes(v, [0], node))
        outs = eval_jaxpr(closed.jaxpr, closed.consts, [*consts, *carry, *values])
        outs = _concrete(outs, "scan output")
        return outs[:n_carry], outs[n_carry:]

    carry, ys = lax.scan(body, init, xs, length=length, reverse=params["reverse"],
                         unroll=params["unroll"])
    return [*carry, *ys]


def _stack_leading(node: LoRA, c: int) -> list[Any]:
    """The node's data leaves with canonical stack axis ``c`` moved first, for ``lax.scan``."""
    j = node.canonical_order[c]
    if c == 0 and j == 0:  # the common case (nn.scan stacks axis 0): no copies; a quantized w
        return jax.tree.leaves(node)  # keeps per-layer codes
    m = node.magnitude
    moved = dataclasses.replace(node, w=jnp.moveaxis(node.float_w(), j, 0),
                                a=jnp.moveaxis(node.a, c, 0),
                                b=jnp.moveaxis(node.b, c, 0),
                                magnitude=None if m is None else jnp.moveaxis(m, c, 0))
    return jax.tree.leaves(moved)


def _cond(params, invals):
    index, *operands = invals

    def branch(closed, *values):
        return _concrete(eval_jaxpr(closed.jaxpr, closed.consts, values), "cond output")

    branches = [functools.partial(branch, closed) for closed in params["branches"]]
    return lax.switch(index, branches, *operands)


def _while(params, invals):
    n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
    cond_consts = _concrete(invals[:n_cond], "while condition")
    body_consts = invals[n_cond : n_cond + n_body]
    init = _concrete(invals[n_cond + n_body :], "while carry")
    cond_jaxpr, body_jaxpr = params["cond_jaxpr"], params["body_jaxpr"]

    def cond_fn(carry):
        return eval_jaxpr(cond_jaxpr.jaxpr, cond_jaxpr.consts, [*cond_consts, *carry])[0]

    def body_fn(carry):
        outs = eval_jaxpr(body_jaxpr.jaxpr, body_jaxpr.consts, [*body_consts, *carry])
        return _concrete(outs, "while carry")

    return lax.while_loop(cond_fn, body_fn, init)


_HIGHER_ORDER = {
    prims.jit_p: _inline(lambda params: params["jaxpr"]),
    prims.closed_call_p: _inline(compat.called_jaxpr),  # eval_jaxpr_p after jax 0.11.0
    compat.remat_p: _remat,
    prims.scan_p: _scan,
    prims.cond_p: _cond,
    prims.while_p: _while,
}

# Higher-order primitives that `jax.extend` does not export (up to 0.11.0), matched by name.
_HIGHER_ORDER_BY_NAME = {"eval_jaxpr": _inline(compat.called_jaxpr)}
