"""QLoRA-style quantized frozen bases: `lorax.quantize` against an independent NumPy codec."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cost_model import abstract_params, full_step_flops, lora_step_flops
from helpers import assert_close, dense_delta, lora_nodes

import lorax
from lorax import quantized as qz

# QLoRA, appendix E (NF4 data type), as printed in the paper.
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def numpy_roundtrip(x: np.ndarray, kind: str, block: int) -> np.ndarray:
    """Quantize + dequantize with plain NumPy: argmin over the levels, per-block absmax."""
    flat = np.asarray(x, np.float64).ravel()
    pad = -len(flat) % block
    blocks = np.concatenate([flat, np.zeros(pad)]).reshape(-1, block)
    absmax = np.abs(blocks).max(1, keepdims=True)
    absmax[absmax == 0] = 1.0
    normed = blocks / absmax
    if kind == "int8":
        out = np.round(normed * 127) / 127
    else:
        levels = np.asarray(PAPER_NF4)
        out = levels[np.abs(normed[..., None] - levels).argmin(-1)]
    return (out * absmax).ravel()[: flat.size].reshape(x.shape)


def _kernel(shape, seed):
    return jnp.asarray(0.05 * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.fixture(scope="module")
def params():
    return {"up": {"kernel": _kernel((64, 96), 0), "bias": jnp.zeros(96)},
            "down": {"kernel": _kernel((96, 48), 1), "bias": jnp.zeros(48)}}


def _apply(p, x):
    h = jax.nn.gelu(x @ p["up"]["kernel"] + p["up"]["bias"][None])
    return h @ p["down"]["kernel"] + p["down"]["bias"][None]


X = jnp.asarray(np.random.default_rng(9).standard_normal((8, 64)), jnp.float32)


def _dequantized(tree):
    return jax.tree.map(lambda n: dataclasses.replace(n, w=n.w.dequantize())
                        if lorax.is_lora(n) else n, tree, is_leaf=lorax.is_lora)


def _perturb(tree):
    rng = np.random.default_rng(4)
    return jax.tree.map(
        lambda n: dataclasses.replace(n, b=jnp.asarray(0.05 * rng.standard_normal(n.b.shape),
                                                       jnp.float32))
        if lorax.is_lora(n) else n, tree, is_leaf=lorax.is_lora)


def test_nf4_levels_are_the_papers():
    assert_close(qz.NF4_LEVELS, PAPER_NF4, dtype=jnp.float32, ulps=8)  # printed f32 values


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("shape", [(64, 96), (3, 7, 5)])  # the second is not a block multiple
def test_codec_matches_numpy(kind, shape):
    x = _kernel(shape, 2)
    q = qz.quantize_array(x, kind, 16)
    assert q.dequantize().shape == shape and q.dequantize().dtype == jnp.float32
    assert_close(q.dequantize(), numpy_roundtrip(np.asarray(x), kind, 16))


def test_memory_ratio_and_output_error(params):
    lp = lorax.wrap(params, rank=4)
    w_bytes = sum(n.w.nbytes for n in lora_nodes(lp))
    ratios, errors = {}, {}
    reference = _apply(params, X)
    for kind in ("int8", "nf4"):
        q = lorax.quantize(lp, kind, block_size=64)
        ratios[kind] = w_bytes / sum(n.w.nbytes for n in lora_nodes(q))
        out = lorax.lora(_apply)(q, X)
        errors[kind] = float(jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference))
    bf16 = lorax.quantize(jax.tree.map(
        lambda n: dataclasses.replace(n, w=n.w.astype(jnp.bfloat16)) if lorax.is_lora(n) else n,
        lp, is_leaf=lorax.is_lora), "nf4")
    ratio_bf16 = w_bytes / 2 / sum(n.w.nbytes for n in lora_nodes(bf16))
    print(f"W memory: nf4 {ratios['nf4']:.2f}x (bf16 base {ratio_bf16:.2f}x), int8 "
          f"{ratios['int8']:.2f}x; relative output error nf4 {errors['nf4']:.4f}, int8 "
          f"{errors['int8']:.5f}")
    assert ratios["nf4"] == pytest.approx(32 / 4.5) and ratio_bf16 >= 3.5
    assert ratios["int8"] == pytest.approx(32 / 8.5)
    assert errors["nf4"] < 0.2 and errors["int8"] < 0.015
    assert lorax.summary(lorax.quantize(lp, "nf4")).frozen_bytes < lorax.summary(lp).frozen_bytes


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_factorized_compute_on_the_dequantized_base(params, kind):
    q = _perturb(lorax.quantize(lorax.wrap(params, rank=4), kind))
    deq = _dequantized(q)
    with jax.default_matmul_precision("highest"):
        got = lorax.lora(_apply)(q, X)
        want = _apply(lorax.merge(deq), X)
        merged = _apply(lorax.merge(q), X)
    assert_close(got, want)
    assert_close(merged, got)  # merge dequantizes
    for node, plain in zip(lora_nodes(q), lora_nodes(deq), strict=True):
        assert_close(lorax.merge({"k": node})["k"],
                     np.asarray(plain.w) + dense_delta(node.a, node.b, node.scale))
    # Identity at init: b = 0 computes the (dequantized) base model.
    init = lorax.quantize(lorax.wrap(params, rank=4), kind)
    assert_close(lorax.lora(_apply)(init, X), _apply(lorax.merge(init), X))


def test_training_changes_only_factors(params):
    q = lorax.quantize(lorax.wrap(params, rank=4), "nf4")
    train, frozen = lorax.split(q)
    assert train["up"]["kernel"].w is None
    assert frozen["up"]["kernel"].w.codes.dtype == jnp.uint8
    tx = lorax.optimizer(optax.adam(1e-2))

    @jax.jit
    def step(train, state):
        loss = lorax.value_and_grad(lambda p: jnp.mean(lorax.lora(_apply)(p, X) ** 2))
        grads = loss(lorax.combine(train, frozen))[1]
        updates, state = tx.update(grads, state, train)
        return optax.apply_updates(train, updates), state

    new, _ = step(train, tx.init(train))
    after = lorax.combine(new, frozen)
    for old, upd in zip(lora_nodes(q), lora_nodes(after), strict=True):
        assert upd.w is old.w or (np.asarray(upd.w.codes) == np.asarray(old.w.codes)).all()
        assert not (old.b == upd.b).all()  # b = 0 at init: a gets no gradient yet
    assert jax.tree.leaves(lorax.trainable(q["up"]["kernel"])) == [False, True, True]


def test_stacked_kernel_in_scan_and_dora():
    w = _kernel((3, 16, 12), 5)
    lp = lorax.quantize(lorax.wrap({"w": w}, rank=2, targets="w$", stacked={"w": 1},
                                   dora=True), "int8", 32)
    lp = _perturb(lp)
    x = _kernel((4, 16), 6)

    def f(p, x):
        return jax.lax.scan(lambda h, w: (h, h @ w), x, p["w"])[1]

    with jax.default_matmul_precision("highest"):
        got = lorax.lora(f)(lp, x)
        want = jnp.einsum("bi,lio->lbo", x, lorax.merge(lp)["w"])
    assert_close(got, want)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_embedding_lookup_and_moe_experts(kind):
    """Lookups and ragged (MoE) products go through the same quantized frozen product as
    matmuls: the dequantized base plus the factorized term, gradients for the factors only."""
    table, experts = _kernel((64, 32), 8), _kernel((4, 32, 16), 9)
    lp = _perturb(lorax.quantize(lorax.wrap({"embed": {"embedding": table},
                                             "moe": {"experts": experts}}, rank=4,
                                            targets=["embedding", "experts"]), kind, 32))
    ids, sizes = jnp.array([[1, 5, 63], [0, 2, 2]]), jnp.array([1, 2, 0, 3], jnp.int32)

    def f(p, ids):
        h = jnp.take(p["embed"]["embedding"], ids, axis=0).reshape(6, 32)
        return jax.lax.ragged_dot(h, p["moe"]["experts"], sizes)

    deq = _dequantized(lp)
    with jax.default_matmul_precision("highest"):
        assert_close(lorax.lora(f)(lp, ids), f(lorax.merge(deq), ids))
        grads = [jax.grad(lambda t, tree=tree: jnp.sum(lorax.lora(f)(
            lorax.combine(t, lorax.split(tree)[1]), ids) ** 2))(lorax.split(tree)[0])
            for tree in (lp, deq)]
    for got, want in zip(lora_nodes(grads[0]), lora_nodes(grads[1]), strict=True):
        assert got.w is None
        assert_close(got.a, want.a)
        assert_close(got.b, want.b)


def test_quantized_leaf_outside_lora_node():
    w = _kernel((32, 8), 7)
    q = qz.quantize_array(w, "int8", 32)
    got = lorax.lora(lambda p, x: x @ p["w"])({"w": q}, X[:, :32])
    assert_close(got, X[:, :32] @ q.dequantize())


def test_checkpoint_restores_into_float_and_quantized(params, tmp_path):
    lp = _perturb(lorax.wrap(params, rank=4))
    q = lorax.quantize(lp, "nf4")
    lorax.save(tmp_path, q)
    for like in (lorax.wrap(params, rank=4), lorax.quantize(lorax.wrap(params, rank=4), "nf4")):
        back = lorax.restore(tmp_path, like)
        np.testing.assert_array_equal(back["up"]["kernel"].b, lp["up"]["kernel"].b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"kind": "int4"}, "`kind`"), ({"kind": "nf4", "block_size": 3}, "`block_size`"),
     ({"kind": "int8", "block_size": 1}, "`block_size`"),
     ({"kind": "int8", "block_size": 2.0}, "`block_size`")],
)
def test_bad_arguments(params, kwargs, message):
    with pytest.raises(ValueError, match=message):
        lorax.quantize(lorax.wrap(params, rank=4), **kwargs)


def test_bad_trees(params):
    q = lorax.quantize(lorax.wrap(params, rank=4))
    with pytest.raises(ValueError, match="already quantized.*'down/kernel'"):
        lorax.quantize(q)
    with pytest.raises(ValueError, match="LoRA nodes"):
        lorax.quantize(params)


def test_quantized_train_step_flops():
    lp = lorax.quantize(lorax.wrap(abstract_params(), rank=8), "nf4")
    assert isinstance(lp["head"]["kernel"].w, lorax.QuantizedArray)
    ratio = lora_step_flops(lp) / full_step_flops()
    print(f"qlora(nf4)/full = {ratio:.4f}")
    assert ratio <= 0.72
