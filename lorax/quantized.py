"""Block-quantized frozen kernels for QLoRA (arXiv 2305.14314): the array type and its formats.

A :class:`QuantizedArray` holds a kernel flattened row-major, cut into blocks of ``block_size``
values, each block stored as small integer codes plus one float32 absmax scale:

* ``"int8"``: ``round(127 · x / absmax)`` as int8 (8.5 bits a value at block size 64);
* ``"nf4"``: the nearest of the paper's 16 NormalFloat levels to ``x / absmax``, two 4-bit codes
  packed per byte (4.5 bits a value at block size 64: 7.1x smaller than float32, 3.6x than bf16).

``n_lead`` leading axes (a stacked kernel's layer axes) are quantized item by item, the codes
keeping those axes, so ``scan`` slices them per layer. :func:`lorax.quantize` applies this to
every LoRA node of a tree.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import statistics
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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

    The array's leading ``lead`` axes (a stacked kernel's layer axes) are kept as axes of
    ``codes`` and ``scales``; each item under them (one layer) is flattened row-major and cut
    into its own blocks. So slicing ``codes`` and ``scales`` along a leading axis (as ``scan``
    does) slices the array, and :attr:`shape` follows.

    Attributes:
        codes: int8 ``(*lead, n_blocks, block_size)`` for ``"int8"``; uint8 ``(*lead, n_blocks,
            block_size // 2)`` for ``"nf4"`` (two codes a byte, the first in the high nibble).
        scales: float32 ``(*lead, n_blocks)``, each block's absmax.
        inner_shape: the shape of one item under the leading axes; static.
        dtype: the dtype :meth:`dequantize` returns by default; static. Casting a quantized
            kernel (:meth:`astype`) only changes it.
        kind: ``"int8"`` or ``"nf4"``; static.
        block_size: values per block; static.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_array(jnp.linspace(-1.0, 1.0, 128).reshape(8, 16), "int8", 64)
        >>> q.shape, q.codes.shape, q.scales.shape, q.nbytes
        ((8, 16), (2, 64), (2,), 136)
        >>> s = quantize_array(jnp.ones((3, 8, 16)), "nf4", 64, n_lead=1)  # 3 stacked layers
        >>> s.codes.shape, s.astype(jnp.bfloat16).dequantize().dtype
        ((3, 2, 32), dtype(bfloat16))
    """

    codes: Any
    scales: Any
    inner_shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    dtype: str = dataclasses.field(metadata={"static": True})
    kind: str = dataclasses.field(metadata={"static": True})
    block_size: int = dataclasses.field(metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        """The array's shape: the leading axes of ``codes``, then :attr:`inner_shape`."""
        return (*self.codes.shape[:-2], *self.inner_shape)

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

    def astype(self, dtype: Any) -> QuantizedArray:
        """The same codes, dequantizing to ``dtype`` (no computation)."""
        return dataclasses.replace(self, dtype=jnp.dtype(dtype).name)

    def reshape(self, shape: Sequence[int]) -> QuantizedArray:
        """The same codes viewed with ``shape`` (row-major, leading axes unchanged)."""
        shape = tuple(shape)
        lead = self.codes.ndim - 2
        if shape[:lead] != self.shape[:lead] or math.prod(shape) != self.size:
            raise ValueError(f"cannot reshape a quantized array of shape {self.shape} with "
                             f"{lead} leading axes to {shape}")
        return dataclasses.replace(self, inner_shape=shape[lead:])

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The array in its shape and ``dtype`` (default: :attr:`dtype`), full size.

        The arithmetic is float32; only the result is cast, so a bf16 dequantization never
        holds a float32 copy outside XLA's fused loop.
        """
        lead = self.codes.shape[:-2]
        if self.kind == "int8":
            values = self.codes.astype(jnp.float32) / 127.0
        else:
            high = (self.codes >> 4).astype(jnp.int32)
            low = (self.codes & 0xF).astype(jnp.int32)
            index = jnp.stack([high, low], axis=-1).reshape(*self.codes.shape[:-1], -1)
            values = jnp.asarray(NF4_LEVELS)[index]
        flat = (values * self.scales[..., None]).reshape(*lead, -1)
        flat = flat[..., : math.prod(self.inner_shape)]
        return flat.reshape(self.shape).astype(self.dtype if dtype is None else dtype)


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a :class:`QuantizedArray`."""
    return isinstance(x, QuantizedArray)


def quantize_array(x: Any, kind: str = "nf4", block_size: int = 64,
                   n_lead: int = 0) -> QuantizedArray:
    """Block-quantizes one floating array (see the module docstring for the formats).

    A ``jax.ShapeDtypeStruct`` gives an abstract :class:`QuantizedArray` (for planning and
    cost analysis). A block of zeros gets scale 1 (its codes decode to zeros).

    Args:
        x: the array.
        kind: ``"int8"`` or ``"nf4"``.
        block_size: values per absmax block.
        n_lead: leading axes quantized item by item (a stacked kernel's layer axes), so that
            the codes can be sliced per layer.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[0.5, -1.0], [0.25, 0.0]])
        >>> [round(float(v), 4) for v in quantize_array(x, "nf4", 4).dequantize().ravel()]
        [0.4407, -1.0, 0.2461, 0.0]
    """
    check_format(kind, block_size)
    lead, inner = tuple(x.shape[:n_lead]), tuple(x.shape[n_lead:])
    n = math.prod(inner)
    blocks = -(-n // block_size)
    width = block_size // 2 if kind == "nf4" else block_size
    code_dtype = jnp.uint8 if kind == "nf4" else jnp.int8
    meta = {"inner_shape": inner, "dtype": jnp.dtype(x.dtype).name, "kind": kind,
            "block_size": block_size}
    if isinstance(x, jax.ShapeDtypeStruct):
        return QuantizedArray(jax.ShapeDtypeStruct((*lead, blocks, width), code_dtype),
                              jax.ShapeDtypeStruct((*lead, blocks), jnp.float32), **meta)
    flat = jnp.reshape(jnp.asarray(x, jnp.float32), (*lead, n))
    pad = [(0, 0)] * len(lead) + [(0, blocks * block_size - n)]
    flat = jnp.pad(flat, pad).reshape(*lead, blocks, block_size)
    absmax = jnp.max(jnp.abs(flat), axis=-1)
    scales = jnp.where(absmax > 0, absmax, jnp.ones_like(absmax))
    normed = flat / scales[..., None]
    if kind == "int8":
        codes = jnp.round(normed * 127.0).astype(jnp.int8)
    else:
        levels = jnp.asarray(NF4_LEVELS)
        index = jnp.searchsorted((levels[1:] + levels[:-1]) / 2, normed).astype(jnp.uint8)
        pairs = index.reshape(*lead, blocks, width, 2)
        codes = (pairs[..., 0] << 4) | pairs[..., 1]
    return QuantizedArray(codes, scales, **meta)


def check_format(kind: Any, block_size: Any) -> None:
    """Raises a ``ValueError`` naming ``kind`` or ``block_size`` when it is not a valid format."""
    if kind not in KINDS:
        raise ValueError(f"expected `kind` to be one of {KINDS}, got {kind!r}")
    if (isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral)
            or block_size < 2 or (kind == "nf4" and block_size % 2)):
        even = " and even for 'nf4'" if kind == "nf4" else ""
        raise ValueError(f"expected `block_size` to be an int >= 2{even}, got {block_size!r}")
