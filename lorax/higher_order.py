"""Higher-order primitives, for both walkers: how a kernel enters their bodies.

Each primitive with a body (``jit``, ``closed_call``/``eval_jaxpr``, ``remat``, ``scan``,
``cond``, ``while``, ``custom_jvp_call``, ``custom_vjp_call``) has two functions side by side:
``*_lora(run, eqn, invals)`` re-issues it with its bodies interpreted by :func:`lorax.lora`
(``run`` evaluates a jaxpr on values that may be :class:`lorax.lora_value.LoRAValue`), and
``*_infer(walker, eqn, views)`` follows the kernels' axes into its bodies for
:func:`lorax.infer_axes` (``walker``: :class:`lorax.infer.Walker`). Both read the same facts
from the equation: which operands a ``scan`` slices (their leading axis: a stack axis), and
whether a custom-derivative function only passes a kernel through (:func:`passed_through`;
otherwise its body, whose derivative rule lorax cannot see through, would consume the kernel:
a fallback in both).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lorax import compat, staging
from lorax.lora_value import LayoutError, LoRAValue, concrete
from lorax.node import LoRA
from lorax.view_rules import without_stack_axes


def _inline_lora(body):
    def run_body(run, eqn, invals):
        closed = body(eqn.params)
        return run(closed.jaxpr, closed.consts, invals)

    return run_body


def _inline_infer(body):
    def walk(walker, eqn, views):
        return walker.run(body(eqn.params).jaxpr, views)

    return walk


def remat_lora(run, eqn, invals):
    """``remat`` with its body interpreted. A kernel the body returns unchanged (NNX's
    ``nnx.remat`` returns the module's whole state) is returned as it came in, factorized."""
    params = eqn.params
    jaxpr = params["jaxpr"]
    through = _returned_inputs(jaxpr, invals)

    def body(*values):
        outs = run(jaxpr, (), values)
        return concrete([o for k, o in enumerate(outs) if k not in through], "remat output")

    checkpointed = jax.checkpoint(body, prevent_cse=params["prevent_cse"], policy=params["policy"])
    computed = iter(checkpointed(*invals))
    return [invals[through[k]] if k in through else next(computed)
            for k in range(len(jaxpr.outvars))]


def _returned_inputs(jaxpr, invals) -> dict[int, int]:
    """``{output position: input position}`` for the LoRA kernels a body returns unchanged."""
    position = {id(var): j for j, var in enumerate(jaxpr.invars)
                if isinstance(invals[j], LoRAValue)}
    return {k: position[id(var)] for k, var in enumerate(jaxpr.outvars) if id(var) in position}


def remat_infer(walker, eqn, views):
    outs = walker.run(eqn.params["jaxpr"], views)
    through = {id(v) for v in eqn.params["jaxpr"].invars}
    _returned(walker, [o for o, var in zip(outs, eqn.params["jaxpr"].outvars, strict=True)
                       if id(var) not in through], "remat output")


def scan_lora(run, eqn, invals):
    params = eqn.params
    closed = params["jaxpr"]
    n_consts, n_carry = compat.scan_counts(params)
    length = params["length"]
    consts = invals[:n_consts]
    init = concrete(invals[n_consts : n_consts + n_carry], "scan carry")
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

    # A kernel slice the body returns unchanged (NNX's scan returns the sliced module state)
    # comes out as the kernel that went in: {ys position: that input}, filled while tracing.
    returned: dict[int, LoRAValue] = {}

    def body(carry, x_slices):
        values, sliced = [], {}
        for template, x in zip(templates, x_slices, strict=True):
            if template is None:
                values.append(x)
                continue
            fields, key = x
            node = jax.tree.unflatten(jax.tree.structure(template.node), fields)
            v = LoRAValue(template.node, key, template.perm, template.routed)
            values.append(without_stack_axes(v, [0], node))
            sliced[id(values[-1])] = template
        outs = run(closed.jaxpr, closed.consts, [*consts, *carry, *values])
        ys = []
        for k, y in enumerate(outs[n_carry:]):
            if id(y) in sliced:
                returned[k] = sliced[id(y)]
            else:
                ys.append(y)
        return concrete(outs[:n_carry], "scan output"), concrete(ys, "scan output")

    carry, ys = lax.scan(body, init, xs, length=length, reverse=params["reverse"],
                         unroll=params["unroll"])
    computed = iter(ys)
    n_ys = len(closed.jaxpr.outvars) - n_carry
    return [*carry, *(returned[k] if k in returned else next(computed) for k in range(n_ys))]


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


def scan_infer(walker, eqn, views):
    n_consts, n_carry = compat.scan_counts(eqn.params)
    inner = list(views)
    for k in range(n_consts, n_consts + n_carry):
        walker.materialized(views[k], "scan carry")
        inner[k] = None
    for k in range(n_consts + n_carry, len(views)):
        if views[k] is not None:  # scan slices the leading axis: a stack of layers
            inner[k] = walker.index(views[k], views[k].axes[0], views[k].axes[1:])
    _returned(walker, walker.run(eqn.params["jaxpr"].jaxpr, inner), "scan output")


def cond_lora(run, eqn, invals):
    index, *operands = invals

    def branch(closed, *values):
        return concrete(run(closed.jaxpr, closed.consts, values), "cond output")

    branches = [functools.partial(branch, closed) for closed in eqn.params["branches"]]
    return lax.switch(index, branches, *operands)


def cond_infer(walker, eqn, views):
    for branch in eqn.params["branches"]:
        _returned(walker, walker.run(branch.jaxpr, views[1:]), "cond output")


def while_lora(run, eqn, invals):
    params = eqn.params
    n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
    cond_consts = concrete(invals[:n_cond], "while condition")
    body_consts = invals[n_cond : n_cond + n_body]
    init = concrete(invals[n_cond + n_body :], "while carry")
    cond_jaxpr, body_jaxpr = params["cond_jaxpr"], params["body_jaxpr"]

    def cond_fn(carry):
        return run(cond_jaxpr.jaxpr, cond_jaxpr.consts, [*cond_consts, *carry])[0]

    def body_fn(carry):
        return concrete(run(body_jaxpr.jaxpr, body_jaxpr.consts, [*body_consts, *carry]),
                        "while carry")

    return lax.while_loop(cond_fn, body_fn, init)


def while_infer(walker, eqn, views):
    params = eqn.params
    n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
    for v in views[:n_cond]:
        walker.materialized(v, "while condition")
    for v in views[n_cond + n_body:]:
        walker.materialized(v, "while carry")
    outs = walker.run(params["body_jaxpr"].jaxpr, [*views[n_cond : n_cond + n_body],
                                                   *[None] * (len(views) - n_cond - n_body)])
    _returned(walker, outs, "while carry")


def _returned(walker, outs, where: str) -> None:
    """Kernels a body returns where ``lora`` needs arrays (``where``): materialized there."""
    for v in outs:
        walker.materialized(v, where)


def passed_through(eqn: Any, k: int) -> list[int] | None:
    """The output positions of a custom-derivative call (``custom_jvp_call``,
    ``custom_vjp_call``) that return its operand ``k`` unchanged, when its body does nothing
    else with it (``[]``: unused); ``None`` when the body consumes it."""
    body = eqn.params["call_jaxpr"].jaxpr
    if len(body.invars) != len(eqn.invars):
        return None
    var = body.invars[k]
    if any(var is v for e in body.eqns for v in e.invars):
        return None
    return [i for i, out in enumerate(body.outvars) if out is var]


def custom_call_lora(run, eqn, invals):
    """A kernel only passed through a custom-derivative function stays factorized (the
    function runs, with its own rule, on the frozen ``w``; the factors' gradients are plain
    LoRA's). One it consumes is materialized (``None``: the interpreter's fallback)."""
    del run
    kernels = {k: passed_through(eqn, k) for k, v in enumerate(invals)
               if isinstance(v, LoRAValue)}
    if any(positions is None for positions in kernels.values()):
        return None
    outs = staging.bind(eqn, [v.base() if k in kernels else v for k, v in enumerate(invals)])
    for k, positions in kernels.items():
        for i in positions:
            outs[i] = invals[k]
    return outs


def custom_call_infer(walker, eqn, views):
    outs = [None] * len(eqn.outvars)
    for k, v in enumerate(views):
        if v is None:
            continue
        positions = passed_through(eqn, k)
        if positions is None:
            walker.consumed_inside(v, eqn.primitive.name)
        for i in positions or ():
            outs[i] = v
    return outs


JIT = (_inline_lora(lambda params: params["jaxpr"]),
       _inline_infer(lambda params: params["jaxpr"]))
CALL = (_inline_lora(compat.called_jaxpr), _inline_infer(compat.called_jaxpr))
REMAT = (remat_lora, remat_infer)
SCAN = (scan_lora, scan_infer)
COND = (cond_lora, cond_infer)
WHILE = (while_lora, while_infer)
CUSTOM_CALL = (custom_call_lora, custom_call_infer)
