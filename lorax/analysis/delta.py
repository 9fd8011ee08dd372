"""The update ``ΔW = s · a @ b``: dense, its norm and its spectrum from the factors."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from lorax.analysis.inputs import as_scale, delta_svd, factors


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
    a_, b_ = factors(a, b)
    return as_scale(scale) * (a_ @ b_)


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
    a_, b_ = factors(a, b)
    s = as_scale(scale)
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
    a_, b_ = factors(a, b)
    _, sigma, _ = delta_svd(a_, b_, as_scale(scale))
    return sigma
