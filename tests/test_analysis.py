"""Tests for lorax.analysis: LoRA section-7 analysis against independent NumPy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import assert_close, tolerance

from lorax.analysis import (
    amplification,
    delta_norm,
    delta_spectrum,
    delta_weight,
    random_projection_norm,
    subspace_similarity,
    top_projection_norm,
)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q


def _with_singular_values(
    rng: np.random.Generator, n: int, sigma: list[float], basis: np.ndarray | None = None
) -> np.ndarray:
    """An (n, len(sigma)) matrix with the given singular values (and left basis if given)."""
    r = len(sigma)
    u = _orthogonal(rng, n)[:, :r] if basis is None else basis
    return u @ np.diag(sigma) @ _orthogonal(rng, r).T


def _phi_reference(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """φ via eigenvectors of a aᵀ and explicit projectors, one (i, j) at a time."""

    def basis(a: np.ndarray) -> np.ndarray:
        vals, vecs = np.linalg.eigh(a @ a.T)
        order = np.argsort(vals)[::-1][: a.shape[1]]
        return vecs[:, order]

    u1, u2 = basis(a1), basis(a2)
    out = np.empty((a1.shape[1], a2.shape[1]))
    for i in range(1, a1.shape[1] + 1):
        for j in range(1, a2.shape[1] + 1):
            p1 = u1[:, :i] @ u1[:, :i].T
            p2 = u2[:, :j] @ u2[:, :j].T
            out[i - 1, j - 1] = np.trace(p1 @ p2) / min(i, j)
    return out


# --------------------------------------------------------------------------------------
# subspace_similarity
# --------------------------------------------------------------------------------------


def test_phi_matches_reference_on_random_factors() -> None:
    rng = _rng(1)
    a1 = _with_singular_values(rng, 12, [5.0, 3.0, 2.0, 1.0])
    a2 = _with_singular_values(rng, 12, [4.0, 2.5, 1.5])
    phi = subspace_similarity(a1, a2)
    assert phi.shape == (4, 3)
    assert phi.dtype == np.float64
    assert_close(phi, _phi_reference(a1, a2))


def test_phi_same_span_gives_one_in_last_row_and_column() -> None:
    # a2 = a1 @ M with M invertible: same column space, but the singular vectors differ, so
    # only the comparisons against a full span are guaranteed to be 1.
    rng = _rng(2)
    a1 = rng.standard_normal((10, 4))
    m = np.triu(rng.standard_normal((4, 4))) + 3.0 * np.eye(4)
    phi = subspace_similarity(a1, a1 @ m)
    assert_close(phi[-1, :], 1.0)
    assert_close(phi[:, -1], 1.0)
    # ... and the leading directions genuinely differ, so not every entry is 1.
    assert phi[0, 0] < 0.99


def test_phi_same_singular_vectors_gives_all_ones() -> None:
    # a1 = U S V1ᵀ and a2 = U S2 V2ᵀ share U (and its ordering): φ(i, j) = 1 everywhere.
    rng = _rng(3)
    u = _orthogonal(rng, 9)[:, :4]
    a1 = _with_singular_values(rng, 9, [4.0, 3.0, 2.0, 1.0], basis=u)
    a2 = _with_singular_values(rng, 9, [40.0, 7.0, 0.5, 0.1], basis=u)
    assert_close(subspace_similarity(a1, a2), 1.0)
    # Rescaling and an orthogonal mixing of the columns keep the singular vectors, too.
    q = _orthogonal(rng, 4)
    assert_close(subspace_similarity(a1, -3.0 * a1 @ q), 1.0)


def test_phi_prefix_of_the_same_basis() -> None:
    # a2 keeps only a1's top-2 singular directions: φ(i, j) = 1 iff U1[:, :min(i, j)] ⊂ U2[:, :j].
    rng = _rng(4)
    u = _orthogonal(rng, 8)[:, :4]
    a1 = _with_singular_values(rng, 8, [4.0, 3.0, 2.0, 1.0], basis=u)
    a2 = _with_singular_values(rng, 8, [2.0, 1.0], basis=u[:, :2])
    phi = subspace_similarity(a1, a2)
    # ‖U1[:, :i]ᵀ U2[:, :j]‖² = min(i, j) for j = 1, 2 as U2 = U1[:, :2].
    assert_close(phi, np.ones((4, 2)))
    # Reversed roles: U2 = U1[:, :2] is compared against the top-j of U1.
    assert_close(subspace_similarity(a2, a1), np.ones((2, 4)))


def test_phi_orthogonal_subspaces_give_zero() -> None:
    rng = _rng(5)
    q = _orthogonal(rng, 10)
    a1 = q[:, :3] @ rng.standard_normal((3, 3))
    a2 = q[:, 3:7] @ rng.standard_normal((4, 4))
    phi = subspace_similarity(a1, a2)
    assert phi.shape == (3, 4)
    assert_close(phi, 0.0, scale=1.0)  # φ is in [0, 1]


def test_phi_hand_constructed_half_overlap() -> None:
    # In a rotated basis e_k = q[:, k]: a1 = [3 e0, e1] and a2 = [(e0 + e2) / √2].
    # U1 = [e0, e1], U2 = [(e0 + e2)/√2]: φ(1, 1) = 1/2 and φ(2, 1) = (1/2 + 0) / 1 = 1/2.
    q = _orthogonal(_rng(6), 6)
    a1 = np.stack([3.0 * q[:, 0], q[:, 1]], axis=1)
    a2 = ((q[:, 0] + q[:, 2]) / math.sqrt(2.0))[:, None]
    assert_close(subspace_similarity(a1, a2), [[0.5], [0.5]])
    # Two-column version: a2 = [2 e0, e2]. φ = [[1, 1], [1, 1/2]].
    a2 = np.stack([2.0 * q[:, 0], q[:, 2]], axis=1)
    assert_close(subspace_similarity(a1, a2), [[1.0, 1.0], [1.0, 0.5]])


def test_phi_symmetry_and_bounds() -> None:
    rng = _rng(7)
    for r1, r2 in [(1, 5), (3, 3), (6, 2)]:
        a1 = rng.standard_normal((16, r1))
        a2 = rng.standard_normal((16, r2))
        phi12 = subspace_similarity(a1, a2)
        phi21 = subspace_similarity(a2, a1)
        assert phi12.shape == (r1, r2)
        assert phi21.shape == (r2, r1)
        assert_close(phi12, phi21.T)
        assert np.all(phi12 >= 0.0)
        assert np.all(phi12 <= 1.0)


def test_phi_full_dimension_is_one() -> None:
    # When r1 == in, U1 spans everything: φ(in, j) = j / min(in, j) = 1.
    rng = _rng(8)
    phi = subspace_similarity(rng.standard_normal((4, 4)), rng.standard_normal((4, 2)))
    assert_close(phi[-1], 1.0)


def test_phi_side_b_uses_output_space() -> None:
    rng = _rng(9)
    b1 = rng.standard_normal((3, 11))
    b2 = rng.standard_normal((5, 11))
    phi_b = subspace_similarity(b1, b2, side="b")
    assert phi_b.shape == (3, 5)
    assert_close(phi_b, _phi_reference(b1.T, b2.T))
    # The output space is not the transposed input space of the same data.
    u = _orthogonal(rng, 7)
    b1 = (u[:, :2] @ rng.standard_normal((2, 2))).T  # rows span u0, u1
    b2 = (u[:, 2:4] @ rng.standard_normal((2, 2))).T
    assert_close(subspace_similarity(b1, b2, side="b"), 0.0, scale=1.0)


def test_phi_accepts_jax_arrays() -> None:
    jnp = pytest.importorskip("jax.numpy")
    rng = _rng(10)
    a1 = rng.standard_normal((8, 3)).astype(np.float32)
    a2 = rng.standard_normal((8, 2)).astype(np.float32)
    phi = subspace_similarity(jnp.asarray(a1), jnp.asarray(a2))
    assert isinstance(phi, np.ndarray)
    assert phi.dtype == np.float64
    # The reference takes a float32 SVD of a2: its precision bounds the comparison.
    assert_close(phi, _phi_reference(a1.astype(np.float64), a2), dtype=np.float32)


@pytest.mark.parametrize(
    ("x1", "x2", "kwargs", "match"),
    [
        (np.ones(5), np.ones((5, 2)), {}, r"x1 must be 2-D.*\(5,\)"),
        (np.ones((5, 2)), np.ones((5, 2, 1)), {}, r"x2 must be 2-D"),
        (np.ones((5, 2)), np.ones((6, 2)), {}, r"x2 .*same first.*x1.shape=\(5, 2\).*\(6, 2\)"),
        (np.ones((2, 5)), np.ones((2, 6)), {"side": "b"}, r"x2 .*same second.*\(2, 6\)"),
        (np.ones((3, 4)), np.ones((3, 2)), {}, r"x1 has rank dimension 4"),
        (np.ones((5, 2)), np.ones((5, 2)), {"side": "c"}, r"side must be"),
        (np.full((5, 2), np.nan), np.ones((5, 2)), {}, r"x1 contains non-finite"),
    ],
)
def test_phi_bad_inputs(x1: np.ndarray, x2: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        subspace_similarity(x1, x2, **kwargs)


# --------------------------------------------------------------------------------------
# delta_weight / delta_norm / delta_spectrum
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("d_in", "d_out", "r"), [(7, 5, 3), (3, 9, 4), (12, 10, 1), (4, 4, 4)])
@pytest.mark.parametrize("scale", [1.0, -0.25, 8.0])
def test_delta_functions_match_dense(d_in: int, d_out: int, r: int, scale: float) -> None:
    rng = _rng(d_in * 100 + d_out * 10 + r)
    a = rng.standard_normal((d_in, r))
    b = rng.standard_normal((r, d_out))
    dense = scale * np.einsum("ir,ro->io", a, b)
    assert_close(delta_weight(a, b, scale), dense)
    norm = delta_norm(a, b, scale)
    assert isinstance(norm, float)
    assert_close(norm, np.sqrt(np.sum(dense**2)))
    spectrum = delta_spectrum(a, b, scale)
    k = min(d_in, d_out, r)
    assert spectrum.shape == (k,)
    assert_close(spectrum, np.linalg.svd(dense, compute_uv=False)[:k])


def test_delta_spectrum_rank_deficient_and_known_values() -> None:
    rng = _rng(11)
    pu, pv = _orthogonal(rng, 6), _orthogonal(rng, 5)
    # ΔW = 0.5 · (6 u0 v0ᵀ + 2 u1 v1ᵀ), written with a rank-3 adapter whose third column is 0.
    a = np.stack([3.0 * pu[:, 0], pu[:, 1], np.zeros(6)], axis=1)
    b = np.stack([2.0 * pv[:, 0], 2.0 * pv[:, 1], pv[:, 2]], axis=0)
    assert_close(delta_spectrum(a, b, 0.5), [3.0, 1.0, 0.0])
    assert_close(delta_norm(a, b, 0.5), math.sqrt(10.0))


def test_delta_norm_zero_and_jax_input() -> None:
    assert delta_norm(np.zeros((4, 2)), np.ones((2, 3)), 3.0) == 0.0
    jnp = pytest.importorskip("jax.numpy")
    a = jnp.arange(6, dtype=jnp.float32).reshape(3, 2)
    b = jnp.ones((2, 4), dtype=jnp.bfloat16)
    dense = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    assert_close(delta_norm(a, b, 2.0), 2.0 * np.linalg.norm(dense))
    assert_close(delta_weight(a, b, 2.0), 2.0 * dense)


@pytest.mark.parametrize("fn", [delta_weight, delta_norm, delta_spectrum])
def test_delta_bad_inputs(fn) -> None:
    with pytest.raises(ValueError, match=r"a and b must share the rank.*\(4, 2\).*\(3, 5\)"):
        fn(np.ones((4, 2)), np.ones((3, 5)), 1.0)
    with pytest.raises(ValueError, match=r"^a must be 2-D"):
        fn(np.ones((4, 2, 1)), np.ones((2, 5)), 1.0)
    with pytest.raises(ValueError, match=r"^b must be 2-D"):
        fn(np.ones((4, 2)), np.ones(2), 1.0)
    with pytest.raises(ValueError, match=r"^scale must be finite"):
        fn(np.ones((4, 2)), np.ones((2, 5)), math.inf)
    with pytest.raises(ValueError, match=r"^scale must be a real scalar"):
        fn(np.ones((4, 2)), np.ones((2, 5)), np.ones(2))
    with pytest.raises(ValueError, match=r"^b must be a real numeric array"):
        fn(np.ones((4, 2)), np.ones((2, 5), dtype=complex), 1.0)


# --------------------------------------------------------------------------------------
# amplification / top_projection_norm / random_projection_norm
# --------------------------------------------------------------------------------------

_SIGMA_W = np.array([10.0, 5.0, 3.0, 1.0, 0.5, 0.1])


def _diag_kernel(d_in: int = 6, d_out: int = 8) -> np.ndarray:
    w = np.zeros((d_in, d_out))
    w[np.arange(6), np.arange(6)] = _SIGMA_W
    return w


def _adapter_on(indices: list[int], d_in: int = 6, d_out: int = 8) -> tuple[np.ndarray, ...]:
    """a, b with ΔW = 2 e_i0 f_i0ᵀ + 1 e_i1 f_i1ᵀ (times the scale)."""
    a = np.zeros((d_in, 2))
    b = np.zeros((2, d_out))
    a[indices[0], 0], a[indices[1], 1] = 2.0, 1.0
    b[0, indices[0]], b[1, indices[1]] = 1.0, 1.0
    return a, b


def test_amplification_on_weak_directions() -> None:
    w = _diag_kernel()
    a, b = _adapter_on([4, 5])  # W's two smallest directions: σ = 0.5, 0.1
    out = amplification(w, a, b, scale=3.0)
    assert set(out) == {"delta_norm", "projected_w_norm", "amplification", "w_norm"}
    assert_close(out["delta_norm"], 3.0 * math.sqrt(5.0))
    assert_close(out["projected_w_norm"], math.sqrt(0.5**2 + 0.1**2))
    assert_close(out["amplification"], 3.0 * math.sqrt(5.0) / math.sqrt(0.26))
    assert_close(out["w_norm"], np.linalg.norm(_SIGMA_W))
    # k = 1 keeps ΔW's top direction (the 2 e4 f4ᵀ term): ‖UᵀWV‖ = 0.5.
    out1 = amplification(w, a, b, scale=3.0, k=1)
    assert_close(out1["projected_w_norm"], 0.5)
    assert_close(out1["amplification"], 3.0 * math.sqrt(5.0) / 0.5)


def test_amplification_on_top_directions() -> None:
    w = _diag_kernel()
    a, b = _adapter_on([0, 1])  # W's two largest directions: σ = 10, 5
    out = amplification(w, a, b, scale=-0.5)
    assert_close(out["projected_w_norm"], math.sqrt(125.0))
    assert_close(out["projected_w_norm"], top_projection_norm(w, 2))
    assert_close(out["amplification"], 0.5 * math.sqrt(5.0) / math.sqrt(125.0))
    weak = amplification(w, *_adapter_on([4, 5]), scale=-0.5)
    # Same ‖ΔW‖, so the ratio of amplifications is the inverse ratio of the projections.
    ratio = weak["amplification"] / out["amplification"]
    assert_close(ratio, math.sqrt(125.0 / 0.26))


def test_amplification_is_rotation_invariant_and_matches_dense_svd() -> None:
    rng = _rng(12)
    p, q = _orthogonal(rng, 6), _orthogonal(rng, 8)
    w = p @ _diag_kernel() @ q.T
    a, b = _adapter_on([4, 5])
    a, b = p @ a, b @ q.T
    out = amplification(w, a, b, scale=3.0)
    assert_close(out["amplification"], 3.0 * math.sqrt(5.0) / math.sqrt(0.26))
    # Against a dense SVD of ΔW on random factors.
    w = rng.standard_normal((9, 7))
    a, b = rng.standard_normal((9, 3)), rng.standard_normal((3, 7))
    u, s, vt = np.linalg.svd(0.7 * a @ b)
    for k in (1, 2, 3):
        expected = np.linalg.norm(u[:, :k].T @ w @ vt[:k].T)
        got = amplification(w, a, b, 0.7, k=k)
        assert_close(got["projected_w_norm"], expected)
        assert_close(got["delta_norm"], np.linalg.norm(s))
        assert_close(got["amplification"], np.linalg.norm(s) / expected)


def test_amplification_zero_projection_and_zero_delta() -> None:
    w = _diag_kernel()
    a, b = _adapter_on([6, 7], d_in=8, d_out=8)  # outside W's support
    w8 = np.zeros((8, 8))
    w8[:6, :8] = w
    assert amplification(w8, a, b)["amplification"] == math.inf
    zero = amplification(w8, np.zeros((8, 2)), b)
    assert zero["delta_norm"] == 0.0
    assert math.isnan(zero["projected_w_norm"])
    assert math.isnan(zero["amplification"])


def test_amplification_multi_axis_kernel() -> None:
    rng = _rng(13)
    w = rng.standard_normal((2, 3, 4))
    a, b = rng.standard_normal((6, 2)), rng.standard_normal((2, 4))
    flat = amplification(w.reshape(6, 4), a, b, 1.5)
    assert_close(amplification(w, a, b, 1.5, n_in=2), flat)
    # Factors may keep the kernel's axes.
    assert_close(amplification(w, a.reshape(2, 3, 2), b, 1.5, n_in=2), flat)
    b_split = rng.standard_normal((2, 3, 4))
    flat1 = amplification(w.reshape(2, 12), a[:2], b_split.reshape(2, 12), 1.5)
    assert_close(amplification(w, a[:2], b_split, 1.5, n_in=1), flat1)
    assert_close(top_projection_norm(w, 2, n_in=2), top_projection_norm(w.reshape(6, 4), 2))
    assert_close(random_projection_norm(w, 2, seed=3, n_in=2),
                 random_projection_norm(w.reshape(6, 4), 2, seed=3))


@pytest.mark.parametrize(
    ("w_shape", "a_shape", "b_shape", "kwargs", "match"),
    [
        ((6, 4), (5, 2), (2, 4), {}, r"^a must have 6 rows.*a.shape=\(5, 2\)"),
        ((6, 4), (6, 2), (2, 5), {}, r"^b must have 4 columns.*b.shape=\(2, 5\)"),
        ((2, 3, 4), (6, 2), (2, 4), {}, r"^a must have 2 rows.*n_in=1"),
        ((2, 3, 4), (3, 2, 2), (2, 4), {"n_in": 2}, r"^a with 3 dimensions.*\(2, 3, r\)"),
        ((2, 3, 4), (2, 2), (2, 4, 3), {}, r"^b with 3 dimensions.*\(r, 3, 4\)"),
        ((2, 3, 4), (6, 2), (2, 4), {"n_in": 3}, r"^n_in must be between 1 and .* 2, got 3"),
        ((6, 4), (6, 2), (2, 4), {"n_in": 0}, r"^n_in must be between"),
        ((6,), (6, 2), (2, 4), {}, r"^w must have at least 2 dimensions"),
        ((6, 4), (6, 2), (3, 4), {}, r"^a and b must share the rank"),
        ((6, 4), (6, 2), (2, 4), {"k": 3}, r"^k must be between 1 and .* 2, got 3"),
        ((6, 4), (6, 2), (2, 4), {"k": 0}, r"^k must be between"),
        ((6, 4), (6, 2), (2, 4), {"k": 1.5}, r"^k must be an integer"),
    ],
)
def test_amplification_bad_inputs(w_shape, a_shape, b_shape, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        amplification(np.ones(w_shape), np.ones(a_shape), np.ones(b_shape), **kwargs)


def test_top_projection_norm_matches_svd() -> None:
    rng = _rng(14)
    w = rng.standard_normal((7, 5))
    sigma = np.linalg.svd(w, compute_uv=False)
    for k in range(1, 6):
        assert_close(top_projection_norm(w, k), np.sqrt(np.sum(sigma[:k] ** 2)))
    assert_close(top_projection_norm(w, 5), np.linalg.norm(w))
    assert_close(top_projection_norm(_diag_kernel(), 3), math.sqrt(134.0))


def test_random_projection_norm_properties() -> None:
    rng = _rng(15)
    w = rng.standard_normal((8, 6))
    first = random_projection_norm(w, 2, seed=1)
    assert isinstance(first, float)
    assert random_projection_norm(w, 2, seed=1) == first
    assert random_projection_norm(w, 2, seed=2) != first
    # Any orthonormal projection is bounded by W's own top-k directions (Ky Fan).
    for seed in range(20):
        for k in (1, 3, 6):
            top = top_projection_norm(w, k)
            assert random_projection_norm(w, k, seed=seed) <= top + tolerance(top)
    # Full orthogonal bases of a square W keep its whole norm.
    sq = rng.standard_normal((5, 5))
    assert_close(random_projection_norm(sq, 5, seed=4), np.linalg.norm(sq))


def test_random_projection_norm_expectation() -> None:
    # E ‖UᵀWV‖²_F = k² ‖W‖²_F / (in · out) for independent Haar U, V. A W that is far from
    # isotropic makes biased samplers (e.g. always the first k axes) fail this check.
    w = _diag_kernel(6, 8)
    k = 2
    samples = [random_projection_norm(w, k, seed=s) ** 2 for s in range(2000)]
    expected = k**2 * np.sum(_SIGMA_W**2) / (6 * 8)
    assert np.mean(samples) == pytest.approx(expected, rel=0.1)


@pytest.mark.parametrize("fn", [top_projection_norm, random_projection_norm])
def test_projection_norm_bad_inputs(fn) -> None:
    with pytest.raises(ValueError, match=r"^k must be between 1 and min\(in, out\) = 4"):
        fn(np.ones((6, 4)), 5)
    with pytest.raises(ValueError, match=r"^k must be between"):
        fn(np.ones((6, 4)), 0)
    with pytest.raises(ValueError, match=r"^w must have at least 2 dimensions"):
        fn(np.ones(6), 1)
    with pytest.raises(ValueError, match=r"^n_in must be between"):
        fn(np.ones((6, 4)), 1, n_in=2)
    with pytest.raises(ValueError, match=r"^w contains non-finite"):
        fn(np.full((6, 4), np.inf), 1)
