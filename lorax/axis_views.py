"""Which kernel axes a value derived from a kernel holds, and what a consumer does with them.

The one algebra behind both walkers of a jaxpr, :func:`lorax.lora` and :func:`lorax.infer_axes`
(dispatched by :mod:`lorax.primitive_table`). A value derived from a kernel is described by its
*axes*: ``axes[d]`` is the set of kernel axes its axis ``d`` holds (one each after transposes,
several after a reshape merges them, none for an inserted size-1 axis). ``lora`` numbers kernel
axes canonically (``(*stack, *in, *out)``), ``infer_axes`` in the kernel's own order; the
functions here do not care.

* A **view** function maps the operand's axes to the result's and names the kernel axes the
  primitive indexes (slices, squeezes): those must be stack axes.
* A **use** function says which kernel axes a consumer contracts and which it batches over
  (a :class:`Use`), or ``None`` for a form lorax does not factorize; :func:`fits` says whether
  a layout serves the use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

Axes = tuple[frozenset[int], ...]
NO_AXES: frozenset[int] = frozenset()


def single_axes(perm: Sequence[int]) -> Axes:
    """The axes of a plain transpose of the kernel: value axis ``d`` holds kernel axis
    ``perm[d]``.

    Example:
        >>> single_axes((1, 0))
        (frozenset({1}), frozenset({0}))
    """
    return tuple(frozenset({p}) for p in perm)


def union(axes: Axes, dims: Sequence[int]) -> frozenset[int]:
    """The kernel axes held by the value axes ``dims``."""
    return NO_AXES.union(*(axes[d] for d in dims))


class View(NamedTuple):
    """A view primitive's effect: the result's axes (``None``: the kernel's axes cannot be
    followed) and the kernel axes it indexes (which must be stack axes)."""

    axes: Axes | None
    indexed: frozenset[int] = NO_AXES


def same_axes(axes: Axes, eqn: Any) -> View:
    """Elementwise and marker primitives (casts, copies, barriers): nothing moves."""
    del eqn
    return View(axes)


def transpose_axes(axes: Axes, eqn: Any) -> View:
    return View(tuple(axes[p] for p in eqn.params["permutation"]))


def reshape_axes(axes: Axes, eqn: Any) -> View:
    """A reshape that merges or splits runs of consecutive axes (size-1 axes come and go)."""
    if eqn.params.get("dimensions") is not None:
        return View(None)
    old, new = eqn.invars[0].aval.shape, tuple(eqn.params["new_sizes"])
    out, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        if j < len(new) and new[j] == 1 and (i >= len(old) or old[i] != 1):
            out.append(NO_AXES)
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
        merged = union(axes, group_old)
        out.extend(merged for _ in group_new)
        i, j = i + 1, j + 1
    return View(tuple(out) if len(out) == len(new) else None)


def slice_axes(axes: Axes, eqn: Any) -> View:
    """``slice``/``dynamic_slice``: the narrowed axes are indexed (stack axes: ``w[0:1]``)."""
    old, new = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
    return View(axes, union(axes, [d for d, (n, m) in enumerate(zip(old, new, strict=True))
                                   if n != m]))


def squeeze_axes(axes: Axes, eqn: Any) -> View:
    """Dropping size-1 axes (after ``w[0]``): they are indexed."""
    dims = set(eqn.params["dimensions"])
    return View(tuple(a for d, a in enumerate(axes) if d not in dims), union(axes, sorted(dims)))


class Use(NamedTuple):
    """What a consumer does with a kernel: its operand position, the kernel axes it contracts
    with the activation (``contracted``; the indexed axes of a lookup) and those it batches
    over. ``kind`` is ``"dot"`` (either side may be contracted: ``x·W`` or ``x·Wᵀ``) or
    ``"input"`` (convolutions, lookups: the contracted axes are the inputs)."""

    operand: int
    contracted: frozenset[int]
    batch: frozenset[int] = NO_AXES
    kind: str = "dot"


def fits(roles: str, use: Use) -> bool:
    """Whether a kernel laid out ``roles`` (one of s/i/o per kernel axis, numbered as the
    use's axes) serves ``use`` factorized.

    Example:
        >>> fits("sio", Use(1, frozenset({1}), frozenset({0})))
        True
        >>> fits("io", Use(1, frozenset({0, 1})))
        False
    """
    groups = {c: frozenset(j for j, r in enumerate(roles) if r == c) for c in "sio"}
    sides = (groups["i"],) if use.kind == "input" else (groups["i"], groups["o"])
    return use.batch <= groups["s"] and use.contracted in sides


def dot_use(views: Sequence[Axes | None], eqn: Any) -> Use | None:
    """``dot_general`` with a kernel on one side."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if (views[0] is None) == (views[1] is None):
        return None  # a product of two kernels: not factorized
    side = 0 if views[0] is not None else 1
    axes, contract, batch = views[side], (lc, rc)[side], (lb, rb)[side]
    return Use(side, union(axes, contract), union(axes, batch))


def ragged_numbers(params: Any) -> tuple[int, int, int, int] | None:
    """``(lhs contracted, lhs ragged, rhs group, rhs contracted)`` axes of the one
    ``ragged_dot_general`` form lorax factorizes (``lax.ragged_dot``'s: ``(m, k)`` rows
    grouped by ``group_sizes`` times a ``(g, k, n)`` stack of kernels, in any axis order),
    else ``None``."""
    numbers = params["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = numbers.dot_dimension_numbers
    ragged, group = tuple(numbers.lhs_ragged_dimensions), tuple(numbers.rhs_group_dimensions)
    if lb or rb or len(lc) != 1 or len(ragged) != 1 or len(group) != 1 or ragged[0] in lc:
        return None
    return lc[0], ragged[0], group[0], rc[0]


def ragged_use(views: Sequence[Axes | None], eqn: Any) -> Use | None:
    """``ragged_dot_general`` (MoE experts): the group axis of the kernel stack is a stack
    axis, batched over by the row groups."""
    x, w = views[0], views[1]
    numbers = ragged_numbers(eqn.params)
    if x is not None or w is None or any(v is not None for v in views[2:]) or numbers is None \
            or len(eqn.invars[0].aval.shape) != 2 or len(eqn.invars[1].aval.shape) != 3:
        return None
    _, _, group, contract = numbers
    return Use(1, w[contract], w[group])


def conv_use(views: Sequence[Axes | None], eqn: Any) -> Use | None:
    """``conv_general_dilated`` with the kernel as the filter: every axis but the output
    feature axis is contracted (spatial window and input features)."""
    lhs, rhs = views
    params = eqn.params
    if lhs is not None or rhs is None or params["feature_group_count"] != 1 \
            or params["batch_group_count"] != 1:
        return None
    out_feature = params["dimension_numbers"].rhs_spec[0]
    return Use(1, union(rhs, [d for d in range(len(rhs)) if d != out_feature]), kind="input")


def gather_use(views: Sequence[Axes | None], eqn: Any) -> Use | None:
    """``gather`` of whole rows of the kernel (an embedding lookup): the indexed axes are its
    inputs; the row (output) axes are taken whole."""
    operand, indices = views
    if operand is None or indices is not None:
        return None
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    shape = eqn.invars[0].aval.shape
    indexed = set(dn.collapsed_slice_dims) | set(dn.start_index_map)
    whole = [d for d in range(len(shape)) if d not in indexed]
    if dn.operand_batching_dims or any(sizes[d] != shape[d] for d in whole):
        return None
    return Use(0, union(operand, sorted(indexed)), kind="input")
