"""`lorax.summary`: what a wrapped tree trains, and what it costs."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import numpy as np

from lorax import modules
from lorax.node import FullyTrained, is_adapted, is_array_like, is_node
from lorax.paths import path_str
from lorax.quantized import QuantizedArray


def _size_bytes(x: Any) -> tuple[int, int]:
    size = math.prod(x.shape)
    if isinstance(x, QuantizedArray):  # a quantized base: codes + scales
        return size, x.nbytes
    return size, size * np.dtype(x.dtype).itemsize


class AdaptedKernel(NamedTuple):
    """One adapted kernel in a :class:`Summary`."""

    path: str
    shape: tuple[int, ...]
    rank: int
    scale: float
    params: int  # trainable factor parameters
    kind: str = "lora"  # "lora", "dora" or "pissa", plus ", nf4 base" / ", int8 base"


class TrainedLeaf(NamedTuple):
    """One ``train`` leaf (:class:`lorax.FullyTrained`) in a :class:`Summary`."""

    path: str
    shape: tuple[int, ...]
    params: int


class Summary(NamedTuple):
    """Parameter counts of a wrapped tree; ``str()`` renders a table with one row per adapted
    kernel (its variant and quantized base in ``kind``) and per ``train`` leaf.

    Attributes:
        trainable: trainable parameters (factors and ``train`` leaves).
        frozen: frozen parameters (base kernels and untouched leaves).
        trainable_bytes: bytes of the trainable parameters.
        frozen_bytes: bytes of the frozen parameters.
        adapted: one :class:`AdaptedKernel` per LoRA node.
        fully_trained: paths of the ``train`` leaves.
        trained: one :class:`TrainedLeaf` (path, shape, parameters) per ``train`` leaf.

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> params = {"fc": {"kernel": jnp.ones((16, 8))}, "head": {"kernel": jnp.ones((8, 1))}}
        >>> s = lorax.summary(lorax.wrap(params, rank=2, targets="fc", train="head", dora=True))
        >>> s.adapted[0].kind, s.trained[0].shape, s.total
        ('dora', (8, 1), 192)
        >>> print(s)
        path         shape  rank  scale  params  kind
        -----------  -----  ----  -----  ------  ----
        fc/kernel    16x8   2     4      56      dora
        head/kernel  8x1    full         8       full
        trainable 64 (33.333%, 256 B) | frozen 128 (512 B) | total 192
    """

    trainable: int
    frozen: int
    trainable_bytes: int
    frozen_bytes: int
    adapted: tuple[AdaptedKernel, ...]
    fully_trained: tuple[str, ...]
    trained: tuple[TrainedLeaf, ...] = ()

    @property
    def total(self) -> int:
        """All parameters, trainable and frozen."""
        return self.trainable + self.frozen

    def __str__(self) -> str:
        def shape(s: tuple[int, ...]) -> str:
            return "x".join(map(str, s)) or "scalar"

        rows = [("path", "shape", "rank", "scale", "params", "kind")]
        rows += [(k.path, shape(k.shape), str(k.rank), f"{k.scale:g}", f"{k.params:,}", k.kind)
                 for k in self.adapted]
        rows += [(t.path, shape(t.shape), "full", "", f"{t.params:,}", "full")
                 for t in self.trained]
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        pct = 100.0 * self.trainable / max(self.total, 1)
        lines.append(
            f"trainable {self.trainable:,} ({pct:.3f}%, {self.trainable_bytes:,} B) | "
            f"frozen {self.frozen:,} ({self.frozen_bytes:,} B) | total {self.total:,}"
        )
        return "\n".join(lines)


def summary(tree: Any) -> Summary:
    """Counts trainable and frozen parameters of a wrapped tree, per adapted kernel.

    Works on abstract trees (``jax.ShapeDtypeStruct`` leaves) as well, for planning.

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> lp = lorax.wrap({"dense": {"kernel": jnp.ones((16, 8))}}, rank=2)
        >>> s = lorax.summary(lp)
        >>> s.trainable, s.frozen
        (48, 128)
        >>> print(s)
        path          shape  rank  scale  params  kind
        ------------  -----  ----  -----  ------  ----
        dense/kernel  16x8   2     4      48      lora
        trainable 48 (27.273%, 192 B) | frozen 128 (512 B) | total 176
    """
    tree = modules.as_tree(tree)
    counts = {"trainable": [0, 0], "frozen": [0, 0]}
    adapted, full = [], []

    def add(kind: str, x: Any) -> None:
        size, nbytes = _size_bytes(x)
        counts[kind][0] += size
        counts[kind][1] += nbytes

    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]:
        if is_adapted(leaf):  # one row per adapter (MultiLoRA: per name)
            add("frozen", leaf.w)
            for suffix, f in leaf.named_factors():
                factor_params = 0
                for factor in (f.a, f.b, f.magnitude):  # magnitude: DoRA's, or None
                    if factor is not None:
                        add("trainable", factor)
                        factor_params += _size_bytes(factor)[0]
                adapted.append(AdaptedKernel((leaf.path or path_str(keypath)) + suffix,
                                             tuple(leaf.shape), f.rank, f.scale, factor_params,
                                             _kind(f, leaf.w)))
        elif isinstance(leaf, FullyTrained):
            add("trainable", leaf.value)
            full.append(TrainedLeaf(path_str(keypath), tuple(leaf.value.shape),
                                    _size_bytes(leaf.value)[0]))
        elif is_array_like(leaf):
            add("frozen", leaf)
    return Summary(counts["trainable"][0], counts["frozen"][0], counts["trainable"][1],
                   counts["frozen"][1], tuple(adapted), tuple(t.path for t in full), tuple(full))


def _kind(factors: Any, w: Any) -> str:
    kind = "dora" if factors.magnitude is not None else "pissa" if factors.residual else "lora"
    return f"{kind}, {w.kind} base" if isinstance(w, QuantizedArray) else kind
