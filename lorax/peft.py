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

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from lorax.layouts import (
    canonical_layout,
    check_layout,
    default_in_axes,
    default_layout,
    layout_order,
    stored_layout,
)
from lorax.node import FullyTrained, LoRA, is_array_like, is_node
from lorax.paths import path_str

WEIGHTS_NAME = "adapter_model.safetensors"
"""The tensor file PEFT reads and writes (``safe_serialization=True``, its default)."""

CONFIG_NAME = "adapter_config.json"
"""PEFT's adapter config file."""

PREFIX = "base_model.model."
"""The prefix PEFT puts before every module path in ``adapter_model.safetensors``."""

# Factor tensor names -> side; Linear and Embedding factors share one layout, so load takes
# either name for either module type.
_LORA_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
    ".lora_magnitude_vector": "M",  # DoRA (PEFT drops the ".weight" of the DoraLayer)
}
# Config settings that change what the adapter computes and that lorax does not implement.
_UNSUPPORTED_IF_SET = (
    "lora_bias",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "velora_config",
    "monteclora_config",
    "kasa_config",
)
# init_lora_weights methods that also rewrite the base weights: the adapter needs that residual
# base model, unless PEFT converted it (save_pretrained(path_initial_model_for_weight_conversion)).
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


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
            :class:`lorax.node.KernelAxes`) when its axes are in another order, e.g. ``"oio"``
            for Gemma's ``q_einsum`` ``(N, D, H)`` (PEFT's ``q_proj`` is ``(N*H, D)``); it
            overrides ``n_in``. Default: :func:`lorax.layouts.default_layout`, as ``wrap``.
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
path (for a LoRA kernel: ``TorchParam(module)``); a :class:`TorchParam` says more.
"""


def _resolve(name_map: NameMap, path: str) -> TorchParam | None:
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
    if isinstance(value, str):
        return TorchParam(value)
    raise TypeError(
        f"expected `name_map` to give a str or TorchParam for {path!r}, got "
        f"{type(value).__name__}"
    )


def _is_kernel(path: str, ndim: int) -> bool:
    return ndim >= 2 and path.rsplit("/", 1)[-1] == "kernel"


def _is_embedding(target: TorchParam, path: str) -> bool:
    if target.embedding is not None:
        return bool(target.embedding)
    return path.rsplit("/", 1)[-1] == "embedding"


def _kernel_n_in(target: TorchParam, path: str, ndim: int) -> int:
    return default_in_axes(path, ndim) if target.n_in is None else int(target.n_in)


def _kernel_layout(target: TorchParam, path: str, shape: tuple[int, ...]) -> str:
    """The layout a LoRA kernel has in the PyTorch module's terms: one stack axis when the
    name map gives one module per stacked kernel, else none."""
    n_stack = 1 if isinstance(target.module, tuple) else 0
    if target.layout is not None:
        return check_layout(target.layout, shape, path)
    if target.n_in is None:
        layout = default_layout(path, shape)
        if layout.count("s") == n_stack:
            return layout
    return canonical_layout(len(shape), n_stack, _kernel_n_in(target, path, len(shape) - n_stack))


def _leaf_to_torch(target: TorchParam, path: str, value: Any) -> np.ndarray:
    array = np.asarray(value)
    if target.to_torch is not None:
        return np.ascontiguousarray(target.to_torch(array))
    if _is_kernel(path, array.ndim):
        n_in = _kernel_n_in(target, path, array.ndim)
        in_size = math.prod(array.shape[:n_in])
        return np.ascontiguousarray(array.reshape(in_size, -1).T)
    return np.ascontiguousarray(array)


def _leaf_to_flax(target: TorchParam, path: str, array: np.ndarray, shape: tuple[int, ...],
                  key: str) -> np.ndarray:
    if target.to_flax is not None:
        out = np.asarray(target.to_flax(array))
    elif _is_kernel(path, len(shape)) and array.ndim == 2:
        n_in = _kernel_n_in(target, path, len(shape))
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


# ---------------------------------------------------------------------------------------------
# PEFT's matching rules (peft.utils.other.get_pattern_key, peft.utils.other._set_trainable)


def pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """The value PEFT takes from ``rank_pattern``/``alpha_pattern`` for ``module``.

    PEFT tries the keys in order and uses the first that matches a dot-separated suffix of the
    module path as a regex (``re.match(rf"(.*\\.)?({key})$", module)``). Note that PEFT writes
    ``adapter_config.json`` with sorted keys, which is the order it applies on loading.

    Example:
        >>> pattern_value({"0.output.dense": 6}, "encoder.layer.0.output.dense", 4)
        6
        >>> pattern_value({"0.output.dense": 6}, "encoder.layer.10.output.dense", 4)
        4
    """
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _module_to_save_matches(entry: str, module: str) -> bool:
    # PEFT selects modules_to_save by plain string suffix, without a dot boundary.
    return module.endswith(entry)


def _excluded_by_modules_to_save(entry: str, module: str) -> bool:
    # PEFT never puts LoRA on a module inside (or equal to) a modules_to_save module.
    return re.match(rf"(^|.*\.){entry}($|\..*)", module) is not None


# ---------------------------------------------------------------------------------------------
# save


def _nice(value: float) -> float | int:
    """``value`` snapped to 12 significant digits when that is a float64 rounding away."""
    snapped = float(f"{value:.12g}")
    if math.isclose(snapped, value, rel_tol=1e-13, abs_tol=0.0):
        value = snapped
    return int(value) if value.is_integer() else value


def _most_common(values: Sequence[Any]) -> Any:
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], v))  # ties: the largest value


@dataclasses.dataclass
class _Adapter:
    module: str
    path: str
    rank: int
    alpha: float | int
    embedding: bool
    a: np.ndarray  # (r, in): lora_A
    b: np.ndarray  # (out, r): lora_B
    magnitude: np.ndarray | None = None  # (out,): DoRA's lora_magnitude_vector


def _adapters_of(path: str, node: LoRA, target: TorchParam | None, use_rslora: bool
                 ) -> list[_Adapter]:
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
    stack = node.stack_shape
    if not node.n_stack or len(target.modules) == math.prod(stack):
        expected = _kernel_layout(target, path, node.shape)
        if node.roles != expected:
            raise ValueError(
                f"the LoRA kernel {path!r} has layout {node.roles!r} (n_in={node.n_in}) but "
                f"`name_map` implies {expected!r}, which lorax.peft.load would rebuild; set "
                f"TorchParam(layout={node.roles!r}) to match the PyTorch module"
            )
    layers = math.prod(stack)
    if node.n_stack and len(target.modules) != layers:
        raise NotImplementedError(
            f"the LoRA kernel {path!r} is stacked over axes {list(stack)}; PEFT has one module "
            f"per kernel, so map it to a tuple of module paths ({layers}, one per stacked "
            "kernel, row-major over the stack axes)"
        )
    if node.n_stack == 0 and isinstance(target.module, tuple):
        raise ValueError(
            f"`name_map` gives {len(target.modules)} modules for the unstacked kernel {path!r}"
        )
    in_size, out_size = math.prod(node.in_shape), math.prod(node.out_shape)
    a = np.asarray(node.a).reshape(layers, in_size, node.rank)
    b = np.asarray(node.b).reshape(layers, node.rank, out_size)
    root = math.sqrt(node.rank) if use_rslora else node.rank
    alpha = _nice(float(node.scale) * root)
    embedding = _is_embedding(target, path)
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


def _pattern_key(module: str, others: Sequence[str]) -> str:
    """``module`` as a rank/alpha pattern key that PEFT matches to ``module`` alone."""
    for key in (module, re.escape(module)):
        if not any(other != module and re.match(rf"(.*\.)?({key})$", other) for other in others):
            return key
    # `module` is a dot-suffix of another module path ("fc" and "block.fc"): anchor it.
    return "^" + re.escape(module)


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
        tree: a wrapped tree (from :func:`lorax.wrap` or :func:`load`).
        name_map: Flax path -> PyTorch module (see :data:`NameMap`).
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
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]
    leaves = [(path_str(kp), leaf) for kp, leaf in flat]

    # Every mapped leaf of the tree, by PyTorch module: which modules exist, what they hold.
    module_params: dict[str, list[tuple[str, TorchParam, Any]]] = {}
    known_modules: set[str] = set()
    adapters: list[_Adapter] = []
    trained_modules: dict[str, str] = {}
    dropouts: dict[float, str] = {}
    for path, leaf in leaves:
        if not (is_node(leaf) or is_array_like(leaf)):
            continue
        target = _resolve(name_map, path)
        if target is not None:
            known_modules.update(target.modules)
        if is_node(leaf) and hasattr(leaf, "adapters"):  # a MultiLoRA node
            raise ValueError(
                f"the kernel {path!r} has named adapters {sorted(leaf.adapters)}; export one "
                "at a time: lorax.peft.save(d, lorax.adapters.get_adapter(tree, name), ...)"
            )
        if isinstance(leaf, LoRA):
            adapters += _adapters_of(path, leaf, target, use_rslora)
            dropouts.setdefault(float(leaf.dropout), path)
            continue
        if target is None:
            if isinstance(leaf, FullyTrained):
                raise ValueError(
                    f"the trained leaf {path!r} has no PyTorch parameter in `name_map`; map it "
                    "to TorchParam(module, param) for PEFT's modules_to_save"
                )
            continue
        if isinstance(target.module, tuple):
            if isinstance(leaf, FullyTrained):
                raise NotImplementedError(
                    f"the trained leaf {path!r} maps to several modules; modules_to_save of "
                    "stacked leaves is not supported"
                )
            continue
        module_params.setdefault(target.module, []).append((path, target, leaf))
        if isinstance(leaf, FullyTrained):
            trained_modules.setdefault(target.module, path)

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
    if len(dropouts) > 1:
        (d0, p0), (d1, p1) = list(dropouts.items())[:2]
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
        for entry, trained_path in trained_modules.items():
            if _excluded_by_modules_to_save(entry, adapter.module):
                raise ValueError(
                    f"the trained leaf {trained_path!r} puts module {entry!r} in PEFT's "
                    f"modules_to_save, which excludes the LoRA kernel {adapter.path!r} (module "
                    f"{adapter.module!r}) from LoRA; PEFT cannot train both"
                )

    tensors: dict[str, np.ndarray] = {}
    for adapter in adapters:
        names = ("lora_embedding_A", "lora_embedding_B") if adapter.embedding else (
            "lora_A.weight", "lora_B.weight")
        tensors[f"{PREFIX}{adapter.module}.{names[0]}"] = adapter.a
        tensors[f"{PREFIX}{adapter.module}.{names[1]}"] = adapter.b
        if adapter.magnitude is not None:
            tensors[f"{PREFIX}{adapter.module}.lora_magnitude_vector"] = np.ascontiguousarray(
                adapter.magnitude)
    for module in sorted(trained_modules):
        clashes = [m for m in known_modules if m != module and _module_to_save_matches(module, m)]
        if clashes:
            raise ValueError(
                f"PEFT selects modules_to_save by suffix, and {module!r} (trained leaf "
                f"{trained_modules[module]!r}) also matches {clashes[0]!r}"
            )
        for path, target, leaf in module_params[module]:
            value = leaf.value if isinstance(leaf, FullyTrained) else leaf
            tensors[f"{PREFIX}{module}.{target.param}"] = _leaf_to_torch(target, path, value)

    rank = _most_common([a.rank for a in adapters])
    alpha = _most_common([a.alpha for a in adapters])
    others = sorted(known_modules)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": next(iter(dropouts)),
        "use_rslora": bool(use_rslora),
        "target_modules": sorted(a.module for a in adapters),
        "rank_pattern": {
            _pattern_key(a.module, others): a.rank for a in adapters if a.rank != rank
        },
        "alpha_pattern": {
            _pattern_key(a.module, others): a.alpha for a in adapters if a.alpha != alpha
        },
        "modules_to_save": sorted(trained_modules) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": adapters[0].magnitude is not None,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(
        directory / WEIGHTS_NAME,
        lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata={"format": "pt"}),
    )

    def write_config(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
            handle.write("\n")

    _atomic_write(directory / CONFIG_NAME, write_config)
    return config


# ---------------------------------------------------------------------------------------------
# load


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads and checks ``adapter_config.json``: a LoRA adapter lorax can compute exactly.

    Raises:
        ValueError: naming the file and setting, for a missing or malformed file, a
            ``peft_type`` other than ``"LORA"``, ``fan_in_fan_out``, ``bias != "none"`` or a
            LoRA variant lorax does not implement (LoRA bias, layer replication, ...).

    Example:
        >>> import json, tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = (pathlib.Path(d) / "adapter_config.json").write_text(
        ...         json.dumps({"peft_type": "LORA", "r": 8, "lora_bias": True}))
        ...     read_config(d)
        Traceback (most recent call last):
        ...
        ValueError: .../adapter_config.json sets lora_bias=True, which lorax.peft does not ...
    """
    path = Path(directory) / CONFIG_NAME
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except FileNotFoundError:
        raise ValueError(f"no PEFT adapter config at {str(path)!r}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"could not read the PEFT adapter config {str(path)!r}: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"expected a JSON object in {str(path)!r}, got {type(config).__name__}")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{path} has peft_type={peft_type!r}; lorax.peft reads only 'LORA'")
    if config.get("fan_in_fan_out"):
        raise ValueError(
            f"{path} sets fan_in_fan_out=True (Conv1D-style weights), which lorax.peft does not "
            "support"
        )
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"{path} sets bias={config['bias']!r} (trained biases), which lorax.peft does not "
            "support; only 'none'"
        )
    for key in _UNSUPPORTED_IF_SET:
        if config.get(key):
            raise ValueError(
                f"{path} sets {key}={config[key]!r}, which lorax.peft does not support"
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise ValueError(
            f"{path} has init_lora_weights={init!r}: the adapter belongs to a modified base "
            "model; convert it with PEFT's save_pretrained(path_initial_model_for_weight_"
            "conversion=...) first"
        )
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{path} has r={rank!r}; expected a positive int")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise ValueError(f"{path} has lora_alpha={alpha!r}; expected a number")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise ValueError(f"{path} has {key}={config[key]!r}; expected a dict")
    return config


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    path = directory / WEIGHTS_NAME
    if not path.exists():
        legacy = directory / "adapter_model.bin"
        extra = (
            f"; found {legacy.name}, a pickle: re-save it with PEFT's safe_serialization=True"
            if legacy.exists()
            else ""
        )
        raise ValueError(f"no PEFT adapter weights at {str(path)!r}{extra}")
    try:
        return safetensors.numpy.load_file(path)
    except (safetensors.SafetensorError, OSError, ValueError, TypeError) as err:
        raise ValueError(f"could not read the safetensors file {str(path)!r}: {err}") from None


@dataclasses.dataclass
class _Slot:
    """One Flax leaf of ``params`` as PEFT sees it."""

    path: str
    target: TorchParam
    leaf: Any
    layer: int = 0


def load(
    directory: str | os.PathLike[str],
    params: Any,
    *,
    name_map: NameMap,
    dtype: Any = None,
) -> Any:
    """Reads a PEFT LoRA adapter directory onto ``params``: the inverse of :func:`save`.

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
        name_map: Flax path -> PyTorch module (see :data:`NameMap`).
        dtype: dtype of the factors; default the dtype stored in the file.

    Returns:
        ``params`` with the adapted leaves replaced by nodes.

    Raises:
        ValueError: naming the tensor key or file, for a tensor whose module or parameter is
            not in ``name_map`` (or not in ``params``), a shape that does not fit, a rank that
            disagrees with the config, a lone ``lora_A``/``lora_B``, an unreadable file, or a
            PEFT setting lorax does not implement (see :func:`read_config`).

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
    directory = Path(directory)
    config = read_config(directory)
    tensors = _read_tensors(directory)
    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    modules_to_save = config.get("modules_to_save") or []

    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)
    paths = [path_str(kp) for kp, _ in flat]
    by_module: dict[str, _Slot] = {}  # LoRA targets: module -> kernel ("weight" leaves)
    by_param: dict[str, _Slot] = {}  # modules_to_save: "module.param" -> leaf
    for path, (_, leaf) in zip(paths, flat, strict=True):
        if is_node(leaf):
            raise ValueError(
                f"expected `params` without LoRA nodes, got a wrapped leaf at {path!r}; pass "
                "the base parameters (lorax.unwrap)"
            )
        if not is_array_like(leaf):
            continue
        target = _resolve(name_map, path)
        if target is None:
            continue
        for layer, module in enumerate(target.modules):
            name = f"{module}.{target.param}"
            if name in by_param:
                raise ValueError(
                    f"`name_map` maps both {by_param[name].path!r} and {path!r} to {name!r}"
                )
            by_param[name] = _Slot(path, target, leaf, layer)
            if target.param == "weight":
                by_module[module] = by_param[name]

    known = sorted(by_module)
    factors: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    trained: dict[str, np.ndarray] = {}
    for key in sorted(tensors):
        if not key.startswith(PREFIX):
            raise ValueError(f"tensor {key!r} does not start with {PREFIX!r}, as PEFT's keys do")
        name = key[len(PREFIX) :]
        suffix = next((s for s in _LORA_SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            module = name[: -len(suffix)]
            if module not in by_module:
                raise ValueError(
                    f"tensor {key!r}: module {module!r} is not in `name_map` (or its kernel not "
                    f"in `params`); mapped modules: {_listing(known)}"
                )
            side = _LORA_SUFFIXES[suffix]
            factors.setdefault(module, {})[side] = (key, tensors[key])
            continue
        if ".lora_" in name:
            raise ValueError(f"tensor {key!r} is a LoRA variant lorax.peft does not support")
        slot = by_param.get(name)
        if slot is None or isinstance(slot.target.module, tuple):
            raise ValueError(
                f"tensor {key!r}: parameter {name!r} is not in `name_map` (or its leaf not in "
                "`params`); map the Flax leaf to TorchParam(module, param)"
            )
        if not any(_module_to_save_matches(m, name[: -len(slot.target.param) - 1])
                   for m in modules_to_save):
            raise ValueError(
                f"tensor {key!r} is neither a LoRA factor nor in modules_to_save "
                f"{modules_to_save!r} of {CONFIG_NAME}"
            )
        shape = tuple(slot.leaf.shape)
        value = _leaf_to_flax(slot.target, slot.path, tensors[key], shape, key)
        trained[slot.path] = np.asarray(value, dtype=slot.leaf.dtype)

    nodes: dict[str, LoRA] = {}
    stacked: dict[str, tuple[_Slot, list[tuple[int, np.ndarray, np.ndarray, int, float]]]] = {}
    use_dora = bool(config.get("use_dora", False))
    for module, sides in factors.items():
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
        (key_a, A), (key_b, B) = sides["A"], sides["B"]
        slot = by_module[module]
        target, w = slot.target, slot.leaf
        try:
            layout = _kernel_layout(target, slot.path, tuple(w.shape))
        except ValueError:
            layout = ""
        if not layout or layout.count("s") > 1:
            raise ValueError(
                f"module {module!r}: the Flax leaf {slot.path!r} of shape {list(w.shape)} is not "
                "a kernel with input and output axes"
            )
        n_stack, n_in = layout.count("s"), layout.count("i")
        canonical = tuple(w.shape[j] for j in layout_order(layout))
        in_shape, out_shape = canonical[n_stack : n_stack + n_in], canonical[n_stack + n_in :]
        rank = int(pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))
        alpha = pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        for key, array, expected in (
            (key_a, A, (rank, math.prod(in_shape))),
            (key_b, B, (math.prod(out_shape), rank)),
        ):
            if tuple(array.shape) != expected:
                raise ValueError(
                    f"tensor {key!r} has shape {list(array.shape)}, expected {list(expected)} "
                    f"(r={rank} from {CONFIG_NAME}; Flax kernel {slot.path!r} of shape "
                    f"{list(w.shape)} with n_in={n_in})"
                )
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        a = A.T.reshape(*in_shape, rank)
        b = B.T.reshape(rank, *out_shape)
        m = _magnitude(directory, module, sides, use_dora, out_shape, _is_embedding(target,
                                                                                  slot.path))
        if n_stack:
            stacked.setdefault(slot.path, (slot, []))[1].append(
                (slot.layer, a, b, rank, scale, m))
            continue
        nodes[slot.path] = LoRA(
            w=w, a=_as_factor(a, dtype), b=_as_factor(b, dtype), scale=scale, rank=rank,
            n_stack=0, n_in=n_in, path=slot.path, dropout=dropout,
            magnitude=None if m is None else jnp.asarray(m), layout=stored_layout(layout),
        )
    for path, (slot, layers) in stacked.items():
        nodes[path] = _stack_layers(path, slot, layers, dropout, dtype)

    leaves = []
    for path, (_, leaf) in zip(paths, flat, strict=True):
        if path in nodes:
            leaves.append(nodes[path])
        elif path in trained:
            leaves.append(FullyTrained(jnp.asarray(trained[path])))
        else:
            leaves.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _listing(names: Sequence[str], limit: int = 6) -> str:
    if not names:
        return "none"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def _as_factor(array: np.ndarray, dtype: Any) -> jax.Array:
    return jnp.asarray(array if dtype is None else array.astype(dtype))


def _magnitude(directory: Path, module: str, sides: dict, use_dora: bool,
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


def _stack_layers(path: str, slot: _Slot, layers: list, dropout: float, dtype: Any) -> LoRA:
    layers = sorted(layers, key=lambda item: item[0])
    count = len(slot.target.modules)
    if len(layers) != count:
        have = {item[0] for item in layers}
        missing = next(m for i, m in enumerate(slot.target.modules) if i not in have)
        raise ValueError(
            f"the stacked kernel {path!r} needs factors for all {count} layers; module "
            f"{missing!r} has none"
        )
    ranks = {item[3] for item in layers}
    scales = {item[4] for item in layers}
    if len(ranks) > 1 or len(scales) > 1:
        raise ValueError(
            f"the layers of the stacked kernel {path!r} have ranks {sorted(ranks)} and scales "
            f"{sorted(scales)}; a stacked LoRA node needs one rank and one scale"
        )
    w = slot.leaf
    layout = _kernel_layout(slot.target, path, tuple(w.shape))
    a = np.stack([item[1] for item in layers])
    b = np.stack([item[2] for item in layers])
    m = None if layers[0][5] is None else jnp.asarray(np.stack([item[5] for item in layers]))
    return LoRA(w=w, a=_as_factor(a, dtype), b=_as_factor(b, dtype), scale=scales.pop(),
                rank=ranks.pop(), n_stack=1, n_in=layout.count("i"), path=path, dropout=dropout,
                magnitude=m, layout=stored_layout(layout))

