"""`lorax.infer_axes`: read each kernel's stack, input and output axes off the computation.

A kernel's layout (see :class:`lorax.kernel_axes.KernelAxes`) is a fact about how the model uses it:
which of its axes a ``dot_general`` contracts with the activation (inputs), which it batches
over or a ``scan`` slices (stacks), and which it keeps (outputs). This module traces the function
once on abstract values and follows every kernel through layout primitives (transpose, reshape,
casts, slices), higher-order primitives (``jit``, ``remat``, ``scan``, ``cond``, ``while``,
custom derivatives) to the primitives that consume it. Nothing is computed, so planning a large
model costs one trace. :func:`lorax.lora` uses the same analysis to name the ``axes=`` spec that
works when a kernel's factors do not fit its use.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Jaxpr, Literal

from lorax.axis_views import Axes, Use, fits, single_axes
from lorax.layouts import default_layout
from lorax.lora_value import LoRAFallbackWarning
from lorax.node import is_array_like, is_node, unbox
from lorax.paths import path_str
from lorax.primitive_table import lookup


@dataclasses.dataclass(frozen=True)
class _View:
    """A value derived from a tracked kernel: ``axes[d]`` are the kernel axes of axis ``d``."""

    kernel: int
    axes: Axes


@dataclasses.dataclass
class _Uses:
    """What the program does with one kernel (axes numbered in the kernel's own order)."""

    ndim: int
    stack: set[int] = dataclasses.field(default_factory=set)
    uses: list[Use] = dataclasses.field(default_factory=list)
    # Primitives where lorax.lora would materialize the kernel; `hidden`: inside a
    # custom-derivative function's body (a use this walk cannot see, always reported).
    fallbacks: set[str] = dataclasses.field(default_factory=set)
    hidden: bool = False

    def fits(self, layout: str) -> bool:
        """Whether a kernel with ``layout`` serves every use factorized."""
        stack = {j for j, r in enumerate(layout) if r == "s"}
        return (len(layout) == self.ndim and self.stack <= stack
                and all(fits(layout, use) for use in self.uses))

    def layout(self, preferred: str | None = None) -> tuple[str | None, str]:
        """The layout string these uses imply, or ``(None, why)`` when none fits them all.

        ``preferred`` (the name-based default) wins when it fits and the first use is a lookup
        or convolution, or a matmul contracting its inputs: a free axis of a matmul may be an
        output or a stack axis (Gemma's k/v selector), which only the name tells.
        """
        if not self.uses:
            return None, "it is not consumed by a matmul, convolution or lookup"
        inputs = [use for use in self.uses if use.kind == "input"]
        if preferred is not None and self.fits(preferred) and (inputs or set(
                self.uses[0].contracted) == {j for j, r in enumerate(preferred) if r == "i"}):
            return preferred, ""
        stack = set(self.stack).union(*(use.batch for use in self.uses))
        first = inputs[0] if inputs else self.uses[0]
        ins = set(first.contracted) - stack if inputs else set(first.contracted)
        outs = set(range(self.ndim)) - stack - ins
        if not ins or not outs or ins & stack:
            return None, f"its uses leave no input/output split (stack axes {sorted(stack)})"
        layout = "".join("s" if j in stack else "i" if j in ins else "o"
                         for j in range(self.ndim))
        for use in self.uses:
            if not fits(layout, use):
                return None, (f"one use contracts its axes {sorted(use.contracted)}, another "
                              f"{sorted(ins)}")
        return layout, ""


class Walker:
    """Follows the tracked kernels through a jaxpr, by :mod:`lorax.primitive_table` (internal;
    :mod:`lorax.higher_order` calls back into it)."""

    def __init__(self, uses: dict[int, _Uses]):
        self.uses = uses

    def run(self, jaxpr: Jaxpr, invals: list[_View | None]) -> list[_View | None]:
        env: dict[Any, _View] = {}
        for var, value in zip(jaxpr.invars, invals, strict=True):
            if value is not None:
                env[var] = value
        for eqn in jaxpr.eqns:
            views = [None if isinstance(v, Literal) else env.get(v) for v in eqn.invars]
            if not any(v is not None for v in views):
                continue
            outs = self.equation(eqn, views)
            for var, out in zip(eqn.outvars, outs, strict=False):
                if out is not None:
                    env[var] = out
        return [None if isinstance(v, Literal) else env.get(v) for v in jaxpr.outvars]

    def equation(self, eqn, views: list[_View | None]) -> list[_View | None]:
        entry = lookup(eqn.primitive)
        none = [None] * len(eqn.outvars)
        name = eqn.primitive.name
        if entry is None:
            for v in views:
                self.materialized(v, name)
            return none
        if entry.infer is not None:
            return entry.infer(self, eqn, views) or none
        if entry.is_consumer:
            use = entry.use([None if v is None else v.axes for v in views], eqn)
            if use is None:
                for v in views:
                    self.materialized(v, name)
            else:
                self.uses[views[use.operand].kernel].uses.append(use)
            return none
        outs = []  # a view: each operand's axes to its result's
        for v in views[: len(eqn.outvars)]:
            view = None if v is None else entry.axes(v.axes, eqn)
            if view is not None and view.axes is None:
                self.materialized(v, name)
                view = None
            outs.append(None if view is None else self.index(v, view.indexed, view.axes))
        return outs

    def index(self, v: _View, indexed: frozenset[int], axes: Axes) -> _View:
        """Records the kernel axes a slice or scan indexes (stack axes); the view after it."""
        self.uses[v.kernel].stack |= indexed
        return _View(v.kernel, axes)

    def materialized(self, v: _View | None, name: str) -> None:
        """``v`` reaches a primitive lorax.lora materializes it at (``name``)."""
        if v is not None:
            self.uses[v.kernel].fallbacks.add(name)

    def consumed_inside(self, v: _View, name: str) -> None:
        """``v`` is consumed inside a custom-derivative function's body (``name``)."""
        self.materialized(v, name)
        self.uses[v.kernel].hidden = True


def layouts_from_jaxpr(jaxpr: Jaxpr, kernels: Mapping[int, tuple[str, tuple[int, ...]]],
                       current: Mapping[int, str] | None = None
                       ) -> dict[int, tuple[str | None, str]]:
    """Layouts of the kernels fed to ``jaxpr``'s inputs (internal).

    Args:
        jaxpr: the traced computation.
        kernels: ``{input position: (path, shape)}`` for the inputs to follow.
        current: ``{input position: layout}`` to keep wherever it serves every use.

    Returns:
        ``{input position: (layout or None, reason when None)}`` for each kernel that is used:
        its ``current`` layout if that fits, else the name-based default
        (:func:`lorax.layouts.default_layout`) if that fits, else what the uses say.
    """
    return _layouts(walk(jaxpr, kernels), kernels, current or {})


def _layouts(uses: dict[int, _Uses], kernels, current) -> dict[int, tuple[str | None, str]]:
    return {pos: (current[pos], "") if pos in current and u.fits(current[pos])
            else u.layout(default_layout(*kernels[pos])) for pos, u in uses.items() if u.uses}


def walk(jaxpr: Jaxpr, kernels: Mapping[int, tuple[str, tuple[int, ...]]]) -> dict[int, _Uses]:
    """Every use of the kernels fed to ``jaxpr``'s inputs ``{position: (path, shape)}``."""
    uses = {pos: _Uses(len(shape)) for pos, (_, shape) in kernels.items()}
    invals = [None] * len(jaxpr.invars)
    for pos, (_, shape) in kernels.items():
        invals[pos] = _View(pos, single_axes(range(len(shape))))
    Walker(uses).run(jaxpr, invals)
    return uses


def trace(fn: Callable[..., Any], args: tuple, kwargs: dict, is_leaf, proxy):
    """Traces ``fn(*args, **kwargs)`` with array leaves (and ``is_leaf`` units, shown to the
    trace as ``proxy(leaf)``) as inputs and everything else closed over (internal).

    Returns:
        ``(closed_jaxpr, out_shape, leaves, dynamic)``: ``dynamic`` lists the positions in
        ``leaves`` (of ``(args, kwargs)`` flattened) that are the jaxpr's inputs, in order.
    """
    leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=is_leaf)
    dynamic = [i for i, x in enumerate(leaves) if is_leaf(x) or is_array_like(x)]

    def flat_fn(*values):
        full = list(leaves)
        for i, value in zip(dynamic, values, strict=True):
            full[i] = value
        call_args, call_kwargs = jax.tree.unflatten(treedef, full)
        return fn(*call_args, **call_kwargs)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(
        *[proxy(leaves[i]) for i in dynamic])
    return closed, out_shape, leaves, dynamic


def path_pattern(path: str) -> str:
    """The regex that selects exactly ``path`` (a key for ``axes=`` and the other patterns).

    Example:
        >>> path_pattern("layers/0/attn/q_einsum/w")
        '^layers/0/attn/q_einsum/w$'
    """
    return "^" + re.escape(path) + "$"


def _abstract(x: Any) -> Any:
    x = unbox(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype) if is_array_like(x) else x


def infer_axes(fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any) -> dict[str, str]:
    """The layout of every kernel of ``params`` that ``fn(params, *args, **kwargs)`` uses.

    Pass the result as ``lorax.wrap(params, axes=...)``. Only shapes matter: ``params`` and the
    arguments may be abstract (``jax.ShapeDtypeStruct`` trees, e.g. from ``jax.eval_shape``),
    and nothing is computed.

    Args:
        fn: the function that consumes the parameters first, e.g. ``model.apply`` with
            ``{"params": ...}`` folded in, or ``lambda state, x: nnx.merge(graphdef, state)(x)``.
        params: the parameter tree (plain, or already wrapped: nodes count as their ``w``).
        *args: the remaining positional arguments of ``fn``.
        **kwargs: its keyword arguments.

    Returns:
        ``{regex: layout}`` with one anchored regex per used floating kernel of ``ndim >= 2``
        and its layout string: one letter per axis, ``s`` stack (``scan``-sliced, indexed, or
        batched over by the matmul), ``i`` input (contracted with the activation), ``o`` output.

    Raises:
        ValueError: when a kernel's uses contradict each other (no layout fits them all).

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> p = {"q_einsum": {"w": jnp.ones((4, 32, 8))}}
        >>> fn = lambda p, x: jnp.einsum("BTD,NDH->BTNH", x, p["q_einsum"]["w"])
        >>> lorax.infer_axes(fn, p, jnp.ones((2, 5, 32)))
        {'^q_einsum/w$': 'oio'}
    """
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)[0]
    closed, _, leaves, dynamic = trace(fn, (params, *args), kwargs, is_node, _abstract)
    kernels, paths = {}, {}
    for pos, i in enumerate(dynamic):
        if i >= len(flat):
            break
        leaf = unbox(leaves[i])
        if leaf.ndim >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating):
            paths[pos] = path_str(flat[i][0])
            kernels[pos] = (paths[pos], tuple(leaf.shape))
    uses = walk(closed.jaxpr, kernels)
    for pos, u in uses.items():
        if u.fallbacks and (u.uses or u.hidden):
            warnings.warn(
                f"lorax.infer_axes: {', '.join(f'`{n}`' for n in sorted(u.fallbacks))} "
                f"consumes the kernel at {paths[pos]!r} in a way that cannot be factorized; "
                "lorax.lora materializes W + s*A@B there (full-size compute and memory)",
                LoRAFallbackWarning, stacklevel=2)
    found = _layouts(uses, kernels, {})
    problems = [f"{paths[pos]!r}: {why}" for pos, (layout, why) in found.items() if not layout]
    if problems:
        raise ValueError("infer_axes: no layout fits every use of " + "; ".join(problems))
    return {path_pattern(paths[pos]): layout for pos, (layout, _) in found.items()}
