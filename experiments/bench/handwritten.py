"""The benchmark GPT's LoRA step written by hand in plain JAX: the bar lorax is measured against.

:func:`handwritten_loss` runs :class:`experiments.gpt.GPT` itself with every kernel product
written as a user would write LoRA without a library: ``x·stop_gradient(W) + s·(x·A)·B`` on the
layer's own activation shapes. :func:`handwritten_step` differentiates it with respect to the
factors only and applies Adam, like the LoRA step of :mod:`experiments.bench.steps`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from experiments import gpt


def init_factors(params: Any, rank: int, key: jax.Array | None = None) -> Any:
    """``{path: (a, b)}`` for every ``kernel`` of ``params``: ``a`` Gaussian, ``b`` zero.

    ``a`` is ``(*in, r)`` and ``b`` is ``(r, *out)`` with the GPT's layouts: q/k/v kernels
    ``(d, heads, head_dim)`` have one input axis, the attention output ``(heads, head_dim, d)``
    two, Dense kernels one.
    """
    key = jax.random.key(0) if key is None else key
    factors = {}
    flat = {"/".join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path, w in flat.items():
        if not path.endswith("kernel"):
            continue
        n_in = 2 if path.endswith("attn/out/kernel") else 1
        key, sub = jax.random.split(key)
        a = jax.random.normal(sub, (*w.shape[:n_in], rank), w.dtype) / math.sqrt(
            math.prod(w.shape[:n_in]))
        factors[path] = (a, jnp.zeros((rank, *w.shape[n_in:]), w.dtype))
    return factors


def handwritten_loss(factors: Any, params: Any, batch: tuple[jax.Array, jax.Array],
                     model: nn.Module, alpha: float) -> jax.Array:
    """The GPT's next-token loss on ``batch = (tokens, labels)``, LoRA written out by hand.

    The model is Flax's own (:class:`experiments.gpt.GPT`); a method interceptor replaces each
    adapted ``Dense``/``DenseGeneral`` call by ``x·stop_gradient(W) + s·(x·A)·B (+ bias)``
    with ``jnp.tensordot`` on the layer's own activation shape, ``s = alpha / r``.
    """
    scale = alpha / next(iter(factors.values()))[0].shape[-1]

    def lora_dense(next_fun, args, kwargs, context):
        module = context.module
        path = "/".join(module.path) + "/kernel"
        if (context.method_name != "__call__" or path not in factors
                or not isinstance(module, nn.Dense | nn.DenseGeneral)):
            return next_fun(*args, **kwargs)
        (x,) = args
        variables = module.variables["params"]
        a, b = factors[path]
        n_in = a.ndim - 1
        frozen = jnp.tensordot(x, jax.lax.stop_gradient(variables["kernel"]), n_in)
        y = frozen + scale * jnp.tensordot(jnp.tensordot(x, a, n_in), b, 1)
        if "bias" not in variables:
            return y
        bias = variables["bias"]
        return y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)

    tokens, labels = batch
    with nn.intercept_methods(lora_dense):
        logits = model.apply({"params": params}, tokens)
    return gpt.next_token_loss(logits, labels)


def handwritten_step(tx: optax.GradientTransformation, model: nn.Module, alpha: float):
    """``(factors, params, opt_state, batch) -> (factors, opt_state, loss)``: Adam on the
    factors of :func:`handwritten_loss` (not jitted)."""

    def step(factors: Any, params: Any, opt_state: Any, batch: tuple[jax.Array, jax.Array]):
        loss, grads = jax.value_and_grad(handwritten_loss)(factors, params, batch, model, alpha)
        updates, opt_state = tx.update(grads, opt_state, factors)
        return optax.apply_updates(factors, updates), opt_state, loss

    return step
