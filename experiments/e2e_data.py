"""The E2E NLG Challenge data (Novikova, Dušek & Rieser, SIGDIAL 2017): MRs, references, splits.

Each row of the shipped CSV files pairs a meaning representation (MR) such as
``name[Alimentum], area[city centre], familyFriendly[no]`` with one human reference text; an MR
has several rows, one per reference. :func:`load` groups the rows into one :class:`Example` per
distinct MR. Provenance, checksums and the licence (CC BY-SA 4.0) are in
``experiments/datasets/e2e/README.md``.

The attribute names are the eight of the E2E ontology: ``name``, ``eatType``, ``food``,
``priceRange``, ``customer rating`` (written with a space in the data, so it is not a ``\\w+``
word), ``area``, ``familyFriendly`` and ``near``. No value contains a comma or a bracket.

Example:
    >>> parse_mr("name[Cotto], customer rating[5 out of 5]")
    (('name', 'Cotto'), ('customer rating', '5 out of 5'))
    >>> mr_text("name[Cotto], eatType[pub]")
    'name: Cotto; eat type: pub'
"""

from __future__ import annotations

import csv
import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "datasets" / "e2e"
"""Folder of the unmodified E2E CSV files."""

SPLIT_FILES = {"dev": "devset.csv", "test": "testset_w_refs.csv"}
"""Which file :func:`load` reads for each split name."""

ATTRIBUTES = (
    "name",
    "eatType",
    "food",
    "priceRange",
    "customer rating",
    "area",
    "familyFriendly",
    "near",
)
"""The eight E2E attributes, spelled as in the data."""

# ``attribute[value]`` items separated by commas. Attribute names may contain spaces
# ("customer rating") but no bracket or comma; values may contain commas but no bracket.
_ITEM = r"\s*([^\[\],]*?[^\s\[\],])\s*\[([^\[\]]*)\]\s*"
_MR = re.compile(rf"{_ITEM}(?:,{_ITEM})*")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")


def parse_mr(mr: str) -> tuple[tuple[str, str], ...]:
    """Parses an E2E meaning representation into ``(attribute, value)`` pairs, in order.

    Args:
        mr: A string such as ``"name[Alimentum], area[city centre]"``.

    Returns:
        The pairs, in the order they appear.

    Raises:
        ValueError: If ``mr`` is not a comma-separated list of ``attribute[value]`` items, or
            names an attribute twice; the message quotes the string.

    Example:
        >>> parse_mr("name[Alimentum], area[city centre], familyFriendly[no]")
        (('name', 'Alimentum'), ('area', 'city centre'), ('familyFriendly', 'no'))
    """
    if not isinstance(mr, str) or not _MR.fullmatch(mr):
        raise ValueError(f"mr is not a comma-separated list of attribute[value] items: {mr!r}")
    pairs = tuple(re.findall(_ITEM, mr))
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"mr names an attribute more than once: {mr!r}")
    return pairs


def attribute_words(attribute: str) -> str:
    """Spells an attribute name as lower-case words: ``"priceRange"`` -> ``"price range"``.

    Example:
        >>> attribute_words("familyFriendly"), attribute_words("customer rating")
        ('family friendly', 'customer rating')
    """
    return _CAMEL.sub(" ", attribute).lower()


def mr_text(mr: str) -> str:
    """Renders an MR readably for a prompt: ``"name: X; eat type: pub; ..."``.

    Args:
        mr: An E2E meaning representation (see :func:`parse_mr`).

    Returns:
        ``attribute: value`` items joined by ``"; "``, attribute names split into words.

    Example:
        >>> mr_text("name[Alimentum], area[city centre], familyFriendly[no]")
        'name: Alimentum; area: city centre; family friendly: no'
    """
    return "; ".join(f"{attribute_words(name)}: {value}" for name, value in parse_mr(mr))


@dataclasses.dataclass(frozen=True)
class Example:
    """One distinct MR with all of its human references.

    Attributes:
        mr: The meaning representation, verbatim from the file.
        refs: Its references in file order (at least one).

    Example:
        >>> Example("name[Cotto]", ["Cotto.", "It is Cotto."]).refs
        ('Cotto.', 'It is Cotto.')
    """

    mr: str
    refs: tuple[str, ...]

    def __post_init__(self) -> None:
        refs = tuple(self.refs)
        if not refs:
            raise ValueError(f"refs is empty for mr {self.mr!r}")
        object.__setattr__(self, "refs", refs)


def load(split: str, data_dir: str | Path | None = None) -> list[Example]:
    """Reads the ``"dev"`` or ``"test"`` split, one :class:`Example` per distinct MR.

    Args:
        split: ``"dev"`` (``devset.csv``) or ``"test"`` (``testset_w_refs.csv``).
        data_dir: Folder holding the CSV files; :data:`DATA_DIR` by default.

    Returns:
        The examples in the order their MR first appears, references in file order.

    Raises:
        ValueError: For an unknown ``split``, a file without the ``mr,ref`` header, or a row
            whose MR does not parse (the message gives file and line).

    Example:
        >>> [len(load(s)) for s in ("dev", "test")]
        [547, 630]
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    path = Path(DATA_DIR if data_dir is None else data_dir) / SPLIT_FILES[split]
    grouped: dict[str, list[str]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["mr", "ref"]:
            raise ValueError(f"{path}: expected the header mr,ref, got {header!r}")
        for row in reader:
            if len(row) != 2:
                raise ValueError(f"{path}:{reader.line_num}: expected 2 fields, got {row!r}")
            mr, ref = row
            if mr not in grouped:
                try:
                    parse_mr(mr)
                except ValueError as err:
                    raise ValueError(f"{path}:{reader.line_num}: {err}") from None
                grouped[mr] = []
            grouped[mr].append(ref)
    return [Example(mr, tuple(refs)) for mr, refs in grouped.items()]


def _permutation(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def split_dev(
    examples: Sequence[Example], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Splits examples into train and validation sets, disjoint by MR.

    ``round(len(examples) * val_fraction)`` examples (at least one) chosen by a seeded
    permutation go to validation; both parts keep the input order.

    Args:
        examples: Examples with distinct MRs, e.g. ``load("dev")``.
        val_fraction: Share of MRs for validation, strictly between 0 and 1.
        seed: Seed of ``numpy.random.default_rng``.

    Returns:
        ``(train, val)``.

    Raises:
        ValueError: If ``val_fraction`` is not in (0, 1), would leave either part empty, or
            two examples share an MR.

    Example:
        >>> train, val = split_dev(load("dev"), val_fraction=0.1, seed=0)
        >>> len(train), len(val)
        (492, 55)
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    mrs = [ex.mr for ex in examples]
    if len(set(mrs)) != len(mrs):
        raise ValueError("examples must have distinct MRs to be split by MR")
    n_val = max(1, round(len(examples) * val_fraction))
    if n_val >= len(examples):
        raise ValueError(
            f"val_fraction={val_fraction!r} of {len(examples)} examples leaves no training data"
        )
    val_idx = set(_permutation(len(examples), seed)[:n_val].tolist())
    train = [ex for i, ex in enumerate(examples) if i not in val_idx]
    val = [ex for i, ex in enumerate(examples) if i in val_idx]
    return train, val


def pairs(examples: Sequence[Example]) -> list[tuple[str, str]]:
    """Flattens examples to ``(mr, ref)`` training pairs, one per reference.

    Example:
        >>> pairs([Example("name[Cotto]", ("Cotto.", "It is Cotto."))])
        [('name[Cotto]', 'Cotto.'), ('name[Cotto]', 'It is Cotto.')]
    """
    return [(ex.mr, ref) for ex in examples for ref in ex.refs]


def subset(examples: Sequence[Example], n: int | None, seed: int = 0) -> list[Example]:
    """Picks ``n`` examples by a seeded permutation, keeping the input order.

    Args:
        examples: The examples to draw from.
        n: How many; ``None`` or ``n >= len(examples)`` returns them all.
        seed: Seed of ``numpy.random.default_rng``.

    Raises:
        ValueError: If ``n < 1``.

    Example:
        >>> [ex.mr for ex in subset([Example(f"name[{c}]", ("x",)) for c in "abc"], 2)]
        ['name[a]', 'name[c]']
    """
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1 (or None for all), got {n!r}")
    if n is None or n >= len(examples):
        return list(examples)
    keep = set(_permutation(len(examples), seed)[:n].tolist())
    return [ex for i, ex in enumerate(examples) if i in keep]
