"""The small GPT whose compiled train steps the cost tests measure, and its step FLOPs.

The benchmark's GPT decoder (:mod:`experiments.gpt`: 2 pre-LN blocks, d=512, 8 heads, causal
attention, FFN 2048, final LayerNorm and a vocab-8192 head), run from embedded input
(``GPT.decode``). Everything is lowered from abstract shapes (``jax.ShapeDtypeStruct``), so
nothing is allocated or run; only compiled. Shared by ``test_cost`` and the variants' cost
tests (DoRA, PiSSA, QLoRA, named adapters, routing).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

import lorax
from experiments import gpt

B, T, RANK = 4, 64, 8
CONFIG = gpt.GPTConfig(vocab_size=8192, d_model=512, n_layers=2, n_heads=8, d_ff=2048, max_len=T)
MODEL = gpt.GPT(CONFIG)
X = jax.ShapeDtypeStruct((B, T, CONFIG.d_model), jnp.float32)
LABELS = jax.ShapeDtypeStruct((B, T), jnp.int32)
ce = gpt.next_token_loss


def apply(params, x):
    """Logits of the embedded input ``x``: the blocks, final LayerNorm and head."""
    return MODEL.apply({"params": params}, x, method="decode")


def flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX returned one dict per device
        cost = cost[0]
    return float(cost["flops"])


@functools.cache
def abstract_params():
    # Initialised through `decode`, so the tree holds no embedding tables.
    return jax.eval_shape(lambda key, x: MODEL.init(key, x, method="decode"),
                          jax.random.key(0), X)["params"]


@functools.cache
def abstract_lp():
    return lorax.wrap(abstract_params(), rank=RANK)


@functools.cache
def full_step_flops() -> float:
    """FLOPs of one full fine-tuning Adam step of the GPT."""
    params = abstract_params()
    tx = optax.adam(1e-3)

    def step(p, state, x, y):
        loss, grads = jax.value_and_grad(lambda p: ce(apply(p, x), y))(p)
        updates, state = tx.update(grads, state, p)
        return loss, optax.apply_updates(p, updates), state

    return flops(step, params, jax.eval_shape(tx.init, params), X, LABELS)


def lora_step_flops(lp: Any) -> float:
    """FLOPs of one ``lorax.optimizer(adam)`` step on the wrapped (abstract) tree ``lp``.

    Gradients are taken of the trainable half only (a quantized base holds integer codes).
    """
    tx = lorax.optimizer(optax.adam(1e-3))
    train, frozen = lorax.split(lp)

    def step(train, frozen, state, x, y):
        def loss(lp):
            return ce(lorax.lora(apply)(lp, x), y)

        value, grads = lorax.value_and_grad(loss)(lorax.combine(train, frozen))
        updates, state = tx.update(grads, state, train)
        return value, optax.apply_updates(train, updates), state

    return flops(step, train, frozen, jax.eval_shape(tx.init, train), X, LABELS)
