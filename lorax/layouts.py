"""Kernel layouts: which axes of a kernel are stack, input and output axes.

A layout is a string with one letter per axis of a kernel: ``s`` (a stack axis: each index is
an independent kernel with its own factors — ``nn.scan`` layers, Gemma's k/v selector), ``i``
(an input axis, contracted with the activation) or ``o`` (an output axis), in any order. The
factors are canonical whatever the layout: ``a: (*stack, *in, r)``, ``b: (*stack, r, *out)``,
each group in the kernel's own axis order. This module holds the layout algebra and the
defaults :func:`lorax.wrap` uses; :mod:`lorax.infer` reads layouts off a computation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from lorax.paths import first_match

T = TypeVar("T")


_ROLES = "'s' (stack), 'i' (input) or 'o' (output), with at least one 'i' and one 'o'"


@dataclasses.dataclass(frozen=True)
class Layout:
    """A kernel's layout: one role per axis, ``s`` (stack), ``i`` (input) or ``o`` (output).

    Canonical axis numbers count ``(*stack, *in, *out)``, each group in the kernel's own axis
    order; the factors are ``a: (*stack, *in, r)``, ``b: (*stack, r, *out)``.

    Raises:
        ValueError: for letters other than s/i/o, or no ``i`` or no ``o``.

    Example:
        >>> lay = Layout("oio")  # Gemma's q_einsum (heads, d_model, head_dim)
        >>> lay.order, lay.inverse, lay.stored, Layout.canonical(3, 1, 1).stored
        ((1, 0, 2), (1, 0, 2), 'oio', None)
        >>> lay.groups(lay.to_canonical((8, 64, 16))), lay.outs
        (((), (64,), (8, 16)), range(1, 3))
        >>> Layout("soio").without((0,)), Layout("sio").node_fields
        (Layout(roles='oio'), {'n_stack': 1, 'n_in': 1, 'layout': None})
    """

    roles: str

    def __post_init__(self) -> None:
        if not isinstance(self.roles, str) or not {"i", "o"} <= set(self.roles) <= set("sio"):
            raise ValueError(f"expected a layout of {_ROLES}, got {self.roles!r}")

    @staticmethod
    @functools.cache
    def of(roles: str) -> Layout:
        """``Layout(roles)``, one shared value per roles string (its views computed once)."""
        return Layout(roles)

    @staticmethod
    def canonical(ndim: int, n_stack: int, n_in: int) -> Layout:
        """The layout of a kernel whose axes are ``(*stack, *in, *out)`` in that order."""
        return Layout.of(canonical_layout(ndim, n_stack, n_in))

    ndim = property(lambda self: len(self.roles), doc="The kernel's number of axes.")
    n_stack = property(lambda self: self.roles.count("s"), doc="How many axes are stack axes.")
    n_in = property(lambda self: self.roles.count("i"), doc="How many axes are input axes.")
    n_out = property(lambda self: self.roles.count("o"), doc="How many axes are output axes.")
    stack = property(lambda self: range(self.n_stack), doc="Canonical numbers of the stack axes.")
    ins = property(lambda self: range(self.n_stack, self.n_stack + self.n_in),
                   doc="Canonical numbers of the input axes.")
    outs = property(lambda self: range(self.n_stack + self.n_in, self.ndim),
                    doc="Canonical numbers of the output axes.")
    @functools.cached_property
    def order(self) -> tuple[int, ...]:
        """The kernel's axes in canonical order: canonical axis ``c`` is axis ``order[c]``."""
        return tuple(sorted(range(self.ndim), key=lambda j: "sio".index(self.roles[j])))

    @functools.cached_property
    def inverse(self) -> tuple[int, ...]:
        """For each kernel axis, its canonical number (the inverse of :attr:`order`)."""
        return tuple(sorted(range(self.ndim), key=self.order.__getitem__))

    @functools.cached_property
    def is_canonical(self) -> bool:
        """Whether the kernel's axes already are ``(*stack, *in, *out)``."""
        return self.order == tuple(range(self.ndim))

    @functools.cached_property
    def canonical_roles(self) -> str:
        """The roles in canonical order (``'s' * n_stack + 'i' * n_in + 'o' * n_out``)."""
        return "".join(self.to_canonical(self.roles))

    stored = property(lambda self: None if self.is_canonical else self.roles,
                      doc="What a node's ``layout`` field holds: ``None`` when canonical.")
    node_fields = property(lambda self: {"n_stack": self.n_stack, "n_in": self.n_in,
                                         "layout": self.stored},
                           doc="The ``n_stack``, ``n_in`` and ``layout`` arguments of a node.")

    def to_canonical(self, per_axis: Sequence[T]) -> tuple[T, ...]:
        """One entry per kernel axis (a shape, a sharding spec) in canonical order."""
        return tuple(per_axis[j] for j in self.order)

    def groups(self, per_canonical_axis: Sequence[T]
               ) -> tuple[tuple[T, ...], tuple[T, ...], tuple[T, ...]]:
        """One entry per canonical axis split into its ``(stack, in, out)`` groups."""
        e, s, i = tuple(per_canonical_axis), self.n_stack, self.n_stack + self.n_in
        return e[:s], e[s:i], e[i:]

    def without(self, axes: Sequence[int]) -> Layout:
        """This layout with the kernel axes ``axes`` dropped (stack axes sliced away)."""
        return Layout("".join(r for j, r in enumerate(self.roles) if j not in axes))


def canonical_layout(ndim: int, n_stack: int, n_in: int) -> str:
    """The layout string of a kernel whose axes are ``(*stack, *in, *out)`` in that order.

    Example:
        >>> canonical_layout(3, 1, 1)
        'sio'
    """
    return "s" * n_stack + "i" * n_in + "o" * (ndim - n_stack - n_in)


# Flax attention projections (Linen MultiHeadDotProductAttention, NNX MultiHeadAttention) keep
# q/k/v kernels as (features, heads, head_dim): one input axis. Everything else defaults to
# "all axes but the last are inputs" (Dense, Conv, Embed, the attention output projection).
_QKV_KERNEL = re.compile(r"(^|/)(query|key|value)/kernel$")
# Gemma's attention einsums (heads N, kv heads K, model width D, head width H): q_einsum
# (N, D, H) "BTD,NDH->BTNH"; kv_einsum (2, K, D, H) "BSD,CKDH->CBSKH" and qkv_einsum
# (3, N, D, H), whose leading axis picks k/v (q/k/v): one adapter each, as PEFT's k_proj/v_proj;
# attn_vec_einsum (N, H, D) "BTNH,NHD->BTD". Extra leading axes are nn.scan's layer stack. The
# Gemma library (Linen) names the parameter `w`, nnx.Einsum (Flax's examples/gemma) `kernel`.
_NAMED_LAYOUTS = (
    (re.compile(r"(^|/)q_einsum(/w|/kernel)?$"), "oio"),
    (re.compile(r"(^|/)(kv|qkv)_einsum(/w|/kernel)?$"), "soio"),
    (re.compile(r"(^|/)attn_vec_einsum(/w|/kernel)?$"), "iio"),
    (re.compile(r"(^|/)linear(/w)?$"), "io"),  # the MLP's output projection (F, D)
)
# Gemma's gated MLP: (2, F, D) (new) or (2, D, F) (old, used as `x @ w[0]`); the model width D
# is the smaller one.
_GATING = re.compile(r"(^|/)gating_einsum(/w|/kernel)?$")
# A module named `layers` followed by a name, not an index, is a scanned stack of layers
# (`nn.scan(..., name="layers")`, NNX and MaxText's scanned decoders); a list of layers is
# `layers_0` (Linen) or `layers/0` (NNX).
_SCANNED = re.compile(r"(^|/)layers/(?!\d+(/|$))")
# MoE experts: a stack of kernels (E, D, F), one per expert, under a module named for them
# (MaxText's `MoeBlock_0/wi_0`, `experts/w1`), consumed by `lax.ragged_dot` or a batched einsum.
EXPERTS = re.compile(r"(?i)(^|/)[^/]*(moe|expert)[^/]*/")
# nn.ConvLocal: (*out_spatial, in_features * window, features), one kernel per position.
_CONV_LOCAL = re.compile(r"(^|/)ConvLocal(_\d+)?/kernel$")


def default_layout(path: str, shape: tuple[int, ...],
                   stack: tuple[int, ...] | None = None) -> str:
    """The layout ``wrap`` gives a kernel when neither ``axes`` nor ``in_axes``/``stacked``
    name it: from Flax's and Gemma's module names, else all axes but the last are inputs;
    under a scanned ``layers`` module the leading axis is a stack.

    ``stack`` holds the stack axes the tree itself tells (:func:`lorax.stacks.stack_axes`:
    boxed axis names, a scanned module's shared depth axis), wherever they sit; the rules
    above then lay out the other axes.

    Example:
        >>> default_layout("layer_0/attn/q_einsum/w", (8, 64, 16))
        'oio'
        >>> default_layout("layers/attn/kv_einsum/w", (4, 2, 1, 64, 16))  # scanned: 4 layers
        'ssoio'
        >>> default_layout("mlp/gating_einsum", (2, 256, 64)), default_layout("kernel", (4, 8))
        ('soi', 'io')
        >>> default_layout("layers/mlp/kernel", (4, 64, 256))  # nn.scan(..., name="layers")
        'sio'
        >>> default_layout("layers/query/kernel", (64, 4, 8, 16), stack=(1,))  # MaxText
        'isoo'
        >>> default_layout("decoder/MoeBlock_0/wi_0", (8, 64, 256))  # 8 experts
        'sio'
    """
    if stack is not None and len(shape) - len(stack) >= 2:
        rest = tuple(n for j, n in enumerate(shape) if j not in stack)
        inner = iter(_name_layout(path, rest))
        return "".join("s" if j in stack else next(inner) for j in range(len(shape)))
    ndim = len(shape)
    if _SCANNED.search(path) and ndim >= 3 and not _named(path):
        return "s" + _name_layout(path, shape[1:])
    return _name_layout(path, shape)


def _named(path: str) -> bool:
    return any(p.search(path) for p, _ in _NAMED_LAYOUTS) or bool(_GATING.search(path))


def _name_layout(path: str, shape: tuple[int, ...]) -> str:
    """The name rules alone (no stack but the extra axes of Gemma's names)."""
    ndim = len(shape)
    for pattern, layout in _NAMED_LAYOUTS:
        if pattern.search(path) and ndim >= len(layout):
            return "s" * (ndim - len(layout)) + layout
    if _GATING.search(path) and ndim >= 3:
        return "s" * (ndim - 2) + ("io" if shape[-2] <= shape[-1] else "oi")
    if (_CONV_LOCAL.search(path) or EXPERTS.search(path)) and ndim >= 3:
        return "s" * (ndim - 2) + "io"
    return canonical_layout(ndim, 0, default_in_axes(path, ndim))


def check_layout(layout: Any, shape: tuple[int, ...], path: str) -> str:
    """Validates an ``axes`` layout string for a kernel of ``shape``.

    Example:
        >>> check_layout("o i o", (8, 64, 16), "q_einsum/w")
        'oio'
    """
    if not isinstance(layout, str):
        raise TypeError(f"expected `axes` to hold layout strings such as 'oio', got "
                        f"{type(layout).__name__} {layout!r} at {path!r}")
    roles = layout.replace(" ", "")
    with contextlib.suppress(ValueError):  # Layout checks the letters
        if Layout(roles).ndim == len(shape):
            return roles
    hint = (" (a stack of layers is one more 's': axes=lorax.infer_axes(fn, params, *args) "
            "reads every kernel's layout off the model)" if len(roles) < len(shape) else "")
    raise ValueError(
        f"expected `axes` to give one letter per axis of the kernel of shape {list(shape)}: "
        f"{_ROLES}; got {layout!r} at {path!r}{hint}")


def stack_hint(path: str, shape: tuple[int, ...], layout: str) -> str:
    """A sentence for :func:`lorax.wrap`'s errors when an axis of the kernel may be a stack of
    layers the layout missed (a scan under a name the defaults do not read), else ``""``.

    Example:
        >>> stack_hint("blocks/mlp/kernel", (2, 64, 256), "iio")
        " If axis 0 (size 2) stacks layers (nn.scan), pass axes={'^blocks/mlp/kernel$': 'sio'}, \
or axes=lorax.infer_axes(fn, params, *args) to read every kernel's layout off the model."
    """
    candidates = [k for k in (0, 1) if layout[k] != "s"]  # nn.scan puts the depth at 0 or 1
    if len(shape) - layout.count("s") < 3 or not candidates:
        return ""
    j = min(candidates, key=lambda k: (shape[k], k))
    rest = tuple(n for k, n in enumerate(shape) if k != j)
    inner = iter(_name_layout(path, rest))
    fixed = "".join("s" if k == j else next(inner) for k in range(len(shape)))
    spec = {"^" + re.escape(path) + "$": fixed}
    return (f" If axis {j} (size {shape[j]}) stacks layers (nn.scan), pass axes={spec}, or "
            "axes=lorax.infer_axes(fn, params, *args) to read every kernel's layout off the "
            "model.")


def default_in_axes(path: str, ndim: int) -> int:
    """How many leading axes of an (unstacked) kernel are inputs when `in_axes` is not given.

    Example:
        >>> default_in_axes("layer_0/attention/query/kernel", 3)
        1
        >>> default_in_axes("layer_0/attention/out/kernel", 3), default_in_axes("conv/kernel", 4)
        (2, 3)
    """
    if ndim >= 3 and _QKV_KERNEL.search(path):
        return 1
    return ndim - 1


def _check_count(value: Any, argname: str, path: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"expected `{argname}` to be an int >= {minimum}, got {value!r} at "
                         f"{path!r}")
    return int(value)


def resolve_layout(path: str, w: Any, in_axes, stacked, axes,
                   stack: tuple[int, ...] | None = None) -> str:
    """The layout :func:`lorax.wrap` gives the kernel ``w`` at ``path``: from ``axes``, else
    ``stacked``/``in_axes``, else :func:`default_layout` (with the tree's ``stack`` axes)."""
    shape = tuple(w.shape)
    layout = axes if isinstance(axes, str) else first_match(axes, path, "axes")
    n_stack = first_match(stacked, path, "stacked")
    n_in = in_axes if isinstance(in_axes, int) else first_match(in_axes, path, "in_axes")
    if layout is not None:
        if n_stack is not None or isinstance(in_axes, Mapping) and n_in is not None:
            raise ValueError(f"expected either `axes` or `stacked`/`in_axes` for {path!r}, got "
                             "both; `axes` alone says everything")
        return check_layout(layout, shape, path)
    if n_stack is None and n_in is None:
        return default_layout(path, shape, stack)
    n_stack = _check_count(n_stack or 0, "stacked", path, 0)
    ndim = len(shape) - n_stack
    if ndim < 2:
        raise ValueError(
            f"expected `stacked` to leave at least 2 kernel axes, got {n_stack} stacked axes of "
            f"shape {list(shape)} at {path!r}"
        )
    n_in = default_in_axes(path, ndim) if n_in is None else _check_count(n_in, "in_axes", path, 1)
    if n_in >= ndim:
        raise ValueError(
            f"expected `in_axes` < {ndim} (the kernel's non-stacked dims) so at least one output "
            f"axis remains, got {n_in} for shape {list(shape)} at {path!r}"
        )
    return canonical_layout(len(shape), n_stack, n_in)
