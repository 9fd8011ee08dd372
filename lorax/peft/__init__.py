"""Hugging Face PEFT interop: write and read LoRA adapters in PEFT's own file format.

:func:`save` writes ``adapter_model.safetensors`` and ``adapter_config.json`` that
``peft.PeftModel.from_pretrained`` (and servers that read PEFT adapters) load unchanged;
:func:`load` turns such a directory back into a wrapped tree for :func:`lorax.lora`.

A PEFT file names tensors by PyTorch module (``base_model.model.<module>.lora_A.weight``), so
both need a *name map* from Flax paths to PyTorch modules (:data:`NameMap`). For a LoRA kernel
the map only needs the module name: a kernel flattens to PyTorch's ``Linear`` layout by itself.
Its input axes (the node's ``n_in`` axes after the stack axes), flattened row-major, are
PyTorch's ``in_features``; its output axes are ``out_features``. So::

    lora_A.weight = a.reshape(in_features, r).T     # (r, in)
    lora_B.weight = b.reshape(r, out_features).T    # (out, r)

A Flax ``DenseGeneral`` q/k/v kernel ``(d, heads, head_dim)`` is ``Linear(d, heads*head_dim)``
and an attention output kernel ``(heads, head_dim, d)`` is ``Linear(heads*head_dim, d)``. An
``nn.Embed`` table ``(vocab, d)`` is ``Embedding(vocab, d)``, whose PEFT tensors are
``lora_embedding_A`` ``(r, vocab)`` and ``lora_embedding_B`` ``(d, r)``.

Writing a name map for your model: give each adapted kernel path its module name, e.g.::

    name_map = {
        "decoder/layers_0/attn/query/kernel": "model.layers.0.self_attn.q_proj",
        "decoder/layers_0/mlp/up/kernel": "model.layers.0.mlp.up_proj",
    }

or a callable that computes it (return ``None`` for paths that have no counterpart)::

    def name_map(path: str) -> str | None:
        m = re.fullmatch(r"decoder/layers_(\\d+)/attn/(query|key|value)/kernel", path)
        return m and f"model.layers.{m[1]}.self_attn.{m[2][0]}_proj"

Leaves trained in full (:class:`lorax.FullyTrained`, PEFT's ``modules_to_save``) also need the
PyTorch parameter name and, where the layouts differ, a conversion: map them to a
:class:`TorchParam`. A kernel of a module trained in full defaults to the same flattening (and
transpose) as above; any other leaf is copied as is unless ``to_torch``/``to_flax`` are given.
``experiments/peft_map.py`` has the complete map of the BERT of the experiments.

Kernels stacked over layers (``lorax.wrap(..., stacked=...)``, one stack axis) map to a tuple
of module names, one per layer in stack order; PEFT has one module per layer, so all layers of
a stacked kernel must share one rank and alpha. More than one stack axis is not supported.

Only LoRA on ``Linear``-like and ``Embedding`` modules is supported (no convolutions), with
``bias="none"`` and ``fan_in_fan_out=False``; :func:`load` rejects anything else with a
``ValueError`` naming the setting or tensor. DoRA nodes (``lorax.wrap(..., dora=True)``) on
``Linear``-like kernels are written with ``use_dora: true`` and one
``<module>.lora_magnitude_vector`` tensor ``(out_features,)`` per module, as PEFT saves them.

Example:
    >>> import tempfile, jax.numpy as jnp, lorax, lorax.peft
    >>> params = {"fc": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}}
    >>> lp = lorax.wrap(params, rank=4, alpha=8.0)
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     _ = lorax.peft.save(directory, lp, name_map={"fc/kernel": "model.fc"})
    ...     back = lorax.peft.load(directory, params, name_map={"fc/kernel": "model.fc"})
    >>> back["fc"]["kernel"].rank, back["fc"]["kernel"].scale
    (4, 2.0)
"""

from lorax.peft.config import pattern_value, read_config
from lorax.peft.files import CONFIG_NAME, WEIGHTS_NAME
from lorax.peft.loading import load
from lorax.peft.names import PREFIX, NameMap, TorchParam
from lorax.peft.saving import save

__all__ = [
    "CONFIG_NAME",
    "NameMap",
    "PREFIX",
    "TorchParam",
    "WEIGHTS_NAME",
    "load",
    "pattern_value",
    "read_config",
    "save",
]
