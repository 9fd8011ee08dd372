"""The benchmark's step functions: LoRA, full fine-tuning, the frozen floor, forward passes.

None is jitted here: :mod:`experiments.bench.cost` compiles them for XLA's cost analysis and
:mod:`experiments.bench.timing` runs the compiled executables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

import lorax
from experiments import gpt
from experiments.bench.handwritten import handwritten_step
from experiments.bench.workloads import Workload

LEARNING_RATE = 1e-3
"""Adam's learning rate in every benchmarked step."""


@dataclasses.dataclass(frozen=True)
class Steps:
    """The pure step functions of one workload (jit them; none is jitted here).

    Attributes:
        lora: ``(trainable, frozen, opt_state, batch) -> (trainable, opt_state, loss)``.
        full: ``(params, opt_state, batch) -> (params, opt_state, loss)``.
        frozen: ``(params, batch) -> (loss, d loss / d embedded input)``.
        forward: ``(params, batch) -> outputs`` of the plain model (base or merged params).
        lora_forward: ``(wrapped params, batch) -> outputs``, factorized, unmerged.
        tx_lora: ``lorax.optimizer(optax.adam(...))``.
        tx_full: ``optax.adam(...)``.
        handwritten: ``(factors, params, opt_state, batch) -> (factors, opt_state, loss)``, the
            same LoRA step written by hand in plain JAX (:mod:`experiments.bench.handwritten`;
            GPT only, else ``None``), with Adam on the factors.
    """

    lora: Callable[..., Any]
    full: Callable[..., Any]
    frozen: Callable[..., Any]
    forward: Callable[..., Any]
    lora_forward: Callable[..., Any]
    tx_lora: optax.GradientTransformation
    tx_full: optax.GradientTransformation
    handwritten: Callable[..., Any] | None = None


def make_steps(workload: Workload, learning_rate: float = LEARNING_RATE) -> Steps:
    """Builds the benchmark's step functions for ``workload``.

    The LoRA step differentiates the :func:`lorax.lora` loss with respect to the trainable half
    only (:func:`lorax.value_and_grad`) and updates it with :func:`lorax.optimizer` over Adam;
    the full step differentiates every parameter; the frozen step differentiates the embedded
    input only (no weight gradient, no optimizer).

    Args:
        workload: The model.
        learning_rate: Adam's learning rate.

    Returns:
        The pure (unjitted) step functions and both optimizers.

    Example:
        >>> from experiments.bench.workloads import QUICK_GPT, gpt_workload
        >>> w = gpt_workload(QUICK_GPT, batch_size=1, abstract_params=True)
        >>> steps = make_steps(w)
        >>> jax.eval_shape(steps.frozen, w.params, w.batch)[1].shape  # d loss / d embedded input
        (1, 32, 128)
    """
    tx_lora = lorax.optimizer(optax.adam(learning_rate))
    tx_full = optax.adam(learning_rate)
    lora_loss = lorax.lora(workload.loss)

    def lora_step(trainable: Any, frozen: Any, opt_state: Any, batch: tuple[Any, ...]):
        loss, grads = lorax.value_and_grad(lora_loss)(lorax.combine(trainable, frozen), batch)
        updates, opt_state = tx_lora.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    def full_step(params: Any, opt_state: Any, batch: tuple[Any, ...]):
        loss, grads = jax.value_and_grad(workload.loss)(params, batch)
        updates, opt_state = tx_full.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def frozen_step(params: Any, batch: tuple[Any, ...]):
        h = workload.embed(params, batch)
        return jax.value_and_grad(lambda h: workload.body_loss(params, h, batch))(h)

    handwritten = None
    if workload.name == "gpt":
        handwritten = handwritten_step(tx_full, gpt.GPT(workload.config), lorax.LoRAConfig().alpha)
    return Steps(lora_step, full_step, frozen_step, workload.forward,
                 lorax.lora(workload.forward), tx_lora, tx_full, handwritten)
