"""PiSSA initialisation (`lorax.wrap(..., init="pissa")`) against NumPy's SVD."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cost_model import abstract_params, full_step_flops, lora_step_flops
from helpers import assert_close, dense_delta, lora_nodes

import lorax
import lorax.peft

RANK = 3


def _decaying(shape, seed=0) -> np.ndarray:
    """A kernel with a decaying spectrum (as trained weights have), per stack entry."""
    rng = np.random.default_rng(seed)
    *stack, n, m = shape
    k = min(n, m)
    u = np.linalg.qr(rng.standard_normal((*stack, n, k)))[0]
    v = np.linalg.qr(rng.standard_normal((*stack, m, k)))[0]
    s = 4.0 * 0.6 ** np.arange(k)
    return np.einsum("...ik,k,...jk->...ij", u, s, v)


@pytest.fixture(scope="module")
def params():
    return {"up": {"kernel": jnp.asarray(_decaying((12, 20), 1), jnp.float32),
                   "bias": jnp.zeros(20)},
            "down": {"kernel": jnp.asarray(_decaying((20, 12), 2), jnp.float32),
                     "bias": jnp.zeros(12)}}


def _apply(p, x):
    h = jax.nn.relu(x @ p["up"]["kernel"] + p["up"]["bias"][None])
    return h @ p["down"]["kernel"] + p["down"]["bias"][None]


X = jnp.asarray(np.random.default_rng(3).standard_normal((5, 12)), jnp.float32)


def _top(w: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
    return np.einsum("...ir,...r,...ro->...io", u[..., :r], s[..., :r], vt[..., :r, :])


def test_factors_are_the_principal_triplets(params):
    lp = lorax.wrap(params, rank=RANK, alpha=6.0, init="pissa")
    for name in ("up", "down"):
        node, w = lp[name]["kernel"], np.asarray(params[name]["kernel"], np.float64)
        assert node.residual and node.scale == 2.0
        top = _top(w, RANK)
        # float64 references of lorax's float32 SVD: float32 eps.
        assert_close(dense_delta(node.a, node.b, node.scale), top, dtype=np.float32)
        assert_close(node.w, w - top, scale=np.abs(w).max())  # w - top cancels: w's scale
        # a = U_r sqrt(S_r / s): orthogonal columns with squared norms S_r / s.
        s = np.linalg.svd(w, compute_uv=False)[:RANK]
        gram = np.asarray(node.a, np.float64).T @ np.asarray(node.a, np.float64)
        assert_close(gram, np.diag(s / node.scale), dtype=np.float32)


def test_identity_at_init_and_merge(params):
    lp = lorax.wrap(params, rank=RANK, init="pissa")
    assert_close(lorax.lora(_apply)(lp, X), _apply(params, X))
    assert_close(lorax.merge(lp), params)


def test_randomized_svd_is_close_to_exact():
    w = jnp.asarray(_decaying((2, 64, 48), 5), jnp.float32)
    exact = lorax.wrap({"w": w}, rank=4, targets="w$", stacked={"w": 1}, init="pissa")["w"]
    fast = lorax.wrap({"w": w}, rank=4, targets="w$", stacked={"w": 1},
                      init="pissa_niter_4")["w"]
    # The randomized SVD's approximation error (not rounding): 1e-4 of ~0.5-sized entries.
    np.testing.assert_allclose(fast.delta(), exact.delta(), atol=1e-4)
    assert_close(fast.w + fast.delta(), w)


def test_trained_merged_equals_unmerged_and_only_factors_change(params):
    lp = lorax.wrap(params, rank=RANK, init="pissa")
    tx = lorax.optimizer(optax.adam(1e-2))
    grads = jax.grad(lambda t: jnp.mean(lorax.lora(_apply)(t, X) ** 2))(lp)
    updates, _ = tx.update(grads, tx.init(lp), lp)
    new = optax.apply_updates(lp, updates)
    chex.assert_trees_all_equal(lorax.split(new)[1], lorax.split(lp)[1])  # W, biases
    for old, upd in zip(lora_nodes(lp), lora_nodes(new), strict=True):
        assert not (old.a == upd.a).all() and not (old.b == upd.b).all()
    assert_close(_apply(lorax.merge(new), X), lorax.lora(_apply)(new, X))
    back = lorax.unmerge(lorax.merge(new), new)
    assert_close(lorax.unwrap(back), lorax.unwrap(new))


def _trained(params):
    lp = lorax.wrap(params, rank=RANK, init="pissa")
    rng = np.random.default_rng(7)

    def nudge(x):
        if not lorax.is_lora(x):
            return x
        return dataclasses.replace(
            x, a=x.a + 0.1 * jnp.asarray(rng.standard_normal(x.a.shape), jnp.float32),
            b=x.b + 0.1 * jnp.asarray(rng.standard_normal(x.b.shape), jnp.float32))

    return lp, jax.tree.map(nudge, lp, is_leaf=lorax.is_lora)


def test_to_lora_is_a_rank_2r_lora_of_the_original(params):
    initial, trained = _trained(params)
    plain = lorax.pissa.to_lora(trained, initial)
    for node, name in ((plain["up"]["kernel"], "up"), (plain["down"]["kernel"], "down")):
        assert node.rank == 2 * RANK and not node.residual
        assert_close(node.w, params[name]["kernel"])
    assert_close(lorax.lora(_apply)(plain, X), lorax.lora(_apply)(trained, X))


def test_peft_export_refuses_residual_and_takes_converted(params, tmp_path):
    initial, trained = _trained(params)
    name_map = {"up/kernel": "up", "down/kernel": "down"}
    with pytest.raises(ValueError, match=r"'down/kernel'.*PiSSA.*lorax\.pissa\.to_lora"):
        lorax.peft.save(tmp_path, trained, name_map=name_map)
    config = lorax.peft.save(tmp_path, lorax.pissa.to_lora(trained, initial), name_map=name_map)
    assert config["r"] == 2 * RANK and config["lora_alpha"] == 2 * 8
    back = lorax.peft.load(tmp_path, params, name_map=name_map)
    assert_close(lorax.lora(_apply)(back, X), lorax.lora(_apply)(trained, X))


def test_checkpoint_records_residual(params):
    meta = lorax.checkpoint.describe(lorax.wrap(params, rank=RANK, init="pissa"))
    assert meta["kernels"]["up/kernel"]["residual"] is True
    assert "residual" not in lorax.checkpoint.describe(lorax.wrap(params, rank=RANK))["kernels"][
        "up/kernel"]


def test_pissa_with_dora_is_identity_at_init(params):
    lp = lorax.wrap(params, rank=RANK, init="pissa", dora=True)
    assert_close(lp["up"]["kernel"].magnitude,
                 np.linalg.norm(np.asarray(params["up"]["kernel"], np.float64), axis=0),
                 dtype=np.float32)
    assert_close(lorax.lora(_apply)(lp, X), _apply(params, X))


@pytest.mark.parametrize("init", ["pissa_niter_", "pissa_niter_x", "pissa2", "svd"])
def test_bad_init(params, init):
    with pytest.raises(ValueError, match="`init`"):
        lorax.wrap(params, rank=RANK, init=init)


def test_to_lora_rejects_mismatched_initial(params):
    initial, trained = _trained(params)
    with pytest.raises(ValueError, match="`initial`"):
        lorax.pissa.to_lora(trained, {"up": initial["up"]})
    other = lorax.wrap(params, rank=RANK + 1, init="pissa")
    with pytest.raises(ValueError, match="'down/kernel'"):
        lorax.pissa.to_lora(trained, other)


def test_pissa_train_step_flops():
    # Same structure as plain LoRA (only the initial values differ): the same bound holds.
    lp = lorax.wrap(abstract_params(), rank=8, init="pissa")
    assert lorax.is_lora(lp["head"]["kernel"]) and lp["head"]["kernel"].residual
    ratio = lora_step_flops(lp) / full_step_flops()
    print(f"pissa/full = {ratio:.4f}")
    assert ratio <= 0.70
