"""Property tests over random nested parameter trees (hypothesis)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from helpers import assert_trees_equal, bits, lora_nodes
from hypothesis import given, settings
from hypothesis import strategies as st

import lorax

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)

# Shapes range over 2..12; a few sizes rather than all eleven keep the number of distinct
# shapes (each costs XLA compiles of the eager init and merge ops) small.
dims = st.sampled_from([2, 3, 5, 8, 12])
names = st.sampled_from(["attn", "mlp", "layer", "proj", "encoder", "head"])


@st.composite
def modules(draw):
    """A Dense-like module: a 2-D float32 kernel and a 1-D bias; shapes only for now."""
    return {"kernel": (draw(dims), draw(dims)), "bias": (draw(dims),)}


shape_trees = st.recursive(
    modules(),
    lambda children: st.lists(children, min_size=1, max_size=3)
    | st.dictionaries(names, children, min_size=1, max_size=3),
    max_leaves=4,
)


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


@st.composite
def wrapped_cases(draw):
    """(params, rank, train) with concrete arrays and a rank every kernel admits."""
    shapes = draw(shape_trees)
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32), shapes,
                          is_leaf=_is_shape)
    kernels = [s for s in jax.tree.leaves(shapes, is_leaf=_is_shape) if len(s) == 2]
    rank = draw(st.integers(1, min(min(s) for s in kernels)))
    train = draw(st.sampled_from([None, "bias$"]))
    return params, rank, train


@SETTINGS
@given(wrapped_cases())
def test_split_combine_roundtrip(case):
    params, rank, train = case
    lp = lorax.wrap(params, rank=rank, train=train)
    trainable, frozen = lorax.split(lp)
    back = lorax.combine(trainable, frozen)
    assert jax.tree.structure(back) == jax.tree.structure(lp)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(lp), strict=True):
        assert x is y
    # Each half holds exactly its own leaves.
    n_train = sum(1 for m in jax.tree.leaves(lorax.trainable(lp)) if m)
    assert len(jax.tree.leaves(trainable)) == n_train
    assert len(jax.tree.leaves(frozen)) == len(jax.tree.leaves(lp)) - n_train


@SETTINGS
@given(wrapped_cases())
def test_merge_at_init_is_exact_identity(case):
    params, rank, train = case
    merged = lorax.merge(lorax.wrap(params, rank=rank, train=train))
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert_trees_equal(merged, params)


@SETTINGS
@given(wrapped_cases())
def test_unwrap_returns_the_input_leaves(case):
    params, rank, train = case
    lp = lorax.wrap(params, rank=rank, train=train)
    assert len(lora_nodes(lp)) == sum(1 for x in jax.tree.leaves(params) if x.ndim == 2)
    out = lorax.unwrap(lp)
    assert jax.tree.structure(out) == jax.tree.structure(params)
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(params), strict=True):
        assert x is y


@SETTINGS
@given(wrapped_cases(), st.integers(0, 2**31 - 1))
def test_factors_are_a_function_of_the_key(case, seed):
    params, rank, _ = case
    one = lora_nodes(lorax.wrap(params, rank=rank, key=jax.random.key(seed)))
    two = lora_nodes(lorax.wrap(params, rank=rank, key=jax.random.key(seed)))
    other = lora_nodes(lorax.wrap(params, rank=rank, key=jax.random.key(seed + 1)))
    for x, y, z in zip(one, two, other, strict=True):
        assert x.a.shape == (x.w.shape[0], rank) and x.b.shape == (rank, x.w.shape[1])
        assert bits(x.a) == bits(y.a) and bits(x.b) == bits(y.b)
        assert bits(x.a) != bits(z.a)
        assert not np.any(np.asarray(x.b))
