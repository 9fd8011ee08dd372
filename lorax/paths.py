"""Leaf paths as '/'-joined strings, and the selectors users write against them.

A selector is ``None``, a regex ``str`` searched in the path, a list (a leaf is selected when
any entry matches; an entry that is a plain name like ``"q"``, ``"layers_1"`` or
``"attention/query"`` matches whole path components, as PEFT's ``target_modules`` list does,
any other entry is a regex searched in the path), or a callable ``(path, leaf) -> bool``.
Pattern maps such as ``rank_pattern`` are ``{regex: value}`` dicts where the first matching
regex wins.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import jax

Selector = str | Sequence[str] | Callable[[str, Any], bool] | None
T = TypeVar("T")

# Flax NNX stores arrays inside `Variable` objects whose pytree child is `.value`.
_VARIABLE_ATTRS = ("value", "raw_value")


def path_str(keypath: Sequence[Any]) -> str:
    """Joins a JAX key path into 'encoder/layer_0/query/kernel' form.

    NNX ``Variable`` wrappers (a trailing ``.value``) are dropped so Linen and NNX trees give the
    same names.

    Example:
        >>> import jax
        >>> tree = {"encoder": {"layers": [{"kernel": 0}]}}
        >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
        ['encoder/layers/0/kernel']
    """
    parts = []
    for key in keypath:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    while len(parts) > 1 and parts[-1] in _VARIABLE_ATTRS and isinstance(
        keypath[len(parts) - 1], jax.tree_util.GetAttrKey
    ):
        parts.pop()
    return "/".join(parts)


def paired_leaves(tree: Any, other: Any, argname: str, is_leaf: Callable[[Any], bool]
                  ) -> tuple[list[tuple[str, Any, Any]], Any]:
    """``[(path, leaf of tree, leaf of other), ...]`` and ``tree``'s treedef, for two trees
    of the same structure; a ``ValueError`` naming ``argname`` when the leaf counts differ.

    Example:
        >>> pairs, _ = paired_leaves({"a": 1, "b": 2}, {"a": 10, "b": 20}, "other", lambda x: False)
        >>> pairs
        [('a', 1, 10), ('b', 2, 20)]
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    other_leaves = jax.tree_util.tree_leaves(other, is_leaf=is_leaf)
    if len(flat) != len(other_leaves):
        raise ValueError(f"expected `{argname}` to have the structure of `tree` ({len(flat)} "
                         f"leaves), got {len(other_leaves)} leaves")
    return [(path_str(kp), leaf, o) for (kp, leaf), o in zip(flat, other_leaves, strict=True)
            ], treedef


def _compile(pattern: Any, argname: str) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise TypeError(
            f"expected `{argname}` to hold regex strings, got {type(pattern).__name__} {pattern!r}"
        )
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"invalid regex {pattern!r} in `{argname}`: {err}") from None


_PLAIN_NAME = re.compile(r"[\w-]+(/[\w-]+)*")


class ComponentName:
    """A list entry that names modules: it matches whole '/'-separated path components, so
    ``"v"`` matches 'attn/v/kernel' but not 'relative_attention_bias/embedding', and
    ``"layers_1"`` not 'layers_10'. Quacks like the compiled regex it stands for.

    Example:
        >>> [bool(ComponentName("v").search(p)) for p in ("attn/v/kernel", "relative/kernel")]
        [True, False]
    """

    def __init__(self, name: str):
        self.pattern = name
        self._regex = re.compile(rf"(?:^|/){re.escape(name)}(?=/|$)")

    def search(self, path: str) -> re.Match[str] | None:
        return self._regex.search(path)

    def finditer(self, path: str) -> Iterable[re.Match[str]]:
        return self._regex.finditer(path)


def list_entry(entry: Any, argname: str) -> re.Pattern[str] | ComponentName:
    """One entry of a list selector: a plain name matches whole path components
    (:class:`ComponentName`), anything else is a regex.

    Example:
        >>> list_entry("layers_1", "targets").search("layers_10/kernel") is None
        True
        >>> list_entry("layers_1.*", "targets").search("layers_10/kernel") is not None
        True
    """
    if isinstance(entry, str) and _PLAIN_NAME.fullmatch(entry):
        return ComponentName(entry)
    return _compile(entry, argname)


class PathSelector:
    """A compiled selector: which leaves it picks, and which of its regexes matched anything.

    Example:
        >>> sel = PathSelector(["query", "value"], "targets")
        >>> sel("layer_0/query/kernel", None), sel("layer_0/key/kernel", None)
        (True, False)
    """

    def __init__(self, spec: Selector, argname: str):
        self.argname = argname
        self.spec = spec
        self.fn: Callable[[str, Any], bool] | None = None
        self.patterns: list[re.Pattern[str] | ComponentName] = []
        if spec is None:
            return
        if callable(spec) and not isinstance(spec, str):
            self.fn = spec
        elif isinstance(spec, str):
            self.patterns = [_compile(spec, argname)]
        elif isinstance(spec, Iterable):
            self.patterns = [list_entry(p, argname) for p in spec]
            if not self.patterns:
                raise ValueError(f"expected at least one regex in `{argname}`, got an empty list")
        else:
            raise TypeError(
                f"expected `{argname}` to be a regex string, a list of regexes or a callable "
                f"(path, leaf) -> bool, got {type(spec).__name__}"
            )

    @property
    def is_none(self) -> bool:
        return self.spec is None

    def matching(self, path: str, leaf: Any) -> list[str]:
        """The regexes (or ``['<callable>']``) that select ``path``."""
        if self.fn is not None:
            result = self.fn(path, leaf)
            if not isinstance(result, bool | jax.numpy.bool_):
                raise TypeError(
                    f"expected the `{self.argname}` callable to return a bool, got "
                    f"{type(result).__name__} at {path!r}"
                )
            return ["<callable>"] if result else []
        return [p.pattern for p in self.patterns if p.search(path)]

    def naming(self, path: str, leaf: Any, kernel_names: tuple[str, ...]) -> list[str]:
        """Like :meth:`matching`, but a regex selects a leaf only when the leaf is named in
        ``kernel_names`` or the match reaches into the leaf's own name.

        So ``"query"`` selects 'attn/query/kernel' but not 'attn/query/bias', while
        ``"query/bias"`` or ``"w$"`` name their leaves explicitly.

        Example:
            >>> sel = PathSelector("query", "targets")
            >>> sel.naming("q/query/kernel", None, ("kernel",)), sel.naming("query/bias", None, ())
            (['query'], [])
        """
        if self.fn is not None:
            return self.matching(path, leaf)
        leaf_start = path.rfind("/") + 1
        named = leaf_name(path) in kernel_names
        return [
            p.pattern for p in self.patterns
            if any(named or m.end() > leaf_start for m in p.finditer(path))
        ]

    def __call__(self, path: str, leaf: Any) -> bool:
        return bool(self.matching(path, leaf))

    def whole_name_note(self, label: str, paths: Iterable[str]) -> str:
        """For a plain-name list entry ``label`` that matched nothing but is part of a path
        component: a note saying that list entries match whole components.

        Example:
            >>> PathSelector(["Dense"], "targets").whole_name_note("Dense", ["Dense_0/kernel"])
            " (a plain name in a list matches whole path components, as in PEFT's target_modules: \
use 'Dense_0', or a regex such as 'Dense.*')"
        """
        if not any(isinstance(p, ComponentName) and p.pattern == label for p in self.patterns):
            return ""
        near = next((c for path in paths for c in path.split("/") if label in c), None)
        if near is None:
            return ""
        return (" (a plain name in a list matches whole path components, as in PEFT's "
                f"target_modules: use {near!r}, or a regex such as {label + '.*'!r})")


def first_match(mapping: Mapping[str, T] | None, path: str, argname: str) -> T | None:
    """The value of the first regex key of ``mapping`` found in ``path`` (PEFT's rule).

    Example:
        >>> first_match({"query": 4, ".*": 8}, "layer_0/query/kernel", "rank_pattern")
        4
    """
    if mapping is None:
        return None
    if not isinstance(mapping, Mapping):
        raise TypeError(
            f"expected `{argname}` to be a dict {{regex: value}}, got {type(mapping).__name__}"
        )
    for pattern, value in mapping.items():
        if _compile(pattern, argname).search(path):
            return value
    return None


def unmatched_keys(mapping: Mapping[str, Any] | None, paths: Iterable[str], argname: str) -> list:
    """The regex keys of ``mapping`` that match none of ``paths``."""
    if not mapping:
        return []
    paths = list(paths)
    return [k for k in mapping if not any(_compile(k, argname).search(p) for p in paths)]


def listing(names: Sequence[str], limit: int = 8) -> str:
    """The first ``limit`` of ``names``, quoted, for error messages (``'none'`` when empty).

    Example:
        >>> listing(["a", "b", "c"], limit=2), listing([])
        ("'a', 'b', ... (1 more)", 'none')
    """
    if not names:
        return "none"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def hint(paths: Sequence[str], limit: int = 8) -> str:
    """A short listing of available paths for error messages.

    Example:
        >>> hint(["fc/kernel"]), hint([])
        ("available paths: 'fc/kernel'", 'the tree has no array leaves')
    """
    return f"available paths: {listing(paths, limit)}" if paths else "the tree has no array leaves"


def leaf_name(path: str) -> str:
    """The leaf's own name: the last component of a '/'-joined path.

    Example:
        >>> leaf_name("encoder/layer_0/query/kernel"), leaf_name("kernel")
        ('kernel', 'kernel')
    """
    return path.rsplit("/", 1)[-1]


def is_kernel_path(path: str, ndim: int, names: Sequence[str] = ("kernel",)) -> bool:
    """Whether a leaf of ``ndim`` axes at ``path`` is a kernel: a leaf named in ``names`` (the
    leaf's own name, see :func:`leaf_name`) with at least two axes.

    Example:
        >>> is_kernel_path("fc/kernel", 2), is_kernel_path("fc/kernel", 1)
        (True, False)
        >>> is_kernel_path("embed/embedding", 2), is_kernel_path("embed/embedding", 2,
        ...                                                      ("kernel", "embedding"))
        (False, True)
    """
    return ndim >= 2 and leaf_name(path) in names


def check_tree(tree: Any, argname: str, is_leaf: Callable[[Any], bool], *,
               arrays: bool = True) -> None:
    """Raises a ``TypeError`` naming ``argname`` and the path for a leaf that is neither an
    array, a node (``is_leaf``), a number nor ``None`` (e.g. ``object()``, a module, an optax
    function passed by mistake). With ``arrays=False`` only a ``tree`` that is itself such a
    leaf is refused (structure-only functions also map trees of shardings or specs).

    Example:
        >>> check_tree({"w": object()}, "tree", lambda x: False)
        Traceback (most recent call last):
        ...
        TypeError: expected `tree` to be a pytree of arrays, got object at 'w'
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    if not arrays and not (len(leaves) == 1 and leaves[0][0] == ()):
        return
    for keypath, leaf in leaves:
        if leaf is None or is_leaf(leaf) or isinstance(leaf, (int, float, complex)):
            continue
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            where = path_str(keypath) or "the root"
            raise TypeError(f"expected `{argname}` to be a pytree of arrays, got "
                            f"{type(leaf).__name__} at {where!r}")
