"""Name maps: where a Flax leaf lives in the PyTorch model, and how its layout converts.

A PEFT file names tensors by PyTorch module (``base_model.model.<module>.lora_A.weight``), so
:func:`lorax.peft.save` and :func:`lorax.peft.load` need a :data:`NameMap` from Flax paths to
PyTorch modules. A LoRA kernel needs only its module name: its input axes flattened row-major
are PyTorch's ``in_features``, its output axes ``out_features`` (:func:`kernel_layout`). Leaves
trained in full also need the parameter name and, where layouts differ, a conversion
(:func:`leaf_to_torch`, :func:`leaf_to_flax`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from lorax.layouts import Layout, canonical_layout, check_layout, default_in_axes, default_layout
from lorax.paths import is_kernel_path, leaf_name

PREFIX = "base_model.model."
"""The prefix PEFT puts before every module path in ``adapter_model.safetensors``."""

LORA_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
    ".lora_magnitude_vector": "M",  # DoRA (PEFT drops the ".weight" of the DoraLayer)
}
"""PEFT's factor tensor names -> side (``A``, ``B`` or DoRA's magnitude ``M``). Linear and
Embedding factors share one layout, so :func:`lorax.peft.load` takes either name for either
module type."""


@dataclasses.dataclass(frozen=True)
class TorchParam:
    """Where a Flax leaf lives in the PyTorch model, and how its layout converts.

    Attributes:
        module: the PyTorch module path as PEFT sees it (``named_modules()`` of the model that
            PEFT wraps, e.g. ``"encoder.layer.0.attention.self.query"``); for a kernel stacked
            over layers, a tuple with one module path per layer.
        param: the module's parameter holding this leaf (``"weight"``, ``"bias"``); a LoRA
            kernel must be ``"weight"``.
        n_in: how many leading (non-stacked) axes of the kernel are inputs; default
            :func:`lorax.layouts.default_in_axes` (what :func:`lorax.wrap` uses).
        layout: the kernel's layout string (``s``/``i``/``o`` per axis, see
            :class:`lorax.kernel_axes.KernelAxes`) when its axes are in another order, e.g.
            ``"oio"`` for Gemma's ``q_einsum`` ``(N, D, H)`` (PEFT's ``q_proj`` is
            ``(N*H, D)``); it overrides ``n_in``. Default:
            :func:`lorax.layouts.default_layout`, as ``wrap``.
        embedding: whether the module is an ``nn.Embedding`` (PEFT names its factors
            ``lora_embedding_A``/``_B``); default: the leaf is named ``embedding``.
        to_torch: converts the Flax array to the PyTorch layout, for leaves trained in full;
            default: the kernel rule (flatten inputs/outputs, transpose) for leaves named
            ``kernel`` with 2+ dims, else unchanged.
        to_flax: the inverse; default: the inverse kernel rule for kernels, else a reshape to
            the Flax leaf's shape.

    Example:
        >>> TorchParam("encoder.layer.0.intermediate.dense").param
        'weight'
    """

    module: str | tuple[str, ...]
    param: str = "weight"
    n_in: int | None = None
    layout: str | None = None
    embedding: bool | None = None
    to_torch: Callable[[np.ndarray], np.ndarray] | None = None
    to_flax: Callable[[np.ndarray], np.ndarray] | None = None

    def __post_init__(self) -> None:
        modules = self.module if isinstance(self.module, tuple) else (self.module,)
        if not modules or not all(isinstance(m, str) and m for m in modules):
            raise ValueError(
                f"expected `module` to be a non-empty str or tuple of str, got {self.module!r}"
            )
        if not isinstance(self.param, str) or not self.param:
            raise ValueError(f"expected `param` to be a non-empty str, got {self.param!r}")

    @property
    def modules(self) -> tuple[str, ...]:
        """The module path(s) as a tuple."""
        return self.module if isinstance(self.module, tuple) else (self.module,)


NameMap = Mapping[str, "str | TorchParam"] | Callable[[str], "str | TorchParam | None"]
"""Flax leaf path (``'/'``-joined, as :func:`lorax.paths.path_str`) -> PyTorch location.

A ``dict`` or a callable returning ``None`` for unmapped paths. A ``str`` value is a module
path (for a LoRA kernel: ``TorchParam(module)``), a tuple of ``str`` one module path per layer
of a stacked kernel (``TorchParam(modules)``); a :class:`TorchParam` says more.
"""


def resolve(name_map: NameMap, path: str) -> TorchParam | None:
    """Where ``name_map`` puts the Flax leaf at ``path``, or ``None`` when it has no counterpart.

    Raises:
        TypeError: for a ``name_map`` that is neither a dict nor a callable, or a value that is
            neither a ``str``, a tuple of ``str``, a :class:`TorchParam` nor ``None``.

    Example:
        >>> resolve({"fc/kernel": "model.fc"}, "fc/kernel")
        TorchParam(module='model.fc', param='weight', n_in=None, layout=None, embedding=None, to_torch=None, to_flax=None)
        >>> resolve(lambda path: None, "fc/kernel") is None
        True
    """  # noqa: E501
    if isinstance(name_map, Mapping):
        value = name_map.get(path)
    elif callable(name_map):
        value = name_map(path)
    else:
        raise TypeError(
            f"expected `name_map` to be a dict or a callable path -> module, got "
            f"{type(name_map).__name__}"
        )
    if value is None or isinstance(value, TorchParam):
        return value
    if isinstance(value, str | tuple):  # a tuple: one module per layer of a stacked kernel
        return TorchParam(value)
    raise TypeError(
        f"expected `name_map` to give a str, a tuple of str or a TorchParam for {path!r}, got "
        f"{type(value).__name__}"
    )


def is_embedding(target: TorchParam, path: str) -> bool:
    """Whether the PyTorch module is an ``nn.Embedding``: ``target.embedding`` when set, else
    whether the Flax leaf is named ``embedding``.

    Example:
        >>> is_embedding(TorchParam("embeddings.word"), "embed/embedding")
        True
    """
    if target.embedding is not None:
        return bool(target.embedding)
    return leaf_name(path) == "embedding"


def kernel_n_in(target: TorchParam, path: str, ndim: int) -> int:
    """How many leading axes of the (unstacked) kernel are inputs: ``target.n_in`` when set,
    else :func:`lorax.layouts.default_in_axes`.

    Example:
        >>> kernel_n_in(TorchParam("fc"), "fc/kernel", 2), kernel_n_in(TorchParam("o", n_in=2),
        ...                                                            "out/kernel", 3)
        (1, 2)
    """
    return default_in_axes(path, ndim) if target.n_in is None else int(target.n_in)


def kernel_layout(target: TorchParam, path: str, shape: tuple[int, ...]) -> str:
    """The layout a LoRA kernel has in the PyTorch module's terms: one stack axis when the
    name map gives one module per stacked kernel, else none.

    Raises:
        ValueError: for a ``target.layout`` that does not fit ``shape``.

    Example:
        >>> kernel_layout(TorchParam("q_proj"), "attn/query/kernel", (16, 2, 8))
        'ioo'
        >>> kernel_layout(TorchParam(("l.0.fc", "l.1.fc")), "fc/kernel", (2, 16, 8))
        'sio'
    """
    n_stack = 1 if isinstance(target.module, tuple) else 0
    if target.layout is not None:
        return check_layout(target.layout, shape, path)
    if target.n_in is None:
        layout = default_layout(path, shape)
        if Layout(layout).n_stack == n_stack:
            return layout
    return canonical_layout(len(shape), n_stack, kernel_n_in(target, path, len(shape) - n_stack))


def leaf_to_torch(target: TorchParam, path: str, value: Any) -> np.ndarray:
    """A leaf trained in full in PyTorch's layout: ``target.to_torch`` when given; a kernel
    (:func:`lorax.paths.is_kernel_path`) flattened to ``(in_features, out_features)`` and
    transposed; any other leaf unchanged.

    Example:
        >>> leaf_to_torch(TorchParam("fc"), "fc/kernel", np.zeros((4, 2, 3))).shape  # n_in=2
        (3, 8)
    """
    array = np.asarray(value)
    if target.to_torch is not None:
        return np.ascontiguousarray(target.to_torch(array))
    if is_kernel_path(path, array.ndim):
        n_in = kernel_n_in(target, path, array.ndim)
        in_size = math.prod(array.shape[:n_in])
        return np.ascontiguousarray(array.reshape(in_size, -1).T)
    return np.ascontiguousarray(array)


def leaf_to_flax(target: TorchParam, path: str, array: np.ndarray, shape: tuple[int, ...],
                 key: str) -> np.ndarray:
    """The inverse of :func:`leaf_to_torch` for the tensor ``key`` onto a Flax leaf of
    ``shape``.

    Raises:
        ValueError: naming ``key`` and ``path``, when the tensor does not fit the leaf.

    Example:
        >>> leaf_to_flax(TorchParam("fc"), "fc/kernel", np.zeros((3, 8)), (4, 2, 3), "k").shape
        (4, 2, 3)
    """
    if target.to_flax is not None:
        out = np.asarray(target.to_flax(array))
    elif is_kernel_path(path, len(shape)) and array.ndim == 2:
        n_in = kernel_n_in(target, path, len(shape))
        expected = (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
        if tuple(array.shape) != expected:
            raise ValueError(
                f"tensor {key!r} has shape {list(array.shape)}, expected {list(expected)} for "
                f"the Flax leaf {path!r} of shape {list(shape)}"
            )
        out = array.T.reshape(shape)
    elif array.size == math.prod(shape):
        out = array.reshape(shape)
    else:
        out = array
    if tuple(out.shape) != tuple(shape):
        raise ValueError(
            f"tensor {key!r} of shape {list(array.shape)} does not fit the Flax leaf {path!r} of "
            f"shape {list(shape)}"
        )
    return out
