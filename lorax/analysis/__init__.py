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

from lorax.analysis.amplification import (
    amplification,
    random_projection_norm,
    top_projection_norm,
)
from lorax.analysis.delta import delta_norm, delta_spectrum, delta_weight
from lorax.analysis.similarity import subspace_similarity

__all__ = [
    "amplification",
    "delta_norm",
    "delta_spectrum",
    "delta_weight",
    "random_projection_norm",
    "subspace_similarity",
    "top_projection_norm",
]
