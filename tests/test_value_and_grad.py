"""`lorax.value_and_grad`: the trainable half's gradient, against jax.grad of the whole tree."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_close, perturb_b

import lorax


def _setup():
    keys = jax.random.split(jax.random.key(0), 3)
    params = {"l0": {"kernel": jax.random.normal(keys[0], (16, 32)), "bias": jnp.zeros(32)},
              "l1": {"kernel": jax.random.normal(keys[1], (32, 4)), "bias": jnp.zeros(4)}}
    lp = perturb_b(lorax.wrap(params, rank=4, train="l1/bias"), jax.random.key(5))
    x = jax.random.normal(keys[2], (8, 16))

    def loss(p, x, scale=1.0):
        h = jnp.tanh(x @ p["l0"]["kernel"] + p["l0"]["bias"][None])
        return scale * jnp.mean((h @ p["l1"]["kernel"] + p["l1"]["bias"][None]) ** 2)

    return lp, x, lorax.lora(loss)


def test_gradients_equal_the_whole_tree_gradient_on_the_trainable_half():
    lp, x, loss = _setup()
    value, grads = lorax.value_and_grad(loss)(lp, x, scale=2.0)
    want_value, want = jax.value_and_grad(loss)(lp, x, scale=2.0)
    train_want = lorax.split(want)[0]
    assert jax.tree.structure(grads) == jax.tree.structure(lorax.split(lp)[0])
    assert_close(value, want_value)
    assert_close(grads, train_want)
    assert grads["l0"]["kernel"].w is None and grads["l0"]["bias"] is None
    assert float(jnp.abs(grads["l0"]["kernel"].a).max()) > 0  # b was perturbed: a gets signal


def test_argnums_and_has_aux():
    lp, x, loss = _setup()

    def swapped(x, p):
        value = loss(p, x)
        return value, {"twice": 2 * value}

    (value, aux), grads = lorax.value_and_grad(swapped, argnums=1, has_aux=True)(x, lp)
    _, want = lorax.value_and_grad(loss)(lp, x)
    assert float(aux["twice"]) == pytest.approx(2 * float(value),
                                                rel=4 * float(np.finfo(np.float32).eps))
    chex.assert_trees_all_equal(grads, want)


def test_one_optimizer_step_on_the_half_matches_the_whole_tree_step():
    lp, x, loss = _setup()
    tx = lorax.optimizer(optax.adam(1e-2))
    train, frozen = lorax.split(lp)
    _, grads = lorax.value_and_grad(loss)(lp, x)
    updates, _ = tx.update(grads, tx.init(train), train)
    half = lorax.combine(optax.apply_updates(train, updates), frozen)
    _, whole_grads = jax.value_and_grad(loss)(lp, x)
    whole_updates, _ = tx.update(whole_grads, tx.init(lp), lp)
    whole = optax.apply_updates(lp, whole_updates)
    assert_close(half, whole)
    assert not np.allclose(half["l0"]["kernel"].a, lp["l0"]["kernel"].a)  # the step moved


def test_the_half_step_touches_fewer_bytes():
    # XLA's cost analysis (deterministic): the whole-tree step also pushes W's zero updates
    # through the optimizer; the half step never sees W.
    lp, x, loss = _setup()
    tx = lorax.optimizer(optax.adam(1e-2))
    train, frozen = lorax.split(lp)

    def whole(lp, s, x):
        g = jax.grad(loss)(lp, x)
        u, s = tx.update(g, s, lp)
        return optax.apply_updates(lp, u), s

    def half(train, frozen, s, x):
        g = lorax.value_and_grad(loss)(lorax.combine(train, frozen), x)[1]
        u, s = tx.update(g, s, train)
        return optax.apply_updates(train, u), s

    def cost(f, *args):
        return jax.jit(f).lower(*args).compile().cost_analysis()["bytes accessed"]

    assert cost(half, train, frozen, tx.init(train), x) < cost(whole, lp, tx.init(lp), x)


def test_bad_arguments():
    lp, x, loss = _setup()
    with pytest.raises(TypeError, match="expected a function for `fun`"):
        lorax.value_and_grad(lp)
    with pytest.raises(TypeError, match="`argnums`"):
        lorax.value_and_grad(loss, argnums=-1)
    with pytest.raises(TypeError, match="`argnums=2` names positional argument 2"):
        lorax.value_and_grad(loss, argnums=2)(lp, x)
