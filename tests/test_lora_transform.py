"""`lorax.lora`'s errors, fallbacks and dropout (its numerics over every consumer pattern:
tests/test_conformance.py, whose rows these tests reuse)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, dense_params, lora_nodes, perturb_b
from test_conformance import X2, _normal, row

import lorax

RANK = 2


@pytest.mark.parametrize("name", ["dense_general_features", "linen_einsum"])
def test_in_axes_mismatch_raises(name):
    case = row(name)
    lp = lorax.wrap(case.params, rank=RANK)  # default in_axes: all axes but the last
    path = lora_nodes(lp)[0].path
    with pytest.raises(ValueError) as err:
        lorax.lora(case.fn)(lp, *case.args)
    msg = str(err.value)
    assert "in_axes" in msg and path in msg, msg


def test_unsupported_consumer_falls_back_with_warning():
    w = _normal(3, (5, 6))
    x = _normal(4, X2)
    params = {"proj": {"kernel": w}}

    def fn(p, x):
        k = p["proj"]["kernel"]
        return x @ k + jnp.sum(k**2)

    lp = perturb_b(lorax.wrap(params, rank=RANK), jax.random.key(3))
    with pytest.warns(lorax.LoRAFallbackWarning, match="proj/kernel") as record:
        y = lorax.lora(fn)(lp, x)
    assert any("proj/kernel" in str(r.message) and "`" in str(r.message) for r in record)
    expected = fn(dense_params(lp), x)
    assert_close(y, expected)


@pytest.fixture(scope="module")
def dropout_setup():
    case = row("dense")
    lp = perturb_b(lorax.wrap(case.params, rank=RANK, dropout=0.5), jax.random.key(7))
    lp0 = perturb_b(lorax.wrap(case.params, rank=RANK, dropout=0.0), jax.random.key(7))
    x = _normal(9, (16, 5))
    return jax.jit(lorax.lora(case.fn)), lp, lp0, x


def test_dropout_without_key_is_deterministic(dropout_setup):
    f, lp, lp0, x = dropout_setup
    y1, y2 = np.asarray(f(lp, x)), np.asarray(f(lp, x))
    assert np.array_equal(y1, y2)
    # Without a key dropout is off: the node's rate does not matter.
    assert np.array_equal(y1, np.asarray(f(lp0, x)))
    assert_close(y1, row("dense").fn(dense_params(lp), x))


def test_dropout_with_key(dropout_setup):
    f, lp, _, x = dropout_setup
    k1, k2 = jax.random.key(1), jax.random.key(2)
    y = np.asarray(f(lp, x))
    y1 = np.asarray(f(lp, x, lora_key=k1))
    assert not np.allclose(y1, y), "dropout with a key should change the output"
    assert np.array_equal(y1, np.asarray(f(lp, x, lora_key=k1))), "same key, same output"
    assert not np.allclose(y1, np.asarray(f(lp, x, lora_key=k2))), "different keys"
    # Dropout acts on the adapter branch only: with b = 0 a key changes nothing.
    case = row("dense")
    lp_init = lorax.wrap(case.params, rank=RANK, dropout=0.5)
    np.testing.assert_array_equal(np.asarray(f(lp_init, x, lora_key=k1)),
                                  np.asarray(f(lp_init, x)))


def test_dropout_rate_zero_ignores_key(dropout_setup):
    f, _, lp0, x = dropout_setup
    assert np.array_equal(np.asarray(f(lp0, x, lora_key=jax.random.key(1))), np.asarray(f(lp0, x)))
