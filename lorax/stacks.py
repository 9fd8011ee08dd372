"""Stack axes read off a parameter tree: the names its boxes carry, then its own structure.

:func:`lorax.wrap`'s defaults consult this before any name guess
(:func:`lorax.layouts.default_layout`). Two sources, in order:

1. **Axis names the tree carries.** Flax Linen's ``nn.Partitioned``/``nn.LogicallyPartitioned``
   boxes hold one name per axis (``nn.scan(..., metadata_params={nn.PARTITION_NAME:
   "layers"})`` inserts the scan's), and so does an NNX variable's sharding metadata
   (``nnx.with_partitioning``, ``nnx.vmap(..., transform_metadata={nnx.PARTITION_NAME:
   "layers"})``). A layer-like name (:data:`LAYER_AXIS`: ``layers``, ``moe_layers``, ``stage``,
   ...) marks a stack axis wherever it sits: MaxText's ``('embed', 'layers', 'mlp')`` is a stack
   at axis 1.
2. **The shape every leaf of one scanned module shares.** ``nn.scan`` with
   ``variable_axes={"params": k}`` gives *every* parameter under the scanned module an axis of
   the depth at position ``k`` (0: Flax's default, big_vision's ``encoderblock``; 1: MaxText's
   and flaxformer's default), norm scales and biases included, which become 2-D. A module is
   read as such a stack when all of these hold:

   * every array leaf under it has >= 2 axes and the same size at position ``k``, for exactly
     one ``k`` in ``(0, 1)``;
   * it holds at least two kernels, each with an axis to spare (3+ axes for a Dense kernel, one
     more than its named layout for Flax's q/k/v and Gemma's einsums);
   * a 2-D ``scale`` or ``bias`` under it (a stacked norm or bias: unscanned ones are 1-D), or
     the module is named like a layer stack (``layers``, ``dense_layers``, ...);
   * the leaves' own axis names, where they have them, do not name that axis otherwise.

   The outermost such module wins. An unscanned block fails the first or third test (its norm
   scales and biases are 1-D), a tree of bare square kernels the first; anything in between
   is left to the name defaults and :func:`lorax.lora`'s check, whose error names the ``axes=``
   spec that fits.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any

import jax

from lorax.node import is_array_like, is_node
from lorax.paths import leaf_name, path_str

# Axis names that mark a stack of layers: MaxText's `layers`, `dense_layers`, `moe_layers`,
# pipeline `stage`/`circular_repeats`, flaxformer's `layers`, NNX's conventional `layers`, and
# the plain words for a scanned axis (`stack`, `scan`, `depth`); and a stack of MoE experts
# (MaxText's `exp`; not its `embed_no_exp`, the model width).
LAYER_AXIS = re.compile(
    r"(^|_)(layers?|stages?|repeats|blocks|stack(ed)?|scan|depth)$|^(exp|experts?)$")
# Module names that say "a scanned stack" (`nn.scan(..., name="layers")`, MaxText's
# `dense_layers`/`moe_layers`); a list of layers is `layers_0` or `layers/0` instead.
_LAYER_MODULE = re.compile(r"(^|_)layers$")
# Leaves that are vectors in an unscanned model: norm scales and biases.
_VECTORS = ("scale", "bias")
# The kernels a scanned body holds, and how many axes each has before stacking.
_KERNEL = re.compile(r"(^|/)(kernel|[^/]*einsum(/w|/kernel)?|linear(/w)?)$")
_QKV = re.compile(r"(^|/)(query|key|value)/kernel$")
_EINSUM_NDIM = (
    (re.compile(r"(^|/)(kv|qkv)_einsum(/w|/kernel)?$"), 4),
    (re.compile(r"(^|/)(q|attn_vec|gating)_einsum(/w|/kernel)?$"), 3),
)


def _base_ndim(path: str) -> int:
    """How many axes the kernel at ``path`` has in an unscanned model (at least)."""
    for pattern, ndim in _EINSUM_NDIM:
        if pattern.search(path):
            return ndim
    return 3 if _QKV.search(path) else 2


def _names(x: Any) -> tuple | None:
    """The per-axis names a Flax box or NNX variable carries, else None."""
    names = getattr(x, "names", None)  # nn.Partitioned, nn.LogicallyPartitioned
    if names is None and hasattr(x, "get_metadata"):  # nnx.Variable (and VariableState)
        meta = x.get_metadata()
        for key in ("out_sharding", "sharding_names", "sharding"):
            if meta.get(key) is not None:
                names = meta[key]
                break
    if names is None or isinstance(names, str):
        return None
    try:
        return tuple(names)
    except TypeError:  # a Sharding object, not names
        return None


def _box_types() -> tuple[type, ...]:
    # Flax's boxes can only be in the tree when their modules are loaded: no import otherwise.
    types: list[type] = []
    meta = sys.modules.get("flax.core.meta")
    if meta is not None:
        types.append(meta.AxisMetadata)
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None:
        # (vars(): an older flax's VariableState; newer ones only alias it, with a warning)
        types.extend(t for t in (vars(nnx).get("Variable"), vars(nnx).get("VariableState"))
                     if isinstance(t, type))
    return tuple(types)


def named_leaves(params: Any) -> list[tuple[str, tuple[int, ...], tuple | None]]:
    """``(path, shape, axis names or None)`` for every array leaf of ``params`` (LoRA nodes
    count as their ``w``), paths as :func:`lorax.paths.path_str` writes them.

    Example:
        >>> import jax.numpy as jnp
        >>> named_leaves({"mlp": {"kernel": jnp.ones((4, 8))}})
        [('mlp/kernel', (4, 8), None)]
    """
    boxes = _box_types()

    def is_leaf(x):
        return is_node(x) or (bool(boxes) and isinstance(x, boxes))

    out = []
    for kp, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)[0]:
        names = None
        if boxes and isinstance(x, boxes):
            names = _names(x)
            inner = jax.tree.leaves(x, is_leaf=is_node)  # (no `.value`: NNX deprecates it)
            if len(inner) != 1:
                continue
            x = inner[0]
        if is_node(x):
            x = getattr(x, "w", getattr(x, "value", x))
        if is_array_like(x):
            shape = tuple(x.shape)
            out.append((path_str(kp), shape,
                        names if names is not None and len(names) == len(shape) else None))
    return out


class _Group:
    """What the leaves under one module have in common."""

    __slots__ = ("kernels", "room", "ndim_ok", "sizes", "vector", "names_ok")

    def __init__(self):
        self.kernels = 0
        self.room = True  # every kernel has an axis to spare
        self.ndim_ok = True  # every leaf has >= 2 axes
        self.sizes: list[int | None] = [None, None]  # the shared size at 0, 1 (-1: none)
        self.vector = False  # a 2-D scale or bias
        self.names_ok = [True, True]  # no leaf names the axis as something else

    def add(self, path: str, shape: tuple[int, ...], names: tuple | None) -> None:
        ndim = len(shape)
        if ndim < 2:
            self.ndim_ok = False
            return
        if _KERNEL.search(path):
            self.kernels += 1
            self.room &= ndim > _base_ndim(path)
        elif ndim == 2 and leaf_name(path) in _VECTORS:
            self.vector = True
        for k in (0, 1):
            if self.sizes[k] is None:
                self.sizes[k] = shape[k]
            elif self.sizes[k] != shape[k]:
                self.sizes[k] = -1
            if names is not None and names[k] is not None and not LAYER_AXIS.search(
                    str(names[k])):
                self.names_ok[k] = False

    def stack_axis(self, layer_named: bool) -> int | None:
        if not (self.ndim_ok and self.room and self.kernels >= (1 if layer_named else 2)):
            return None
        if not (self.vector or layer_named):
            return None
        shared = [k for k in (0, 1) if self.sizes[k] not in (None, -1) and self.names_ok[k]]
        if len(shared) == 1 or (layer_named and shared):
            return shared[0]
        return None


def stack_axes(leaves: Sequence[tuple[str, tuple[int, ...], tuple | None]],
               wanted: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """The stack axes of each kernel path in ``wanted`` that the tree itself tells (see the
    module docstring); paths it says nothing about are left out.

    Args:
        leaves: every array leaf, as :func:`named_leaves` lists them.
        wanted: the paths to report (the kernels ``wrap`` adapts).

    Returns:
        ``{path: stack axis positions}``; ``()`` where the leaf's own axis names say it has no
        stack axis.

    Example:
        >>> leaves = [("enc/ln/scale", (6, 8), None), ("enc/fc1/kernel", (6, 8, 32), None),
        ...           ("enc/fc1/bias", (6, 32), None), ("enc/fc2/kernel", (6, 32, 8), None)]
        >>> stack_axes(leaves, ["enc/fc1/kernel"])  # a scan named `enc`, the depth in front
        {'enc/fc1/kernel': (0,)}
        >>> stack_axes([("fc/kernel", (8, 6, 32), ("embed", "layers", "mlp"))], ["fc/kernel"])
        {'fc/kernel': (1,)}
    """
    wanted = set(wanted)
    out: dict[str, tuple[int, ...]] = {}
    groups: dict[str, _Group] = {}
    unnamed = []
    for path, shape, names in leaves:
        if path in wanted:
            named = () if names is None else tuple(
                j for j, n in enumerate(names) if n is not None and LAYER_AXIS.search(str(n)))
            if names is not None and (named or all(n is not None for n in names)):
                out[path] = named  # the names settle it
            else:
                unnamed.append(path)
        parts = path.split("/")
        for end in range(1, len(parts)):
            prefix = "/".join(parts[:end])
            group = groups.get(prefix)
            if group is None:
                group = groups[prefix] = _Group()
            group.add(path, shape, names)
    for path in unnamed:
        parts = path.split("/")
        for end in range(1, len(parts) - 1):  # outermost first; the kernel's own module last
            prefix = "/".join(parts[:end])
            k = groups[prefix].stack_axis(bool(_LAYER_MODULE.search(parts[end - 1])))
            if k is not None:
                out[path] = (k,)
                break
    return out
