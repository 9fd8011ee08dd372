"""Reading a PEFT LoRA adapter directory onto a parameter tree (:func:`load`)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax import modules
from lorax.layouts import Layout
from lorax.node import FullyTrained, LoRA, is_array_like, is_node
from lorax.paths import listing, path_str
from lorax.peft.config import module_to_save_matches, rank_and_scale, read_config
from lorax.peft.files import CONFIG_NAME, WEIGHTS_NAME, read_tensors
from lorax.peft.names import (
    LORA_SUFFIXES,
    PREFIX,
    NameMap,
    TorchParam,
    is_embedding,
    kernel_layout,
    leaf_to_flax,
    resolve,
)

# A module's tensors by side ("A", "B", "M"): (tensor key, array).
_Sides = dict[str, tuple[str, np.ndarray]]


@dataclasses.dataclass
class _Slot:
    """One Flax leaf of ``params`` as PEFT sees it."""

    path: str
    target: TorchParam
    leaf: Any
    layer: int = 0


@dataclasses.dataclass
class _Slots:
    """The mapped leaves of ``params``, by PyTorch name."""

    by_module: dict[str, _Slot]  # LoRA targets: module -> kernel ("weight" leaves)
    by_param: dict[str, _Slot]  # modules_to_save: "module.param" -> leaf


@dataclasses.dataclass
class _Layer:
    """One module's factors in the Flax kernel's canonical shapes."""

    layer: int
    a: np.ndarray  # (*in, r)
    b: np.ndarray  # (r, *out)
    rank: int
    scale: float
    magnitude: np.ndarray | None  # (*out,), float32


def load(
    directory: str | os.PathLike[str],
    params: Any,
    *,
    name_map: NameMap,
    dtype: Any = None,
) -> Any:
    """Reads a PEFT LoRA adapter directory onto ``params``: the inverse of
    :func:`lorax.peft.save`.

    Each module with ``lora_A``/``lora_B`` tensors becomes a :class:`lorax.LoRA` node over its
    Flax kernel in ``params`` (the caller's array, not a copy), with PEFT's rank and scale for
    that module (``rank_pattern``/``alpha_pattern`` applied as PEFT does; ``scale = alpha / r``
    or ``alpha / sqrt(r)`` with ``use_rslora``), ``n_in`` from the name map (default
    :func:`lorax.layouts.default_in_axes`, as :func:`lorax.wrap`) and PEFT's ``lora_dropout``.
    Each other tensor (a ``modules_to_save`` parameter) replaces its leaf as a
    :class:`lorax.FullyTrained` box (in the leaf's dtype).

    Args:
        directory: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
        params: the base model's plain parameter tree (no LoRA nodes).
        name_map: Flax path -> PyTorch module (see :data:`lorax.peft.NameMap`).
        dtype: dtype of the factors; default the dtype stored in the file.

    Returns:
        ``params`` with the adapted leaves replaced by nodes.

    Raises:
        ValueError: naming the tensor key or file, for a tensor whose module or parameter is
            not in ``name_map`` (or not in ``params``), a shape that does not fit, a rank that
            disagrees with the config, a lone ``lora_A``/``lora_B``, an unreadable file, or a
            PEFT setting lorax does not implement (see :func:`lorax.peft.read_config`).

    Example:
        >>> import tempfile, jax.numpy as jnp, lorax, lorax.peft
        >>> params = {"fc": {"kernel": jnp.ones((16, 8))}}
        >>> lp = lorax.wrap(params, rank=4)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = lorax.peft.save(d, lp, name_map={"fc/kernel": "fc"})
        ...     lorax.peft.load(d, params, name_map={"other/kernel": "fc"})
        Traceback (most recent call last):
        ...
        ValueError: tensor 'base_model.model.fc.lora_A.weight': module 'fc' is not in `name_map` ...
    """
    if modules.is_module(params):  # a module of the base, or a wrapped one: its adapters go
        return modules.rebuild(params, load(directory, modules.module_tree(params),
                                            name_map=name_map, dtype=dtype))
    directory = Path(directory)
    config = read_config(directory)
    tensors = read_tensors(directory)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)
    paths = [path_str(kp) for kp, _ in flat]
    leaves = [leaf for _, leaf in flat]
    slots = _slots(paths, leaves, name_map)
    factors, trained = _sort_tensors(tensors, slots, config.get("modules_to_save") or [])
    nodes = _nodes(directory, config, factors, slots, dtype)
    new_leaves = []
    for path, leaf in zip(paths, leaves, strict=True):
        if path in nodes:
            new_leaves.append(nodes[path])
        elif path in trained:
            new_leaves.append(FullyTrained(jnp.asarray(trained[path])))
        else:
            new_leaves.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, new_leaves)


def _slots(paths: Sequence[str], leaves: Sequence[Any], name_map: NameMap) -> _Slots:
    """The array leaves of ``params`` that ``name_map`` maps, by PyTorch name."""
    slots = _Slots({}, {})
    for path, leaf in zip(paths, leaves, strict=True):
        if is_node(leaf):
            raise ValueError(
                f"expected `params` without LoRA nodes, got a wrapped leaf at {path!r}; pass "
                "the base parameters (lorax.unwrap)"
            )
        if not is_array_like(leaf):
            continue
        target = resolve(name_map, path)
        if target is None:
            continue
        for layer, module in enumerate(target.modules):
            name = f"{module}.{target.param}"
            if name in slots.by_param:
                raise ValueError(
                    f"`name_map` maps both {slots.by_param[name].path!r} and {path!r} to "
                    f"{name!r}"
                )
            slots.by_param[name] = _Slot(path, target, leaf, layer)
            if target.param == "weight":
                slots.by_module[module] = slots.by_param[name]
    return slots


# ---------------------------------------------------------------------------------------------
# the tensors: LoRA factors by module, modules_to_save parameters by leaf


def _sort_tensors(tensors: dict[str, np.ndarray], slots: _Slots, modules_to_save: list[str]
                  ) -> tuple[dict[str, _Sides], dict[str, np.ndarray]]:
    """Splits the file's tensors into LoRA factors (by module, then side) and the new values of
    leaves trained in full (by Flax path)."""
    known = sorted(slots.by_module)
    factors: dict[str, _Sides] = {}
    trained: dict[str, np.ndarray] = {}
    for key in sorted(tensors):
        if not key.startswith(PREFIX):
            raise ValueError(f"tensor {key!r} does not start with {PREFIX!r}, as PEFT's keys do")
        name = key[len(PREFIX) :]
        suffix = next((s for s in LORA_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            slot = _trained_slot(key, name, slots, modules_to_save)
            value = leaf_to_flax(slot.target, slot.path, tensors[key], tuple(slot.leaf.shape), key)
            trained[slot.path] = np.asarray(value, dtype=slot.leaf.dtype)
            continue
        module = name[: -len(suffix)]
        if module not in slots.by_module:
            raise ValueError(
                f"tensor {key!r}: module {module!r} is not in `name_map` (or its kernel not "
                f"in `params`); mapped modules: {listing(known, limit=6)}"
            )
        factors.setdefault(module, {})[LORA_SUFFIXES[suffix]] = (key, tensors[key])
    return factors, trained


def _trained_slot(key: str, name: str, slots: _Slots, modules_to_save: list[str]) -> _Slot:
    """The leaf that the non-LoRA tensor ``key`` (PyTorch parameter ``name``) trains in full."""
    if ".lora_" in name:
        raise ValueError(f"tensor {key!r} is a LoRA variant lorax.peft does not support")
    slot = slots.by_param.get(name)
    if slot is None or isinstance(slot.target.module, tuple):
        raise ValueError(
            f"tensor {key!r}: parameter {name!r} is not in `name_map` (or its leaf not in "
            "`params`); map the Flax leaf to TorchParam(module, param)"
        )
    module = name[: -len(slot.target.param) - 1]
    if not any(module_to_save_matches(m, module) for m in modules_to_save):
        raise ValueError(
            f"tensor {key!r} is neither a LoRA factor nor in modules_to_save "
            f"{modules_to_save!r} of {CONFIG_NAME}"
        )
    return slot


# ---------------------------------------------------------------------------------------------
# LoRA nodes


def _nodes(directory: Path, config: dict[str, Any], factors: dict[str, _Sides], slots: _Slots,
           dtype: Any) -> dict[str, LoRA]:
    """The LoRA node of each adapted Flax kernel, by path; a stacked kernel gathers one
    :class:`_Layer` per module first."""
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    use_dora = bool(config.get("use_dora", False))
    nodes: dict[str, LoRA] = {}
    stacked: dict[str, tuple[_Slot, list[_Layer]]] = {}
    for module, sides in factors.items():
        _check_pair(directory, sides)
        slot = slots.by_module[module]
        layout = _module_layout(module, slot)
        layer = _module_factors(directory, config, module, sides, slot, layout, use_dora)
        if layout.n_stack:
            stacked.setdefault(slot.path, (slot, []))[1].append(layer)
            continue
        nodes[slot.path] = LoRA(
            w=slot.leaf, a=_as_factor(layer.a, dtype), b=_as_factor(layer.b, dtype),
            scale=layer.scale, rank=layer.rank, path=slot.path, dropout=dropout,
            magnitude=None if layer.magnitude is None else jnp.asarray(layer.magnitude),
            **layout.node_fields,
        )
    for path, (slot, layers) in stacked.items():
        nodes[path] = _stack_layers(path, slot, layers, dropout, dtype)
    return nodes


def _check_pair(directory: Path, sides: _Sides) -> None:
    """Refuses a module with a lone ``lora_A``, ``lora_B`` or DoRA magnitude."""
    if "A" not in sides and "B" not in sides:
        raise ValueError(
            f"tensor {sides['M'][0]!r} is a DoRA magnitude without lora_A/lora_B tensors in "
            f"{str(directory / WEIGHTS_NAME)!r}"
        )
    for side in ("A", "B"):
        if side not in sides:
            other = "B" if side == "A" else "A"
            raise ValueError(
                f"tensor {sides[other][0]!r} has no lora_{side} counterpart in "
                f"{str(directory / WEIGHTS_NAME)!r}"
            )


def _module_layout(module: str, slot: _Slot) -> Layout:
    """The layout of the module's Flax kernel, with at most one stack axis."""
    try:
        layout = Layout(kernel_layout(slot.target, slot.path, tuple(slot.leaf.shape)))
    except ValueError:
        layout = None
    if layout is None or layout.n_stack > 1:
        raise ValueError(
            f"module {module!r}: the Flax leaf {slot.path!r} of shape {list(slot.leaf.shape)} is "
            "not a kernel with input and output axes"
        )
    return layout


def _module_factors(directory: Path, config: dict[str, Any], module: str, sides: _Sides,
                    slot: _Slot, layout: Layout, use_dora: bool) -> _Layer:
    """The module's PEFT factors ``(r, in)``/``(out, r)``, checked against the config's rank,
    reshaped to the kernel's canonical ``(*in, r)``/``(r, *out)``."""
    (key_a, A), (key_b, B) = sides["A"], sides["B"]
    shape = tuple(slot.leaf.shape)
    _, in_shape, out_shape = layout.groups(layout.to_canonical(shape))
    rank, scale = rank_and_scale(config, module)
    for key, array, expected in (
        (key_a, A, (rank, math.prod(in_shape))),
        (key_b, B, (math.prod(out_shape), rank)),
    ):
        if tuple(array.shape) != expected:
            raise ValueError(
                f"tensor {key!r} has shape {list(array.shape)}, expected {list(expected)} "
                f"(r={rank} from {CONFIG_NAME}; Flax kernel {slot.path!r} of shape "
                f"{list(shape)} with n_in={layout.n_in})"
            )
    magnitude = _magnitude(directory, module, sides, use_dora, out_shape,
                           is_embedding(slot.target, slot.path))
    return _Layer(slot.layer, A.T.reshape(*in_shape, rank), B.T.reshape(rank, *out_shape), rank,
                  scale, magnitude)


def _as_factor(array: np.ndarray, dtype: Any) -> jax.Array:
    return jnp.asarray(array if dtype is None else array.astype(dtype))


def _magnitude(directory: Path, module: str, sides: _Sides, use_dora: bool,
               out_shape: tuple[int, ...], embedding: bool) -> np.ndarray | None:
    """The module's DoRA magnitude reshaped to the kernel's output axes (float32), or None."""
    if "M" not in sides:
        if use_dora:
            raise ValueError(
                f"{directory / CONFIG_NAME} sets use_dora=True (DoRA) but module {module!r} has "
                f"no lora_magnitude_vector tensor in {str(directory / WEIGHTS_NAME)!r}"
            )
        return None
    key, array = sides["M"]
    if not use_dora:
        raise ValueError(
            f"tensor {key!r} is a DoRA magnitude but {directory / CONFIG_NAME} does not set "
            "use_dora=True"
        )
    if embedding:
        raise ValueError(f"tensor {key!r}: DoRA on embeddings is not supported by lorax.peft")
    if array.size != math.prod(out_shape) or array.ndim != 1:
        raise ValueError(
            f"tensor {key!r} has shape {list(array.shape)}, expected [{math.prod(out_shape)}] "
            f"(out_features of module {module!r})"
        )
    return np.asarray(array, np.float32).reshape(out_shape)


def _stack_layers(path: str, slot: _Slot, layers: list[_Layer], dropout: float, dtype: Any
                  ) -> LoRA:
    """One stacked LoRA node from the factors of every layer's module."""
    layers = sorted(layers, key=lambda layer: layer.layer)
    count = len(slot.target.modules)
    if len(layers) != count:
        have = {layer.layer for layer in layers}
        missing = next(m for i, m in enumerate(slot.target.modules) if i not in have)
        raise ValueError(
            f"the stacked kernel {path!r} needs factors for all {count} layers; module "
            f"{missing!r} has none"
        )
    ranks = {layer.rank for layer in layers}
    scales = {layer.scale for layer in layers}
    if len(ranks) > 1 or len(scales) > 1:
        raise ValueError(
            f"the layers of the stacked kernel {path!r} have ranks {sorted(ranks)} and scales "
            f"{sorted(scales)}; a stacked LoRA node needs one rank and one scale"
        )
    layout = Layout(kernel_layout(slot.target, path, tuple(slot.leaf.shape)))
    a = np.stack([layer.a for layer in layers])
    b = np.stack([layer.b for layer in layers])
    m = (None if layers[0].magnitude is None
         else jnp.asarray(np.stack([layer.magnitude for layer in layers])))
    return LoRA(w=slot.leaf, a=_as_factor(a, dtype), b=_as_factor(b, dtype), scale=scales.pop(),
                rank=ranks.pop(), path=path, dropout=dropout, magnitude=m, **layout.node_fields)
