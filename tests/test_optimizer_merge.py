"""Training with `lorax.optimizer`, the trainable mask, split/combine, merge/unmerge, unwrap."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from helpers import (
    assert_close,
    assert_trees_equal,
    bits,
    dense_delta,
    dense_kernel,
    lora_nodes,
    perturb_b,
)

import lorax

D_IN, D_HID, D_OUT, RANK = 16, 32, 4, 4


def _params() -> dict:
    rng = np.random.default_rng(0)

    def arr(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    return {
        "dense": {"kernel": arr(D_IN, D_HID, scale=D_IN**-0.5), "bias": arr(D_HID, scale=0.1)},
        "ln": {"scale": 1.0 + arr(D_HID, scale=0.1), "bias": arr(D_HID, scale=0.1)},
        "head": {"kernel": arr(D_HID, D_OUT, scale=D_HID**-0.5), "bias": arr(D_OUT, scale=0.1)},
    }


def forward(p, x):
    h = x @ p["dense"]["kernel"] + p["dense"]["bias"][None]
    mu = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.var(h, axis=-1, keepdims=True)
    h = (h - mu) / jnp.sqrt(var + 1e-5) * p["ln"]["scale"][None] + p["ln"]["bias"][None]
    return jnp.tanh(h) @ p["head"]["kernel"] + p["head"]["bias"][None]


X = jnp.asarray(np.random.default_rng(1).standard_normal((8, D_IN)), jnp.float32)
Y = jnp.asarray(np.random.default_rng(2).standard_normal((8, D_OUT)), jnp.float32)
TRAIN = ["^head/kernel$", "^ln/scale$"]


def loss(p):
    return jnp.mean((lorax.lora(forward)(p, X) - Y) ** 2)


@pytest.fixture(scope="module")
def params():
    return _params()


@pytest.fixture(scope="module")
def lp(params):
    return lorax.wrap(params, rank=RANK, train=TRAIN)


def _step(tx, tree, state):
    grads = jax.grad(loss)(tree)
    updates, state = tx.update(grads, state, tree)
    return optax.apply_updates(tree, updates), state


def test_identity_at_init(params, lp):
    # b = 0, so the adapter adds exact zeros; XLA may still fuse the two programs differently.
    assert_close(jax.jit(lorax.lora(forward))(lp, X), jax.jit(forward)(params, X))
    # Exactly the program without adapters run the same way (lorax.lora on the plain params):
    # eager `forward` itself may round differently (by an ulp on jax 0.7.1, which dispatches
    # eager jnp ops differently from binding the traced equations one by one).
    got = np.asarray(lorax.lora(forward)(lp, X))
    np.testing.assert_array_equal(got, np.asarray(lorax.lora(forward)(params, X)))
    ref = np.asarray(forward(params, X))
    assert_close(got, ref, ulps=4)


def test_trainable_mask(lp):
    mask = lorax.trainable(lp)
    assert mask["dense"]["kernel"] == dataclasses.replace(lp["dense"]["kernel"], w=False, a=True,
                                                          b=True)
    assert mask["head"]["kernel"] == lorax.FullyTrained(True)
    assert mask["ln"]["scale"] == lorax.FullyTrained(True)
    assert mask["dense"]["bias"] is False and mask["ln"]["bias"] is False
    assert mask["head"]["bias"] is False
    # One bool per array leaf, in flattening order: optax's mask convention.
    flat = jax.tree.leaves(lp)
    assert len(jax.tree.leaves(mask)) == len(flat)
    # dict keys sort: dense/{bias, kernel: w, a, b}, head/{bias, kernel}, ln/{bias, scale}
    assert jax.tree.leaves(mask) == [False, False, True, True, False, True, False, True]


def test_adam_steps_train_factors_and_train_leaves_only(params, lp):
    tx = lorax.optimizer(optax.adam(1e-2))
    state = tx.init(lp)
    one, state = _step(tx, lp, state)
    node0, node1 = lp["dense"]["kernel"], one["dense"]["kernel"]
    assert bits(node1.w) == bits(params["dense"]["kernel"])
    assert not np.any(np.asarray(node0.b)) and np.all(np.asarray(node1.b) != 0)
    # With b = 0 the gradient of a is exactly zero, so Adam leaves a unchanged on step one...
    assert bits(node1.a) == bits(node0.a)
    two, state = _step(tx, one, state)
    node2 = two["dense"]["kernel"]
    # ... and moves it on step two, once b is nonzero; W never moves.
    assert np.all(np.asarray(node2.a) != np.asarray(node1.a))
    assert bits(node2.w) == bits(params["dense"]["kernel"])
    for path in (("dense", "bias"), ("ln", "bias"), ("head", "bias")):
        assert bits(two[path[0]][path[1]]) == bits(params[path[0]][path[1]])
    for module, name in (("head", "kernel"), ("ln", "scale")):
        box = two[module][name]
        assert isinstance(box, lorax.FullyTrained)
        assert np.all(np.asarray(box.value) != np.asarray(params[module][name]))
    assert float(loss(two)) < float(loss(lp))


def test_split_combine_training_matches_full_tree(params, lp):
    tx = lorax.optimizer(optax.adam(1e-2))
    full, full_state = lp, tx.init(lp)
    train, frozen = lorax.split(lp)
    assert train["dense"]["kernel"].w is None and frozen["dense"]["kernel"].a is None
    assert frozen["dense"]["kernel"].w is params["dense"]["kernel"]
    state = tx.init(train)
    for _ in range(2):
        full, full_state = _step(tx, full, full_state)
        grads = jax.grad(lambda t: loss(lorax.combine(t, frozen)))(train)
        assert grads["dense"]["kernel"].w is None  # no gradient is even formed for W
        updates, state = tx.update(grads, state, train)
        train = optax.apply_updates(train, updates)
    combined = lorax.combine(train, frozen)
    assert combined["dense"]["kernel"].w is params["dense"]["kernel"]
    assert_trees_equal(combined, full)


def _state_bytes(state) -> tuple[int, int, int]:
    leaves = jax.tree.leaves(state)
    return (len(leaves), sum(x.size for x in leaves),
            sum(x.size * np.dtype(x.dtype).itemsize for x in leaves))


def test_optimizer_state_holds_nothing_for_frozen_leaves(lp):
    # Trainable sizes from the shapes alone: a (16, 4), b (4, 32), head kernel, LayerNorm scale.
    trainable = [D_IN * RANK, RANK * D_HID, D_HID * D_OUT, D_HID]
    expected_size = 2 * sum(trainable) + 1  # Adam's mu and nu, plus one int32 step count
    expected_leaves = 2 * len(trainable) + 1
    tx = lorax.optimizer(optax.adam(1e-3))
    for tree in (lp, lorax.split(lp)[0]):
        n, size, nbytes = _state_bytes(tx.init(tree))
        assert (n, size, nbytes) == (expected_leaves, expected_size, 4 * expected_size)
    # No state leaf has the shape of a frozen leaf.
    shapes = {tuple(x.shape) for x in jax.tree.leaves(tx.init(lp))}
    assert (D_IN, D_HID) not in shapes and (D_OUT,) not in shapes
    # Full fine-tuning would need Adam state for every leaf.
    n_all = sum(x.size for x in jax.tree.leaves(_params()))
    assert _state_bytes(optax.adam(1e-3).init(_params()))[1] == 2 * n_all + 1


def test_summary_counts(lp):
    s = lorax.summary(lp)
    trainable = D_IN * RANK + RANK * D_HID + D_HID * D_OUT + D_HID
    frozen = D_IN * D_HID + D_HID + D_HID + D_OUT
    assert (s.trainable, s.frozen) == (trainable, frozen)
    assert (s.trainable_bytes, s.frozen_bytes) == (4 * trainable, 4 * frozen)
    assert [k.path for k in s.adapted] == ["dense/kernel"]
    assert s.adapted[0].params == D_IN * RANK + RANK * D_HID


def test_merge_float32_matches_dense_math(params, lp):
    tuned = perturb_b(lp, 0)
    merged = lorax.merge(tuned)
    node = tuned["dense"]["kernel"]
    assert merged["dense"]["kernel"].dtype == jnp.float32
    assert_close(merged["dense"]["kernel"], dense_kernel(node))
    assert np.max(np.abs(dense_delta(node.a, node.b, node.scale))) > 1e-2  # a real change
    # Boxes become their values, other leaves pass through: no copies.
    assert merged["head"]["kernel"] is params["head"]["kernel"]
    assert merged["dense"]["bias"] is params["dense"]["bias"]
    # The merged model computes what the factorized one does.
    assert_close(forward(merged, X), lorax.lora(forward)(tuned, X))


def test_merge_bf16_base_rounds_once_exact():
    # Dyadic factors: every product and sum below is exact in float32 and float64, so the
    # only rounding is the final cast to bf16, and the result is determined exactly.
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((16, 8)), jnp.bfloat16)
    node = lora_nodes(lorax.wrap({"kernel": w}, rank=4, alpha=8.0, dtype=jnp.float32))[0]
    a = rng.integers(-255, 256, (16, 4)) / 256.0  # 8-bit mantissas: ab needs ~18 bits
    b = rng.integers(-255, 256, (4, 8)) / 256.0
    node = dataclasses.replace(node, a=jnp.asarray(a, jnp.float32),
                               b=jnp.asarray(b, jnp.float32))
    merged = lorax.merge({"kernel": node})["kernel"]
    assert merged.dtype == jnp.bfloat16
    expected = (np.asarray(w, np.float32) + dense_delta(a, b, 2.0).astype(np.float32))
    expected = expected.astype(ml_dtypes.bfloat16)
    assert bits(merged) == bits(expected)
    # A bf16-precision delta would round twice; make sure this input can tell the difference.
    twice = (np.asarray(w, np.float32) + dense_delta(a, b, 2.0).astype(ml_dtypes.bfloat16)
             .astype(np.float32)).astype(ml_dtypes.bfloat16)
    assert bits(twice) != bits(expected)


def test_merge_bf16_base_random_factors(lp):
    w = lp["dense"]["kernel"].w.astype(jnp.bfloat16)
    (node,) = lora_nodes(perturb_b(lorax.wrap({"kernel": w}, rank=RANK), 1))
    assert node.a.dtype == jnp.float32  # a bf16 base gets float32 factors by default
    merged = np.asarray(lorax.merge({"kernel": node})["kernel"])
    expected = (np.asarray(w, np.float64) + dense_delta(node.a, node.b, node.scale))
    expected = expected.astype(np.float32).astype(ml_dtypes.bfloat16)
    # float32 vs float64 accumulation can only flip a bf16 rounding at an exact tie region.
    same = merged.view(np.uint16) == expected.view(np.uint16)
    assert same.mean() > 0.99
    ulp_diff = np.abs(merged.view(np.int16).astype(np.int32) - expected.view(np.int16))
    assert ulp_diff.max() <= 1


def test_unmerge_recovers_w(params, lp):
    tuned = perturb_b(lp, 2)
    merged = lorax.merge(tuned)
    back = lorax.unmerge(merged, tuned)
    node, back_node = tuned["dense"]["kernel"], back["dense"]["kernel"]
    assert_close(back_node.w, params["dense"]["kernel"])
    assert back_node.a is node.a and back_node.b is node.b
    assert (back_node.scale, back_node.rank, back_node.path) == (node.scale, node.rank,
                                                                 node.path)
    assert isinstance(back["head"]["kernel"], lorax.FullyTrained)
    assert back["head"]["kernel"].value is merged["head"]["kernel"]
    assert jax.tree.structure(back) == jax.tree.structure(tuned)


def test_unmerge_rejects_mismatched_trees(lp):
    merged = lorax.merge(lp)
    bad = {**merged, "dense": {**merged["dense"], "kernel": jnp.zeros((D_IN, D_HID + 1))}}
    with pytest.raises(ValueError, match="dense/kernel"):
        lorax.unmerge(bad, lp)
    with pytest.raises(ValueError):
        lorax.unmerge({"dense": merged["dense"]}, lp)


def test_unwrap_returns_identical_objects(params, lp):
    tuned = perturb_b(lp, 3)
    out = lorax.unwrap(tuned)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(params), strict=True):
        assert a is b
    assert jax.tree.structure(out) == jax.tree.structure(params)


def test_optimizer_with_other_transforms(params, lp):
    # Weight decay must not reach W either (it would with optax.adamw on the raw tree).
    tx = lorax.optimizer(optax.adamw(1e-2, weight_decay=0.5))
    new, _ = _step(tx, lp, tx.init(lp))
    assert bits(new["dense"]["kernel"].w) == bits(params["dense"]["kernel"])
    assert bits(new["dense"]["bias"]) == bits(params["dense"]["bias"])
    assert math.isfinite(float(loss(new)))
