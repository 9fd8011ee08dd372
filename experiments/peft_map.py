"""The :mod:`lorax.peft` name map of the Flax BERT in :mod:`experiments.bert`.

Every :class:`~experiments.bert.BertModel` leaf maps to its Hugging Face ``BertModel`` module and
parameter, with the layout conversions of :func:`experiments.hf_bert.to_torch` /
:func:`~experiments.hf_bert.to_flax` (used for leaves trained in full, PEFT's
``modules_to_save``). The q/k/v kernels ``(d, heads, head_dim)`` and the attention output
kernel ``(heads, head_dim, d)`` need nothing special for LoRA: they flatten to PyTorch's
``Linear`` layout by themselves (see :mod:`lorax.peft`).

Example:
    >>> import tempfile
    >>> import jax, numpy as np, lorax, lorax.peft
    >>> from experiments import bert
    >>> config = bert.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
    ...                          num_attention_heads=2, intermediate_size=16,
    ...                          max_position_embeddings=8)
    >>> ids = np.ones((1, 4), np.int32)
    >>> params = bert.BertModel(config).init(jax.random.key(0), ids, ids)["params"]
    >>> lp = lorax.wrap(params, rank=2, targets=["query", "value"])
    >>> with tempfile.TemporaryDirectory() as d:
    ...     written = lorax.peft.save(d, lp, name_map=peft_name_map(config))
    >>> written["target_modules"]
    ['encoder.layer.0.attention.self.query', 'encoder.layer.0.attention.self.value']
"""

from __future__ import annotations

import functools

from experiments.bert import BertConfig
from experiments.hf_bert import hf_name_map, to_flax, to_torch
from lorax.peft import TorchParam


def peft_name_map(config: BertConfig, prefix: str = "") -> dict[str, TorchParam]:
    """Flax path -> PyTorch location of every :class:`~experiments.bert.BertModel` leaf.

    Args:
        config: the architecture (sets the number of layers and the head layout).
        prefix: put before every module path: ``""`` for an adapter trained on a bare HF
            ``BertModel``, ``"bert."`` for one trained on a task model such as
            ``BertForSequenceClassification`` (its encoder lives under ``bert``).

    Returns:
        ``{flax_path: TorchParam(module, param, to_torch=..., to_flax=...)}``, for
        :func:`lorax.peft.save` and :func:`lorax.peft.load`.

    Example:
        >>> name_map = peft_name_map(BertConfig(num_hidden_layers=1), prefix="bert.")
        >>> name_map["encoder/layer_0/attention/out/kernel"].module
        'bert.encoder.layer.0.attention.output.dense'
        >>> name_map["encoder/layer_0/output_norm/scale"].param
        'weight'
    """
    return {
        row.flax_path: TorchParam(
            prefix + row.torch_module,
            row.torch_param,
            to_torch=functools.partial(to_torch, row.kind, config=config),
            to_flax=functools.partial(to_flax, row.kind, config=config),
        )
        for row in hf_name_map(config)
    }
