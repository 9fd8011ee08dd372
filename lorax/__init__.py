"""lorax: low-rank adaptation (LoRA) for JAX and Flax.

Wrap a parameter tree, transform the function that consumes it, train the factors:

>>> import jax, jax.numpy as jnp, optax, lorax
>>> params = {"dense": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}}
>>> lp = lorax.wrap(params, rank=2)
>>> forward = lorax.lora(lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"][None])
>>> tx = lorax.optimizer(optax.sgd(0.1))
>>> grads = jax.grad(lambda p: forward(p, jnp.ones((1, 8))).sum())(lp)
>>> updates, _ = tx.update(grads, tx.init(lp), lp)
>>> new = optax.apply_updates(lp, updates)
>>> bool((new["dense"]["kernel"].w == params["dense"]["kernel"]).all())
True
"""

from lorax import adapters, analysis, dora, layouts, modules, peft, pissa
from lorax.adapters import add_adapter, combine_adapters, drop_adapter, get_adapter, select
from lorax.checkpoint import CheckpointManager, CheckpointMismatchError, restore, save
from lorax.config import LoRAConfig
from lorax.infer import infer_axes
from lorax.interpreter import lora
from lorax.lora_value import LoRAFallbackWarning
from lorax.merging import merge, unmerge
from lorax.node import FullyTrained, LoRA, MultiLoRA, is_lora
from lorax.optimizers import optimizer
from lorax.partition import combine, split, trainable, value_and_grad
from lorax.quantization import dequantize, quantize
from lorax.quantized import QuantizedArray
from lorax.sharding import factor_specs, partition_specs, shardings, state_shardings
from lorax.summaries import Summary, summary
from lorax.version import __version__ as __version__
from lorax.wrapping import unwrap, wrap

__all__ = [
    "CheckpointManager",
    "CheckpointMismatchError",
    "FullyTrained",
    "LoRA",
    "LoRAConfig",
    "LoRAFallbackWarning",
    "MultiLoRA",
    "QuantizedArray",
    "Summary",
    "adapters",
    "add_adapter",
    "analysis",
    "combine",
    "combine_adapters",
    "dequantize",
    "dora",
    "drop_adapter",
    "factor_specs",
    "get_adapter",
    "infer_axes",
    "is_lora",
    "layouts",
    "lora",
    "merge",
    "modules",
    "optimizer",
    "partition_specs",
    "peft",
    "pissa",
    "quantize",
    "restore",
    "save",
    "select",
    "shardings",
    "split",
    "state_shardings",
    "summary",
    "trainable",
    "unmerge",
    "unwrap",
    "value_and_grad",
    "wrap",
]
