"""Which leaves :func:`lorax.wrap` adapts and which it trains in full, with the checks that every
pattern the user wrote matched something."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp

from lorax.config import LoRAConfig
from lorax.layouts import EXPERTS
from lorax.node import is_array_like
from lorax.paths import PathSelector, hint, listing, unmatched_keys

# Leaf names that regex `targets` select by their module's path alone (Flax's names for
# Dense/Conv/Einsum kernels and Embed tables, Gemma's einsum `w`); other leaves must be named
# by the regex itself.
KERNEL_NAMES = ("kernel", "embedding", "w")
# What `targets=None` adapts: Flax kernels, and Gemma's einsum weights (`q_einsum/w`, ...,
# `gating_einsum` or `gating_einsum/w`, `linear` or `linear/w`).
DEFAULT_TARGETS = re.compile(r"(^|/)(kernel|[^/]*einsum/w|[^/]*einsum|linear/w|linear)$")
# ... but not the language-model output projection over the vocabulary, as PEFT's `all-linear`
# (HF/EasyLM `lm_head`, MaxText/T5X `logits_dense`, Flax's lm1b/wmt `logitdense`).
OUTPUT_HEADS = re.compile(r"(^|/)(lm_head|logits_dense|logitdense)/kernel$")
# MoE expert stacks (E, D, F) under a module named for them, whatever the leaf's name
# (MaxText's `MoeBlock_0/wi_0`, `wo`; `experts/w1`): see lorax.layouts.EXPERTS.


def is_default_target(path: str, leaf: Any) -> bool:
    """Whether ``targets=None`` adapts the leaf at ``path``: a kernel (:data:`DEFAULT_TARGETS`)
    that is not a language-model output head (:data:`OUTPUT_HEADS`), or a stack of MoE expert
    kernels (ndim >= 3 under a module named for experts, :data:`lorax.layouts.EXPERTS`).

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.ones((4, 8))
        >>> is_default_target("mlp/kernel", w), is_default_target("lm_head/kernel", w)
        (True, False)
        >>> is_default_target("MoeBlock_0/wi_0", jnp.ones((8, 4, 16)))
        True
    """
    if not is_kernel(leaf):
        return False
    if EXPERTS.search(path) and leaf.ndim >= 3:
        return True
    return bool(DEFAULT_TARGETS.search(path)) and not OUTPUT_HEADS.search(path)


def is_kernel(leaf: Any) -> bool:
    """Whether ``leaf`` can be adapted: a floating array of at least 2 dims."""
    return is_array_like(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim >= 2


class Selection(NamedTuple):
    """The paths :func:`select` picked, in tree order."""

    adapted: list[str]
    trained: list[str]


def select(arrays: Sequence[tuple[str, Any]], config: LoRAConfig) -> Selection:
    """The leaves of ``arrays`` (``(path, array)`` pairs) that ``config`` adapts or trains.

    Raises:
        ValueError: when nothing is selected, a pattern of ``targets``, ``exclude``, ``train``,
            ``rank_pattern``, ``alpha_pattern``, ``in_axes``, ``stacked`` or ``axes`` matches
            no leaf, or ``targets``/``train`` select leaves that cannot be adapted/trained.

    Example:
        >>> import jax.numpy as jnp
        >>> arrays = [("dense/kernel", jnp.ones((4, 4))), ("dense/bias", jnp.ones(4))]
        >>> select(arrays, LoRAConfig(train="bias"))
        Selection(adapted=['dense/kernel'], trained=['dense/bias'])
    """
    targets = PathSelector(config.targets, "targets")
    exclude = PathSelector(config.exclude, "exclude")
    train = PathSelector(config.train, "train")
    paths = [p for p, _ in arrays]
    trained, adapted, exclude_hits = [], [], set()
    target_hits: dict[str, list[tuple[str, Any]]] = {}
    for path, leaf in arrays:
        excluded_by = exclude.matching(path, leaf)
        exclude_hits.update(excluded_by)  # a `train` leaf is not adapted: `exclude` holds there
        if train(path, leaf):
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise ValueError(
                    f"expected `train` to select floating leaves, got {leaf.dtype} at {path!r}")
            trained.append(path)
            continue
        if excluded_by:
            continue
        if targets.is_none:
            if is_default_target(path, leaf):
                adapted.append(path)
            continue
        hits = targets.naming(path, leaf, KERNEL_NAMES)
        for pattern in hits:
            target_hits.setdefault(pattern, []).append((path, leaf))
        if hits and is_kernel(leaf):
            adapted.append(path)

    for pattern in exclude.patterns:
        if pattern.pattern not in exclude_hits:
            raise ValueError(f"`exclude` pattern {pattern.pattern!r} matched no leaf"
                             f"{exclude.whole_name_note(pattern.pattern, paths)}; {hint(paths)}")
    if not train.is_none and not trained:
        raise ValueError(f"`train` matched no leaf; {hint(paths)}")
    _check_targets(targets, target_hits, paths)
    if not adapted:
        default = (" (the default `targets` picks floating leaves of ndim >= 2 named `kernel` or "
                   "Gemma's einsum weights, but not the output heads `lm_head`, `logits_dense`, "
                   "`logitdense`; pass `targets=` regexes for other names)"
                   if targets.is_none else "")
        raise ValueError(f"no leaf was selected for adaptation{default}; {hint(paths)}")
    _check_patterns(config, adapted, paths)
    return Selection(adapted, trained)


def _check_targets(targets: PathSelector, hits: dict[str, list[tuple[str, Any]]],
                   paths: list[str]) -> None:
    names = [p.pattern for p in targets.patterns] + (["<callable>"] if targets.fn else [])
    for pattern in names:
        found = hits.get(pattern, [])
        if not found:
            raise ValueError(f"`targets` pattern {pattern!r} matched no leaf"
                             f"{targets.whole_name_note(pattern, paths)}; {hint(paths)}")
        bad = [(p, x) for p, x in found if not is_kernel(x)]
        if len(bad) == len(found) or (pattern == "<callable>" and bad):
            p, x = bad[0]
            raise ValueError(f"expected `targets` to select floating kernels with ndim >= 2, "
                             f"got {x.dtype}{list(x.shape)} at {p!r}")


def _check_patterns(config: LoRAConfig, adapted: list[str], paths: list[str]) -> None:
    in_axes = config.in_axes if not isinstance(config.in_axes, int) else None
    for argname, mapping in (("rank_pattern", config.rank_pattern),
                             ("alpha_pattern", config.alpha_pattern),
                             ("in_axes", in_axes), ("stacked", config.stacked)):
        missing = unmatched_keys(mapping, adapted, argname)
        if missing:
            raise ValueError(f"`{argname}` pattern {missing[0]!r} matched no adapted leaf; "
                             f"adapted paths: {listing(adapted)}")
    # `axes` may come from infer_axes, which lists every kernel the model uses: its keys need
    # only match some leaf.
    axes = None if isinstance(config.axes, str) else config.axes
    missing = unmatched_keys(axes, paths, "axes")
    if missing:
        raise ValueError(f"`axes` pattern {missing[0]!r} matched no leaf; {hint(paths)}")
