"""QLoRA-style frozen bases (arXiv 2305.14314): block-quantized ``w``, float factors.

:func:`quantize` replaces the frozen kernel ``w`` of every LoRA node with a
:class:`QuantizedArray`: the kernel flattened row-major, cut into blocks of ``block_size``
values, each block stored as small integer codes plus one float32 absmax scale:

* ``"int8"``: ``round(127 · x / absmax)`` as int8 (8.5 bits a value at block size 64);
* ``"nf4"``: the nearest of the paper's 16 NormalFloat levels to ``x / absmax``, two 4-bit codes
  packed per byte (4.5 bits a value at block size 64: 7.1x smaller than float32, 3.6x than bf16).

The factors (and a DoRA magnitude) stay in their float dtype and train as usual.
:func:`lorax.lora` gives the traced function an ordinary array of the kernel's shape and dtype
and dequantizes at entry, inside the computation, under ``jax.checkpoint`` so that the backward
pass recomputes the float kernel from the codes instead of keeping it. :func:`lorax.merge`
dequantizes. Quantization is not differentiable: take gradients of the trainable half
(:func:`lorax.split`), not of the whole tree (its codes are integers).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import statistics
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax.node import LoRA, MultiLoRA, is_node

KINDS = ("int8", "nf4")


def _nf4_levels() -> np.ndarray:
    # QLoRA's NormalFloat4: quantiles of N(0, 1), 8 positive and 7 negative, plus an exact 0,
    # scaled to [-1, 1] (the paper's appendix E; `offset` keeps the extreme quantiles finite).
    offset = 1 - 0.5 * (1 / 32 + 1 / 30)
    quantile = statistics.NormalDist().inv_cdf
    positive = [quantile(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-quantile(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    levels = np.sort(np.concatenate([positive, [0.0], negative]))
    return (levels / np.abs(levels).max()).astype(np.float32)


NF4_LEVELS = _nf4_levels()
"""The 16 NF4 code values in [-1, 1], ascending (code ``i`` means ``NF4_LEVELS[i]``)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A block-quantized array: integer ``codes``, float32 ``scales`` and static metadata.

    Attributes:
        codes: int8 ``(n_blocks, block_size)`` for ``"int8"``; uint8 ``(n_blocks,
            block_size // 2)`` for ``"nf4"`` (two codes a byte, the first in the high nibble).
        scales: float32 ``(n_blocks,)``, each block's absmax.
        shape: the original shape; static.
        dtype: the original dtype's name (what :meth:`dequantize` returns); static.
        kind: ``"int8"`` or ``"nf4"``; static.
        block_size: values per block; static.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_array(jnp.linspace(-1.0, 1.0, 128).reshape(8, 16), "int8", 64)
        >>> q.shape, q.codes.shape, q.scales.shape, q.nbytes
        ((8, 16), (2, 64), (2,), 136)
    """

    codes: Any
    scales: Any
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    dtype: str = dataclasses.field(metadata={"static": True})
    kind: str = dataclasses.field(metadata={"static": True})
    block_size: int = dataclasses.field(metadata={"static": True})

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held: codes plus scales."""
        return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in (self.codes, self.scales))

    def dequantize(self) -> jax.Array:
        """The array in its original shape and dtype (full size)."""
        if self.kind == "int8":
            values = self.codes.astype(jnp.float32) / 127.0
        else:
            high = (self.codes >> 4).astype(jnp.int32)
            low = (self.codes & 0xF).astype(jnp.int32)
            index = jnp.stack([high, low], axis=-1).reshape(self.codes.shape[0], -1)
            values = jnp.asarray(NF4_LEVELS)[index]
        flat = (values * self.scales[:, None]).reshape(-1)[: self.size]
        return flat.reshape(self.shape).astype(self.dtype)


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a :class:`QuantizedArray`."""
    return isinstance(x, QuantizedArray)


def quantize_array(x: Any, kind: str = "nf4", block_size: int = 64) -> QuantizedArray:
    """Block-quantizes one floating array (see the module docstring for the formats).

    A ``jax.ShapeDtypeStruct`` gives an abstract :class:`QuantizedArray` (for planning and
    cost analysis). A block of zeros gets scale 1 (its codes decode to zeros).

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[0.5, -1.0], [0.25, 0.0]])
        >>> [round(float(v), 4) for v in quantize_array(x, "nf4", 4).dequantize().ravel()]
        [0.4407, -1.0, 0.2461, 0.0]
    """
    _check(kind, block_size)
    n = math.prod(x.shape)
    blocks = -(-n // block_size)
    width = block_size // 2 if kind == "nf4" else block_size
    code_dtype = jnp.uint8 if kind == "nf4" else jnp.int8
    meta = {"shape": tuple(x.shape), "dtype": jnp.dtype(x.dtype).name, "kind": kind,
            "block_size": block_size}
    if isinstance(x, jax.ShapeDtypeStruct):
        return QuantizedArray(jax.ShapeDtypeStruct((blocks, width), code_dtype),
                              jax.ShapeDtypeStruct((blocks,), jnp.float32), **meta)
    flat = jnp.ravel(jnp.asarray(x, jnp.float32))
    flat = jnp.pad(flat, (0, blocks * block_size - n)).reshape(blocks, block_size)
    absmax = jnp.max(jnp.abs(flat), axis=1)
    scales = jnp.where(absmax > 0, absmax, jnp.ones_like(absmax))
    normed = flat / scales[:, None]
    if kind == "int8":
        codes = jnp.round(normed * 127.0).astype(jnp.int8)
    else:
        levels = jnp.asarray(NF4_LEVELS)
        index = jnp.searchsorted((levels[1:] + levels[:-1]) / 2, normed).astype(jnp.uint8)
        pairs = index.reshape(blocks, width, 2)
        codes = (pairs[..., 0] << 4) | pairs[..., 1]
    return QuantizedArray(codes, scales, **meta)


def _check(kind: Any, block_size: Any) -> None:
    if kind not in KINDS:
        raise ValueError(f"expected `kind` to be one of {KINDS}, got {kind!r}")
    if (isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral)
            or block_size < 2 or (kind == "nf4" and block_size % 2)):
        even = " and even for 'nf4'" if kind == "nf4" else ""
        raise ValueError(f"expected `block_size` to be an int >= 2{even}, got {block_size!r}")


def quantize(tree: Any, kind: str = "nf4", block_size: int = 64) -> Any:
    """Quantizes the frozen kernel ``w`` of every LoRA (or MultiLoRA) node of ``tree``.

    Args:
        tree: a wrapped tree (from :func:`lorax.wrap`); abstract trees give abstract codes.
        kind: ``"int8"`` or ``"nf4"``.
        block_size: values per absmax block (QLoRA uses 64).

    Returns:
        ``tree`` with each node's ``w`` a :class:`QuantizedArray` (factors untouched).

    Raises:
        ValueError: for a bad ``kind`` or ``block_size``, a tree without LoRA nodes, or a node
            whose ``w`` is already quantized or not floating (naming its path).

    Example:
        >>> import jax.numpy as jnp, lorax
        >>> lp = lorax.quantize(lorax.wrap({"kernel": jnp.ones((128, 64))}, rank=4), "nf4")
        >>> w = lp["kernel"].w
        >>> type(w).__name__, w.shape, w.nbytes, 128 * 64 * 4  # 7.1x fewer bytes than f32
        ('QuantizedArray', (128, 64), 4608, 32768)
        >>> bool((lorax.merge(lp)["kernel"] == 1.0).all())
        True
    """
    _check(kind, block_size)
    found = []

    def go(node: Any) -> Any:
        if not isinstance(node, (LoRA, MultiLoRA)):
            return node
        found.append(node.path)
        if is_quantized(node.w):
            raise ValueError(f"expected a float kernel, got an already quantized one at "
                             f"{node.path!r}")
        if not jnp.issubdtype(node.w.dtype, jnp.floating):
            raise ValueError(f"expected a floating kernel, got {node.w.dtype} at {node.path!r}")
        return dataclasses.replace(node, w=quantize_array(node.w, kind, block_size))

    out = jax.tree.map(go, tree, is_leaf=is_node)
    if not found:
        raise ValueError("expected `tree` to hold LoRA nodes (from lorax.wrap), got none")
    return out


def dequantize_node(node: LoRA) -> LoRA:
    """``node`` with a float ``w`` (a no-op for unquantized nodes)."""
    if is_quantized(node.w):
        return dataclasses.replace(node, w=node.w.dequantize())
    return node
