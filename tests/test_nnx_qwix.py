"""lorax against qwix on an NNX model (:mod:`experiments.nnx_transformer`,
:mod:`experiments.bench.nnx_lora`): the plain model trains with NNX's own tools; both LoRA
wrappings compute the base model's function at step 0, train the same number of parameters
with the same step, and leave the base untouched; XLA's cost analysis of the two steps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from experiments import nnx_transformer as nt
from experiments.bench import nnx_lora
from experiments.bench.cost import abstract, compile_step
from tests.helpers import assert_close

pytest.importorskip("qwix")
# qwix 0.1.8 calls flax 0.12.8 APIs that warn (m.iter_modules(), nnx.VariableState).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:qwix")

CONFIG = nt.TransformerConfig()
RANK = 8


def frozen_leaves(model: nnx.Module) -> list[jax.Array]:
    return [jnp.array(x) for x in jax.tree.leaves(nnx.state(model, nnx_lora.FROZEN))]


@pytest.fixture(scope="module")
def built() -> tuple[dict[str, nnx.Module], jax.Array]:
    return nnx_lora.build(CONFIG, RANK, batch_size=4)


def test_plain_nnx_trains_params_and_batch_stats():
    model = nt.Transformer(CONFIG, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    tokens = nt.random_tokens(CONFIG, jax.random.key(1), 4)
    stats = jnp.array(model.blocks.mlp_norm.mean[...])
    step = nnx.jit(nt.train_step, static_argnums=3)
    losses = [float(step(model, optimizer, tokens, nnx.Param)) for _ in range(8)]
    assert losses[-1] < losses[0]
    assert not jnp.allclose(model.blocks.mlp_norm.mean[...], stats)  # training mode updates
    model.eval()
    first = model(tokens)
    assert_close(model(tokens), first, ulps=0)  # no dropout, running statistics only


@pytest.mark.parametrize("variant", [{"remat": True}, {"unroll": True}])
def test_remat_and_unroll_compute_the_same_function(variant):
    tokens = nt.random_tokens(CONFIG, jax.random.key(1), 2)
    base = nt.Transformer(CONFIG, rngs=nnx.Rngs(0))
    other = nt.Transformer(dataclasses.replace(CONFIG, **variant), rngs=nnx.Rngs(0))
    for m in (base, other):
        m.eval()
    assert_close(other(tokens), base(tokens))
    grads = [nnx.jit(nnx.grad(nt.loss_fn))(m, tokens) for m in (base, other)]
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[0]))
    assert_close(grads[1], grads[0], scale=scale)


def test_step_zero_is_the_base_model_and_counts_match(built):
    models, tokens = built
    base = nnx.state(models["frozen"], nnx.Param)
    stats = nnx.state(models["frozen"], nnx.BatchStat)
    assert not nnx.state(models["frozen"], nnx.LoRAParam)  # neither wrapper touched it
    outputs = nnx_lora.step_zero_outputs(models, tokens)
    assert_close(outputs["lorax"], outputs["frozen"], ulps=0)
    assert_close(outputs["qwix"], outputs["frozen"], ulps=0)
    counts = {name: nnx_lora.trainable_count(models[name]) for name in nnx_lora.ADAPTERS}
    assert counts["lorax"] == counts["qwix"] > 0
    # Same factor paths: every kernel but the embedding, the stacked ones with a layer axis.
    paths = {name: {p for p, _ in nnx.to_flat_state(nnx.state(models[name], nnx.LoRAParam))}
             for name in nnx_lora.ADAPTERS}
    assert paths["lorax"] == paths["qwix"]
    assert ("blocks", "attn", "query", "kernel_lora_a") in paths["lorax"]
    assert models["lorax"].blocks.mlp_in.kernel_lora_a.shape == (CONFIG.n_layers,
                                                                  CONFIG.d_model, RANK)
    # Both wrappers keep the base's parameters and batch statistics (same values).
    for name in nnx_lora.ADAPTERS:
        assert_close(nnx.state(models[name], nnx_lora.FROZEN), base, ulps=0)
        assert_close(nnx.state(models[name], nnx.BatchStat), stats, ulps=0)


@pytest.mark.parametrize("name", nnx_lora.ADAPTERS)
def test_lora_step_trains_only_the_factors(built, name):
    models, tokens = built
    model = nnx.clone(models[name])
    frozen = frozen_leaves(model)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    step = nnx.jit(nt.train_step, static_argnums=3)
    losses = [float(step(model, optimizer, tokens, nnx.LoRAParam)) for _ in range(6)]
    assert losses[-1] < losses[0]
    for before, after in zip(frozen, frozen_leaves(model), strict=True):
        assert_close(after, before, ulps=0)
    assert float(jnp.abs(model.head.kernel_lora_b[...]).max()) > 0


def test_cost_relation_and_report():
    """Measured (float32, CPU, this tiny model at r = 8): lorax/qwix FLOPs 1.118, bytes 0.841;
    at the benchmark's size (d 256, 4 layers, batch 8 x 128) 1.013 and 0.799. lorax computes
    ``s·(x·A)·B`` at small rank as an elementwise epilogue fused into the kernel's product (no
    ``(tokens, out)`` low-rank intermediate in memory), which XLA's cost model counts as a few
    more FLOPs than qwix's second ``dot``; the bounds keep a margin above those figures."""
    row = nnx_lora.compare(CONFIG, RANK, batch_size=2, rounds=1, warmup=0, compile_reps=0,
                           fast=True)
    assert row["trainable_params"] > 0 and row["qwix"] == nnx_lora.qwix_version()
    assert row["flops_frozen"] < min(row["flops_lorax"], row["flops_qwix"])
    assert row["lorax_over_qwix_flops"] <= 1.2
    assert row["lorax_over_qwix_bytes_accessed"] <= 0.95
    # The scanned programs (run and timed) count one layer: fewer FLOPs than the unrolled ones.
    assert row["flops_scan_lorax"] < row["flops_lorax"]
    for method in nnx_lora.METHODS:
        assert row[f"ms_{method}"] > 0 and row[f"peak_bytes_{method}"] > 0
    table = "\n".join(nnx_lora.render([row]))
    assert "## NNX: lorax.wrap vs qwix LoRA" in table and f"| {RANK} |" in table


def test_scanned_cost_covers_one_layer():
    """Why the benchmark counts FLOPs on the unrolled model: XLA's cost model counts the scan's
    body once, so the scanned step's FLOPs fall short of the unrolled step's."""
    flops = {}
    for unroll in (False, True):
        config = dataclasses.replace(CONFIG, unroll=unroll)
        model = nt.Transformer(config, rngs=nnx.Rngs(0))
        step, state = nnx_lora.frozen_fn(model)
        tokens = nt.random_tokens(config, jax.random.key(1), 2)
        _, cost = compile_step(step, abstract(state), tokens, fast=True)
        flops[unroll] = cost.flops
    assert flops[False] < 0.75 * flops[True]


def test_qwix_init_call_in_training_mode_moves_batch_stats():
    """Why :func:`nnx_lora.qwix_wrap` wraps in evaluation mode: qwix creates its factors by
    calling the model, and in training mode that call updates the BatchNorm statistics."""
    import qwix

    model = nt.Transformer(CONFIG, rngs=nnx.Rngs(0))
    model.scan_broadcast = ("qwix_rngs",)
    provider = qwix.LoraProvider(module_path=".*", rank=RANK, alpha=nnx_lora.ALPHA)
    tokens = nt.random_tokens(CONFIG, jax.random.key(1), 2)
    wrapped = qwix.apply_lora_to_model(model, provider, tokens, rngs=nnx.Rngs(1))
    assert not jnp.allclose(wrapped.blocks.mlp_norm.mean[...], model.blocks.mlp_norm.mean[...])


def test_qwix_needs_the_scan_broadcast():
    """qwix 0.1.8 attaches one unstacked ``nnx.Rngs`` to every module while it creates its
    factors; ``nnx.scan`` over the stacked blocks cannot split it (the reason for
    :attr:`~experiments.nnx_transformer.Transformer.scan_broadcast`)."""
    import qwix

    model = nt.Transformer(CONFIG, rngs=nnx.Rngs(0))
    provider = qwix.LoraProvider(module_path=".*", rank=RANK, alpha=nnx_lora.ALPHA)
    tokens = nt.random_tokens(CONFIG, jax.random.key(1), 2)
    with pytest.raises(IndexError):
        qwix.apply_lora_to_model(model, provider, tokens, rngs=nnx.Rngs(1))
