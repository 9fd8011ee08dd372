"""Real human-labelled regression data, user tables, splits and metrics for the experiments.

The main data set is the VADER sentiment lexicon (Hutto & Gilbert, 2014), shipped as
``vader_lexicon.txt`` inside the PyPI package ``vaderSentiment`` (3.3.2). Each line is
``token<TAB>mean<TAB>std<TAB>[ten ratings]``: ten human raters scored each token's valence
from -4 (extremely negative) to +4 (extremely positive), and ``mean`` is the published label.

Measured on vaderSentiment 3.3.2: the file has **7,520** entries (not the 7,517 sometimes
quoted). 14 tokens occur twice with different ratings (``lol``, ``ok``, ``sob``, ``xd``,
``:-p``, ...), so there are **7,506** distinct tokens; :func:`load_vader` merges the duplicates
by default so the same text can never land in both train and test. Labels span [-3.9, 3.4].

Example:
    >>> data = Dataset(["good", "bad", "fine", "meh"], [2.0, -2.0, 0.3, -0.4], "toy")
    >>> train, val, test = split(data, seed=0, fractions=(0.5, 0.25, 0.25))
    >>> len(train), len(val), len(test)
    (2, 1, 1)
    >>> acc3(np.array([1.0, -1.0]), np.array([2.0, 0.0]))
    0.5
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.resources
import json
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

VADER_PACKAGE = "vaderSentiment"
VADER_FILE = "vader_lexicon.txt"
NEUTRAL_BAND = 0.5
"""Half-width of the neutral class of :func:`acc3` on the raw valence scale."""

_SUPPORTED_EXTENSIONS = (".csv", ".jsonl", ".json")


class DataError(ValueError):
    """A data file could not be read; the message says which file, line and value."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Texts with one float32 regression label each.

    Attributes:
        texts: The inputs.
        labels: float32 array of shape ``(len(texts),)``.
        name: A short description, e.g. ``"vader"`` or ``"vader/train"``.

    Example:
        >>> data = Dataset(["a", "b"], [1, -1], "toy")
        >>> len(data), data.labels.dtype
        (2, dtype('float32'))
    """

    texts: list[str]
    labels: np.ndarray
    name: str

    def __post_init__(self) -> None:
        texts = list(self.texts)
        labels = np.asarray(self.labels, dtype=np.float32)
        if labels.ndim != 1 or labels.shape[0] != len(texts):
            raise ValueError(
                f"expected one label per text for {self.name!r}: {len(texts)} texts, "
                f"labels of shape {labels.shape}"
            )
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> Dataset:
        """The examples at ``indices`` (in that order), as a new :class:`Dataset`."""
        indices = np.asarray(indices, dtype=np.int64)
        return Dataset(
            [self.texts[i] for i in indices.tolist()],
            self.labels[indices],
            self.name if name is None else name,
        )


# --------------------------------------------------------------------------------------------
# VADER


def _vader_lines() -> list[str]:
    resource = importlib.resources.files(VADER_PACKAGE) / VADER_FILE
    return resource.read_text(encoding="utf-8").splitlines()


def load_vader(deduplicate: bool = True) -> Dataset:
    """Loads the VADER lexicon: 7,506 tokens with their mean human valence in [-4, 4].

    Args:
        deduplicate: If True (default), tokens listed more than once (14 in vaderSentiment
            3.3.2) become one example whose label is the mean of their listed means, kept at
            the position of the first occurrence: 7,506 examples. If False, every line of the
            file is an example, in file order: 7,520 examples.

    Returns:
        A :class:`Dataset` named ``"vader"`` (texts are the raw tokens, e.g. ``"lol"``,
        ``":-)"``, ``"abandon"``).

    Raises:
        DataError: If a line of the packaged file cannot be parsed.
    """
    texts: list[str] = []
    labels: list[list[float]] = []
    position: dict[str, int] = {}
    for line_number, line in enumerate(_vader_lines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            token, valence = fields[0], float(fields[1])
        except (IndexError, ValueError):
            raise DataError(f"{VADER_FILE}, line {line_number}: cannot parse {line!r}") from None
        if deduplicate and token in position:
            labels[position[token]].append(valence)
            continue
        position[token] = len(texts)
        texts.append(token)
        labels.append([valence])
    means = np.array([math.fsum(values) / len(values) for values in labels], dtype=np.float32)
    return Dataset(texts, means, "vader")


# --------------------------------------------------------------------------------------------
# Splits


def split(
    dataset: Dataset, seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> tuple[Dataset, Dataset, Dataset]:
    """Splits into train/validation/test with a fixed random permutation.

    The permutation is ``np.random.default_rng(seed).permutation(len(dataset))``. The
    validation and test sizes are ``floor(n * fraction)`` (with a 1e-9 guard against float
    round-off, so 0.29 * 100 gives 29); train gets the rest, so ``len(train) >= floor(n * f_train)``
    and the three sizes always sum to ``n``. Train takes the first indices of the permutation,
    then validation, then test. The same seed always gives the same split.

    Args:
        dataset: The data.
        seed: Seed of the permutation.
        fractions: ``(train, validation, test)``, each in [0, 1], summing to 1.

    Returns:
        ``(train, validation, test)`` datasets named ``"<name>/train"`` etc.

    Raises:
        ValueError: If ``fractions`` is not three non-negative numbers summing to 1.

    Example:
        >>> data = Dataset([str(i) for i in range(10)], np.arange(10.0), "digits")
        >>> train, val, test = split(data, seed=1)
        >>> len(train), len(val), len(test), val.name
        (8, 1, 1, 'digits/val')
    """
    fractions = tuple(float(value) for value in fractions)
    if (
        len(fractions) != 3
        or any(not 0.0 <= value <= 1.0 for value in fractions)
        or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6)
    ):
        raise ValueError(
            f"expected `fractions` to be three numbers in [0, 1] summing to 1, got {fractions}"
        )
    size = len(dataset)
    val_size = math.floor(size * fractions[1] + 1e-9)
    test_size = math.floor(size * fractions[2] + 1e-9)
    train_size = size - val_size - test_size
    order = np.random.default_rng(seed).permutation(size)
    bounds = (0, train_size, train_size + val_size, size)
    return tuple(
        dataset.subset(order[start:stop], f"{dataset.name}/{part}")
        for part, start, stop in zip(("train", "val", "test"), bounds[:-1], bounds[1:], strict=True)
    )


# --------------------------------------------------------------------------------------------
# User tables


def _number(value: Any, where: str, column: str) -> float:
    """Parses a label; rejects booleans, empty cells and non-finite values."""
    if isinstance(value, bool) or value is None:
        number = math.nan
    else:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
    if not math.isfinite(number):
        raise DataError(f"{where}: label {value!r} in column {column!r} is not a finite number")
    return number


def _csv_records(path: str) -> Iterator[tuple[str, dict[str, Any], list[str]]]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
        for row in reader:  # DictReader itself skips blank lines
            yield f"{path}, line {reader.line_num}", row, columns


def _jsonl_records(path: str) -> Iterator[tuple[str, dict[str, Any], list[str]]]:
    with open(path, encoding="utf-8-sig") as handle:
        text = handle.read()
    if text.lstrip().startswith("["):  # a .json file holding one array of objects
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: invalid JSON ({error})") from None
        numbered = [(f"{path}, record {index}", item) for index, item in enumerate(items, 1)]
    else:
        numbered = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                numbered.append((where, json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: invalid JSON ({error.msg})") from None
    for where, item in numbered:
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
        yield where, item, list(item)


def load_table(
    path: str | os.PathLike[str], text_col: str, label_col: str, name: str | None = None
) -> Dataset:
    """Loads a user's regression table from CSV or JSON lines.

    The format is picked by extension: ``.csv`` (header row, read with :mod:`csv`, UTF-8,
    optional BOM), ``.jsonl`` or ``.json`` (one JSON object per line; a ``.json`` file holding a
    single array of objects is accepted too). Blank lines are skipped. Labels must be finite
    numbers (numeric strings such as ``"3.5"`` are fine); texts must be strings.

    Args:
        path: The file.
        text_col: Column (key) holding the text.
        label_col: Column (key) holding the numeric label.
        name: Dataset name; defaults to the file name.

    Returns:
        A :class:`Dataset` in file order.

    Raises:
        DataError: With one message for: a missing file (names the path), an unsupported
            extension, an unknown column (lists the available ones), a non-numeric label or
            non-string text (names the line and value), invalid JSON, or a file with no rows.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"file not found: {path}")
    extension = os.path.splitext(path)[1].lower()
    if extension == ".csv":
        records = _csv_records(path)
    elif extension in (".jsonl", ".json"):
        records = _jsonl_records(path)
    else:
        raise DataError(
            f"unsupported file type {extension or '(none)'!r} for {path}; expected one of "
            f"{', '.join(_SUPPORTED_EXTENSIONS)}"
        )
    texts: list[str] = []
    labels: list[float] = []
    for where, record, columns in records:
        for column in (text_col, label_col):
            if column not in record:
                raise DataError(f"{where}: unknown column {column!r}; available columns: {columns}")
        text = record[text_col]
        if not isinstance(text, str):
            raise DataError(f"{where}: text {text!r} in column {text_col!r} is not a string")
        texts.append(text)
        labels.append(_number(record[label_col], where, label_col))
    if not texts:
        raise DataError(f"empty file: {path} has no data rows")
    return Dataset(texts, np.asarray(labels), os.path.basename(path) if name is None else name)


# --------------------------------------------------------------------------------------------
# Metrics


def _pair(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    target = np.asarray(target, dtype=np.float64).reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(
            f"expected as many predictions as targets, got {pred.size} and {target.size}"
        )
    if pred.size == 0:
        raise ValueError("expected at least one prediction, got none")
    return pred, target


def pearson(pred: Any, target: Any) -> float:
    """Pearson correlation, computed in float64 on centred, unit-scaled vectors.

    Returns ``nan`` (without warning) when either input has zero variance, where the
    correlation is undefined; the result is clipped to [-1, 1] against round-off.

    Example:
        >>> pearson([1.0, 2.0, 3.0], [2.0, 4.0, 7.0])
        0.9933992677987828
        >>> pearson([1.0, 1.0], [0.0, 1.0])
        nan
    """
    pred, target = _pair(pred, target)
    pred = pred - pred.mean()
    target = target - target.mean()
    pred_norm, target_norm = np.linalg.norm(pred), np.linalg.norm(target)
    if not (pred_norm > 0.0 and target_norm > 0.0):
        return math.nan
    return float(np.clip(np.dot(pred / pred_norm, target / target_norm), -1.0, 1.0))


def mse(pred: Any, target: Any) -> float:
    """Mean squared error in float64.

    Example:
        >>> mse([1.0, 2.0], [1.0, 4.0])
        2.0
    """
    pred, target = _pair(pred, target)
    return float(np.mean(np.square(pred - target)))


def _sentiment_class(values: np.ndarray) -> np.ndarray:
    return np.where(values < -NEUTRAL_BAND, 0, np.where(values > NEUTRAL_BAND, 2, 1))


def acc3(pred: Any, target: Any) -> float:
    """Three-class accuracy: negative < -0.5 <= neutral <= 0.5 < positive (raw valence).

    Returns ``nan`` if any value is NaN (a NaN has no class).

    Example:
        >>> acc3([-0.6, 0.5, 0.51], [-1.0, -0.5, 3.0])
        1.0
    """
    pred, target = _pair(pred, target)
    if np.isnan(pred).any() or np.isnan(target).any():
        return math.nan
    return float(np.mean(_sentiment_class(pred) == _sentiment_class(target)))
