"""Post-hoc analysis of LoRA adapters, after section 7 of the LoRA paper (arXiv 2106.09685).

Convention: an adapter on a kernel ``W`` of shape ``(in, out)`` has factors ``a`` of shape
``(in, r)`` and ``b`` of shape ``(r, out)`` and a scale ``s``; the update is
``ΔW = s · a @ b``. Kernels with several input/output axes are flattened to 2-D first, the
leading ``n_in`` axes forming ``in`` and the rest forming ``out``.

All functions are pure. They accept JAX or NumPy arrays (any real floating dtype), do their
math in NumPy ``float64`` and return NumPy arrays or Python floats. Nothing here forms the
dense ``(in, out)`` update unless asked to (:func:`delta_weight`); the norm, spectrum and
singular directions of ``ΔW`` come from ``r × r`` cores, so they stay cheap for large kernels.

Functions:
    subspace_similarity: the normalized subspace similarity φ(i, j) between two adapters
        (paper figures 3-4), on the input side (``a``) or the output side (``b``).
    delta_weight: the dense update ``s · a @ b``.
    delta_norm: ``‖ΔW‖_F`` from the factors' Gram matrices.
    delta_spectrum: the singular values of ``ΔW`` from QR factorizations and a small SVD.
    amplification: the paper's table-7 quantities (``‖ΔW‖_F``, ``‖Uᵀ W V‖_F`` and their
        ratio, the "amplification factor").
    top_projection_norm: ``‖Uᵀ W V‖_F`` for W's own top-k singular directions (table 7,
        row "W_q").
    random_projection_norm: ``‖Uᵀ W V‖_F`` for random orthonormal directions (table 7, row
        "Random").
"""

from __future__ import annotations

import math
import operator
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "amplification",
    "delta_norm",
    "delta_spectrum",
    "delta_weight",
    "random_projection_norm",
    "subspace_similarity",
    "top_projection_norm",
]


# --------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------


def _as_float64(x: ArrayLike, name: str) -> np.ndarray:
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


def _as_matrix(x: ArrayLike, name: str) -> np.ndarray:
    """Converts ``x`` to a float64 matrix, requiring exactly two non-empty axes."""
    arr = _as_float64(x, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    return arr


def _as_scale(scale: float | ArrayLike) -> float:
    """Converts ``scale`` (a Python, NumPy or JAX scalar) to a finite Python float."""
    arr = np.asarray(scale)
    if arr.size != 1 or arr.dtype.kind == "c":
        raise ValueError(f"scale must be a real scalar, got {scale!r}")
    value = float(arr.reshape(()))
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, got {value}")
    return value


def _as_count(value: int, name: str) -> int:
    """Converts ``value`` to a Python int, rejecting bools and non-integers."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _factors(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validates a LoRA factor pair ``a`` (in, r) and ``b`` (r, out)."""
    a_ = _as_matrix(a, "a")
    b_ = _as_matrix(b, "b")
    if a_.shape[1] != b_.shape[0]:
        raise ValueError(
            "a and b must share the rank dimension (a.shape[1] == b.shape[0]), "
            f"got a.shape={a_.shape}, b.shape={b_.shape}"
        )
    return a_, b_


def _flatten_kernel(w: ArrayLike, n_in: int) -> np.ndarray:
    """Flattens a kernel to (prod(shape[:n_in]), prod(shape[n_in:]))."""
    w_ = _as_float64(w, "w")
    n_in = _as_count(n_in, "n_in")
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


def _kernel_factors(
    w: ArrayLike, a: ArrayLike, b: ArrayLike, n_in: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattens ``w`` and checks that ``a`` (in, r) and ``b`` (r, out) fit it.

    ``a`` may also keep the kernel's input axes, shape ``(*w.shape[:n_in], r)``, and ``b`` its
    output axes, shape ``(r, *w.shape[n_in:])``.
    """
    w2 = _flatten_kernel(w, n_in)
    n_in = _as_count(n_in, "n_in")
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
    a_, b_ = _factors(a_arr, b_arr)
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


def _delta_svd(
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


# --------------------------------------------------------------------------------------
# Subspace similarity (paper section 7.2, figures 3-4)
# --------------------------------------------------------------------------------------


def _singular_basis(x: np.ndarray, name: str, side: str) -> np.ndarray:
    """Orthonormal basis, by descending singular value, of the column space of ``x``."""
    rank_dim, space_dim = (1, 0) if side == "a" else (0, 1)
    r, d = x.shape[rank_dim], x.shape[space_dim]
    if r > d:
        raise ValueError(
            f"{name} has rank dimension {r} larger than its "
            f"{'input' if side == 'a' else 'output'} dimension {d} (shape {x.shape}); "
            "the subspace similarity needs r <= dimension"
        )
    mat = x if side == "a" else x.T
    u, _, _ = np.linalg.svd(mat, full_matrices=False)
    return u


def subspace_similarity(
    x1: ArrayLike, x2: ArrayLike, *, side: Literal["a", "b"] = "a"
) -> np.ndarray:
    """Normalized subspace similarity φ(i, j) between two LoRA factors.

    Following the paper's section 7.2,
    ``φ(i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j)``, where ``U1`` and ``U2`` are the
    singular vectors of the two factors in the shared space, sorted by descending singular
    value. φ is 1 when the smaller of the two subspaces lies inside the larger one and 0 when
    they are orthogonal.

    With ``side="a"`` the factors are ``a`` matrices of shape ``(in, r)`` and the subspaces
    live in the input space: ``U`` are the left singular vectors of ``a`` (the paper's
    right-singular unitary matrix of its ``A = aᵀ``). With ``side="b"`` the factors are ``b``
    matrices of shape ``(r, out)`` and the subspaces live in the output space: ``U`` are the
    right singular vectors of ``b``. ``subspace_similarity(b1, b2, side="b")`` equals
    ``subspace_similarity(b1.T, b2.T)``.

    Singular vectors of repeated (including zero) singular values are not unique, so φ(i, j)
    is well defined only where ``i`` and ``j`` do not split a block of equal singular values;
    φ(r1, r2) is always well defined for factors of full column rank.

    Args:
        x1: The first factor, shape ``(in, r1)`` for ``side="a"`` or ``(r1, out)`` for
            ``side="b"``, with ``r1 <= in`` (or ``r1 <= out``).
        x2: The second factor, shape ``(in, r2)`` or ``(r2, out)``.
        side: ``"a"`` to compare input-space subspaces of ``a`` factors, ``"b"`` to compare
            output-space subspaces of ``b`` factors.

    Returns:
        A float64 array of shape ``(r1, r2)`` whose entry ``[i - 1, j - 1]`` is φ(i, j), with
        values in ``[0, 1]``.

    Raises:
        ValueError: If a factor is not 2-D, the factors' shared dimension differs, a rank
            exceeds the shared dimension, or ``side`` is not ``"a"`` or ``"b"``.

    Example:
        >>> import numpy as np
        >>> a1 = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # span{e1, e2}
        >>> a2 = np.array([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]])  # span{e1, e3}
        >>> subspace_similarity(a1, a2).round(3).tolist()
        [[1.0, 1.0], [1.0, 0.5]]
    """
    if side not in ("a", "b"):
        raise ValueError(f'side must be "a" or "b", got {side!r}')
    x1_ = _as_matrix(x1, "x1")
    x2_ = _as_matrix(x2, "x2")
    space_axis = 0 if side == "a" else 1
    if x1_.shape[space_axis] != x2_.shape[space_axis]:
        what = "first (input)" if side == "a" else "second (output)"
        raise ValueError(
            f"x2 must have the same {what} dimension as x1 for side={side!r}, "
            f"got x1.shape={x1_.shape}, x2.shape={x2_.shape}"
        )
    u1 = _singular_basis(x1_, "x1", side)
    u2 = _singular_basis(x2_, "x2", side)
    overlap = (u1.T @ u2) ** 2  # [p, q] = (u1_p · u2_q)²
    cumulative = overlap.cumsum(axis=0).cumsum(axis=1)  # ‖U1[:, :i]ᵀ U2[:, :j]‖²_F
    i = np.arange(1, u1.shape[1] + 1)[:, None]
    j = np.arange(1, u2.shape[1] + 1)[None, :]
    return np.clip(cumulative / np.minimum(i, j), 0.0, 1.0)


# --------------------------------------------------------------------------------------
# The update ΔW
# --------------------------------------------------------------------------------------


def delta_weight(a: ArrayLike, b: ArrayLike, scale: float | ArrayLike = 1.0) -> np.ndarray:
    """The dense LoRA update ``ΔW = scale · a @ b``.

    Args:
        a: The down-projection factor, shape ``(in, r)``.
        b: The up-projection factor, shape ``(r, out)``.
        scale: The adapter's scale ``s`` (e.g. ``alpha / r``).

    Returns:
        A float64 array of shape ``(in, out)``.

    Raises:
        ValueError: If ``a`` or ``b`` is not 2-D, their rank dimensions differ, or ``scale``
            is not a finite real scalar.

    Example:
        >>> import numpy as np
        >>> delta_weight(np.ones((3, 1)), np.ones((1, 2)), 0.5).tolist()
        [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]
    """
    a_, b_ = _factors(a, b)
    return _as_scale(scale) * (a_ @ b_)


def delta_norm(a: ArrayLike, b: ArrayLike, scale: float | ArrayLike = 1.0) -> float:
    """Frobenius norm of ``ΔW = scale · a @ b`` without forming ``ΔW``.

    Uses ``‖a b‖²_F = trace((aᵀ a)(b bᵀ))`` with the two ``r × r`` Gram matrices, which costs
    ``O((in + out) r²)`` instead of ``O(in · out · r)``.

    Args:
        a: The down-projection factor, shape ``(in, r)``.
        b: The up-projection factor, shape ``(r, out)``.
        scale: The adapter's scale ``s``.

    Returns:
        ``‖ΔW‖_F`` as a Python float.

    Raises:
        ValueError: If ``a`` or ``b`` is not 2-D, their rank dimensions differ, or ``scale``
            is not a finite real scalar.

    Example:
        >>> import numpy as np
        >>> a = np.array([[3.0], [0.0]])
        >>> b = np.array([[0.0, 4.0, 0.0]])
        >>> round(delta_norm(a, b, scale=0.5), 3)  # ‖0.5 · 12‖
        6.0
    """
    a_, b_ = _factors(a, b)
    s = _as_scale(scale)
    # Both Gram matrices are symmetric, so trace(Ga Gb) = sum(Ga * Gb).
    squared = float(np.sum((a_.T @ a_) * (b_ @ b_.T)))
    return abs(s) * math.sqrt(max(squared, 0.0))


def delta_spectrum(a: ArrayLike, b: ArrayLike, scale: float | ArrayLike = 1.0) -> np.ndarray:
    """Singular values of ``ΔW = scale · a @ b`` without forming ``ΔW``.

    With reduced QR factorizations ``a = Qa Ra`` and ``bᵀ = Qb Rb``, ``ΔW`` has the same
    nonzero singular values as the small core ``scale · Ra Rbᵀ``, so this costs
    ``O((in + out) r²)``.

    Args:
        a: The down-projection factor, shape ``(in, r)``.
        b: The up-projection factor, shape ``(r, out)``.
        scale: The adapter's scale ``s``.

    Returns:
        The ``k = min(in, out, r)`` largest singular values of ``ΔW`` (all others are zero),
        in descending order, as a float64 array of shape ``(k,)``. Normally ``k == r``.

    Raises:
        ValueError: If ``a`` or ``b`` is not 2-D, their rank dimensions differ, or ``scale``
            is not a finite real scalar.

    Example:
        >>> import numpy as np
        >>> a = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
        >>> b = np.array([[3.0, 0.0], [0.0, -2.0]])
        >>> delta_spectrum(a, b, scale=2.0).round(3).tolist()
        [6.0, 4.0]
    """
    a_, b_ = _factors(a, b)
    _, sigma, _ = _delta_svd(a_, b_, _as_scale(scale))
    return sigma


# --------------------------------------------------------------------------------------
# Amplification (paper section 7.3, table 7)
# --------------------------------------------------------------------------------------


def _projected_norm(w: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
    """``‖Uᵀ W V‖_F`` for a 2-D ``w``."""
    return float(np.linalg.norm(u.T @ w @ v))


def _check_k(k: int, limit: int, name_of_limit: str) -> int:
    k = _as_count(k, "k")
    if not 1 <= k <= limit:
        raise ValueError(f"k must be between 1 and {name_of_limit} = {limit}, got {k}")
    return k


def amplification(
    w: ArrayLike,
    a: ArrayLike,
    b: ArrayLike,
    scale: float | ArrayLike = 1.0,
    k: int | None = None,
    *,
    n_in: int = 1,
) -> dict[str, float]:
    """The paper's table-7 quantities: how much ``ΔW`` amplifies directions of ``W``.

    Let ``U`` and ``V`` hold the top-``k`` left and right singular vectors of
    ``ΔW = scale · a @ b`` (computed from small cores, never forming ``ΔW``). The
    amplification factor is ``‖ΔW‖_F / ‖Uᵀ W V‖_F``: large when ``ΔW`` boosts directions that
    ``W`` barely uses. Compare ``projected_w_norm`` with :func:`top_projection_norm` (W's own
    top directions) and :func:`random_projection_norm` (random directions) to reproduce the
    table's three rows.

    Args:
        w: The frozen kernel. With more than two dimensions, its leading ``n_in`` axes are
            flattened into ``in`` and the rest into ``out``.
        a: The down-projection factor, shape ``(in, r)`` or ``(*w.shape[:n_in], r)``.
        b: The up-projection factor, shape ``(r, out)`` or ``(r, *w.shape[n_in:])``.
        scale: The adapter's scale ``s``.
        k: How many singular directions of ``ΔW`` to use; defaults to
            ``min(r, in, out)`` (normally ``r``, as in the paper).
        n_in: How many leading axes of ``w`` are input axes.

    Returns:
        A dict with Python floats ``"delta_norm"`` (``‖ΔW‖_F``), ``"projected_w_norm"``
        (``‖Uᵀ W V‖_F``), ``"amplification"`` (their ratio; ``inf`` if the projection is 0)
        and ``"w_norm"`` (``‖W‖_F``). If ``ΔW`` is exactly 0 it has no singular directions,
        and ``"projected_w_norm"`` and ``"amplification"`` are ``nan``.

    Raises:
        ValueError: If the shapes of ``w``, ``a`` and ``b`` do not fit together, ``n_in`` is
            out of range, ``k`` is not in ``[1, min(r, in, out)]``, or an input is not finite.

    Example:
        >>> import numpy as np
        >>> w = np.diag([10.0, 1.0, 0.1])
        >>> a = np.array([[0.0], [0.0], [1.0]])  # ΔW on W's weakest direction
        >>> b = np.array([[0.0, 0.0, 2.0]])
        >>> out = amplification(w, a, b, scale=1.0)
        >>> {key: round(value, 3) for key, value in out.items()}
        {'delta_norm': 2.0, 'projected_w_norm': 0.1, 'amplification': 20.0, 'w_norm': 10.05}
    """
    w2, a_, b_ = _kernel_factors(w, a, b, n_in)
    s = _as_scale(scale)
    u, sigma, v = _delta_svd(a_, b_, s)
    limit = sigma.shape[0]
    k = limit if k is None else _check_k(k, limit, "min(r, in, out)")
    d_norm = delta_norm(a_, b_, s)
    if d_norm == 0.0:
        # ΔW = 0 has no singular directions to project onto.
        projected = ratio = math.nan
    else:
        projected = _projected_norm(w2, u[:, :k], v[:, :k])
        ratio = d_norm / projected if projected > 0.0 else math.inf
    return {
        "delta_norm": d_norm,
        "projected_w_norm": projected,
        "amplification": ratio,
        "w_norm": float(np.linalg.norm(w2)),
    }


def top_projection_norm(w: ArrayLike, k: int, *, n_in: int = 1) -> float:
    """``‖Uᵀ W V‖_F`` for W's own top-``k`` singular directions.

    This is ``sqrt(σ1² + … + σk²)`` for the singular values ``σ`` of ``W`` (flattened to 2-D)
    — the largest value ``‖Uᵀ W V‖_F`` can take over orthonormal ``U`` and ``V`` with ``k``
    columns (table 7, row "W_q").

    Args:
        w: The kernel; leading ``n_in`` axes are flattened into the input dimension.
        k: Number of directions, ``1 <= k <= min(in, out)``.
        n_in: How many leading axes of ``w`` are input axes.

    Returns:
        The norm as a Python float.

    Raises:
        ValueError: If ``w`` has fewer than 2 dimensions, ``n_in`` is out of range or ``k``
            is not in ``[1, min(in, out)]``.

    Example:
        >>> import numpy as np
        >>> round(top_projection_norm(np.diag([4.0, 3.0, 1.0]), k=2), 3)
        5.0
    """
    w2 = _flatten_kernel(w, n_in)
    k = _check_k(k, min(w2.shape), "min(in, out)")
    sigma = np.linalg.svd(w2, compute_uv=False)
    return float(np.sqrt(np.sum(sigma[:k] ** 2)))


def _random_orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """A Haar-random ``n × k`` matrix with orthonormal columns."""
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    return q * signs


def random_projection_norm(w: ArrayLike, k: int, seed: int = 0, *, n_in: int = 1) -> float:
    """``‖Uᵀ W V‖_F`` for random orthonormal ``U`` (in, k) and ``V`` (out, k).

    ``U`` and ``V`` are drawn uniformly (Haar) from the Stiefel manifolds with
    ``numpy.random.default_rng(seed)``, so the result is reproducible. This is the paper's
    "Random" baseline row of table 7; its expectation of the square is
    ``k² ‖W‖²_F / (in · out)``.

    Args:
        w: The kernel; leading ``n_in`` axes are flattened into the input dimension.
        k: Number of directions, ``1 <= k <= min(in, out)``.
        seed: Seed for NumPy's random generator.
        n_in: How many leading axes of ``w`` are input axes.

    Returns:
        The norm as a Python float.

    Raises:
        ValueError: If ``w`` has fewer than 2 dimensions, ``n_in`` is out of range or ``k``
            is not in ``[1, min(in, out)]``.

    Example:
        >>> import numpy as np
        >>> w = np.diag([4.0, 3.0, 1.0])
        >>> random_projection_norm(w, k=1, seed=0) <= top_projection_norm(w, k=1)
        True
        >>> round(random_projection_norm(w, k=3), 3)  # full bases keep the whole norm
        5.099
    """
    w2 = _flatten_kernel(w, n_in)
    k = _check_k(k, min(w2.shape), "min(in, out)")
    rng = np.random.default_rng(seed)
    u = _random_orthonormal(rng, w2.shape[0], k)
    v = _random_orthonormal(rng, w2.shape[1], k)
    return _projected_norm(w2, u, v)
