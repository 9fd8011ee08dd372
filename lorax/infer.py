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
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Jaxpr, Literal

from lorax import compat
from lorax.compat import ClosedJaxpr
from lorax.layouts import default_layout
from lorax.node import is_array_like, is_node, unbox
from lorax.paths import path_str

# Primitives that keep every axis where it is.
_SAME_AXES = frozenset({
    "convert_element_type", "copy", "copy_p", "stop_gradient", "pvary", "reduce_precision",
    "sharding_constraint", "optimization_barrier",
})


@dataclasses.dataclass(frozen=True)
class _View:
    """A value derived from a tracked kernel: ``axes[d]`` are the kernel axes of axis ``d``."""

    kernel: int
    axes: tuple[frozenset[int], ...]


@dataclasses.dataclass
class _Uses:
    """What the program does with one kernel (sets of the kernel's axes)."""

    ndim: int
    stack: set[int] = dataclasses.field(default_factory=set)
    dots: list[tuple[frozenset[int], frozenset[int]]] = dataclasses.field(default_factory=list)
    lookups: list[frozenset[int]] = dataclasses.field(default_factory=list)
    convs: list[frozenset[int]] = dataclasses.field(default_factory=list)

    def used(self) -> bool:
        return bool(self.dots or self.lookups or self.convs)

    def fits(self, layout: str) -> bool:
        """Whether a kernel with ``layout`` serves every use factorized."""
        roles = {c: {j for j, r in enumerate(layout) if r == c} for c in "sio"}
        if len(layout) != self.ndim or not self.stack <= roles["s"]:
            return False
        return (all(batch <= roles["s"] and set(contracted) in (roles["i"], roles["o"])
                    for contracted, batch in self.dots)
                and all(set(u) == roles["i"] for u in [*self.lookups, *self.convs]))

    def layout(self, preferred: str | None = None) -> tuple[str | None, str]:
        """The layout string these uses imply, or ``(None, why)`` when none fits them all.

        ``preferred`` (the name-based default) wins when it fits and the first matmul
        contracts its inputs: a free axis of a matmul may be an output or a stack axis
        (Gemma's k/v selector), which only the name tells.
        """
        if preferred is not None and self.used() and self.fits(preferred) and (
                self.lookups or self.convs
                or set(self.dots[0][0]) == {j for j, r in enumerate(preferred) if r == "i"}):
            return preferred, ""
        stack = set(self.stack)
        for _, batch in self.dots:
            stack |= batch
        if self.lookups:  # the indexed axis of an embedding table is its input
            ins = set(self.lookups[0]) - stack
        elif self.convs:
            ins = set(self.convs[0])
        elif self.dots:
            ins = set(self.dots[0][0])
        else:
            return None, "it is not consumed by a matmul, convolution or lookup"
        outs = set(range(self.ndim)) - stack - ins
        if not ins or not outs or ins & stack:
            return None, f"its uses leave no input/output split (stack axes {sorted(stack)})"
        for contracted, _ in self.dots:
            if set(contracted) not in (ins, outs):
                return None, (f"one matmul contracts its axes {sorted(contracted)}, another "
                              f"{sorted(ins)}")
        for indexed in self.lookups:
            if set(indexed) != ins:
                return None, "it is indexed along different axes"
        for conv_in in self.convs:
            if set(conv_in) != ins:
                return None, "convolutions use it with different feature axes"
        return "".join("s" if j in stack else "i" if j in ins else "o"
                       for j in range(self.ndim)), ""


class _Walker:
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
        name, params = eqn.primitive.name, eqn.params
        none = [None] * len(eqn.outvars)
        v = views[0]
        if name in _SAME_AXES:
            return list(views[: len(eqn.outvars)])
        if name == "transpose":
            return [_View(v.kernel, tuple(v.axes[p] for p in params["permutation"]))]
        if name == "reshape" and params.get("dimensions") is None:
            return [_reshaped(v, eqn.invars[0].aval.shape, params["new_sizes"])]
        if name in ("slice", "dynamic_slice") and v is not None:
            shape = eqn.invars[0].aval.shape
            sizes = eqn.outvars[0].aval.shape
            for d, (n, m) in enumerate(zip(shape, sizes, strict=True)):
                if n != m:
                    self.uses[v.kernel].stack |= v.axes[d]
            return [v]
        if name == "squeeze":
            dims = set(params["dimensions"])
            for d in dims:
                self.uses[v.kernel].stack |= v.axes[d]
            return [_View(v.kernel, tuple(a for d, a in enumerate(v.axes) if d not in dims))]
        if name == "dot_general":
            self.dot(views, params)
            return none
        if name == "conv_general_dilated":
            rhs = views[1]
            if rhs is not None and views[0] is None and params["feature_group_count"] == 1:
                out_feature = params["dimension_numbers"].rhs_spec[0]
                self.uses[rhs.kernel].convs.append(frozenset().union(
                    *(a for d, a in enumerate(rhs.axes) if d != out_feature)))
            return none
        if name == "gather" and v is not None and views[1] is None:
            indexed = params["dimension_numbers"].start_index_map
            self.uses[v.kernel].lookups.append(frozenset().union(*(v.axes[d] for d in indexed)))
            return none
        return self.higher_order(eqn, views) or none

    def dot(self, views, params) -> None:
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        for side, (contract, batch) in enumerate(((lc, lb), (rc, rb))):
            v = views[side]
            if v is None or views[1 - side] is not None:
                continue
            self.uses[v.kernel].dots.append((
                frozenset().union(*(v.axes[d] for d in contract)),
                frozenset().union(*(v.axes[d] for d in batch)),
            ))

    def higher_order(self, eqn, views) -> list[_View | None] | None:
        name, params = eqn.primitive.name, eqn.params
        if name == "scan":
            n_consts, n_carry = compat.scan_counts(params)
            inner = list(views)
            for k in range(n_consts, n_consts + n_carry):
                inner[k] = None
            for k in range(n_consts + n_carry, len(views)):
                v = views[k]
                if v is not None:  # scan slices the leading axis: a stack of layers
                    self.uses[v.kernel].stack |= v.axes[0]
                    inner[k] = _View(v.kernel, v.axes[1:])
            self.run(params["jaxpr"].jaxpr, inner)
            return None
        if name == "cond":
            for branch in params["branches"]:
                self.run(branch.jaxpr, views[1:])
            return None
        if name == "while":
            n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
            n_carry = len(views) - n_cond - n_body
            self.run(params["body_jaxpr"].jaxpr,
                     [*views[n_cond : n_cond + n_body], *[None] * n_carry])
            return None
        for value in params.values():  # jit, remat, custom_jvp/vjp calls, closed_call, ...
            inner = value.jaxpr if isinstance(value, ClosedJaxpr) else value
            if isinstance(inner, Jaxpr) and len(inner.invars) == len(views):
                return self.run(inner, views)
        return None


def _reshaped(v: _View, old: tuple[int, ...], new: tuple[int, ...]) -> _View | None:
    """Follows a reshape that merges or splits runs of consecutive axes."""
    axes, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        if j < len(new) and new[j] == 1 and (i >= len(old) or old[i] != 1):
            axes.append(frozenset())
            j += 1
            continue
        if i < len(old) and old[i] == 1 and (j >= len(new) or new[j] != 1):
            i += 1
            continue
        group_old, group_new = [i], [j]
        size_old, size_new = old[i], new[j]
        while size_old != size_new:
            if size_old < size_new:
                i += 1
                group_old.append(i)
                size_old *= old[i]
            else:
                j += 1
                group_new.append(j)
                size_new *= new[j]
        merged = frozenset().union(*(v.axes[k] for k in group_old))
        axes.extend(merged for _ in group_new)
        i, j = i + 1, j + 1
    return _View(v.kernel, tuple(axes)) if len(axes) == len(new) else None


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
    uses = {pos: _Uses(len(shape)) for pos, (_, shape) in kernels.items()}
    invals = [None] * len(jaxpr.invars)
    for pos, (_, shape) in kernels.items():
        invals[pos] = _View(pos, tuple(frozenset({j}) for j in range(len(shape))))
    _Walker(uses).run(jaxpr, invals)
    current = current or {}
    return {pos: (current[pos], "") if pos in current and u.fits(current[pos])
            else u.layout(default_layout(*kernels[pos])) for pos, u in uses.items() if u.used()}


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
    found = layouts_from_jaxpr(closed.jaxpr, kernels)
    problems = [f"{paths[pos]!r}: {why}" for pos, (layout, why) in found.items() if not layout]
    if problems:
        raise ValueError("infer_axes: no layout fits every use of " + "; ".join(problems))
    return {path_pattern(paths[pos]): layout for pos, (layout, _) in found.items()}
