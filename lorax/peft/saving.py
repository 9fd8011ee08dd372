"""Writing a wrapped tree as a PEFT LoRA adapter directory (:func:`save`)."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lorax import modules
from lorax.node import FullyTrained, LoRA, is_array_like, is_node
from lorax.paths import path_str
from lorax.peft.config import (
    alpha_of,
    excluded_by_modules_to_save,
    make_config,
    module_to_save_matches,
    write_config,
)
from lorax.peft.files import write_tensors
from lorax.peft.names import (
    PREFIX,
    NameMap,
    TorchParam,
    is_embedding,
    kernel_layout,
    leaf_to_torch,
    resolve,
)


@dataclasses.dataclass
class _Adapter:
    """One PyTorch module's LoRA factors, as PEFT stores them."""

    module: str
    path: str
    rank: int
    alpha: float | int
    embedding: bool
    a: np.ndarray  # (r, in): lora_A
    b: np.ndarray  # (out, r): lora_B
    magnitude: np.ndarray | None = None  # (out,): DoRA's lora_magnitude_vector


@dataclasses.dataclass
class _Export:
    """What :func:`save` writes, gathered from the tree in one pass."""

    adapters: list[_Adapter] = dataclasses.field(default_factory=list)
    # Every mapped unstacked leaf that is not a LoRA node, by module: what modules hold.
    module_params: dict[str, list[tuple[str, TorchParam, Any]]] = dataclasses.field(
        default_factory=dict)
    known_modules: set[str] = dataclasses.field(default_factory=set)  # every mapped module
    trained_modules: dict[str, str] = dataclasses.field(default_factory=dict)  # -> leaf path
    dropouts: dict[float, str] = dataclasses.field(default_factory=dict)  # -> first node path


def save(
    directory: str | os.PathLike[str],
    tree: Any,
    *,
    name_map: NameMap,
    base_model_name_or_path: str | None = None,
    use_rslora: bool = False,
) -> dict[str, Any]:
    """Writes the adapters of ``tree`` as a PEFT LoRA adapter directory.

    Each LoRA node becomes ``lora_A``/``lora_B`` tensors of its PyTorch module (transposed to
    PyTorch's ``(r, in)``/``(out, r)``, in the factors' dtype); each :class:`lorax.FullyTrained`
    leaf puts its module in ``modules_to_save`` and every mapped parameter of that module (the
    boxed ones and the module's other, untouched leaves) is written under its PyTorch name, as
    PEFT saves whole modules. The config holds the most common rank and alpha (ties: the
    largest) as ``r`` and ``lora_alpha``; modules that differ are listed in ``rank_pattern`` /
    ``alpha_pattern`` under their full module path, and ``target_modules`` lists every adapted
    module path, so PEFT rebuilds exactly these modules with exactly these ranks and scales.
    Both files are written atomically (temporary file, then ``os.replace``), tensors first.

    Args:
        directory: the adapter directory; created if missing, files in it are replaced.
        tree: a wrapped tree (from :func:`lorax.wrap` or :func:`lorax.peft.load`).
        name_map: Flax path -> PyTorch module (see :data:`lorax.peft.NameMap`).
        base_model_name_or_path: recorded in the config; ``PeftModel.from_pretrained`` does not
            need it, ``AutoPeftModel`` does.
        use_rslora: write ``use_rslora: true`` and alphas as ``scale * sqrt(r)``; otherwise
            alphas are ``scale * r``. Nodes keep only their scale, so either way PEFT computes
            the same scale; pass the value the adapter was trained with.

    Returns:
        The config dict that was written.

    Raises:
        ValueError: when a LoRA kernel or trained leaf is not in ``name_map`` (naming its path),
            when nodes disagree on dropout, when a module would be both LoRA-adapted and in
            ``modules_to_save`` (PEFT cannot express that), or when the tree has no LoRA node.
        NotImplementedError: for a stacked kernel not mapped to one module per layer.

    Example:
        >>> import json, pathlib, tempfile, jax.numpy as jnp, lorax, lorax.peft
        >>> params = {"fc": {"kernel": jnp.ones((16, 8))}, "out": {"kernel": jnp.ones((8, 4))}}
        >>> lp = lorax.wrap(params, rank=4, rank_pattern={"out": 2}, alpha=8.0)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     config = lorax.peft.save(d, lp, name_map={"fc/kernel": "fc", "out/kernel": "out"})
        ...     files = sorted(p.name for p in pathlib.Path(d).iterdir())
        >>> files
        ['adapter_config.json', 'adapter_model.safetensors']
        >>> config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]
        (4, 8, {'out': 2}, {})
    """
    if not isinstance(use_rslora, bool | np.bool_):
        raise TypeError(f"expected `use_rslora` to be a bool, got {type(use_rslora).__name__}")
    export = _gather(modules.as_tree(tree), name_map, bool(use_rslora))
    _check_export(export)
    tensors = _tensors(export)
    config = make_config(
        {a.module: a.rank for a in export.adapters},
        {a.module: a.alpha for a in export.adapters},
        modules=sorted(export.known_modules),
        modules_to_save=sorted(export.trained_modules),
        dropout=next(iter(export.dropouts)),
        use_rslora=bool(use_rslora),
        use_dora=export.adapters[0].magnitude is not None,
        base_model_name_or_path=base_model_name_or_path,
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_tensors(directory, tensors)
    write_config(directory, config)
    return config


# ---------------------------------------------------------------------------------------------
# gathering the tree's leaves by PyTorch module


def _gather(tree: Any, name_map: NameMap, use_rslora: bool) -> _Export:
    """Every mapped leaf of ``tree``, by PyTorch module: which modules exist, what they hold."""
    export = _Export()
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]:
        if not (is_node(leaf) or is_array_like(leaf)):
            continue
        path = path_str(keypath)
        target = resolve(name_map, path)
        if target is not None:
            export.known_modules.update(target.modules)
        if is_node(leaf) and hasattr(leaf, "adapters"):  # a MultiLoRA node
            raise ValueError(
                f"the kernel {path!r} has named adapters {sorted(leaf.adapters)}; export one "
                "at a time: lorax.peft.save(d, lorax.adapters.get_adapter(tree, name), ...)"
            )
        if isinstance(leaf, LoRA):
            export.adapters += _adapters_of(path, leaf, target, use_rslora)
            export.dropouts.setdefault(float(leaf.dropout), path)
        else:
            _add_leaf(export, path, leaf, target)
    return export


def _add_leaf(export: _Export, path: str, leaf: Any, target: TorchParam | None) -> None:
    """Records a leaf that is not a LoRA node under its module (a trained one marks its module
    for ``modules_to_save``)."""
    trained = isinstance(leaf, FullyTrained)
    if target is None:
        if trained:
            raise ValueError(
                f"the trained leaf {path!r} has no PyTorch parameter in `name_map`; map it "
                "to TorchParam(module, param) for PEFT's modules_to_save"
            )
        return
    if isinstance(target.module, tuple):
        if trained:
            raise NotImplementedError(
                f"the trained leaf {path!r} maps to several modules; modules_to_save of "
                "stacked leaves is not supported"
            )
        return
    held = export.module_params.setdefault(target.module, [])
    for other, other_target, _ in held:
        if other_target.param == target.param:  # one tensor name: the second would be lost
            raise ValueError(
                f"`name_map` maps both {other!r} and {path!r} to the PyTorch parameter "
                f"'{target.module}.{target.param}'; give each its own parameter, e.g. "
                f"TorchParam({target.module!r}, 'bias') for a bias")
    held.append((path, target, leaf))
    if trained:
        export.trained_modules.setdefault(target.module, path)


def _adapters_of(path: str, node: LoRA, target: TorchParam | None, use_rslora: bool
                 ) -> list[_Adapter]:
    """The LoRA node at ``path`` as one :class:`_Adapter` per PyTorch module (per layer of a
    stacked kernel)."""
    _check_lora_target(path, node, target)
    layers, in_size, out_size = map(math.prod, node.groups(node.shape))
    a = np.asarray(node.a).reshape(layers, in_size, node.rank)
    b = np.asarray(node.b).reshape(layers, node.rank, out_size)
    alpha = alpha_of(float(node.scale), node.rank, use_rslora)
    embedding = is_embedding(target, path)
    magnitudes = [None] * layers
    if node.magnitude is not None:
        if embedding:
            raise ValueError(
                f"the DoRA kernel {path!r} is an embedding; lorax.peft writes DoRA only for "
                "Linear-like modules"
            )
        magnitudes = list(np.asarray(node.magnitude).reshape(layers, out_size))
    return [
        _Adapter(module, path, node.rank, alpha, embedding,
                 np.ascontiguousarray(a[i].T), np.ascontiguousarray(b[i].T), magnitudes[i])
        for i, module in enumerate(target.modules)
    ]


def _check_lora_target(path: str, node: LoRA, target: TorchParam | None) -> None:
    """Refuses a LoRA node that PEFT cannot load as mapped: a PiSSA residual, no or a wrong
    module, a layout the name map would not rebuild, a stack not mapped per layer."""
    if node.residual:
        raise ValueError(
            f"the LoRA kernel {path!r} was initialised with PiSSA: its base is the residual "
            "W - s*a0@b0, not the original weight PEFT would load it onto; convert it first "
            "with lorax.pissa.to_lora(tree, initial_tree) (a LoRA of rank 2r over the original W)"
        )
    if target is None:
        raise ValueError(
            f"the LoRA kernel {path!r} has no PyTorch module in `name_map`; map it to the "
            "module path PEFT sees (e.g. 'model.layers.0.self_attn.q_proj')"
        )
    if target.param != "weight":
        raise ValueError(
            f"expected `name_map` to map the LoRA kernel {path!r} to a module's 'weight', got "
            f"param {target.param!r}"
        )
    # The factors are canonical: PEFT's in/out features are the input/output axes flattened in
    # the kernel's own order, whatever the layout (Gemma's q_einsum (N, D, H) gives q_proj's
    # (N*H, D) weight).
    layers = math.prod(node.stack_shape)
    if not node.n_stack or len(target.modules) == layers:
        expected = kernel_layout(target, path, node.shape)
        if node.roles != expected:
            raise ValueError(
                f"the LoRA kernel {path!r} has layout {node.roles!r} (n_in={node.n_in}) but "
                f"`name_map` implies {expected!r}, which lorax.peft.load would rebuild; set "
                f"TorchParam(layout={node.roles!r}) to match the PyTorch module"
            )
    if node.n_stack and len(target.modules) != layers:
        axes = [j for j, role in enumerate(node.roles) if role == "s"]
        raise NotImplementedError(
            f"the LoRA kernel {path!r} is stacked over axes {axes} (stack shape "
            f"{list(node.stack_shape)}); PEFT has one module per kernel, so map it to a tuple "
            f"of module paths ({layers}, one per stacked kernel, row-major over the stack axes)"
        )
    if node.n_stack == 0 and isinstance(target.module, tuple):
        raise ValueError(
            f"`name_map` gives {len(target.modules)} modules for the unstacked kernel {path!r}"
        )


# ---------------------------------------------------------------------------------------------
# what PEFT can express, and the tensors


def _check_export(export: _Export) -> None:
    """Refuses what one PEFT adapter cannot hold: no LoRA node, mixed DoRA, mixed dropout, two
    kernels on one module, a module both adapted and trained in full, an ambiguous
    ``modules_to_save`` entry."""
    adapters = export.adapters
    if not adapters:
        raise ValueError(
            "expected `tree` to hold LoRA nodes (from lorax.wrap or lorax.peft.load), got none"
        )
    dora_paths = {a.magnitude is not None: a.path for a in adapters}
    if len(dora_paths) > 1:
        raise ValueError(
            f"PEFT has one use_dora per adapter, but {dora_paths[True]!r} is a DoRA kernel and "
            f"{dora_paths[False]!r} is not"
        )
    if len(export.dropouts) > 1:
        (d0, p0), (d1, p1) = list(export.dropouts.items())[:2]
        raise ValueError(
            f"PEFT has one lora_dropout per adapter, but {p0!r} has dropout {d0} and {p1!r} has "
            f"{d1}"
        )
    seen: dict[str, str] = {}
    for adapter in adapters:
        if adapter.module in seen:
            raise ValueError(
                f"`name_map` maps both {seen[adapter.module]!r} and {adapter.path!r} to the "
                f"module {adapter.module!r}"
            )
        seen[adapter.module] = adapter.path
        for entry, trained_path in export.trained_modules.items():
            if excluded_by_modules_to_save(entry, adapter.module):
                raise ValueError(
                    f"the trained leaf {trained_path!r} puts module {entry!r} in PEFT's "
                    f"modules_to_save, which excludes the LoRA kernel {adapter.path!r} (module "
                    f"{adapter.module!r}) from LoRA; PEFT cannot train both"
                )
    for module in sorted(export.trained_modules):
        clashes = [m for m in export.known_modules
                   if m != module and module_to_save_matches(module, m)]
        if clashes:
            raise ValueError(
                f"PEFT selects modules_to_save by suffix, and {module!r} (trained leaf "
                f"{export.trained_modules[module]!r}) also matches {clashes[0]!r}"
            )


def _tensors(export: _Export) -> dict[str, np.ndarray]:
    """PEFT's tensors: each adapter's factors (and DoRA magnitude), and every mapped parameter
    of each module in ``modules_to_save``."""
    tensors: dict[str, np.ndarray] = {}
    for adapter in export.adapters:
        key = f"{PREFIX}{adapter.module}"
        a_name, b_name = (("lora_embedding_A", "lora_embedding_B") if adapter.embedding
                          else ("lora_A.weight", "lora_B.weight"))
        tensors[f"{key}.{a_name}"] = adapter.a
        tensors[f"{key}.{b_name}"] = adapter.b
        if adapter.magnitude is not None:
            tensors[f"{key}.lora_magnitude_vector"] = np.ascontiguousarray(adapter.magnitude)
    for module in sorted(export.trained_modules):
        for path, target, leaf in export.module_params[module]:
            value = leaf.value if isinstance(leaf, FullyTrained) else leaf
            tensors[f"{PREFIX}{module}.{target.param}"] = leaf_to_torch(target, path, value)
    return tensors
