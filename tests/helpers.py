"""Shared test helpers: independent dense LoRA math and tree comparisons.

Nothing here calls lorax's own ``LoRA.delta``/``merged``/``merge``: the tests compare lorax
against these reference computations.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

import lorax

ROOT = Path(__file__).resolve().parents[1]


def cpu_devices_env(devices: int) -> dict[str, str]:
    """The environment for a child Python process with ``devices`` CPU devices (``XLA_FLAGS``
    must be set before jax is imported) that imports this checkout's ``lorax`` and
    ``experiments`` (the repository root first on ``PYTHONPATH``, ahead of any editable install
    of another checkout)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", ""))
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path,
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip()}


def lora_nodes(tree: Any) -> list[lorax.LoRA]:
    """Every LoRA node of ``tree`` in flattening order."""
    return [x for x in jax.tree.leaves(tree, is_leaf=lorax.is_lora) if lorax.is_lora(x)]


def dense_delta(a: Any, b: Any, scale: float, n_stack: int = 0) -> np.ndarray:
    """``scale * a @ b`` in float64 NumPy: a (*stack, *in, r), b (*stack, r, *out)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    stack = a.shape[:n_stack]
    ins, r = a.shape[n_stack:-1], a.shape[-1]
    outs = b.shape[n_stack + 1 :]
    a2 = a.reshape(*stack, math.prod(ins), r)
    b2 = b.reshape(*stack, r, math.prod(outs))
    d = np.einsum("...ir,...ro->...io", a2, b2)
    return (scale * d).reshape(*stack, *ins, *outs)


def delta_eqn(roles: str) -> str:
    """``"a,b->W"``: the einsum giving ``a @ b`` in the layout ``roles`` (one of ``s``/``i``/``o``
    per kernel axis), for factors ``a (*stack, *in, r)``, ``b (*stack, r, *out)`` whose groups
    keep the kernel's axis order."""
    letters = "ABCDEFGHIJKLMNOPQ"[: len(roles)]

    def pick(c):
        return "".join(x for x, role in zip(letters, roles, strict=True) if role == c)

    return f"{pick('s')}{pick('i')}r,{pick('s')}r{pick('o')}->{letters}"


def factor_shapes(shape, roles: str, rank: int) -> tuple[tuple, tuple]:
    """The factors' shapes for a kernel of this layout: a (*stack, *in, r), b (*stack, r, *out),
    each group in the kernel's axis order."""
    pick = {c: tuple(n for n, x in zip(shape, roles, strict=True) if x == c) for c in "sio"}
    return (*pick["s"], *pick["i"], rank), (*pick["s"], rank, *pick["o"])


def dense_kernel(node: lorax.LoRA) -> np.ndarray:
    """``w + scale * a @ b`` in float64 NumPy, from the node's raw fields, in ``w``'s layout."""
    d = np.einsum(delta_eqn(node.roles), np.asarray(node.a, np.float64),
                  np.asarray(node.b, np.float64))
    return np.asarray(node.w, np.float64) + node.scale * d


def dense_delta_jnp(node: lorax.LoRA) -> jax.Array:
    """``scale * a @ b`` in differentiable jnp (for reference gradients), in ``w``'s layout."""
    d = jnp.einsum(delta_eqn(node.roles), node.a, node.b, precision=jax.lax.Precision.HIGHEST)
    return node.scale * d


def wrap_filled(params: Any, **wrap_kw: Any) -> Any:
    """``lorax.wrap`` of ``params``' abstract shapes, filled: each node's ``w`` the concrete
    kernel, ``a`` random (NumPy), ``b`` zero. (Wrapping concrete params compiles an initializer
    per factor shape, seconds each on a busy CPU; tests/test_wrap.py covers it.)"""
    lp = lorax.wrap(jax.eval_shape(lambda p: p, params), **wrap_kw)
    rng = np.random.default_rng(5)

    def fill(node, w):
        if not lorax.is_lora(node):
            return w
        a = rng.uniform(-1, 1, node.a.shape) / np.sqrt(math.prod(node.in_shape))
        return dataclasses.replace(node, w=w, a=jnp.asarray(a, node.a.dtype),
                                   b=jnp.zeros(node.b.shape, node.b.dtype))

    return jax.tree.map(fill, lp, params, is_leaf=lorax.is_lora)


def _is_node(x: Any) -> bool:
    return isinstance(x, lorax.LoRA | lorax.FullyTrained)


def dense_params(tree: Any, dtype: Any = np.float32) -> Any:
    """Replaces each LoRA node by its adapted kernel from :func:`dense_kernel` (NumPy, ``dtype``);
    ``FullyTrained`` boxes by their values."""

    def fold(x):
        if lorax.is_lora(x):
            return jnp.asarray(dense_kernel(x).astype(dtype))
        if isinstance(x, lorax.FullyTrained):
            return x.value
        return x

    return jax.tree.map(fold, tree, is_leaf=_is_node)


def dense_params_jnp(tree: Any) -> Any:
    """Like :func:`dense_params` but differentiable: ``w + s * a @ b`` with jnp, as a function
    of each node's ``w``, ``a`` and ``b``."""

    def fold(x):
        if lorax.is_lora(x):
            return x.w + dense_delta_jnp(x).astype(x.w.dtype)
        if isinstance(x, lorax.FullyTrained):
            return x.value
        return x

    return jax.tree.map(fold, tree, is_leaf=_is_node)


def perturb_b(tree: Any, key: Any, std: float = 0.1) -> Any:
    """Sets every LoRA ``b`` to ``std * normal`` (in b's dtype), different values per node.

    ``key`` is a JAX PRNG key or an int seed. The values come from NumPy (no per-shape XLA
    compiles), deterministically from ``key``.
    """
    if isinstance(key, jax.Array):
        key = np.asarray(jax.random.key_data(key)).astype(np.uint32).tolist()
    rng = np.random.default_rng(key)

    def go(x):
        if not lorax.is_lora(x):
            return x
        b = jnp.asarray(std * rng.standard_normal(x.b.shape), jnp.float32).astype(x.b.dtype)
        return dataclasses.replace(x, b=b)

    return jax.tree.map(go, tree, is_leaf=lorax.is_lora)


def _precision(*arrays: Any) -> Any:
    """The coarsest floating dtype among ``arrays`` (the precision a computation ran in: a
    float32 result checked against a float64 NumPy reference is float32), or None."""
    floats = [d for d in (np.asarray(x).dtype for x in arrays) if jnp.issubdtype(d, jnp.inexact)]
    return max(floats, key=lambda d: jnp.finfo(d).eps, default=None)


def tolerance(expected: Any, *, dtype: Any = None, ulps: float = 64,
              scale: float | None = None) -> float:
    """The absolute tolerance ``ulps · eps(dtype) · scale`` for comparing against ``expected``.

    ``scale`` defaults to ``max|expected|``: rounding errors of sums and products scale with
    the magnitude of the values involved, not with each element (an entry that cancels to ~0
    still carries the rounding of its large summands), so one normwise bound per array fits
    every entry. ``dtype`` defaults to ``expected``'s; pass the dtype the computation ran in
    when ``expected`` is a float64 reference of float32 math. ``ulps`` counts the eps allowed:
    64 covers reassociated float32 sums of the sizes in these tests with margin (XLA may sum in
    any order, differently per machine), while a wrong scale or a missing term is off by far
    more; raise it for long chains (whole models, SVDs) and say why where it is raised.
    """
    e = np.asarray(expected, np.float64)
    if scale is None:
        scale = float(np.max(np.abs(e), initial=0.0))
    return ulps * float(jnp.finfo(dtype or _precision(expected)).eps) * scale


def assert_close(actual: Any, expected: Any, *, dtype: Any = None, ulps: float = 64,
                 scale: float | None = None, err_msg: str = "") -> None:
    """Arrays or trees (same structure, via chex) equal within :func:`tolerance`, leaf by leaf.

    Each leaf pair must satisfy ``|actual - expected| <= ulps · eps · scale`` elementwise, with
    ``eps`` that of ``dtype`` or else of the coarser floating dtype of the two leaves, and
    ``scale`` the leaf's ``max|expected|`` unless given. Leaves with no floating dtype must be
    equal. When ``actual`` is one array, ``expected`` is array-like and broadcasts against it
    (a scalar checks every entry).
    """

    def leaf_tol(a, e):
        precision = dtype or _precision(a, e)
        if precision is None:  # integers, bools: exact
            return np.asarray(a), np.asarray(e), None
        e = np.asarray(e, np.float64)
        return np.asarray(a, np.float64), e, tolerance(e, dtype=precision, ulps=ulps,
                                                        scale=scale)

    def fits(a, e) -> bool:
        try:
            return np.broadcast_shapes(a.shape, e.shape) == a.shape
        except ValueError:
            return False

    def close(a, e) -> bool:
        a, e, tol = leaf_tol(a, e)
        if not fits(a, e):
            return False
        if tol is None:
            return bool(np.array_equal(a, np.broadcast_to(e, a.shape)))
        return bool(np.all(np.abs(a - e) <= tol))

    def message(a, e) -> str:
        a, e, tol = leaf_tol(a, e)
        if not fits(a, e) or tol is None:
            return f"{a} != {e} {err_msg}"
        err = float(np.max(np.abs(a - e), initial=0.0))
        return f"max |actual - expected| = {err:.3g} > {tol:.3g} ({ulps} eps · scale) {err_msg}"

    if jax.tree_util.treedef_is_leaf(jax.tree.structure(actual)):
        expected = np.asarray(expected)  # one array: ``expected`` may be a (nested) list
    chex.assert_trees_all_equal_comparator(close, message, actual, expected)


def assert_trees_equal(x: Any, y: Any) -> None:
    """Same tree structure and bit-identical leaves (shapes and dtypes too; NaN-safe)."""
    chex.assert_trees_all_equal_comparator(
        lambda a, b: bits(a) == bits(b), lambda a, b: "not bit-identical", x, y)


def bits(x: Any) -> bytes:
    """The raw bytes of an array (bit-level equality, NaN-safe)."""
    x = np.ascontiguousarray(np.asarray(x))
    return x.dtype.str.encode() + str(x.shape).encode() + x.tobytes()
