"""The low-rank term's lowering (:mod:`lorax.lowrank`): values and gradients against dense
math, and what it costs on the benchmark's GPT (XLA cost analysis, deterministic).

The consumer rules' outputs and factor gradients for every layout the library supports (Dense,
DenseGeneral, MHA, einsum, conv, embed lookup/attend, scanned and vmapped stacks, Gemma einsums,
routed adapters, DoRA, nf4/int8 bases) are checked against dense math in
``test_lora_transform``, ``test_layouts``, ``test_routing``, ``test_dora`` and
``test_quantize``; this file checks the lowering's own building blocks and its cost.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest
from helpers import assert_close

import lorax
from experiments import gpt
from experiments.bench import handwritten
from experiments.bench.cost import abstract, compile_step, handwritten_cost, lora_cost
from experiments.bench.steps import make_steps
from experiments.bench.workloads import gpt_workload
from lorax import lowrank


def _normal(seed: int, shape, dtype=jnp.float32) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _dense_term(x, first, second, n_batch, n_free_stack, scale):
    """``s·(x·first)·second`` by one einsum over named axes (the independent reference)."""
    letters = iter("abcdefghijklmnopq")
    batch = "".join(next(letters) for _ in range(n_batch))
    stack = "".join(next(letters) for _ in range(n_free_stack))
    n_contract = first.ndim - n_batch - n_free_stack - 1
    contract = "".join(next(letters) for _ in range(n_contract))
    free = "".join(next(letters) for _ in range(x.ndim - n_batch - n_contract))
    out = "".join(next(letters) for _ in range(second.ndim - n_batch - n_free_stack - 1))
    spec = (f"{batch}{free}{contract},{batch}{stack}{contract}z,{batch}{stack}z{out}"
            f"->{batch}{stack}{free}{out}")
    return scale * jnp.einsum(spec, x, first, second, precision="highest")


# (x shape, first shape, second shape, n_batch, n_free_stack): Dense on (B, T, d); the attention
# output projection (two contracted axes) and q/k/v (two output axes); a vmapped stack (one
# batch axis); Gemma's k/v selector (a free stack axis); rank above the epilogue's limit.
TERMS = {
    "dense": ((2, 3, 5), (5, 4), (4, 6), 0, 0),
    "two_contracted": ((2, 3, 4, 5), (4, 5, 3), (3, 6), 0, 0),
    "two_out": ((2, 3, 5), (5, 3), (3, 2, 4), 0, 0),
    "batched_stack": ((3, 2, 4, 5), (3, 5, 2), (3, 2, 6), 1, 0),
    "free_stack": ((2, 3, 5), (2, 5, 3), (2, 3, 4, 2), 0, 1),
    "high_rank": ((4, 5), (5, lowrank.EPILOGUE_MAX_RANK + 1),
                  (lowrank.EPILOGUE_MAX_RANK + 1, 3), 0, 0),
}


@pytest.mark.parametrize("name", sorted(TERMS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowrank_term_and_gradients_match_dense_math(name, dtype):
    x_shape, f_shape, s_shape, nb, nf = TERMS[name]
    x, first, second = (_normal(k, s, dtype) for k, s in enumerate((x_shape, f_shape, s_shape)))
    cotangent = _normal(9, jax.eval_shape(
        lambda *a: _dense_term(*a, nb, nf, 0.5), x, first, second).shape, dtype)

    def term(fn, x, first, second):
        return jnp.vdot(fn(x, first, second).astype(jnp.float32),
                        cotangent.astype(jnp.float32))

    ours = functools.partial(lowrank.lowrank_term, n_batch=nb, n_free_stack=nf, scale=0.5)
    dense = functools.partial(_dense_term, n_batch=nb, n_free_stack=nf, scale=0.5)
    assert_close(ours(x, first, second), dense(x.astype(jnp.float32), first.astype(jnp.float32),
                                               second.astype(jnp.float32)), dtype=dtype)
    grads = jax.grad(functools.partial(term, ours), argnums=(0, 1, 2))(x, first, second)
    expected = jax.grad(functools.partial(term, dense), argnums=(0, 1, 2))(
        *(v.astype(jnp.float32) for v in (x, first, second)))
    for got, want in zip(grads, expected, strict=True):
        assert got.dtype == dtype
        assert_close(got, want, dtype=dtype)


@pytest.mark.parametrize("feature", [0, 1, 2])
def test_feature_product_matches_dense_math(feature):
    t = _normal(0, (3, 4, 5)[:feature] + (2,) + (3, 4, 5)[feature:])
    second = _normal(1, (2, 6))
    got = lowrank.feature_product(t, second, feature)
    want = jnp.moveaxis(jnp.tensordot(jnp.moveaxis(t, feature, -1), second, 1), -1, feature)
    assert_close(got, want)
    g = jax.grad(lambda t, s: (lowrank.feature_product(t, s, feature) * want).sum(),
                 argnums=(0, 1))(t, second)
    g_ref = jax.grad(lambda t, s: (jnp.moveaxis(jnp.tensordot(
        jnp.moveaxis(t, feature, -1), s, 1), -1, feature) * want).sum(), argnums=(0, 1))(t, second)
    assert_close(g, g_ref)


def test_handwritten_step_is_the_same_lora():
    """The benchmark's bar is the same model: the hand-written loss and its factor gradients
    equal lorax's on random factors."""
    config = gpt.GPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=8)
    w = gpt_workload(config, batch_size=2)
    factors = handwritten.init_factors(w.params, 4, jax.random.key(1))
    factors = {path: (a, 0.1 * _normal(k, b.shape))
               for k, (path, (a, b)) in enumerate(sorted(factors.items()))}

    def put(path, node):
        key = "/".join(str(k.key) for k in path)
        return dataclasses.replace(node, a=factors[key][0], b=factors[key][1]) \
            if lorax.is_lora(node) else node

    lp = jax.tree_util.tree_map_with_path(put, lorax.wrap(w.params, 4), is_leaf=lorax.is_lora)
    alpha = lorax.LoRAConfig().alpha
    model = gpt.GPT(config)
    loss, grads = jax.value_and_grad(handwritten.handwritten_loss)(factors, w.params, w.batch,
                                                                   model, alpha)
    lora_loss, lora_grads = lorax.value_and_grad(lorax.lora(w.loss))(lp, w.batch)
    assert_close(loss, lora_loss)
    for path, (ga, gb) in grads.items():
        node = functools.reduce(lambda t, k: t[k], path.split("/"), lora_grads)
        assert_close(node.a, ga, scale=float(jnp.abs(ga).max()))
        assert_close(node.b, gb, scale=float(jnp.abs(gb).max()))


@functools.cache
def _bench_costs():
    w = gpt_workload(abstract_params=True)  # the benchmark's GPT: 4 layers, d=512, batch 8x128
    steps = make_steps(w)
    return {"lora": lora_cost(w, steps, 8, fast=True)[1],
            "handwritten": handwritten_cost(w, steps, 8, fast=True)[1],
            "frozen": compile_step(steps.frozen, abstract(w.params), w.batch, fast=True)[1]}


def test_lora_step_bytes_near_the_frozen_floor():
    # Measured 1.180 (jax 0.10.2, CPU); 1.613 before the flattened, fused lowering.
    c = _bench_costs()
    assert c["lora"].bytes_accessed / c["frozen"].bytes_accessed <= 1.19, c
    assert c["lora"].flops / c["frozen"].flops <= 1.02, c


def test_lora_step_beats_the_handwritten_step():
    # Measured 0.732 of the hand-written step's bytes (whose own ratio to frozen is 1.61), at
    # equal FLOPs (1.002).
    c = _bench_costs()
    assert c["lora"].bytes_accessed / c["handwritten"].bytes_accessed <= 0.76, c
    assert c["lora"].flops / c["handwritten"].flops <= 1.02, c
    assert c["lora"].peak_bytes <= c["handwritten"].peak_bytes, c


@pytest.mark.parametrize("rank", [4, lowrank.EPILOGUE_MAX_RANK + 1])
def test_wide_output_takes_the_merged_kernel_and_matches_dense_math(rank):
    # A vocabulary-head shape: O = 4096 >= MERGE_MIN_OUT and N = 24 > K·O/(K+O) ~ 8.
    x, w = _normal(0, (2, 12, 8)), _normal(1, (8, 4096))
    assert lowrank.merge_pays(24, 8, 4096)
    lp = lorax.wrap({"head": {"kernel": w}}, rank=rank)
    node = lp["head"]["kernel"]
    node = dataclasses.replace(node, b=0.1 * _normal(2, node.b.shape))
    lp = {"head": {"kernel": node}}
    jaxpr = str(jax.make_jaxpr(lorax.lora(lambda p, x: x @ p["head"]["kernel"]))(lp, x))
    assert "merged_product" in jaxpr
    cotangent = _normal(3, (2, 12, 4096))

    def loss(a, b, x, dense):
        if dense:
            return jnp.vdot(x @ (w + node.scale * a @ b), cotangent)
        p = {"head": {"kernel": dataclasses.replace(node, a=a, b=b)}}
        return jnp.vdot(lorax.lora(lambda p, x: x @ p["head"]["kernel"])(p, x), cotangent)

    got = jax.value_and_grad(loss, argnums=(0, 1, 2))(node.a, node.b, x, False)
    want = jax.value_and_grad(loss, argnums=(0, 1, 2))(node.a, node.b, x, True)
    assert_close(got[0], want[0], ulps=256)
    for g, e in zip(got[1], want[1], strict=True):
        assert_close(g, e, ulps=256)
