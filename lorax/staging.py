"""Staged binds: each equation the interpreter re-issues goes through a cached inline ``jit``.

:func:`lorax.lora` traces the function once and then evaluates its jaxpr equation by equation
(:mod:`lorax.interpreter`). Under autodiff, a primitive bound on its own is linearized on its
own: JAX traces its JVP rule into a small jaxpr, every time, for every equation of every layer.
A plain trace of the same model does not pay that: ``jax.numpy`` functions are ``jit(inline=
True)`` calls, whose traced jaxpr and linearization JAX caches, so the second layer reuses the
first's. This module gives the re-evaluation the same caching: an equation is bound through a
``jax.jit(..., inline=True)`` function cached by its *signature* (primitive, parameters and
literal operands), and a factorized consumer (:mod:`lorax.rules`) runs inside one cached by the
rule, the signature and the structure of its operands (the kernel's path, only used in
messages, left out). JAX then traces and differentiates each distinct signature once; inlined,
the program is the same as binding the equations one by one.

Only traced operands take this path (concrete ones are bound eagerly, as before), and only
equations without effects or sub-jaxprs (higher-order primitives are re-issued by the
interpreter itself).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from lorax import compat
from lorax.lora_value import LoRAValue

_CACHE_SIZE = 4096
"""Distinct signatures kept (a model has a few dozen; the bound only limits memory)."""


def _is_traced(values: list[Any]) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in values)


def _plain(value: Any) -> bool:
    """Whether a parameter value holds no jaxpr or function (those belong to higher-order
    primitives, which the interpreter re-issues itself)."""
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return not (isinstance(value, (Jaxpr, ClosedJaxpr)) or callable(value))


def signature(eqn: Any) -> tuple | None:
    """What determines an equation's result besides its non-literal operands, hashable; or
    ``None`` for an equation that must be bound as it is (effects, sub-jaxprs, unhashable
    parameters).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> eqns = jax.make_jaxpr(lambda x, y: (x * 2.0, y * 2.0))(1.0, 3.0).eqns
        >>> signature(eqns[0]) == signature(eqns[1]) is not None
        True
    """
    if eqn.effects or not all(_plain(v) for v in eqn.params.values()):
        return None
    literals = tuple(
        (var.aval, type(var.val), np.asarray(var.val).tobytes())
        if isinstance(var, Literal) else None for var in eqn.invars)
    params = tuple((name, type(value), value) for name, value in sorted(eqn.params.items()))
    key = (eqn.primitive, params, literals)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _operands(eqn: Any, invals: list[Any]) -> list[Any]:
    return [v for v, var in zip(invals, eqn.invars, strict=True) if not isinstance(var, Literal)]


def _with_literals(eqn: Any) -> Callable[[list[Any]], list[Any]]:
    """Rebuilds an equation's operand list from its non-literal operands."""
    literals = [var.val if isinstance(var, Literal) else None for var in eqn.invars]
    is_literal = [isinstance(var, Literal) for var in eqn.invars]

    def full(operands: list[Any]) -> list[Any]:
        it = iter(operands)
        return [lit if known else next(it) for lit, known in zip(literals, is_literal,
                                                                 strict=True)]

    return full


_STAGED: dict[tuple, Callable[..., Any]] = {}


def _staged(key: tuple, make: Callable[[], Callable[..., Any]]) -> Callable[..., Any]:
    """The function cached under ``key`` (made by ``make()`` on a miss; oldest out first)."""
    fn = _STAGED.get(key)
    if fn is None:
        if len(_STAGED) >= _CACHE_SIZE:
            del _STAGED[next(iter(_STAGED))]
        fn = _STAGED[key] = make()
    return fn


def _staged_bind(eqn: Any) -> Callable[..., Any]:
    primitive, params, full = eqn.primitive, eqn.params, _with_literals(eqn)
    return jax.jit(lambda *operands: compat.bind(primitive, full(list(operands)), params),
                   inline=True)


def bind(eqn: Any, invals: list[Any]) -> Any:
    """Binds ``eqn``'s primitive to ``invals`` (arrays or tracers) as the jaxpr would.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> eqn = jax.make_jaxpr(lambda x: x * 2.0)(1.0).eqns[0]
        >>> float(jax.jit(lambda x: bind(eqn, [x, 2.0]))(3.0))
        6.0
    """
    key = signature(eqn) if _is_traced(invals) else None
    if key is None:
        return compat.bind(eqn.primitive, invals, eqn.params)
    return _staged(key, lambda: _staged_bind(eqn))(*_operands(eqn, invals))


def _anonymous(value: Any) -> Any:
    """A :class:`LoRAValue` without its path (static, for messages only), so that kernels of
    different layers share one staged rule."""
    if isinstance(value, LoRAValue) and value.node.path:
        return value.with_node(dataclasses.replace(value.node, path=""))
    return value


def _staged_rule(rule: Callable[..., Any], eqn: Any) -> Callable[..., Any]:
    full = _with_literals(eqn)
    return jax.jit(lambda operands: rule(full(operands), eqn), inline=True)


def apply_rule(rule: Callable[..., Any], eqn: Any, invals: list[Any]) -> Any:
    """``rule(invals, eqn)`` for a rule that returns arrays (or ``None``): a consumer.

    Staged (see the module docstring) when the operands are traced. Should the staged call
    fail, the rule runs directly, so that its error names the kernel's path.
    """
    key = signature(eqn) if _is_traced(jax.tree.leaves(invals)) else None
    if key is None:
        return rule(invals, eqn)
    try:
        fn = _staged((rule, *key), lambda: _staged_rule(rule, eqn))
        return fn([_anonymous(v) for v in _operands(eqn, invals)])
    except Exception:  # noqa: BLE001 (re-raised, with the path, by the direct call)
        return rule(invals, eqn)
