"""Per-example adapter routing: `lorax.lora(fn)(tree, x, adapter_ids=ids)`."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cost_model import LABELS, X, abstract_params, apply, ce, flops, full_step_flops
from helpers import assert_close

import lorax


def _nudge(tree, seed=0):
    rng = np.random.default_rng(seed)

    def go(node):
        if not isinstance(node, lorax.MultiLoRA):
            return node
        return dataclasses.replace(node, adapters={
            k: dataclasses.replace(f, b=jnp.asarray(0.3 * rng.standard_normal(f.b.shape),
                                                    jnp.float32))
            for k, f in node.adapters.items()})

    return jax.tree.map(go, tree, is_leaf=lambda x: isinstance(x, lorax.MultiLoRA))


def _one_by_one(fn, tree, x, ids):
    """Each example alone, with `select` choosing its adapter (the reference)."""
    names = lorax.routing.adapter_names(tree)
    outs = []
    for i, k in enumerate(np.asarray(ids)):
        chosen = lorax.select(tree, [names[k]] if 0 <= k < len(names) else [])
        outs.append(lorax.lora(fn)(chosen, x[i : i + 1]))
    return jnp.concatenate(outs)


def test_mlp_routing_matches_each_example_alone():
    rng = np.random.default_rng(0)
    params = {"up": {"kernel": jnp.asarray(rng.standard_normal((12, 16)), jnp.float32)},
              "down": {"kernel": jnp.asarray(rng.standard_normal((16, 6)), jnp.float32)}}
    lp = lorax.add_adapter(params, "a", rank=2)
    lp = _nudge(lorax.add_adapter(lp, "b", rank=3, targets="up"))  # ranks differ; b on "up"

    def f(p, x):
        return jax.nn.tanh(x @ p["up"]["kernel"]) @ p["down"]["kernel"]

    x = jnp.asarray(rng.standard_normal((5, 3, 12)), jnp.float32)
    ids = jnp.array([0, 1, -1, 1, 7])  # 7: out of range, no adapter
    got = jax.jit(lorax.lora(f))(lp, x, adapter_ids=ids)
    assert_close(got, _one_by_one(f, lp, x, ids))
    assert not np.allclose(got[0], got[2])  # the adapters do act


def test_attention_and_scan_routing():
    rng = np.random.default_rng(1)
    mha = nn.MultiHeadDotProductAttention(num_heads=2)
    x = jnp.asarray(rng.standard_normal((3, 4, 8)), jnp.float32)
    params = mha.init(jax.random.key(0), x)["params"]
    lp = lorax.add_adapter(params, "p", rank=2, targets=["query", "value", "out"])
    lp = _nudge(lorax.add_adapter(lp, "q", rank=2, targets=["query", "key"]))

    def g(p, x):
        return mha.apply({"params": p}, x)

    ids = jnp.array([1, -1, 0])
    assert_close(lorax.lora(g)(lp, x, adapter_ids=ids), _one_by_one(g, lp, x, ids))

    w = jnp.asarray(rng.standard_normal((3, 6, 6)), jnp.float32)
    ls = lorax.add_adapter({"w": w}, "a", rank=2, targets="w$", stacked={"w": 1})
    ls = _nudge(lorax.add_adapter(ls, "b", rank=1, targets="w$", stacked={"w": 1}))

    def h(p, x):
        return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, p["w"])[0]

    xs = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
    ids = jnp.array([1, 0, -1, 1])
    assert_close(lorax.lora(h)(ls, xs, adapter_ids=ids), _one_by_one(h, ls, xs, ids))


def test_gradients_reach_only_the_routed_adapters():
    rng = np.random.default_rng(2)
    params = {"k": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)}
    lp = lorax.add_adapter(params, "a", rank=2, targets="k$")
    lp = _nudge(lorax.add_adapter(lp, "b", rank=2, targets="k$"))
    x = jnp.asarray(rng.standard_normal((2, 6)), jnp.float32)
    grads = jax.grad(lambda t: jnp.sum(lorax.lora(lambda p, x: x @ p["k"])(
        t, x, adapter_ids=jnp.array([1, 1])) ** 2))(lp)
    assert not np.allclose(grads["k"].adapters["b"].a, 0)
    np.testing.assert_array_equal(grads["k"].adapters["a"].a, 0)
    np.testing.assert_array_equal(grads["k"].adapters["a"].b, 0)


def test_routing_errors():
    rng = np.random.default_rng(3)
    params = {"k": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)}
    lp = lorax.add_adapter(params, "a", rank=2, targets="k$")
    x = jnp.ones((3, 6))
    fn = lorax.lora(lambda p, x: x @ p["k"])
    with pytest.raises(ValueError, match="`adapter_ids`.*1-d integer"):
        fn(lp, x, adapter_ids=jnp.zeros((3, 1), jnp.int32))
    with pytest.raises(ValueError, match="`adapter_ids` needs named adapters"):
        fn(lorax.wrap(params, rank=2, targets="k$"), x, adapter_ids=jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="'k'.*leading axis 3.*2 entries"):
        fn(lp, x, adapter_ids=jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="'k'.*batch-leading"):
        lorax.lora(lambda p, x: p["k"].T @ x.T)(lp, x, adapter_ids=jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="'k'.*gather"):
        lorax.lora(lambda p, i: p["k"][i])(lp, jnp.array([0, 2, 1]),
                                           adapter_ids=jnp.zeros(3, jnp.int32))


def test_routed_train_step_flops():
    lp = lorax.add_adapter(abstract_params(), "a", rank=8)
    lp = lorax.add_adapter(lp, "b", rank=8)
    tx = lorax.optimizer(optax.adam(1e-3))
    train, frozen = lorax.split(lp)
    ids = jax.ShapeDtypeStruct((X.shape[0],), jnp.int32)

    def step(train, frozen, state, x, y, ids):
        def loss(lp):
            return ce(lorax.lora(apply)(lp, x, adapter_ids=ids), y)

        value, grads = lorax.value_and_grad(loss)(lorax.combine(train, frozen))
        updates, state = tx.update(grads, state, train)
        return value, optax.apply_updates(train, updates), state

    ratio = flops(step, train, frozen, jax.eval_shape(tx.init, train), X, LABELS, ids)
    ratio /= full_step_flops()
    print(f"routed (2 adapters, r=8)/full = {ratio:.4f}")
    assert ratio <= 0.72
