"""DoRA (`lorax.wrap(..., dora=True)`) against independent dense math, and its costs."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cost_model import abstract_params, full_step_flops, lora_step_flops
from helpers import assert_close, dense_delta, lora_nodes

import lorax
import lorax.peft
from lorax import dora

D, HEADS, FFN, VOCAB = 16, 2, 24, 11


class Net(nn.Module):
    """Embedding lookup, attention (3-d q/k/v/out kernels), an MLP and a tied output."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(VOCAB, D)
        x = embed(ids)
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(x)
        x = x + nn.Dense(D)(nn.relu(nn.Dense(FFN)(x)))
        return embed.attend(x)


NET = Net()
IDS = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, 5)), jnp.int32)


@pytest.fixture(scope="module")
def params():
    p = NET.init(jax.random.key(0), IDS)["params"]
    # Non-trivial base values everywhere (Flax initialises biases to zero).
    leaves, treedef = jax.tree.flatten(p)
    rng = np.random.default_rng(2)
    leaves = [jnp.asarray(x + 0.1 * rng.standard_normal(x.shape), jnp.float32) for x in leaves]
    return jax.tree.unflatten(treedef, leaves)


def _apply(p, ids):
    return NET.apply({"params": p}, ids)


TARGETS = ["Dense_0", "Dense_1", "query", "key", "value", "out", "embedding"]


def _wrap(params, **kwargs):
    return lorax.wrap(params, rank=3, targets=TARGETS, dora=True, **kwargs)


def _perturb(tree, seed=0):
    rng = np.random.default_rng(seed)

    def go(x):
        if not lorax.is_lora(x):
            return x
        b = jnp.asarray(0.3 * rng.standard_normal(x.b.shape), jnp.float32)
        m = x.magnitude * jnp.asarray(1 + 0.2 * rng.standard_normal(x.magnitude.shape),
                                      jnp.float32)
        return dataclasses.replace(x, b=b, magnitude=m)

    return jax.tree.map(go, tree, is_leaf=lorax.is_lora)


def dense_dora(node) -> np.ndarray:
    """``m * V / ||V||_c`` in float64 NumPy from the node's raw fields (independent of lorax)."""
    s, i = node.n_stack, node.n_in
    v = np.asarray(node.w, np.float64) + dense_delta(node.a, node.b, node.scale, s)
    in_axes = tuple(range(s, s + i))
    norm = np.sqrt(np.sum(v * v, axis=in_axes, keepdims=True))
    m = np.expand_dims(np.asarray(node.magnitude, np.float64), in_axes)
    return m * v / norm


def _dense_tree(tree):
    return jax.tree.map(lambda x: jnp.asarray(dense_dora(x), jnp.float32) if lorax.is_lora(x)
                        else x, tree, is_leaf=lorax.is_lora)


def test_magnitude_is_the_column_norm_and_identity_at_init(params):
    lp = _wrap(params)
    nodes = lora_nodes(lp)
    assert len(nodes) == 7  # embedding, q, k, v, out, two Dense
    for node in nodes:
        w = np.asarray(node.w, np.float64)
        axes = tuple(range(node.n_stack, node.n_stack + node.n_in))
        assert_close(node.magnitude, np.sqrt((w * w).sum(axes)), err_msg=node.path)
        assert node.magnitude.shape == node.out_shape
    assert_close(lorax.lora(_apply)(lp, IDS), _apply(params, IDS))


def test_forward_matches_dense_dora(params):
    lp = _perturb(_wrap(params))
    with jax.default_matmul_precision("highest"):
        got = lorax.lora(_apply)(lp, IDS)
        want = _apply(_dense_tree(lp), IDS)
    assert_close(got, want)


def test_gradients_match_dense_dora_with_constant_norm(params):
    lp = _perturb(_wrap(params))

    def dense_loss(tree):
        def fold(x):
            if not lorax.is_lora(x):
                return x
            s, i = x.n_stack, x.n_in
            axes = tuple(range(s, s + i))
            v = x.w + jnp.reshape(
                jnp.einsum("ir,ro->io", x.a.reshape(-1, x.rank), x.b.reshape(x.rank, -1)),
                x.w.shape) * x.scale
            norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v * v, axes, keepdims=True)))
            return jnp.expand_dims(x.magnitude, axes) * v / norm

        return jnp.sum(_apply(jax.tree.map(fold, tree, is_leaf=lorax.is_lora), IDS) ** 2)

    with jax.default_matmul_precision("highest"):
        got = jax.grad(lambda t: jnp.sum(lorax.lora(_apply)(t, IDS) ** 2))(lp)
        want = jax.grad(dense_loss)(lp)
    def trained(tree):  # the dense reference also differentiates w, which DoRA freezes
        return [(n.a, n.b, n.magnitude) for n in lora_nodes(tree)]

    assert_close(trained(got), trained(want))


def test_factorized_norm_matches_dense_norm():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((3, 4, 5, 6))  # stack 3, in (4, 5), out 6
    a, b = rng.standard_normal((3, 4, 5, 2)), rng.standard_normal((3, 2, 6))
    v = w + dense_delta(a, b, 0.7, n_stack=1)
    got = dora.adapted_norm(jnp.asarray(w, jnp.float32), jnp.asarray(a, jnp.float32),
                            jnp.asarray(b, jnp.float32), 0.7, 1, 2)
    assert_close(got, np.sqrt((v * v).sum((1, 2))))


def test_stacked_kernels_in_scan():
    rng = np.random.default_rng(4)
    params = {"w": jnp.asarray(rng.standard_normal((3, 6, 5)), jnp.float32)}
    lp = lorax.wrap(params, rank=2, targets="w$", stacked={"w": 1}, dora=True)
    lp = _perturb(lp)
    x = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)

    def f(p, x):
        def body(h, w):
            return h, h @ w

        return jax.lax.scan(body, x, p["w"])[1]

    want = np.einsum("bi,lio->lbo", np.asarray(x, np.float64), dense_dora(lp["w"]))
    assert_close(lorax.lora(f)(lp, x), want)


def test_conv_kernel():
    rng = np.random.default_rng(5)
    conv = nn.Conv(4, (3, 3))
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 3)), jnp.float32)
    params = conv.init(jax.random.key(0), x)["params"]
    lp = _perturb(lorax.wrap(params, rank=2, dora=True))
    with jax.default_matmul_precision("highest"):
        got = lorax.lora(lambda p, x: conv.apply({"params": p}, x))(lp, x)
        want = conv.apply({"params": _dense_tree(lp)}, x)
    assert_close(got, want)


def test_merge_and_unmerge(params):
    lp = _perturb(_wrap(params))
    merged = lorax.merge(lp)
    for node, path in ((n, n.path) for n in lora_nodes(lp)):
        leaf = merged
        for part in path.split("/"):
            leaf = leaf[part]
        assert_close(leaf, dense_dora(node), err_msg=path)
    assert_close(_apply(merged, IDS), lorax.lora(_apply)(lp, IDS))
    back = lorax.unmerge(merged, lp)
    assert_close(lorax.unwrap(back), lorax.unwrap(lp))


def test_optimizer_trains_magnitude_and_factors_only(params):
    lp = _perturb(_wrap(params))
    tx = lorax.optimizer(optax.adam(1e-2))
    state = tx.init(lp)
    assert jax.tree.leaves(lorax.trainable(lp["Dense_0"]["kernel"])) == [False, True, True, True]

    @jax.jit
    def step(lp, state):
        grads = jax.grad(lambda t: jnp.mean(lorax.lora(_apply)(t, IDS) ** 2))(lp)
        updates, state = tx.update(grads, state, lp)
        return optax.apply_updates(lp, updates), state

    new, _ = step(lp, state)
    chex.assert_trees_all_equal(lorax.split(new)[1], lorax.split(lp)[1])  # frozen: unchanged
    for old, upd in zip(lora_nodes(lp), lora_nodes(new), strict=True):
        assert not (old.magnitude == upd.magnitude).all(), old.path
    trainable, frozen = lorax.split(lp)
    assert trainable["Dense_0"]["kernel"].magnitude is not None
    assert frozen["Dense_0"]["kernel"].magnitude is None
    assert lorax.combine(trainable, frozen)["Dense_0"]["kernel"].magnitude is lp["Dense_0"][
        "kernel"].magnitude


def test_summary_counts_magnitude():
    lp = lorax.wrap({"dense": {"kernel": jnp.ones((16, 8))}}, rank=2, dora=True)
    assert lorax.summary(lp).trainable == 16 * 2 + 2 * 8 + 8


def test_checkpoint_round_trip_and_mismatch(tmp_path, params):
    lp = _perturb(_wrap(params))
    lorax.save(tmp_path / "ckpt", lp)
    like = _wrap(params)
    back = lorax.restore(tmp_path / "ckpt", like)
    for got, want in zip(lora_nodes(back), lora_nodes(lp), strict=True):
        np.testing.assert_array_equal(got.magnitude, want.magnitude)
    meta = lorax.checkpoint.describe(lp)
    assert meta["kernels"]["Dense_0/kernel"]["magnitude"] == [[D], "float32"]  # Dense(D) first
    plain = lorax.wrap(params, rank=3, targets=TARGETS)
    with pytest.raises(lorax.CheckpointMismatchError, match="magnitude"):
        lorax.restore(tmp_path / "ckpt", plain)


def test_peft_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    params = {"fc": {"kernel": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)},
              "qkv": {"kernel": jnp.asarray(rng.standard_normal((2, 8, 2, 3)), jnp.float32)}}
    lp = _perturb(lorax.wrap(params, rank=2, dora=True, stacked={"qkv": 1}, in_axes={"qkv": 1}))
    name_map = {"fc/kernel": "fc",
                "qkv/kernel": lorax.peft.TorchParam(("l.0.q", "l.1.q"), n_in=1)}
    config = lorax.peft.save(tmp_path, lp, name_map=name_map)
    assert config["use_dora"] is True
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    np.testing.assert_array_equal(tensors["base_model.model.fc.lora_magnitude_vector"],
                                  lp["fc"]["kernel"].magnitude)
    assert tensors["base_model.model.l.1.q.lora_magnitude_vector"].shape == (6,)
    back = lorax.peft.load(tmp_path, params, name_map=name_map)
    for got, want in zip(lora_nodes(back), lora_nodes(lp), strict=True):
        np.testing.assert_array_equal(got.magnitude, want.magnitude)
        np.testing.assert_array_equal(got.b, want.b)

    # A DoRA config without magnitudes, or magnitudes without use_dora, is rejected.
    del tensors["base_model.model.fc.lora_magnitude_vector"]
    from safetensors.numpy import save_file

    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="use_dora=True.*'fc'.*lora_magnitude_vector"):
        lorax.peft.load(tmp_path, params, name_map=name_map)
    config_path = pathlib.Path(tmp_path) / "adapter_config.json"
    config_path.write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(ValueError, match="l.0.q.lora_magnitude_vector.*use_dora"):
        lorax.peft.load(tmp_path, params, name_map=name_map)


def test_peft_save_rejects_mixed_dora(tmp_path):
    params = {"fc": {"kernel": jnp.ones((8, 6))}, "out": {"kernel": jnp.ones((6, 4))}}
    lp = lorax.wrap(params, rank=2, dora=True)
    lp["out"]["kernel"] = dataclasses.replace(lp["out"]["kernel"], magnitude=None)
    with pytest.raises(ValueError, match="use_dora.*'fc/kernel'.*'out/kernel'"):
        lorax.peft.save(tmp_path, lp, name_map={"fc/kernel": "fc", "out/kernel": "out"})


def test_bad_dora_argument():
    with pytest.raises(TypeError, match="`dora`"):
        lorax.wrap({"kernel": jnp.ones((4, 4))}, rank=2, dora="yes")


def test_dora_factor_of_plain_node_names_path():
    lp = lorax.wrap({"dense": {"kernel": jnp.ones((4, 4))}}, rank=2)
    with pytest.raises(ValueError, match="'dense/kernel'"):
        lp["dense"]["kernel"].dora_factor()


def test_dora_train_step_flops():
    lp = lorax.wrap(abstract_params(), rank=8, dora=True)
    ratio = lora_step_flops(lp) / full_step_flops()
    print(f"dora/full = {ratio:.4f}")
    assert ratio <= 0.72


def test_norm_cost_is_independent_of_tokens():
    # O(in·out·r): the norm of a 256x512 kernel at r=8 is ~2·in·out·r FLOPs plus lower terms.
    w = jax.ShapeDtypeStruct((256, 512), jnp.float32)
    a, b = jax.ShapeDtypeStruct((256, 8), jnp.float32), jax.ShapeDtypeStruct((8, 512), jnp.float32)
    cost = jax.jit(lambda w, a, b: dora.adapted_norm(w, a, b, 1.0, 0, 1)).lower(w, a, b)
    cost = cost.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    assert cost["flops"] < 3 * 2 * 256 * 512 * 8, cost["flops"]
    assert math.isfinite(cost["flops"])
