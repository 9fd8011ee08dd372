"""FLOP counts of train steps for the LoRA variants, on the small GPT of ``test_cost``.

Only the names below are imported from ``test_cost`` (importing its ``test_*`` functions would
make pytest collect them twice).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import optax
from test_cost import LABELS, X, abstract_params, apply, ce, flops

import lorax

__all__ = ["abstract_params", "full_step_flops", "lora_step_flops"]


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
        def loss(t):
            return ce(lorax.lora(apply)(lorax.combine(t, frozen), x), y)

        value, grads = jax.value_and_grad(loss)(train)
        updates, state = tx.update(grads, state, train)
        return value, optax.apply_updates(train, updates), state

    return flops(step, train, frozen, jax.eval_shape(tx.init, train), X, LABELS)
