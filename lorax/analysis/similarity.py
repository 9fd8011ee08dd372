"""Subspace similarity between two adapters (the LoRA paper's section 7.2, figures 3-4)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from lorax.analysis.inputs import as_matrix


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
    x1_ = as_matrix(x1, "x1")
    x2_ = as_matrix(x2, "x2")
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
