"""A small Flax NNX decoder-only transformer: the model of ``tests/test_nnx_qwix.py`` and of the
benchmark's NNX workload (:mod:`experiments.bench.nnx_lora`: lorax against qwix).

Pre-LN blocks, stacked: :class:`Transformer` creates its ``n_layers`` blocks with ``nnx.vmap``
over an init function (every parameter and state of :attr:`Transformer.blocks` has a leading
layer axis) and applies them with ``nnx.scan`` (``remat=True`` wraps the scanned body in
``nnx.remat``). A block is LayerNorm, causal ``nnx.MultiHeadAttention``, ``nnx.Dropout``, and
an MLP ``nnx.Linear`` -> ``nnx.BatchNorm`` -> GELU -> ``nnx.Linear``; the BatchNorm gives the
model batch-statistics state (``nnx.BatchStat``), updated in training mode
(``model.train()``) and read in evaluation mode (``model.eval()``, which also turns dropout
off). A token ``nnx.Embed``, a learned position table, a final LayerNorm and an ``nnx.Linear``
vocabulary head complete it.

``unroll=True`` fully unrolls the scan: the same parameters and numbers, but a straight-line
program, because XLA's cost model counts a while loop's body once (measured in
:mod:`experiments.bench.nnx_lora`: the scanned step's FLOPs are about those of one layer).

Example:
    >>> model = Transformer(TransformerConfig(), rngs=nnx.Rngs(0))
    >>> tokens = jnp.zeros((2, 16), jnp.int32)
    >>> model(tokens).shape
    (2, 16, 64)
    >>> nnx.state(model.blocks, nnx.BatchStat)["mlp_norm"]["mean"].shape  # (layers, d_ff)
    (2, 64)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes of :class:`Transformer` (defaults: the tiny model of the tests).

    Attributes:
        vocab_size: Tokens (rows of the embedding, columns of the head).
        d_model: Model width.
        n_layers: Transformer blocks.
        n_heads: Attention heads; must divide ``d_model``.
        d_ff: Width of the MLP's hidden layer (and of its BatchNorm).
        max_len: Longest sequence (rows of the position table).
        dropout: Dropout rate after attention and after the MLP (training mode only).
        remat: Rematerialize each block in the backward pass (``nnx.remat`` on the scan body).
        unroll: Unroll the scan over blocks into straight-line code (for XLA's cost model).
    """

    vocab_size: int = 64
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 64
    max_len: int = 16
    dropout: float = 0.1
    remat: bool = False
    unroll: bool = False

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"expected `d_model` ({self.d_model}) to be divisible by "
                             f"`n_heads` ({self.n_heads})")


BENCH_CONFIG = TransformerConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, d_ff=1024,
                                 max_len=128)
"""The benchmark's size (:mod:`experiments.bench.nnx_lora`): 4 layers, d 256, FFN 1024."""


class Block(nnx.Module):
    """One pre-LN block: causal self-attention and a BatchNorm MLP, each with a residual."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs) -> None:
        d = config.d_model
        self.attn_norm = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(config.n_heads, d, decode=False, keep_rngs=False,
                                           rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)
        self.mlp_norm_in = nnx.LayerNorm(d, rngs=rngs)
        self.mlp_in = nnx.Linear(d, config.d_ff, rngs=rngs)
        self.mlp_norm = nnx.BatchNorm(config.d_ff, rngs=rngs)
        self.mlp_out = nnx.Linear(config.d_ff, d, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """``x`` ``(batch, seq, d)`` -> ``(batch, seq, d)``; ``mask`` is the causal mask."""
        x = x + self.dropout(self.attn(self.attn_norm(x), mask=mask))
        h = nnx.gelu(self.mlp_norm(self.mlp_in(self.mlp_norm_in(x))))
        return x + self.dropout(self.mlp_out(h))


class Transformer(nnx.Module):
    """Token and position embeddings, ``n_layers`` stacked :class:`Block` s, LayerNorm, head.

    Attributes:
        blocks: One :class:`Block` whose every variable has a leading ``n_layers`` axis.
        scan_broadcast: Attribute names whose variables the scan over :attr:`blocks` passes
            whole to every layer (axis ``None``) instead of splitting them along the layer axis.
            Empty by default; ``("qwix_rngs",)`` for qwix, which attaches one unstacked
            ``nnx.Rngs`` under that name to every module while it creates its LoRA params
            (:func:`experiments.bench.nnx_lora.qwix_wrap`).
    """

    scan_broadcast: tuple[str, ...] = ()

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs) -> None:
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.d_model, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(),
                                                      (config.max_len, config.d_model)))

        @nnx.split_rngs(splits=config.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create_blocks(rngs: nnx.Rngs) -> Block:
            return Block(config, rngs=rngs)

        self.blocks = create_blocks(rngs)
        self.final_norm = nnx.LayerNorm(config.d_model, rngs=rngs)
        self.head = nnx.Linear(config.d_model, config.vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits ``(batch, seq, vocab)`` of int tokens ``(batch, seq)``, ``seq <= max_len``."""
        return self.logits(self.embed_tokens(tokens))

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Token plus position embeddings ``(batch, seq, d)`` of ``tokens``."""
        return self.embed(tokens) + self.pos[None, : tokens.shape[1]]

    def logits(self, x: jax.Array) -> jax.Array:
        """Everything after the embedding: the blocks, the final LayerNorm and the head."""
        config = self.config
        mask = nnx.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))

        def body(x: jax.Array, block: Block) -> jax.Array:
            return block(x, mask)

        if config.remat:
            body = nnx.remat(body)
        axes = 0
        if self.scan_broadcast:
            axes = nnx.StateAxes({**{nnx.PathContains(name): None
                                     for name in self.scan_broadcast}, ...: 0})
        scan = nnx.scan(body, in_axes=(nnx.Carry, axes), out_axes=nnx.Carry,
                        unroll=config.n_layers if config.unroll else 1)
        x = scan(x, self.blocks)
        return self.head(self.final_norm(x))


def loss_fn(model: nnx.Module, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of ``model`` on ``tokens`` ``(batch, seq)``.

    Example:
        >>> model = Transformer(TransformerConfig(), rngs=nnx.Rngs(0))
        >>> bool(jnp.isfinite(loss_fn(model, jnp.zeros((2, 16), jnp.int32))))
        True
    """
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def random_tokens(config: TransformerConfig, key: jax.Array, batch_size: int) -> jax.Array:
    """Uniform random token ids ``(batch_size, max_len)``."""
    return jax.random.randint(key, (batch_size, config.max_len), 0, config.vocab_size, jnp.int32)


def train_step(model: nnx.Module, optimizer: nnx.Optimizer, tokens: jax.Array,
               wrt: nnx.filterlib.Filter = nnx.Param) -> jax.Array:
    """One optimizer step on the variables ``wrt`` (the optimizer's own ``wrt``); returns the
    loss. Jit it with ``nnx.jit``; ``model`` and ``optimizer`` are updated in place.

    Example:
        >>> model = Transformer(TransformerConfig(), rngs=nnx.Rngs(0))
        >>> optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        >>> tokens = random_tokens(model.config, jax.random.key(1), 4)
        >>> step = nnx.jit(train_step, static_argnums=3)
        >>> first = step(model, optimizer, tokens, nnx.Param)
        >>> for _ in range(5):
        ...     last = step(model, optimizer, tokens, nnx.Param)
        >>> bool(last < first)
        True
    """
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))
    loss, grads = grad_fn(model, tokens)
    optimizer.update(model, grads)
    return loss
