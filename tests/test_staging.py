"""Staged binds (``lorax.staging``): repeated layers share one trace of each rule, results
and gradients stay those of the dense kernel ``W + s·A·B``, and errors still name the path."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, dense_params, dense_params_jnp, perturb_b

import lorax
from lorax import primitive_table

N_LAYERS = 4


def _layers(x, params):
    for k in range(N_LAYERS):
        x = jnp.tanh(x @ params[f"layer{k}"]["kernel"]) * 0.5 + x
    return jnp.sum(x * x)


def _wrapped():
    rng = np.random.default_rng(0)
    params = {f"layer{k}": {"kernel": jnp.asarray(rng.standard_normal((8, 8)) / 3, jnp.float32)}
              for k in range(N_LAYERS)}
    return perturb_b(lorax.wrap(params, rank=2), 1)


@pytest.fixture
def counted_dot(monkeypatch):
    """Counts the runs of the factorized ``dot_general`` rule's Python."""
    calls = []
    name = jax.extend.core.primitives.dot_general_p.name
    entry = primitive_table.TABLE[name]

    def counting(invals, eqn):
        calls.append(1)
        return entry.lora(invals, eqn)

    monkeypatch.setitem(primitive_table.TABLE, name,
                        dataclasses.replace(entry, lora=counting))
    return calls


def test_identical_layers_trace_the_rule_once_and_match_the_dense_kernels(counted_dot):
    lp = _wrapped()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 8)), jnp.float32)
    loss = lorax.lora(lambda p, x: _layers(x, p))
    value, grads = jax.jit(lorax.value_and_grad(loss))(lp, x)
    assert len(counted_dot) == 1  # four kernels of one signature: traced once

    expected = _layers(x, dense_params(lp))
    assert_close(value, expected, ulps=256)

    def dense_loss(trainable):
        return _layers(x, dense_params_jnp(lorax.combine(trainable, lorax.split(lp)[1])))

    expected_grads = jax.grad(dense_loss)(lorax.split(lp)[0])
    assert_close(grads, expected_grads, ulps=512,
                 scale=max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(expected_grads)))


def test_eager_calls_run_the_rule_on_each_layer(counted_dot):
    lp = _wrapped()
    x = jnp.ones((3, 8), jnp.float32)
    y = lorax.lora(lambda p, x: _layers(x, p))(lp, x)
    assert len(counted_dot) == N_LAYERS  # concrete operands: bound as they come, not staged
    assert_close(y, _layers(x, dense_params(lp)), ulps=256)


def test_a_misused_kernel_still_names_its_path_under_jit():
    # Wrapped as (in, in, out), used with axis 0 kept: the staged rule fails, and the
    # error (raised by the direct call) names the kernel and the spec that fits.
    lp = lorax.wrap({"proj": {"kernel": jnp.ones((4, 8, 6))}}, rank=2, axes={"proj": "iio"})
    fn = lorax.lora(lambda p, x: jnp.einsum("bd,ndh->bnh", x, p["proj"]["kernel"]))
    with pytest.raises(ValueError, match=r"proj/kernel.*axes=\{'\^proj/kernel\$': 'oio'\}"):
        jax.jit(fn)(lp, jnp.ones((3, 8)))
