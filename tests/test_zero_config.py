"""Zero configuration on the shapes of real model code: ``lorax.wrap(params, rank=4)`` and
``lorax.lora(fn)``, no other argument (`tests/real_models.py`).

For each model: the layouts ``wrap`` picks are the ones written down from its einsums and the
ones ``lorax.infer_axes`` reads off the computation; the wrapped model computes the base model
at init and ``lorax.merge``'s model with random factors; XLA counts at most 0.8x the FLOPs of
full fine-tuning for its train step. ``filterwarnings = error`` makes a ``LoRAFallbackWarning``
a failure. Then the other side: unscanned trees that must not be read as stacks, a scan the
tree does not tell (it reaches ``lorax.lora``'s error with the spec), the errors' hints, and
the output-head convention of the default ``targets``.
"""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import real_models
from helpers import assert_close, lora_nodes, perturb_b, wrap_filled

import lorax
from lorax.layouts import stack_hint

RANK = 4
# XLA's cheap CPU settings: the same HLO, half the compile time (as tests/test_layouts.py).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.cache
def built(name: str):
    return real_models.BUILDERS[name]()


@functools.cache
def wrapped(name: str):
    """The zero-config wrap of the model's params, ``a`` random and ``b`` zero."""
    return wrap_filled(built(name)[1], rank=RANK)


def _layouts(lp) -> dict[str, str]:
    return {n.path: n.roles for n in lora_nodes(lp)}


def _resolve(spec: dict[str, str], paths) -> dict[str, str]:
    return {p: layout for key, layout in spec.items() for p in paths if re.search(key, p)}


@pytest.mark.parametrize("name", sorted(real_models.BUILDERS))
def test_zero_config_layouts(name):
    fn, params, x, expected = built(name)
    lp = wrapped(name)
    assert _layouts(lp) == expected
    inferred = _resolve(lorax.infer_axes(fn, params, x), expected)
    assert inferred == expected
    for node in lora_nodes(lp):  # the factors follow the layout
        stack = tuple(n for n, c in zip(node.shape, node.roles, strict=True) if c == "s")
        assert node.a.shape[: len(stack)] == stack and node.b.shape[: len(stack)] == stack


@pytest.mark.parametrize("name", sorted(real_models.BUILDERS))
def test_zero_config_numerics(name):
    fn, params, x, _ = built(name)
    lp = wrapped(name)
    lp_random = perturb_b(lp, 3, std=0.3)
    def run(p, lp, lpr, x):
        return fn(p, x), lorax.lora(fn)(lp, x), lorax.lora(fn)(lpr, x), fn(lorax.merge(lpr), x)

    compiled = jax.jit(run).lower(params, lp, lp_random, x).compile(
        compiler_options=FAST_COMPILE)
    base, at_init, adapted, merged = (np.asarray(v, np.float64)
                                      for v in compiled(params, lp, lp_random, x))
    assert_close(at_init, base, dtype=jnp.float32)  # b = 0: the base, up to summation order
    scale = float(np.max(np.abs(merged)))
    assert float(np.max(np.abs(merged - base))) > 0.05 * scale, "adapter too small to test"
    assert_close(adapted, merged, dtype=jnp.float32)  # 64 eps of float32 times max|output|


def _flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).cost_analysis()
    return float((cost[0] if isinstance(cost, list | tuple) else cost)["flops"])


@pytest.mark.parametrize("name", sorted(real_models.BUILDERS))
def test_zero_config_step_flops(name):
    # At bigger dims (D=256, F=1024; the small ones make rank-4 adapters an eighth of a
    # kernel), from abstract params: lowered, not compiled.
    with real_models.big_and_abstract():
        fn, params, x, _ = real_models.BUILDERS[name]()
        x = jax.ShapeDtypeStruct(x.shape, x.dtype)
        lp = lorax.wrap(params, rank=RANK)
        full, lora = _step_flops(fn, params, lp, x)
    print(f"{name}: lora/full = {lora / full:.3f}")
    assert lora <= 0.8 * full, (lora, full)


def _step_flops(fn, params, lp, x) -> tuple[float, float]:

    def loss(y):
        return jnp.mean(jnp.square(y))

    def full_step(p, x):
        return jax.value_and_grad(lambda p: loss(fn(p, x)))(p)

    def lora_step(t, frozen, x):
        return lorax.value_and_grad(lambda p: loss(lorax.lora(fn)(p, x)))(
            lorax.combine(t, frozen))

    train, frozen = lorax.split(lp)
    return _flops(full_step, params, x), _flops(lora_step, train, frozen, x)


# --- trees that are not scans keep their layouts ------------------------------------------------


def _S(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _linen_abstract(module, *inputs):
    return jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]


class _UnscannedMHA(nn.Module):  # heads == head_dim, no biases: q/k/v (D, N, N)
    @nn.compact
    def __call__(self, x):
        y = nn.MultiHeadDotProductAttention(num_heads=8, qkv_features=64, use_bias=False)(x, x)
        return nn.Dense(64, use_bias=False)(y)


class _ConvNet(nn.Module):  # 1-D convs without bias or norm: every kernel (3, C, C)
    @nn.compact
    def __call__(self, x):
        for _ in range(3):
            x = nn.Conv(16, (3,), use_bias=False)(x)
        return x


UNSCANNED = {
    # T5X-style block: no biases, DenseGeneral q/k/v (D, N, H), out (N, H, D), norms 1-D.
    "t5x_block": {"layers_0": {
        "pre_attention_layer_norm": {"scale": _S(64)},
        "attention": {**{n: {"kernel": _S(64, 8, 8)} for n in ("query", "key", "value")},
                      "out": {"kernel": _S(8, 8, 64)}},
        "pre_mlp_layer_norm": {"scale": _S(64)},
        "mlp": {"wi_0": {"kernel": _S(64, 128)}, "wi_1": {"kernel": _S(64, 128)},
                "wo": {"kernel": _S(128, 64)}}}},
    # Square kernels with DenseGeneral-style 2-D biases sharing every size.
    "square_dense_general": {"proj": {
        "a": {"kernel": _S(8, 8, 8), "bias": _S(8, 8)},
        "b": {"kernel": _S(8, 8, 8), "bias": _S(8, 8)}}},
    "flax_mha_heads_eq_head_dim": _linen_abstract(_UnscannedMHA(), _S(2, 5, 64)),
    "conv1d_stack": _linen_abstract(_ConvNet(), _S(2, 10, 16)),
    "vit_unscanned_blocks": {f"encoderblock_{i}": {
        "LayerNorm_0": {"scale": _S(32), "bias": _S(32)},
        "MlpBlock_0": {"Dense_0": {"kernel": _S(32, 64), "bias": _S(64)},
                       "Dense_1": {"kernel": _S(64, 32), "bias": _S(32)}}} for i in range(3)},
}


@pytest.mark.parametrize("name", sorted(UNSCANNED))
def test_unscanned_trees_have_no_stack_axes(name):
    lp = lorax.wrap(UNSCANNED[name], rank=2)
    layouts = _layouts(lp)
    assert layouts and not any("s" in layout for layout in layouts.values()), layouts


def test_unscanned_gemma_models_keep_their_layouts():
    # The Gemma-library shapes (`w`) and their nnx.Einsum twins (`kernel`) get one layout.
    for leaf in ("w", "kernel"):
        tree = {"attn": {"q_einsum": {leaf: _S(4, 32, 8)}, "kv_einsum": {leaf: _S(2, 1, 32, 8)},
                         "attn_vec_einsum": {leaf: _S(4, 8, 32)}}}
        assert set(_layouts(lorax.wrap(tree, rank=2)).values()) == {"oio", "soio", "iio"}


def test_axis_names_settle_the_stack():
    from lorax.stacks import stack_axes

    # nn.scan without metadata_params leaves the scan's axis unnamed (None): the shapes decide.
    leaves = [("l/a/kernel", (8, 3, 16), ("embed", None, "mlp")),
              ("l/b/kernel", (16, 3, 8), ("mlp", None, "embed")),
              ("l/norm/scale", (8, 3), ("norm", None))]
    assert stack_axes(leaves, ["l/a/kernel", "l/b/kernel"]) == {"l/a/kernel": (1,),
                                                               "l/b/kernel": (1,)}
    # Names on every axis, none layer-like: no stack, even under a module named `layers`.
    tree = {"layers": {"fc": {"kernel": nn.Partitioned(_S(3, 8, 16), ("a", "b", "c"))}}}
    assert _layouts(lorax.wrap(tree, rank=2)) == {"layers/fc/kernel": "iio"}
    tree = {"layers": {"fc": {"kernel": nn.Partitioned(_S(8, 3, 16), (None, "stack", None))}}}
    assert _layouts(lorax.wrap(tree, rank=2)) == {"layers/fc/kernel": "iso"}


# --- what the tree does not tell reaches lora(fn)'s error with the spec -------------------------


class _BareBody(nn.Module):  # no norm, no bias: nothing in the tree says "scanned"
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(32, use_bias=False)(jnp.tanh(nn.Dense(32, use_bias=False)(x)))
                        ), None


class _BareScan(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.scan(_BareBody, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=3)(name="trunk")(x, None)[0]


def test_undetected_scan_names_the_spec():
    model = _BareScan()
    x = jnp.ones((2, 32))
    params = _linen_abstract(model, x)

    def fn(p, x):
        return model.apply({"params": p}, x)

    lp = lorax.wrap(params, rank=RANK)
    assert set(_layouts(lp).values()) == {"iio"}  # (3, 32, 32): no guess at a stack
    with pytest.raises(ValueError, match=r"axes=\{'\^trunk/Dense_\d/kernel\$': 'sio'") as err:
        jax.eval_shape(lorax.lora(fn), lp, x)
    assert "infer_axes" in str(err.value)
    # The README's one line for such trees.
    lp = lorax.wrap(params, rank=RANK, axes=lorax.infer_axes(fn, params, x))
    assert set(_layouts(lp).values()) == {"sio"}
    jax.eval_shape(lorax.lora(fn), lp, x)


def test_wrap_errors_name_infer_axes_for_a_missed_stack():
    assert stack_hint("blocks/query/kernel", (2, 64, 4, 16), "iooo") == (
        " If axis 0 (size 2) stacks layers (nn.scan), pass axes={'^blocks/query/kernel$': "
        "'sioo'}, or axes=lorax.infer_axes(fn, params, *args) to read every kernel's layout "
        "off the model.")
    assert stack_hint("fc/kernel", (64, 32), "io") == ""
    with pytest.raises(ValueError, match="infer_axes") as err:
        lorax.wrap({"blocks": {"fc": {"kernel": _S(3, 32, 32)}}}, rank=2, axes="io")
    assert "'io' at 'blocks/fc/kernel'" in str(err.value)


# --- the output-head convention of targets=None -----------------------------------------------


def test_default_targets_leave_language_model_heads_out():
    tree = {"layers_0": {"mlp": {"kernel": _S(16, 32)}},
            "lm_head": {"kernel": _S(16, 100)},
            "decoder": {"logits_dense": {"kernel": _S(16, 100)}},
            "logitdense": {"kernel": _S(16, 100)},
            "head": {"kernel": _S(16, 10)}}
    assert sorted(_layouts(lorax.wrap(tree, rank=2))) == ["head/kernel", "layers_0/mlp/kernel"]
    explicit = lorax.wrap(tree, rank=2, targets=["lm_head", "mlp"])
    assert sorted(_layouts(explicit)) == ["layers_0/mlp/kernel", "lm_head/kernel"]
    only = {"lm_head": {"kernel": _S(16, 100)}}
    with pytest.raises(ValueError, match="no leaf was selected"):
        lorax.wrap(only, rank=2)
