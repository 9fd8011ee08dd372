"""Amplification of W's directions by ΔW (the LoRA paper's section 7.3, table 7)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from lorax.analysis.delta import delta_norm
from lorax.analysis.inputs import as_count, as_scale, delta_svd, flatten_kernel, kernel_factors


def _projected_norm(w: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
    """``‖Uᵀ W V‖_F`` for a 2-D ``w``."""
    return float(np.linalg.norm(u.T @ w @ v))


def _check_k(k: int, limit: int, name_of_limit: str) -> int:
    k = as_count(k, "k")
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
    w2, a_, b_ = kernel_factors(w, a, b, n_in)
    s = as_scale(scale)
    u, sigma, v = delta_svd(a_, b_, s)
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
    w2 = flatten_kernel(w, n_in)
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
        w: The kernel, as in :func:`top_projection_norm` (which also names the errors).
        k: Number of directions, ``1 <= k <= min(in, out)``.
        seed: Seed for NumPy's random generator.
        n_in: How many leading axes of ``w`` are input axes.

    Returns:
        The norm as a Python float.

    Example:
        >>> import numpy as np
        >>> w = np.diag([4.0, 3.0, 1.0])
        >>> random_projection_norm(w, k=1, seed=0) <= top_projection_norm(w, k=1)
        True
        >>> round(random_projection_norm(w, k=3), 3)  # full bases keep the whole norm
        5.099
    """
    w2 = flatten_kernel(w, n_in)
    k = _check_k(k, min(w2.shape), "min(in, out)")
    rng = np.random.default_rng(seed)
    u = _random_orthonormal(rng, w2.shape[0], k)
    v = _random_orthonormal(rng, w2.shape[1], k)
    return _projected_norm(w2, u, v)
