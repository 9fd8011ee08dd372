"""Batch tokenization for the BERT encoder with a Hugging Face ``tokenizers.Tokenizer``.

:func:`configure_tokenizer` sets truncation and pad-to-longest padding; :func:`tokenize` turns a
batch of texts into the int32 ``input_ids`` / ``attention_mask`` / ``token_type_ids`` arrays that
:class:`experiments.bert.BertModel` takes. The packaged all-MiniLM-L6-v2 tokenizer is loaded by
:func:`experiments.hf_bert.load_tokenizer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_MAX_LENGTH = 128
"""Default tokenizer truncation length (tokens, including ``[CLS]`` and ``[SEP]``)."""


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
        >>> from experiments.hf_bert import load_tokenizer
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
