"""`lorax.wrap`: factor shapes, selection, patterns, initialisation, inputs and every bad input.

Most trees here are abstract (``jax.ShapeDtypeStruct``) so the tests compile nothing; the
initialisation tests use concrete arrays.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import FrozenDict
from helpers import assert_close, bits, lora_nodes

import lorax

F32 = jnp.float32


def S(*shape, dtype=F32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def _abstract(module: nn.Module, *shapes) -> dict:
    args = [jnp.zeros(s) for s in shapes]
    return jax.eval_shape(module.init, jax.random.key(0), *args)["params"]


def _nodes_by_path(tree) -> dict[str, lorax.LoRA]:
    return {n.path: n for n in lora_nodes(tree)}


def _shapes(node: lorax.LoRA) -> tuple:
    return tuple(node.a.shape), tuple(node.b.shape), node.n_stack, node.n_in


# --- factor shapes ----------------------------------------------------------------------------


def test_dense_factor_shapes():
    lp = lorax.wrap(_abstract(nn.Dense(8), (2, 16)), rank=4)
    (node,) = lora_nodes(lp)
    assert node.path == "kernel"
    assert _shapes(node) == ((16, 4), (4, 8), 0, 1)
    assert isinstance(node.a, jax.ShapeDtypeStruct) and node.a.dtype == F32


def test_dense_general_factor_shapes():
    features = lorax.wrap(_abstract(nn.DenseGeneral((2, 3)), (2, 5)), rank=4, in_axes=1)
    assert _shapes(lora_nodes(features)[0]) == ((5, 4), (4, 2, 3), 0, 1)
    axes = lorax.wrap(_abstract(nn.DenseGeneral(4, axis=(-2, -1)), (3, 2, 5)), rank=3)
    assert _shapes(lora_nodes(axes)[0]) == ((2, 5, 3), (3, 4), 0, 2)


def test_mha_factor_shapes():
    params = _abstract(nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16), (1, 3, 8))
    nodes = _nodes_by_path(lorax.wrap(params, rank=2))
    assert sorted(nodes) == ["key/kernel", "out/kernel", "query/kernel", "value/kernel"]
    for name in ("query", "key", "value"):
        assert _shapes(nodes[f"{name}/kernel"]) == ((8, 2), (2, 4, 4), 0, 1)
    assert _shapes(nodes["out/kernel"]) == ((4, 4, 2), (2, 8), 0, 2)


def test_conv_factor_shapes():
    nodes = lora_nodes(lorax.wrap(_abstract(nn.Conv(6, (3, 3)), (1, 5, 5, 4)), rank=2))
    assert _shapes(nodes[0]) == ((3, 3, 4, 2), (2, 6), 0, 3)
    nodes = lora_nodes(lorax.wrap(_abstract(nn.Conv(6, (3,)), (1, 5, 4)), rank=2))
    assert _shapes(nodes[0]) == ((3, 4, 2), (2, 6), 0, 2)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.Dense(8)(x), None


class _Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=5)
        return scan(name="layers")(x, None)[0]


def test_stacked_factor_shapes():
    params = _abstract(_Stack(), (2, 8))
    assert params["layers"]["Dense_0"]["kernel"].shape == (5, 8, 8)
    (node,) = lora_nodes(lorax.wrap(params, rank=2, stacked={"layers": 1}))
    assert _shapes(node) == ((5, 8, 2), (5, 2, 8), 1, 1)
    # The rank bound ignores stack axes: min(in, out) = 8, not 5.
    lorax.wrap(params, rank=8, stacked={"layers": 1})
    # Two stack axes (e.g. nested scans) leave a (4, 6) kernel per layer.
    (node,) = lora_nodes(lorax.wrap({"w": {"kernel": S(2, 3, 4, 6)}}, rank=2, stacked={"w": 2}))
    assert _shapes(node) == ((2, 3, 4, 2), (2, 3, 2, 6), 2, 1)


# --- selection ----------------------------------------------------------------------------


def _mixed_tree() -> dict:
    return {
        "embed": {"embedding": S(100, 16)},
        "dense": {"kernel": S(16, 32), "bias": S(32)},
        "ln": {"scale": S(32), "bias": S(32)},
        "head": {"kernel": S(32, 10), "bias": S(10)},
        "odd": {"kernel": S(32)},  # a 1-D "kernel": never adapted by default
        "ids": {"kernel": S(4, 4, dtype=jnp.int32)},  # an integer "kernel": never adapted
        "counter": 3,  # not an array at all
    }


def test_default_targets_pick_only_float_kernels():
    lp = lorax.wrap(_mixed_tree(), rank=2)
    assert sorted(_nodes_by_path(lp)) == ["dense/kernel", "head/kernel"]
    assert isinstance(lp["embed"]["embedding"], jax.ShapeDtypeStruct)
    assert lp["counter"] == 3


def test_regex_list_and_callable_targets():
    tree = _mixed_tree()
    assert sorted(_nodes_by_path(lorax.wrap(tree, rank=2, targets="dense"))) == ["dense/kernel"]
    by_list = lorax.wrap(tree, rank=2, targets=["^dense/", "embedding"])
    assert sorted(_nodes_by_path(by_list)) == ["dense/kernel", "embed/embedding"]

    def pick(path, leaf):
        return path.endswith("kernel") and leaf.ndim == 2 and leaf.shape[0] == 32 and \
            jnp.issubdtype(leaf.dtype, jnp.floating)

    assert sorted(_nodes_by_path(lorax.wrap(tree, rank=2, targets=pick))) == ["head/kernel"]


def test_exclude():
    lp = lorax.wrap(_mixed_tree(), rank=2, exclude="head")
    assert sorted(_nodes_by_path(lp)) == ["dense/kernel"]
    lp = lorax.wrap(_mixed_tree(), rank=2, targets=["kernel", "embedding"], exclude=["^head/"])
    assert sorted(_nodes_by_path(lp)) == ["dense/kernel", "embed/embedding"]
    # A callable exclude sees the leaf too.
    lp = lorax.wrap(_mixed_tree(), rank=2, exclude=lambda path, leaf: leaf.shape[-1] == 10)
    assert sorted(_nodes_by_path(lp)) == ["dense/kernel"]


def test_regex_targets_on_attention_adapt_only_kernels():
    # PEFT-style module names: target_modules=["query", "value"] adapts those projections'
    # weight matrices. Flax attention biases are 2-D (heads, head_dim) but are not kernels: a
    # LoRA node there is consumed by `add`, which cannot be factorized.
    params = _abstract(nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16), (1, 3, 8))
    lp = lorax.wrap(params, rank=2, targets=["query", "value"])
    assert sorted(_nodes_by_path(lp)) == ["query/kernel", "value/kernel"]


def test_train_leaves_are_boxed_and_take_precedence():
    lp = lorax.wrap(_mixed_tree(), rank=2, train=["^head/", "^ln/scale"])
    assert sorted(_nodes_by_path(lp)) == ["dense/kernel"]
    for leaf in (lp["head"]["kernel"], lp["head"]["bias"], lp["ln"]["scale"]):
        assert isinstance(leaf, lorax.FullyTrained)
    assert isinstance(lp["ln"]["bias"], jax.ShapeDtypeStruct)
    assert lorax.summary(lp).fully_trained == ("head/bias", "head/kernel", "ln/scale")


# --- patterns and scales ------------------------------------------------------------------


def _qkv_tree() -> dict:
    return {name: {"kernel": S(64, 64)} for name in ("query", "key", "value", "qproj")}


def test_rank_and_alpha_patterns_first_match_wins():
    lp = lorax.wrap(
        _qkv_tree(), rank=8, alpha=16.0,
        rank_pattern={"query": 2, "q": 4, ".*": 16},  # "query" also matches "q" and ".*"
        alpha_pattern={"^value": 3.0, "^k|value": 5.0},  # "value" matches both: first wins
    )
    nodes = _nodes_by_path(lp)
    assert {p: n.rank for p, n in nodes.items()} == {
        "query/kernel": 2, "qproj/kernel": 4, "key/kernel": 16, "value/kernel": 16,
    }
    assert nodes["query/kernel"].a.shape == (64, 2) and nodes["query/kernel"].b.shape == (2, 64)
    scales = {p: n.scale for p, n in nodes.items()}
    assert scales == {
        "query/kernel": 16.0 / 2,  # alpha from the default, rank from the pattern
        "qproj/kernel": 16.0 / 4,
        "key/kernel": 5.0 / 16,
        "value/kernel": 3.0 / 16,
    }


def test_rslora_scale():
    nodes = _nodes_by_path(lorax.wrap(_qkv_tree(), rank=16, alpha=8.0, rslora=True,
                                      rank_pattern={"key": 4}))
    assert_close(nodes["query/kernel"].scale, 8.0 / math.sqrt(16))
    assert_close(nodes["key/kernel"].scale, 8.0 / math.sqrt(4))
    plain = _nodes_by_path(lorax.wrap(_qkv_tree(), rank=16, alpha=8.0))
    assert plain["query/kernel"].scale == 0.5


# --- initialisation -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_kernel() -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).standard_normal((4096, 16)), F32)


def test_kaiming_init(big_kernel):
    (node,) = lora_nodes(lorax.wrap({"kernel": big_kernel}, rank=8))
    a = np.asarray(node.a, np.float64)
    bound = 1.0 / math.sqrt(4096)
    assert a.shape == (4096, 8)
    assert np.all(np.abs(a) <= bound)
    assert np.max(np.abs(a)) > 0.99 * bound  # uses the whole interval
    # U(-bound, bound) has variance bound^2 / 3; with 32768 draws the estimate is within ~1%.
    assert np.var(a) == pytest.approx(bound**2 / 3, rel=0.05)
    assert abs(np.mean(a)) < 0.05 * bound
    # Roughly uniform: each tenth of the interval holds ~10% of the draws.
    hist, _ = np.histogram(a, bins=10, range=(-bound, bound))
    assert np.all(np.abs(hist / a.size - 0.1) < 0.01)
    assert not np.any(np.asarray(node.b)) and node.b.shape == (8, 16)


def test_kaiming_fan_in_spans_all_input_axes():
    w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 64, 8)), F32)
    (node,) = lora_nodes(lorax.wrap({"conv": {"kernel": w}}, rank=4))
    a = np.asarray(node.a)
    bound = 1.0 / math.sqrt(3 * 3 * 64)
    assert np.all(np.abs(a) <= bound) and np.max(np.abs(a)) > 0.99 * bound


def test_gaussian_init(big_kernel):
    (node,) = lora_nodes(lorax.wrap({"kernel": big_kernel}, rank=8, init="gaussian"))
    a = np.asarray(node.a, np.float64)
    assert np.std(a) == pytest.approx(1 / 8, rel=0.03)
    assert abs(np.mean(a)) < 0.01
    assert np.max(np.abs(a)) > 3 / 8  # unbounded, unlike the uniform init
    assert not np.any(np.asarray(node.b))


def test_dtype_argument():
    w = jnp.ones((8, 8), F32)
    (node,) = lora_nodes(lorax.wrap({"kernel": w}, rank=2, dtype=jnp.bfloat16))
    assert node.a.dtype == node.b.dtype == jnp.bfloat16 and node.w.dtype == F32
    # Default: the kernel's dtype promoted to at least float32 (PEFT's autocast_adapter_dtype).
    for half in (jnp.bfloat16, jnp.float16):
        (node,) = lora_nodes(lorax.wrap({"kernel": w.astype(half)}, rank=2))
        assert node.a.dtype == node.b.dtype == F32 and node.w.dtype == half
    (node,) = lora_nodes(lorax.wrap({"kernel": w.astype(jnp.bfloat16)}, rank=2,
                                    dtype=jnp.bfloat16))
    assert node.a.dtype == node.b.dtype == jnp.bfloat16
    (node,) = lora_nodes(lorax.wrap({"kernel": S(8, 8)}, rank=2, dtype=jnp.float16))
    assert node.a.dtype == node.b.dtype == jnp.float16


def test_same_key_bit_identical_different_keys_differ():
    params = {"a": {"kernel": jnp.ones((16, 8))}, "b": {"kernel": jnp.ones((16, 8))}}
    one = _nodes_by_path(lorax.wrap(params, rank=4, key=jax.random.key(3)))
    two = _nodes_by_path(lorax.wrap(params, rank=4, key=jax.random.key(3)))
    other = _nodes_by_path(lorax.wrap(params, rank=4, key=jax.random.key(4)))
    default = _nodes_by_path(lorax.wrap(params, rank=4))
    zero = _nodes_by_path(lorax.wrap(params, rank=4, key=jax.random.key(0)))
    for path in one:
        assert bits(one[path].a) == bits(two[path].a)
        assert bits(one[path].a) != bits(other[path].a)
        assert bits(default[path].a) == bits(zero[path].a)  # key=None means key(0)
    # Same-shaped kernels at different paths get different factors.
    assert bits(one["a/kernel"].a) != bits(one["b/kernel"].a)
    # A leaf's factors depend on its path, not on which other leaves the tree holds.
    alone = _nodes_by_path(lorax.wrap({"b": params["b"]}, rank=4, key=jax.random.key(3)))
    assert bits(alone["b/kernel"].a) == bits(one["b/kernel"].a)


# --- inputs -----------------------------------------------------------------------------------


def test_w_is_the_input_array_and_input_untouched():
    params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
    lp = lorax.wrap(params, rank=2)
    assert lp["dense"]["kernel"].w is params["dense"]["kernel"]
    assert lp["dense"]["bias"] is params["dense"]["bias"]
    assert not lorax.is_lora(params["dense"]["kernel"])


def test_frozendict_input():
    params = FrozenDict({"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}})
    lp = lorax.wrap(params, rank=2)
    assert isinstance(lp, FrozenDict)
    assert lp["dense"]["kernel"].w is params["dense"]["kernel"]
    assert lp["dense"]["kernel"].path == "dense/kernel"
    assert jax.tree.structure(lorax.unwrap(lp)) == jax.tree.structure(params)


def test_nnx_state_input():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(8, 16, rngs=rngs)
            self.norm = nnx.LayerNorm(16, rngs=rngs)
            self.down = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return self.down(self.norm(self.up(x)))

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Model(nnx.Rngs(0))))
    lp = lorax.wrap(state, rank=2)
    assert isinstance(lp, nnx.State)
    nodes = _nodes_by_path(lp)
    assert sorted(nodes) == ["down/kernel", "up/kernel"]  # no '.value' in paths
    assert _shapes(nodes["up/kernel"]) == ((8, 2), (2, 16), 0, 1)
    unwrapped = lorax.unwrap(lp)
    assert jax.tree.structure(unwrapped) == jax.tree.structure(state)
    nnx.merge(graphdef, unwrapped)  # still a valid state for the graph


LLAMA_LAYERS, D, FFN, VOCAB = 32, 4096, 11008, 32000


def _llama_7b() -> dict:
    layer = {
        "self_attn": {f"{n}_proj": {"kernel": S(D, D)} for n in ("q", "k", "v", "o")},
        "mlp": {
            "gate_proj": {"kernel": S(D, FFN)},
            "up_proj": {"kernel": S(D, FFN)},
            "down_proj": {"kernel": S(FFN, D)},
        },
        "input_layernorm": {"scale": S(D)},
        "post_attention_layernorm": {"scale": S(D)},
    }
    return {
        "embed_tokens": {"embedding": S(VOCAB, D)},
        "layers": [layer for _ in range(LLAMA_LAYERS)],
        "norm": {"scale": S(D)},
        "lm_head": {"kernel": S(D, VOCAB)},
    }


def test_llama_7b_abstract():
    abstract = _llama_7b()
    r = 8
    per_layer = r * (4 * (D + D) + 2 * (D + FFN) + (FFN + D))
    expected_trainable = LLAMA_LAYERS * per_layer
    assert expected_trainable == 19_988_480
    expected_total = (
        LLAMA_LAYERS * (4 * D * D + 3 * D * FFN + 2 * D) + 2 * VOCAB * D + D
    )
    assert expected_total == 6_738_415_616  # Llama-2-7B's published parameter count

    for lp in (
        jax.eval_shape(lambda p: lorax.wrap(p, rank=8, exclude="lm_head"), abstract),
        lorax.wrap(abstract, rank=8, exclude="lm_head"),
    ):
        nodes = _nodes_by_path(lp)
        assert len(nodes) == LLAMA_LAYERS * 7
        q = nodes["layers/0/self_attn/q_proj/kernel"]
        assert isinstance(q.a, jax.ShapeDtypeStruct)
        assert _shapes(q) == ((D, 8), (8, D), 0, 1)
        assert _shapes(nodes["layers/31/mlp/down_proj/kernel"]) == ((FFN, 8), (8, D), 0, 1)
        assert _shapes(nodes["layers/5/mlp/gate_proj/kernel"]) == ((D, 8), (8, FFN), 0, 1)
        summary = lorax.summary(lp)
        assert summary.trainable == expected_trainable
        assert summary.frozen == expected_total
        assert summary.trainable_bytes == 4 * expected_trainable
        assert len(summary.adapted) == LLAMA_LAYERS * 7


# --- bad inputs ---------------------------------------------------------------------------


def _small() -> dict:
    return {
        "dense": {"kernel": S(16, 4), "bias": S(4)},
        "query": {"kernel": S(8, 8), "bias": S(8)},
    }


def _raises(exc, *needles, tree=None, **kw):
    with pytest.raises(exc) as err:
        lorax.wrap(_small() if tree is None else tree, **kw)
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in message: {msg}"
    return msg


@pytest.mark.parametrize("rank", [0, -1, True, 2.5, "8"])
def test_bad_rank(rank):
    _raises(ValueError, "`rank`", rank=rank)


def test_rank_larger_than_kernel_is_allowed_as_in_peft():
    # A Dense(4) at rank 5: a (16, 5), b (5, 4) are well defined; the adapter's product has
    # rank <= 4, and lorax.lora computes what the merged kernel computes.
    lp = lorax.wrap({"dense": {"kernel": jnp.ones((16, 4))}}, rank=5, init="gaussian")
    node = lp["dense"]["kernel"]
    assert (node.a.shape, node.b.shape) == ((16, 5), (5, 4))
    lp["dense"]["kernel"] = dataclasses.replace(node, b=jnp.full((5, 4), 0.1))
    x = jnp.linspace(-1.0, 1.0, 32).reshape(2, 16)
    y = lorax.lora(lambda p, x: x @ p["dense"]["kernel"])(lp, x)
    assert_close(y, x @ lorax.merge(lp)["dense"]["kernel"])
    # PiSSA takes W's top-r singular directions: there are only min(in, out).
    msg = _raises(ValueError, "`rank`", "'dense/kernel'", rank=5, init="pissa")
    assert "min(16, 4)" in msg


def test_bad_rank_pattern_values():
    _raises(ValueError, "`rank_pattern`", "'query/kernel'", rank=2, rank_pattern={"query": 0})


def test_bad_alpha():
    _raises(ValueError, "`alpha`", rank=2, alpha=0.0)
    _raises(ValueError, "`alpha`", "'dense/kernel'", rank=2, alpha_pattern={"dense": -1.0})


def test_targets_matching_nothing_lists_paths():
    msg = _raises(ValueError, "`targets`", "'nothing_here'", "available paths", rank=2,
                  targets="nothing_here")
    assert "'dense/kernel'" in msg and "'query/kernel'" in msg


def test_exclude_matching_nothing():
    _raises(ValueError, "`exclude`", "'nothing_here'", "'dense/kernel'", rank=2,
            exclude="nothing_here")


def test_train_matching_nothing():
    _raises(ValueError, "`train`", "'dense/kernel'", rank=2, train="nothing_here")


def test_targets_matching_only_vectors():
    _raises(ValueError, "`targets`", "'query/bias'", rank=2, targets="query/bias")


def test_callable_target_selecting_int_leaf():
    tree = {**_small(), "ids": {"kernel": S(4, 4, dtype=jnp.int32)}}
    _raises(ValueError, "`targets`", "'ids/kernel'", tree=tree, rank=2,
            targets=lambda path, leaf: path.endswith("kernel"))


def test_callable_target_returning_non_bool():
    _raises(TypeError, "`targets`", rank=2, targets=lambda path, leaf: 1)


def test_unknown_init():
    _raises(ValueError, "`init`", "'orthogonal'", rank=2, init="orthogonal")


@pytest.mark.parametrize("in_axes", [0, -1, True])
def test_bad_in_axes_int(in_axes):
    _raises(ValueError, "`in_axes`", rank=2, in_axes=in_axes)


def test_in_axes_too_large():
    _raises(ValueError, "`in_axes`", "'dense/kernel'", rank=2, in_axes=2)
    _raises(ValueError, "`in_axes`", "'query/kernel'", rank=2, in_axes={"query": 0})
    _raises(ValueError, "`in_axes`", "'query/kernel'", rank=2, in_axes={"query": 3})


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_bad_dropout(dropout):
    _raises(ValueError, "`dropout`", rank=2, dropout=dropout)


def test_stacked_leaving_too_few_axes():
    _raises(ValueError, "`stacked`", "'dense/kernel'", rank=2, stacked={"dense": 1})
    _raises(ValueError, "`stacked`", "'dense/kernel'", rank=2, stacked={"dense": -1})


def test_already_wrapped_input():
    lp = lorax.wrap(_small(), rank=2)
    _raises(ValueError, "`params`", "'dense/kernel'", tree=lp, rank=2)
    partly = {**_small(), "dense": lp["dense"]}
    _raises(ValueError, "'dense/kernel'", tree=partly, rank=2)


@pytest.mark.parametrize("argname", ["rank_pattern", "alpha_pattern", "stacked", "in_axes"])
@pytest.mark.parametrize("value", [3, [("dense", 2)]])
def test_non_dict_pattern_maps(argname, value):
    if argname == "in_axes" and isinstance(value, int):
        value = 3.5  # an int is a valid in_axes
    with pytest.raises((TypeError, ValueError)) as err:
        lorax.wrap(_small(), rank=2, **{argname: value})
    assert f"`{argname}`" in str(err.value), str(err.value)


@pytest.mark.parametrize("argname", ["targets", "exclude", "train", "rank_pattern"])
def test_invalid_regex(argname):
    value = {"(": 2} if argname == "rank_pattern" else "("
    _raises(ValueError, f"`{argname}`", "'('", rank=2, **{argname: value})


def test_pattern_map_key_matching_no_adapted_leaf():
    _raises(ValueError, "`rank_pattern`", "'nope'", rank=2, rank_pattern={"nope": 2})
    _raises(ValueError, "`stacked`", "'bias'", rank=2, stacked={"bias": 1})


def test_bad_rslora():
    _raises(TypeError, "`rslora`", rank=2, rslora="yes")


def test_non_float_factor_dtype():
    # Integer factors would be all zero after the cast: nothing could ever train.
    _raises((TypeError, ValueError), "`dtype`", rank=2, dtype=jnp.int32)


def test_no_floating_kernel_at_all():
    _raises(ValueError, "no leaf", tree={"ids": S(4, 4, dtype=jnp.int32)}, rank=2)
