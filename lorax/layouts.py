"""Kernel layouts: which axes of a kernel are stack, input and output axes.

A layout is a string with one letter per axis of a kernel: ``s`` (a stack axis: each index is
an independent kernel with its own factors — ``nn.scan`` layers, Gemma's k/v selector), ``i``
(an input axis, contracted with the activation) or ``o`` (an output axis), in any order. The
factors are canonical whatever the layout: ``a: (*stack, *in, r)``, ``b: (*stack, r, *out)``,
each group in the kernel's own axis order. This module holds the layout algebra and the
defaults :func:`lorax.wrap` uses; :mod:`lorax.infer` reads layouts off a computation.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from lorax.paths import first_match

T = TypeVar("T")


def canonical_layout(ndim: int, n_stack: int, n_in: int) -> str:
    """The layout string of a kernel whose axes are ``(*stack, *in, *out)`` in that order.

    Example:
        >>> canonical_layout(3, 1, 1)
        'sio'
    """
    return "s" * n_stack + "i" * n_in + "o" * (ndim - n_stack - n_in)


def axis_groups(per_axis: Sequence[T], n_stack: int, n_in: int
                ) -> tuple[tuple[T, ...], tuple[T, ...], tuple[T, ...]]:
    """Splits one entry per canonical axis (a shape, a sharding spec) into its
    ``(stack, in, out)`` groups.

    Example:
        >>> axis_groups((12, 64, 8, 256), 1, 2)
        ((12,), (64, 8), (256,))
    """
    per_axis = tuple(per_axis)
    return per_axis[:n_stack], per_axis[n_stack:n_stack + n_in], per_axis[n_stack + n_in:]


def layout_order(layout: str) -> tuple[int, ...]:
    """A kernel's axes in canonical ``(*stack, *in, *out)`` order, given its layout string.

    Example:
        >>> layout_order("oio")  # Gemma's q_einsum (heads, d_model, head_dim)
        (1, 0, 2)
    """
    return tuple(j for letter in "sio" for j, c in enumerate(layout) if c == letter)


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


def stored_layout(layout: str) -> str | None:
    """What a node's ``layout`` field holds: ``None`` when the axes are already canonical.

    Example:
        >>> stored_layout("sio"), stored_layout("oio")
        (None, 'oio')
    """
    return None if layout_order(layout) == tuple(range(len(layout))) else layout


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
    if len(roles) != len(shape) or set(roles) - set("sio") or "i" not in roles or (
            "o" not in roles):
        hint = (" (a stack of layers is one more 's': axes=lorax.infer_axes(fn, params, *args) "
                "reads every kernel's layout off the model)" if len(roles) < len(shape) else "")
        raise ValueError(
            f"expected `axes` to give one letter per axis of the kernel of shape {list(shape)}: "
            "'s' (stack), 'i' (input) or 'o' (output), with at least one 'i' and one 'o'; got "
            f"{layout!r} at {path!r}{hint}")
    return roles


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
