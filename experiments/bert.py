"""A Flax Linen BERT encoder that runs the real all-MiniLM-L6-v2 sentence encoder.

The model itself: :class:`BertConfig`, the Linen modules, :func:`mean_pool` and
sentence-transformers style :func:`embed_sentences`. Loading Hugging Face weights (the
pretrained MiniLM included) lives in :mod:`experiments.hf_bert`, tokenizer settings in
:mod:`experiments.tokenization`.

Parameter tree of :class:`BertModel` (flax paths, ``/``-separated, no ``params/`` prefix)::

    embeddings/{word,position,token_type}_embeddings/embedding      (rows, d)
    embeddings/LayerNorm/{scale,bias}                              (d,)
    encoder/layer_{i}/attention/{query,key,value}/kernel           (d, heads, head_dim)
    encoder/layer_{i}/attention/{query,key,value}/bias             (heads, head_dim)
    encoder/layer_{i}/attention/out/kernel                         (heads, head_dim, d)
    encoder/layer_{i}/attention/out/bias                           (d,)
    encoder/layer_{i}/attention_norm/{scale,bias}                  (d,)
    encoder/layer_{i}/intermediate/{kernel,bias}                   (d, ffn), (ffn,)
    encoder/layer_{i}/output/{kernel,bias}                         (ffn, d), (d,)
    encoder/layer_{i}/output_norm/{scale,bias}                     (d,)

Example:
    >>> config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
    ...                     num_attention_heads=2, intermediate_size=16)
    >>> tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    >>> params = jax.eval_shape(BertModel(config).init, jax.random.key(0), tokens, tokens)
    >>> layer = params["params"]["encoder"]["layer_0"]  # abstract: no weights are created
    >>> layer["attention"]["query"]["kernel"].shape, layer["output"]["kernel"].shape
    ((8, 2, 4), (16, 8))
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.tokenization import tokenize

# --------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture hyper-parameters of a BERT encoder (defaults: all-MiniLM-L6-v2).

    Attributes:
        vocab_size: Number of WordPiece tokens.
        hidden_size: Model width ``d``.
        num_hidden_layers: Number of transformer layers.
        num_attention_heads: Number of attention heads; must divide ``hidden_size``.
        intermediate_size: Width of the feed-forward hidden layer.
        max_position_embeddings: Longest supported sequence (rows of the position table).
        type_vocab_size: Number of segment (token type) ids.
        layer_norm_eps: Epsilon of every LayerNorm.
        hidden_dropout_prob: Dropout on embeddings and residual branches (only when
            ``deterministic=False``).
        attention_probs_dropout_prob: Dropout on attention weights (only when
            ``deterministic=False``).
        initializer_range: Standard deviation of the normal initializer for fresh weights.
        pad_token_id: Token id used for padding.

    Example:
        >>> BertConfig(hidden_size=8, num_attention_heads=2).head_dim
        4
        >>> BertConfig.from_dict({"hidden_size": 16, "num_attention_heads": 4,
        ...                       "model_type": "bert"}).head_dim
        4
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        for field in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"expected `{field}` to be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"expected `hidden_size` ({self.hidden_size}) to be divisible by "
                f"`num_attention_heads` ({self.num_attention_heads})"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``hidden_size // num_attention_heads``."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> BertConfig:
        """Builds a config from a Hugging Face style ``config.json`` dictionary.

        Keys that are not fields of :class:`BertConfig` are ignored, except that settings this
        implementation cannot honour are rejected.

        Args:
            mapping: Parsed ``config.json`` contents.

        Returns:
            The config.

        Raises:
            ValueError: If ``hidden_act`` is not ``"gelu"`` or ``position_embedding_type`` is
                not ``"absolute"``.
        """
        activation = mapping.get("hidden_act", "gelu")
        if activation != "gelu":
            raise ValueError(
                f"only hidden_act='gelu' (exact erf GELU) is supported, got {activation!r}"
            )
        position_type = mapping.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"only position_embedding_type='absolute' is supported, got {position_type!r}"
            )
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in mapping.items() if key in names})

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> BertConfig:
        """Reads a Hugging Face ``config.json`` file; see :meth:`from_dict`."""
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))


# --------------------------------------------------------------------------------------------
# Model


def _normal_init(config: BertConfig) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=config.initializer_range)


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    # use_fast_variance=False: BERT activations have large outlier channels, and E[x^2]-E[x]^2
    # loses float32 precision there; HF computes E[(x - mean)^2].
    return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, name=name)


class BertEmbeddings(nn.Module):
    """Word + absolute position + token type embeddings, then LayerNorm and dropout."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, deterministic: bool):
        config = self.config
        seq_len = input_ids.shape[-1]
        embed = functools.partial(
            nn.Embed, features=config.hidden_size, embedding_init=_normal_init(config)
        )
        words = embed(config.vocab_size, name="word_embeddings")(input_ids)
        positions = embed(config.max_position_embeddings, name="position_embeddings")(
            jnp.arange(seq_len)[None, :]
        )
        token_types = embed(config.type_vocab_size, name="token_type_embeddings")(token_type_ids)
        hidden = _layer_norm(config, "LayerNorm")(words + positions + token_types)
        return nn.Dropout(rate=config.hidden_dropout_prob)(hidden, deterministic=deterministic)


class BertLayer(nn.Module):
    """One post-LN transformer layer: ``h = LN(x + attn(x)); out = LN(h + W2 gelu(W1 h))``."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden: jax.Array, attention_bias_mask: jax.Array, deterministic: bool):
        config = self.config
        attention = nn.MultiHeadDotProductAttention(
            num_heads=config.num_attention_heads,
            qkv_features=config.hidden_size,
            out_features=config.hidden_size,
            dropout_rate=config.attention_probs_dropout_prob,
            kernel_init=_normal_init(config),
            name="attention",
        )
        attended = attention(hidden, mask=attention_bias_mask, deterministic=deterministic)
        attended = nn.Dropout(rate=config.hidden_dropout_prob)(
            attended, deterministic=deterministic
        )
        hidden = _layer_norm(config, "attention_norm")(hidden + attended)

        expanded = nn.Dense(
            config.intermediate_size, kernel_init=_normal_init(config), name="intermediate"
        )(hidden)
        expanded = nn.gelu(expanded, approximate=False)
        projected = nn.Dense(config.hidden_size, kernel_init=_normal_init(config), name="output")(
            expanded
        )
        projected = nn.Dropout(rate=config.hidden_dropout_prob)(
            projected, deterministic=deterministic
        )
        return _layer_norm(config, "output_norm")(hidden + projected)


class BertEncoder(nn.Module):
    """A stack of ``config.num_hidden_layers`` :class:`BertLayer` modules named ``layer_{i}``."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden: jax.Array, attention_bias_mask: jax.Array, deterministic: bool):
        for index in range(self.config.num_hidden_layers):
            hidden = BertLayer(self.config, name=f"layer_{index}")(
                hidden, attention_bias_mask, deterministic
            )
        return hidden


class BertModel(nn.Module):
    """BERT encoder returning the last hidden states (no pooler).

    Padding follows Hugging Face: padded *keys* are masked out of every softmax, while padded
    query positions still attend to the real tokens (their outputs are meaningless but finite).

    Attributes:
        config: Architecture hyper-parameters.

    Example:
        >>> config = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
        ...                     num_attention_heads=2, intermediate_size=16,
        ...                     max_position_embeddings=8)
        >>> ids = np.array([[2, 5, 3, 0]], dtype=np.int32)
        >>> mask = np.array([[1, 1, 1, 0]], dtype=np.int32)
        >>> model = BertModel(config)
        >>> params = jax.jit(model.init)(jax.random.key(0), ids, mask)["params"]
        >>> params["encoder"]["layer_0"]["attention"]["query"]["kernel"].shape
        (8, 2, 4)
        >>> jax.jit(model.apply)({"params": params}, ids, mask).shape
        (1, 4, 8)
    """

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Encodes a padded batch.

        Args:
            input_ids: Token ids, shape ``(batch, seq_len)``.
            attention_mask: 1 for real tokens and 0 for padding, shape ``(batch, seq_len)``.
            token_type_ids: Segment ids, shape ``(batch, seq_len)``; zeros when omitted.
            deterministic: If False, applies dropout (needs a ``"dropout"`` rng).

        Returns:
            Last hidden states, shape ``(batch, seq_len, hidden_size)``.

        Raises:
            ValueError: On inconsistent shapes or a sequence longer than
                ``config.max_position_embeddings``.
        """
        if input_ids.ndim != 2:
            raise ValueError(
                f"expected `input_ids` of shape (batch, seq_len), got {input_ids.shape}"
            )
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"expected `attention_mask` of shape {input_ids.shape}, got {attention_mask.shape}"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        elif token_type_ids.shape != input_ids.shape:
            raise ValueError(
                f"expected `token_type_ids` of shape {input_ids.shape}, got {token_type_ids.shape}"
            )
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        hidden = BertEmbeddings(self.config, name="embeddings")(
            input_ids, token_type_ids, deterministic
        )
        # (batch, 1, query, key): every query may look at every real key, as in HF BERT.
        key_mask = nn.make_attention_mask(
            jnp.ones_like(attention_mask), attention_mask, dtype=jnp.bool_
        )
        return BertEncoder(self.config, name="encoder")(hidden, key_mask, deterministic)


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Averages hidden states over the real (mask == 1) positions.

    Args:
        hidden: Hidden states, shape ``(batch, seq_len, d)``.
        mask: Attention mask, shape ``(batch, seq_len)``.

    Returns:
        Shape ``(batch, d)``; all-padding rows give zeros (the count is clamped at 1e-9, as in
        sentence-transformers).

    Example:
        >>> hidden = jnp.array([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
        >>> mean_pool(hidden, jnp.array([[1, 1, 0]])).tolist()
        [[2.0, 3.0]]
    """
    weights = jnp.asarray(mask, dtype=hidden.dtype)[..., None]
    summed = jnp.sum(hidden * weights, axis=-2)
    counts = jnp.maximum(jnp.sum(weights, axis=-2), 1e-9)
    return summed / counts


@functools.partial(jax.jit, static_argnums=0)
def _normalized_embeddings(
    model: BertModel,
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    token_type_ids: jax.Array,
) -> jax.Array:
    hidden = model.apply({"params": params}, input_ids, attention_mask, token_type_ids)
    pooled = mean_pool(hidden, attention_mask)
    norms = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled / jnp.maximum(norms, 1e-12)


def _pad_columns(array: np.ndarray, multiple: int) -> np.ndarray:
    extra = -array.shape[1] % multiple
    return np.pad(array, ((0, 0), (0, extra))) if extra else array


def embed_sentences(
    model: BertModel,
    params: Any,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 64,
) -> np.ndarray:
    """Sentence embeddings as in sentence-transformers: mean pooling, then L2 normalisation.

    Batches are padded to a multiple of 16 tokens (masked, so results are unchanged) to limit
    recompilation.

    Args:
        model: The encoder.
        params: Its ``"params"`` collection.
        tokenizer: A configured ``tokenizers.Tokenizer``.
        texts: Sentences to embed.
        batch_size: Sentences per forward pass.

    Returns:
        float32 array of shape ``(len(texts), hidden_size)`` with unit-norm rows.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if batch_size <= 0:
        raise ValueError(f"expected `batch_size` to be a positive int, got {batch_size}")
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenize(tokenizer, texts[start : start + batch_size])
        padded = {name: _pad_columns(value, 16) for name, value in batch.items()}
        if padded["input_ids"].shape[1] > model.config.max_position_embeddings:
            padded = batch
        chunks.append(
            np.asarray(
                _normalized_embeddings(
                    model,
                    params,
                    padded["input_ids"],
                    padded["attention_mask"],
                    padded["token_type_ids"],
                )
            )
        )
    if not chunks:
        return np.zeros((0, model.config.hidden_size), dtype=np.float32)
    return np.concatenate(chunks, axis=0).astype(np.float32, copy=False)
