"""Named adapters (`lorax.add_adapter`, `select`, `drop_adapter`, `combine_adapters`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cost_model import abstract_params, full_step_flops, lora_step_flops
from helpers import assert_close, dense_delta

import lorax
import lorax.peft


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(0)
    return {"up": {"kernel": jnp.asarray(rng.standard_normal((12, 16)), jnp.float32)},
            "down": {"kernel": jnp.asarray(rng.standard_normal((16, 6)), jnp.float32)}}


def _apply(p, x):
    return jax.nn.tanh(x @ p["up"]["kernel"]) @ p["down"]["kernel"]


X = jnp.asarray(np.random.default_rng(1).standard_normal((4, 12)), jnp.float32)


def _nudge(tree, seed):
    """Random non-zero b for every adapter of every MultiLoRA node."""
    rng = np.random.default_rng(seed)

    def go(node):
        if not isinstance(node, lorax.MultiLoRA):
            return node
        adapters = {k: dataclasses.replace(f, b=jnp.asarray(0.2 * rng.standard_normal(f.b.shape),
                                                            jnp.float32))
                    for k, f in node.adapters.items()}
        return dataclasses.replace(node, adapters=adapters)

    return jax.tree.map(go, tree, is_leaf=lambda x: isinstance(x, lorax.MultiLoRA))


def _three(params):
    lp = lorax.add_adapter(params, "a", rank=2, alpha=4.0, key=jax.random.key(1))
    lp = lorax.add_adapter(lp, "b", rank=2, alpha=2.0, key=jax.random.key(2))
    lp = lorax.add_adapter(lp, "c", rank=3, alpha=3.0, targets="up", key=jax.random.key(3))
    return _nudge(lp, 4)


def dense(tree, weights):
    """Each kernel as w + sum weight_k * scale_k * a_k @ b_k in float64 NumPy."""
    out = {}
    for name, sub in tree.items():
        node = sub["kernel"]
        k = np.asarray(node.w, np.float64)
        for adapter, weight in weights.items():
            f = node.adapters.get(adapter)
            if f is not None:
                k = k + weight * dense_delta(f.a, f.b, f.scale)
        out[name] = {"kernel": jnp.asarray(k, jnp.float32)}
    return out


def test_add_is_identity_and_first_adapter_is_active(params):
    lp = lorax.add_adapter(params, "a", rank=2)
    lp = lorax.add_adapter(lp, "b", rank=3)
    node = lp["up"]["kernel"]
    assert isinstance(node, lorax.MultiLoRA) and node.active == (("a", 1.0),)
    assert node.w is params["up"]["kernel"]
    assert_close(lorax.lora(_apply)(lp, X), _apply(params, X))


def test_select_weights_match_dense(params):
    lp = _three(params)
    with jax.default_matmul_precision("highest"):
        for names, weights in ((["a"], None), (["a", "b"], [0.5, 2.0]), (["b", "c"], [1.0, -1.0]),
                               ([], None)):
            chosen = lorax.select(lp, names, weights)
            expected = dict(zip(names, weights or [1.0] * len(names), strict=True))
            assert_close(lorax.lora(_apply)(chosen, X), _apply(dense(lp, expected), X))
            # merged == unmerged, and unmerge gives w back.
            merged = lorax.merge(chosen)
            assert_close(_apply(merged, X), lorax.lora(_apply)(chosen, X))
            back = lorax.unmerge(merged, chosen)
            assert_close(back["up"]["kernel"].w, params["up"]["kernel"])


def test_plain_tree_keeps_its_adapter_as_default(params):
    lp = lorax.wrap(params, rank=2)
    lp = jax.tree.map(lambda n: dataclasses.replace(n, b=n.b + 0.1) if lorax.is_lora(n) else n,
                      lp, is_leaf=lorax.is_lora)
    multi = lorax.add_adapter(lp, "new", rank=2)
    assert multi["up"]["kernel"].active == (("default", 1.0),)
    assert_close(lorax.lora(_apply)(multi, X), lorax.lora(_apply)(lp, X))
    back = lorax.get_adapter(multi, "default")
    assert lorax.is_lora(back["up"]["kernel"])
    np.testing.assert_array_equal(back["up"]["kernel"].b, lp["up"]["kernel"].b)


def test_drop_adapter(params):
    lp = _three(params)
    dropped = lorax.drop_adapter(lp, "c")
    assert sorted(dropped["up"]["kernel"].adapters) == ["a", "b"]
    only = lorax.drop_adapter(lorax.drop_adapter(dropped, "a"), "b")
    assert only["up"]["kernel"] is params["up"]["kernel"]
    with pytest.raises(ValueError, match="`name`.*'zz'"):
        lorax.drop_adapter(lp, "zz")


def test_combine_cat_is_exact(params):
    lp = _three(params)
    both = lorax.combine_adapters(lp, {"a": 0.7, "c": 1.5}, "cat", name="mix")
    assert both["up"]["kernel"].adapters["mix"].rank == 5
    assert both["down"]["kernel"].adapters["mix"].rank == 2  # c does not adapt "down"
    with jax.default_matmul_precision("highest"):
        assert_close(lorax.lora(_apply)(lorax.select(both, "mix"), X),
               _apply(dense(lp, {"a": 0.7, "c": 1.5}), X))


def test_combine_linear_is_peft_formula(params):
    lp = _three(params)
    lin = lorax.combine_adapters(lp, {"a": 0.5, "b": 2.0}, "linear", name="lin")
    f, fa, fb = (lin["down"]["kernel"].adapters[k] for k in ("lin", "a", "b"))
    ca, cb = 0.5 * fa.scale, 2.0 * fb.scale
    assert_close(f.a, np.sqrt(ca) * fa.a + np.sqrt(cb) * fb.a)
    assert_close(f.b, np.sqrt(ca) * fa.b + np.sqrt(cb) * fb.b)
    with pytest.raises(ValueError, match="equal ranks.*'up/kernel'"):
        lorax.combine_adapters(lp, {"a": 1.0, "c": 1.0}, "linear")


def test_combine_svd_is_the_best_low_rank_approximation(params):
    lp = _three(params)
    svd = lorax.combine_adapters(lp, {"a": 1.0, "c": -0.5}, "svd", name="s", rank=3)
    node = svd["up"]["kernel"]
    want = (dense_delta(node.adapters["a"].a, node.adapters["a"].b, node.adapters["a"].scale)
            - 0.5 * dense_delta(node.adapters["c"].a, node.adapters["c"].b,
                                node.adapters["c"].scale))
    u, s, vt = np.linalg.svd(want)
    best = (u[:, :3] * s[:3]) @ vt[:3]
    # float64 products of float32 factors: lorax's SVD runs in float32.
    assert_close(dense_delta(node.adapters["s"].a, node.adapters["s"].b, 1.0), best,
                 dtype=np.float32)
    full = lorax.combine_adapters(lp, {"a": 1.0, "c": -0.5}, "svd", name="s", rank=5)
    assert_close(dense_delta(full["up"]["kernel"].adapters["s"].a,
                             full["up"]["kernel"].adapters["s"].b, 1.0), want, dtype=np.float32)


def test_training_touches_only_active_factors(params):
    lp = lorax.select(_three(params), ["a", "c"], [1.0, 0.5])
    tx = lorax.optimizer(optax.adam(1e-2))
    grads = jax.grad(lambda t: jnp.mean(lorax.lora(_apply)(t, X) ** 2))(lp)
    updates, _ = tx.update(grads, tx.init(lp), lp)
    new = optax.apply_updates(lp, updates)
    for name in ("up", "down"):
        old, upd = lp[name]["kernel"], new[name]["kernel"]
        assert (old.w == upd.w).all()
        np.testing.assert_array_equal(old.adapters["b"].a, upd.adapters["b"].a)  # inactive
        assert not (old.adapters["a"].b == upd.adapters["a"].b).all()
    assert jax.tree.leaves(lorax.trainable(lp["down"]["kernel"])) == [False, True, True, True,
                                                                       True]


def test_checkpoint_and_peft_per_adapter(params, tmp_path):
    lp = _three(params)
    lorax.save(tmp_path / "c", lorax.get_adapter(lp, "c"))
    fresh = lorax.add_adapter(lorax.drop_adapter(lp, "c"), "c", rank=3, alpha=3.0, targets="up")
    restored = lorax.restore(tmp_path / "c", lorax.get_adapter(fresh, "c"))
    back = lorax.adapters.put_adapter(fresh, "c", restored)
    np.testing.assert_array_equal(back["up"]["kernel"].adapters["c"].b,
                                  lp["up"]["kernel"].adapters["c"].b)
    name_map = {"up/kernel": "up", "down/kernel": "down"}
    with pytest.raises(ValueError, match="named adapters.*get_adapter"):
        lorax.peft.save(tmp_path / "p", lp, name_map=name_map)
    config = lorax.peft.save(tmp_path / "p", lorax.get_adapter(lp, "a"), name_map=name_map)
    assert config["r"] == 2
    loaded = lorax.peft.load(tmp_path / "p", params, name_map=name_map)
    assert_close(lorax.lora(_apply)(loaded, X), lorax.lora(_apply)(lorax.select(lp, "a"), X))
    meta = lorax.checkpoint.describe(lp)
    assert sorted(meta["kernels"]) == ["down/kernel[a]", "down/kernel[b]", "up/kernel[a]",
                                       "up/kernel[b]", "up/kernel[c]"]


def test_summary_rows_per_adapter(params):
    s = lorax.summary(_three(params))
    assert [k.path for k in s.adapted] == ["down/kernel[a]", "down/kernel[b]", "up/kernel[a]",
                                           "up/kernel[b]", "up/kernel[c]"]


@pytest.mark.parametrize(
    ("call", "message"),
    [(lambda lp: lorax.add_adapter(lp, "a", rank=2), "already exists"),
     (lambda lp: lorax.add_adapter(lp, "", rank=2), "`name`"),
     (lambda lp: lorax.add_adapter(lp, "d", rank=2, dora=True), "`dora`"),
     (lambda lp: lorax.select(lp, ["a", "zz"]), "`names`.*'zz'"),
     (lambda lp: lorax.select(lp, ["a", "a"]), "distinct"),
     (lambda lp: lorax.select(lp, ["a"], [1.0, 2.0]), "`weights`"),
     (lambda lp: lorax.combine_adapters(lp, {"a": 1.0}, "mean"), "`method`"),
     (lambda lp: lorax.combine_adapters(lp, {"zz": 1.0}), "`weights`.*'zz'"),
     (lambda lp: lorax.combine_adapters(lp, {"a": 1.0}, name="b"), "`name`.*'b'"),
     (lambda lp: lorax.combine_adapters(lp, {"a": 1.0}, "svd", rank=0), "`rank`"),
     (lambda lp: lorax.combine_adapters(lp, {"a": 1.0}, "svd", rank=50), "`rank`.*'down/kernel'")],
)
def test_bad_inputs(params, call, message):
    with pytest.raises(ValueError, match=message):
        call(_three(params))


def test_two_active_adapters_train_step_flops():
    lp = lorax.add_adapter(abstract_params(), "a", rank=8)
    lp = lorax.select(lorax.add_adapter(lp, "b", rank=8), ["a", "b"], [0.5, 0.5])
    ratio = lora_step_flops(lp) / full_step_flops()
    print(f"two adapters (r=8+8)/full = {ratio:.4f}")
    assert ratio <= 0.72
