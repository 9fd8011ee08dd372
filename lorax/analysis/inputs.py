"""Input checks and the shared linear algebra of :mod:`lorax.analysis` (NumPy float64)."""

from __future__ import annotations

import math
import operator

import numpy as np
from numpy.typing import ArrayLike


def as_float64(x: ArrayLike, name: str) -> np.ndarray:
    """Converts ``x`` (JAX or NumPy, real) to a finite float64 NumPy array."""
    arr = np.asarray(x)
    # Kind "V" covers the ml_dtypes floats JAX uses (bfloat16, float8 ...); they cast cleanly.
    if arr.dtype.kind not in "biufV":
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    try:
        arr = arr.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}") from None
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return arr


def as_matrix(x: ArrayLike, name: str) -> np.ndarray:
    """Converts ``x`` to a float64 matrix, requiring exactly two non-empty axes."""
    arr = as_float64(x, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    return arr


def as_scale(scale: float | ArrayLike) -> float:
    """Converts ``scale`` (a Python, NumPy or JAX scalar) to a finite Python float."""
    arr = np.asarray(scale)
    if arr.size != 1 or arr.dtype.kind == "c":
        raise ValueError(f"scale must be a real scalar, got {scale!r}")
    value = float(arr.reshape(()))
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, got {value}")
    return value


def as_count(value: int, name: str) -> int:
    """Converts ``value`` to a Python int, rejecting bools and non-integers."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def factors(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validates a LoRA factor pair ``a`` (in, r) and ``b`` (r, out)."""
    a_ = as_matrix(a, "a")
    b_ = as_matrix(b, "b")
    if a_.shape[1] != b_.shape[0]:
        raise ValueError(
            "a and b must share the rank dimension (a.shape[1] == b.shape[0]), "
            f"got a.shape={a_.shape}, b.shape={b_.shape}"
        )
    return a_, b_


def flatten_kernel(w: ArrayLike, n_in: int) -> np.ndarray:
    """Flattens a kernel to (prod(shape[:n_in]), prod(shape[n_in:]))."""
    w_ = as_float64(w, "w")
    n_in = as_count(n_in, "n_in")
    if w_.ndim < 2:
        raise ValueError(f"w must have at least 2 dimensions, got shape {w_.shape}")
    if not 1 <= n_in < w_.ndim:
        raise ValueError(
            f"n_in must be between 1 and w.ndim - 1 = {w_.ndim - 1}, got {n_in} "
            f"(w.shape={w_.shape})"
        )
    if w_.size == 0:
        raise ValueError(f"w must not be empty, got shape {w_.shape}")
    d_in = math.prod(w_.shape[:n_in])
    return w_.reshape(d_in, w_.size // d_in)


def kernel_factors(
    w: ArrayLike, a: ArrayLike, b: ArrayLike, n_in: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattens ``w`` and checks that ``a`` (in, r) and ``b`` (r, out) fit it.

    ``a`` may also keep the kernel's input axes, shape ``(*w.shape[:n_in], r)``, and ``b`` its
    output axes, shape ``(r, *w.shape[n_in:])``.
    """
    w2 = flatten_kernel(w, n_in)
    n_in = as_count(n_in, "n_in")
    w_shape = np.shape(w)
    a_arr = np.asarray(a)
    b_arr = np.asarray(b)
    if a_arr.ndim > 2:
        if a_arr.shape[:-1] != w_shape[:n_in]:
            raise ValueError(
                f"a with {a_arr.ndim} dimensions must have shape (*w.shape[:n_in], r) = "
                f"({', '.join(map(str, w_shape[:n_in]))}, r), got a.shape={a_arr.shape}"
            )
        a_arr = a_arr.reshape(-1, a_arr.shape[-1])
    if b_arr.ndim > 2:
        if b_arr.shape[1:] != w_shape[n_in:]:
            raise ValueError(
                f"b with {b_arr.ndim} dimensions must have shape (r, *w.shape[n_in:]) = "
                f"(r, {', '.join(map(str, w_shape[n_in:]))}), got b.shape={b_arr.shape}"
            )
        b_arr = b_arr.reshape(b_arr.shape[0], -1)
    a_, b_ = factors(a_arr, b_arr)
    if a_.shape[0] != w2.shape[0]:
        raise ValueError(
            f"a must have {w2.shape[0]} rows (the flattened input size of w with "
            f"n_in={n_in}), got a.shape={a_.shape}, w.shape={w_shape}"
        )
    if b_.shape[1] != w2.shape[1]:
        raise ValueError(
            f"b must have {w2.shape[1]} columns (the flattened output size of w with "
            f"n_in={n_in}), got b.shape={b_.shape}, w.shape={w_shape}"
        )
    return w2, a_, b_


def delta_svd(
    a: np.ndarray, b: np.ndarray, scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of ``scale · a @ b`` without forming it.

    With ``a = Qa Ra`` and ``bᵀ = Qb Rb`` (reduced QR), ``ΔW = Qa (s · Ra Rbᵀ) Qbᵀ``, so the
    SVD of the small core ``s · Ra Rbᵀ = Uc Σ Vcᵀ`` gives ``ΔW = (Qa Uc) Σ (Qb Vc)ᵀ``.

    Returns:
        ``(u, sigma, v)`` with ``u`` of shape (in, k), ``sigma`` of shape (k,) in descending
        order and ``v`` of shape (out, k), where ``k = min(in, out, r)``.
    """
    qa, ra = np.linalg.qr(a)
    qb, rb = np.linalg.qr(b.T)
    uc, sigma, vct = np.linalg.svd(scale * (ra @ rb.T), full_matrices=False)
    return qa @ uc, sigma, qb @ vct.T
