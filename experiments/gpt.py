"""A small GPT-style decoder in Flax Linen: the benchmark's first model, the model that
:mod:`experiments.train_distributed` trains, and the one ``tests/test_cost.py`` compiles.

Pre-LN transformer: token + learned position embeddings, ``n_layers`` blocks of causal
``nn.MultiHeadDotProductAttention`` and a GELU feed-forward network, a final LayerNorm and an
untied vocabulary head (``nn.Dense`` without bias). The defaults (4 layers, ``d = 512``, 8 heads,
FFN 2048, vocabulary 8192, sequence 128) are those of the benchmark; :class:`GPTConfig` lets tests
and the CPU-sized distributed run shrink them.

The model is split in two so a benchmark can differentiate with respect to the embedded input
(a float array) instead of the integer tokens: :meth:`GPT.embed` maps tokens to activations and
:meth:`GPT.decode` maps activations to logits; ``__call__`` composes them. Select one with
``model.apply(variables, x, method="embed")``.

Parameter tree (``/``-separated, no ``params/`` prefix)::

    tok_embed/embedding                                   (vocab, d)
    pos_embed/embedding                                   (max_len, d)
    blocks_{i}/ln_attn/{scale,bias}                       (d,)
    blocks_{i}/attn/{query,key,value}/kernel              (d, heads, head_dim)
    blocks_{i}/attn/{query,key,value}/bias                (heads, head_dim)
    blocks_{i}/attn/out/kernel                            (heads, head_dim, d)
    blocks_{i}/attn/out/bias                              (d,)
    blocks_{i}/ln_ffn/{scale,bias}                        (d,)
    blocks_{i}/ffn_in/{kernel,bias}                       (d, ffn), (ffn,)
    blocks_{i}/ffn_out/{kernel,bias}                      (ffn, d), (d,)
    ln_f/{scale,bias}                                     (d,)
    head/kernel                                           (d, vocab)

Example:
    >>> config = GPTConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=8)
    >>> model, params = init(config, jax.random.key(0))
    >>> tokens = jnp.zeros((2, 8), jnp.int32)
    >>> jax.jit(model.apply)({"params": params}, tokens).shape
    (2, 8, 32)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Architecture hyper-parameters of :class:`GPT` (defaults: the benchmark's model).

    Attributes:
        vocab_size: Number of tokens (rows of the embedding, columns of the head).
        d_model: Model width ``d``.
        n_layers: Number of transformer blocks.
        n_heads: Number of attention heads; must divide ``d_model``.
        d_ff: Width of the feed-forward hidden layer.
        max_len: Longest sequence (rows of the learned position table).

    Example:
        >>> GPTConfig(d_model=64, n_heads=4).head_dim
        16
    """

    vocab_size: int = 8192
    d_model: int = 512
    n_layers: int = 4
    n_heads: int = 8
    d_ff: int = 2048
    max_len: int = 128

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"expected `{field.name}` to be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"expected `d_model` ({self.d_model}) to be divisible by `n_heads` ({self.n_heads})"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``d_model // n_heads``."""
        return self.d_model // self.n_heads

    def matmul_params(self) -> int:
        """Parameters in the kernels that multiply every token (all ``kernel`` leaves).

        A forward pass costs about ``2 * tokens * matmul_params()`` FLOPs plus attention scores.

        Example:
            >>> GPTConfig(vocab_size=10, d_model=4, n_layers=1, n_heads=1, d_ff=8).matmul_params()
            168
        """
        d = self.d_model
        per_layer = 4 * d * d + 2 * d * self.d_ff
        return self.n_layers * per_layer + d * self.vocab_size


class Block(nn.Module):
    """One pre-LN block: ``x + attn(LN(x))`` then ``x + W2 gelu(W1 LN(x))``."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        config = self.config
        seq_len = x.shape[-2]
        causal = jnp.tril(jnp.ones((seq_len, seq_len), jnp.bool_))[None, None]
        h = nn.LayerNorm(name="ln_attn")(x)
        h = nn.MultiHeadDotProductAttention(
            num_heads=config.n_heads,
            qkv_features=config.d_model,
            out_features=config.d_model,
            name="attn",
        )(h, mask=causal)
        x = x + h
        h = nn.LayerNorm(name="ln_ffn")(x)
        h = nn.Dense(config.d_ff, name="ffn_in")(h)
        h = nn.gelu(h)
        h = nn.Dense(config.d_model, name="ffn_out")(h)
        return x + h


class GPT(nn.Module):
    """A GPT-style causal decoder; ``__call__(tokens)`` returns logits ``(batch, seq, vocab)``.

    Attributes:
        config: Architecture hyper-parameters.
    """

    config: GPTConfig

    def setup(self) -> None:
        config = self.config
        init = nn.initializers.normal(stddev=0.02)
        self.tok_embed = nn.Embed(config.vocab_size, config.d_model, embedding_init=init)
        self.pos_embed = nn.Embed(config.max_len, config.d_model, embedding_init=init)
        self.blocks = [Block(config) for _ in range(config.n_layers)]
        self.ln_f = nn.LayerNorm()
        self.head = nn.Dense(config.vocab_size, use_bias=False, kernel_init=init)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token + position embeddings, ``(batch, seq)`` ints to ``(batch, seq, d)`` floats."""
        seq_len = tokens.shape[-1]
        if seq_len > self.config.max_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_len={self.config.max_len}")
        return self.tok_embed(tokens) + self.pos_embed(jnp.arange(seq_len))[None]

    def decode(self, x: jax.Array) -> jax.Array:
        """The transformer blocks, final LayerNorm and vocabulary head on embedded input."""
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.decode(self.embed(tokens))


def init(
    config: GPTConfig, key: jax.Array, batch_size: int = 1, abstract: bool = False
) -> tuple[GPT, dict[str, Any]]:
    """Builds a :class:`GPT` and its float32 ``params`` (the Linen ``"params"`` collection).

    Args:
        config: Architecture hyper-parameters.
        key: PRNG key for the initializers.
        batch_size: Batch size of the dummy input used for shape inference.
        abstract: Return ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape``; nothing is
            computed or allocated) instead of arrays.

    Returns:
        ``(model, params)``.

    Example:
        >>> _, params = init(GPTConfig(), jax.random.key(0), abstract=True)
        >>> params["blocks_3"]["attn"]["query"]["kernel"].shape, params["head"]["kernel"].shape
        ((512, 8, 64), (512, 8192))
    """
    model = GPT(config)
    tokens = jnp.zeros((batch_size, config.max_len), jnp.int32)
    if abstract:
        return model, jax.eval_shape(model.init, key, tokens)["params"]
    return model, jax.jit(model.init)(key, tokens)["params"]


def next_token_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy of ``logits`` ``(..., vocab)`` against integer ``targets`` ``(...)``.

    Example:
        >>> logits = jnp.zeros((1, 2, 4))
        >>> bool(jnp.isclose(next_token_loss(logits, jnp.array([[0, 3]])), jnp.log(4.0)))
        True
    """
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def random_batch(config: GPTConfig, key: jax.Array, batch_size: int) -> tuple[jax.Array, ...]:
    """Random ``(tokens, targets)`` of shape ``(batch_size, max_len)``: ``targets`` is ``tokens``
    shifted left by one, so the loss is next-token prediction.

    Example:
        >>> tokens, targets = random_batch(GPTConfig(max_len=4), jax.random.key(0), 2)
        >>> tokens.shape, bool((tokens[:, 1:] == targets[:, :-1]).all())
        ((2, 4), True)
    """
    stream = jax.random.randint(
        key, (batch_size, config.max_len + 1), 0, config.vocab_size, jnp.int32
    )
    return stream[:, :-1], stream[:, 1:]
