"""A lorax-wrapped NNX module trained by tunix's ``PeftTrainer``.

``PeftTrainer`` looks for ``nnx.LoRAParam`` variables in the model; finding lorax's factors, it
builds ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` and differentiates with
``nnx.DiffState(0, nnx.LoRAParam)`` under ``nnx.jit``, so only the factors train. Skipped
without tunix (``google-tunix``; see README for its installation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import lorax
from experiments import nnx_transformer as nt
from tests.helpers import assert_close

peft_trainer = pytest.importorskip("tunix.sft.peft_trainer")
tunix_utils = pytest.importorskip("tunix.sft.utils")
# tunix 0.1.7 reads jax.interpreters.pxla.thread_resources (deprecated since JAX 0.8.2) and
# calls optax.global_norm (deprecated in optax 0.2.8 for optax.tree.norm).
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:tunix"),
    pytest.mark.filterwarnings("ignore:optax.global_norm is deprecated:DeprecationWarning"),
]

CONFIG = nt.TransformerConfig()
FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # LoRAParam subclasses Param
STEPS = 8


def eval_loss(model: nnx.Module, tokens: jax.Array) -> float:
    model = nnx.clone(model)
    model.eval()
    return float(nt.loss_fn(model, tokens))


def test_peft_trainer_trains_only_the_lorax_factors():
    base = nt.Transformer(CONFIG, rngs=nnx.Rngs(0))
    model = lorax.wrap(base, rank=4)
    assert tunix_utils.is_lora_enabled(model) and not tunix_utils.is_lora_enabled(base)
    frozen = [jnp.array(x) for x in jax.tree.leaves(nnx.state(model, FROZEN))]
    tokens = nt.random_tokens(CONFIG, jax.random.key(1), 4)
    before = eval_loss(model, tokens)

    trainer = peft_trainer.PeftTrainer(
        model, optax.adam(1e-2),
        peft_trainer.TrainingConfig(eval_every_n_steps=STEPS, max_steps=STEPS,
                                    pbar_description=None))
    trainer.with_loss_fn(nt.loss_fn).with_gen_model_input_fn(lambda batch: {"tokens": batch})
    trainer.train([tokens] * STEPS)

    losses = trainer.metrics_logger.get_metric_history("", "loss", "train")
    assert len(losses) == STEPS and losses[-1] < losses[0]
    assert eval_loss(model, tokens) < before
    for old, new in zip(frozen, jax.tree.leaves(nnx.state(model, FROZEN)), strict=True):
        assert_close(new, old, ulps=0)
    b = nnx.state(model, nnx.LoRAParam)["head"]["kernel_lora_b"][...]
    assert float(jnp.abs(b).max()) > 0
    opt_leaves = jax.tree.leaves(nnx.state(trainer.optimizer, nnx.optimizer.OptState))
    adapter = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    # Adam's two moments of the factors, Adam's count and the optimizer's step: nothing of the
    # base model.
    assert sum(x.size for x in opt_leaves) == 2 * adapter + 2
