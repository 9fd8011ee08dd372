"""`lorax.LoRAConfig`: every setting of :func:`lorax.wrap` in one validated, immutable object."""

from __future__ import annotations

import dataclasses
import math
import numbers
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax import pissa
from lorax.layouts import resolve_layout
from lorax.node import is_array_like
from lorax.paths import PathSelector, Selector, first_match

INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_<k>")


def check_int(value: Any, argname: str, path: str | None, minimum: int) -> int:
    """``value`` as an int, or a ``ValueError`` naming ``argname`` (and ``path``)."""
    where = f" at {path!r}" if path else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"expected `{argname}` to be an int >= {minimum}, got {value!r}{where}")
    return int(value)


def check_alpha(value: Any, path: str | None) -> float:
    """``value`` as a positive finite float, or a ``ValueError`` naming ``alpha``."""
    where = f" at {path!r}" if path else ""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0
            or not math.isfinite(value)):
        raise ValueError(f"expected `alpha` to be a positive finite number, got {value!r}{where}")
    return float(value)


def _check_bool(value: Any, argname: str) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"expected `{argname}` to be a bool, got {type(value).__name__}")
    return bool(value)


def _check_key(key: Any) -> jax.Array:
    if key is None:
        return jax.random.key(0)
    typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    raw = is_array_like(key) and key.dtype == jnp.uint32 and tuple(key.shape) == (2,)
    if not (typed or raw):
        raise TypeError(
            f"expected `key` to be a PRNG key (jax.random.key(...)), got {type(key).__name__}")
    return key


def _check_dtype(dtype: Any) -> Any:
    if dtype is None:
        return None
    try:
        floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise TypeError(f"expected `dtype` to be a floating dtype, got {dtype!r}")
    return jnp.dtype(dtype)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """The settings of :func:`lorax.wrap`, checked once when the object is made.

    The fields are :func:`lorax.wrap`'s keyword arguments, with the same defaults and meaning
    (see its docstring); ``lorax.wrap(params, config=cfg)`` is ``lorax.wrap(params, **fields)``.
    A config is convenient to keep, compare and log (``dataclasses.asdict``) across runs, and
    ``dataclasses.replace(cfg, rank=16)`` gives a validated variant.

    Raises:
        ValueError: for a bad value, naming the field.
        TypeError: for a value of the wrong type.

    Example:
        >>> import dataclasses, jax.numpy as jnp, lorax
        >>> cfg = lorax.LoRAConfig(rank=4, alpha=16, targets="dense")
        >>> cfg.scale_at("dense/kernel", cfg.rank_at("dense/kernel"))
        4.0
        >>> lp = lorax.wrap({"dense": {"kernel": jnp.ones((8, 8))}}, config=cfg)
        >>> lp["dense"]["kernel"].rank
        4
        >>> lorax.LoRAConfig(rank=0)
        Traceback (most recent call last):
        ...
        ValueError: expected `rank` to be an int >= 1, got 0
    """

    rank: int = 8
    targets: Selector = None
    exclude: Selector = None
    alpha: float = 8.0
    rank_pattern: Mapping[str, int] | None = None
    alpha_pattern: Mapping[str, float] | None = None
    in_axes: int | Mapping[str, int] | None = None
    stacked: Mapping[str, int] | None = None
    axes: str | Mapping[str, str] | None = None
    train: Selector = None
    init: str = "kaiming"
    rslora: bool = False
    dropout: float = 0.0
    key: jax.Array | None = None
    dtype: Any = None
    dora: bool = False

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)  # normalising a frozen dataclass's fields

        fix("rank", check_int(self.rank, "rank", None, 1))
        fix("alpha", check_alpha(self.alpha, None))
        if isinstance(self.init, str) and self.init.startswith("pissa"):
            pissa.niter(self.init)  # validates "pissa_niter_<k>"
        elif self.init not in INITS:
            raise ValueError(f"expected `init` to be one of {INITS}, got {self.init!r}")
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real)
                or not 0.0 <= self.dropout < 1.0):
            raise ValueError(f"expected `dropout` to be a float in [0, 1), got {self.dropout!r}")
        fix("dropout", float(self.dropout))
        fix("rslora", _check_bool(self.rslora, "rslora"))
        fix("dora", _check_bool(self.dora, "dora"))
        fix("key", _check_key(self.key))
        fix("dtype", _check_dtype(self.dtype))
        if self.in_axes is not None and not isinstance(self.in_axes, Mapping):
            check_int(self.in_axes, "in_axes", None, 1)
        for name in ("rank_pattern", "alpha_pattern", "stacked", "axes"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping) and not (
                    name == "axes" and isinstance(value, str)):
                raise TypeError(f"expected `{name}` to be a dict {{regex: value}}, got "
                                f"{type(value).__name__}")
        for name in ("targets", "exclude", "train"):
            PathSelector(getattr(self, name), name)  # raises for a bad regex or type

    @property
    def residual(self) -> bool:
        """Whether ``init`` is PiSSA's, which replaces ``w`` by a residual."""
        return self.init.startswith("pissa")

    def rank_at(self, path: str) -> int:
        """The rank of the kernel at ``path``: ``rank_pattern``'s first match, else ``rank``."""
        r = first_match(self.rank_pattern, path, "rank_pattern")
        return self.rank if r is None else check_int(r, "rank_pattern", path, 1)

    def scale_at(self, path: str, rank: int) -> float:
        """``alpha / rank`` (``alpha / sqrt(rank)`` with ``rslora``) for the kernel at ``path``,
        ``alpha`` from ``alpha_pattern``'s first match, else ``alpha``."""
        alpha = first_match(self.alpha_pattern, path, "alpha_pattern")
        alpha = self.alpha if alpha is None else check_alpha(alpha, path)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def layout_at(self, path: str, w: Any, stack: tuple[int, ...] | None = None) -> str:
        """The layout of the kernel ``w`` at ``path`` (see :func:`lorax.layouts.resolve_layout`),
        ``stack`` the stack axes the tree tells (:func:`lorax.stacks.stack_axes`)."""
        return resolve_layout(path, w, self.in_axes, self.stacked, self.axes, stack)

    def key_at(self, path: str) -> jax.Array:
        """A stable per-path key: factors do not depend on tree order or on other leaves."""
        return jax.random.fold_in(self.key, zlib.crc32(path.encode()) & 0x7FFFFFFF)

    def factor_dtype(self, w: Any) -> Any:
        """``dtype``, or the kernel's dtype promoted to at least float32 (as PEFT's
        ``autocast_adapter_dtype``): a bf16 or fp16 kernel gets float32 factors, whose small
        optimizer updates are not rounded away; float32 and float64 kernels keep theirs.

        Example:
            >>> import dataclasses, jax, jax.numpy as jnp, lorax
            >>> w = jax.ShapeDtypeStruct((8, 8), jnp.bfloat16)
            >>> cfg = lorax.LoRAConfig()
            >>> cfg.factor_dtype(w), dataclasses.replace(cfg, dtype="bfloat16").factor_dtype(w)
            (dtype('float32'), dtype(bfloat16))
        """
        if self.dtype is not None:
            return self.dtype
        return jnp.promote_types(w.dtype, jnp.float32)
