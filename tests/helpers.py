"""Shared test helpers: independent dense LoRA math and tree comparisons.

Nothing here calls lorax's own ``LoRA.delta``/``merged``/``merge``: the tests compare lorax
against these reference computations.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lorax


def lora_nodes(tree: Any) -> list[lorax.LoRA]:
    """Every LoRA node of ``tree`` in flattening order."""
    return [x for x in jax.tree.leaves(tree, is_leaf=lorax.is_lora) if lorax.is_lora(x)]


def _split_shapes(w_shape, n_stack: int, n_in: int):
    stack = tuple(w_shape[:n_stack])
    ins = tuple(w_shape[n_stack : n_stack + n_in])
    outs = tuple(w_shape[n_stack + n_in :])
    return stack, ins, outs


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


def dense_kernel(node: lorax.LoRA) -> np.ndarray:
    """``w + scale * a @ b`` in float64 NumPy, from the node's raw fields."""
    return np.asarray(node.w, np.float64) + dense_delta(node.a, node.b, node.scale, node.n_stack)


def dense_delta_jnp(w_shape, a, b, scale: float, n_stack: int) -> jax.Array:
    """``scale * a @ b`` in differentiable jnp (for reference gradients), shaped like ``w``."""
    n_in = a.ndim - n_stack - 1
    stack, ins, outs = _split_shapes(w_shape, n_stack, n_in)
    a2 = jnp.reshape(a, (*stack, math.prod(ins), a.shape[-1]))
    b2 = jnp.reshape(b, (*stack, b.shape[n_stack], math.prod(outs)))
    d = jnp.einsum("...ir,...ro->...io", a2, b2, precision=jax.lax.Precision.HIGHEST)
    return jnp.reshape(scale * d, tuple(w_shape))


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
            d = dense_delta_jnp(x.w.shape, x.a, x.b, x.scale, x.n_stack)
            return x.w + d.astype(x.w.dtype)
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


def assert_trees_close(x: Any, y: Any, *, rtol: float = 1e-6, atol: float = 1e-6) -> None:
    """Same tree structure and every pair of leaves allclose (shapes and dtypes equal)."""
    lx, tx = jax.tree.flatten(x)
    ly, ty = jax.tree.flatten(y)
    assert tx == ty, f"tree structures differ:\n{tx}\n{ty}"
    for i, (a, b) in enumerate(zip(lx, ly, strict=True)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, f"leaf {i}: shape {a.shape} != {b.shape}"
        assert a.dtype == b.dtype, f"leaf {i}: dtype {a.dtype} != {b.dtype}"
        np.testing.assert_allclose(
            a.astype(np.float64), b.astype(np.float64), rtol=rtol, atol=atol, err_msg=f"leaf {i}"
        )


def assert_trees_equal(x: Any, y: Any) -> None:
    """Same tree structure and bit-identical leaves."""
    lx, tx = jax.tree.flatten(x)
    ly, ty = jax.tree.flatten(y)
    assert tx == ty, f"tree structures differ:\n{tx}\n{ty}"
    for i, (a, b) in enumerate(zip(lx, ly, strict=True)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype, f"leaf {i}"
        assert bits(a) == bits(b), f"leaf {i} differs"


def bits(x: Any) -> bytes:
    """The raw bytes of an array (bit-level equality, NaN-safe)."""
    x = np.ascontiguousarray(np.asarray(x))
    return x.dtype.str.encode() + str(x.shape).encode() + x.tobytes()
