"""The VADER data set, splits, user-table loading and metrics in ``experiments/data.py``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import assert_close

from experiments import data


@pytest.fixture(scope="module")
def vader() -> data.Dataset:
    return data.load_vader()


# ----------------------------------------------------------------------------- VADER


def test_vader_counts(vader):
    raw = data.load_vader(deduplicate=False)
    assert len(raw) == 7520  # every entry of vaderSentiment 3.3.2's vader_lexicon.txt
    assert len(vader) == 7506  # 14 tokens are listed twice
    assert len(set(vader.texts)) == len(vader)
    assert vader.name == "vader"


def test_vader_labels(vader):
    assert vader.labels.dtype == np.float32
    assert vader.labels.shape == (len(vader.texts),)
    assert np.all(vader.labels >= -4.0) and np.all(vader.labels <= 4.0)
    assert_close(vader.labels.min(), -3.9)
    assert_close(vader.labels.max(), 3.4)
    label = dict(zip(vader.texts, vader.labels, strict=True))
    assert_close(label["$:"], -1.5)  # first line of the file
    assert_close(label["abandon"], -1.9)
    assert_close(label["lol"], (2.9 + 1.8) / 2)  # listed twice: merged
    assert all(text == text.strip() and text for text in vader.texts)


# ----------------------------------------------------------------------------- split


def test_split_sizes_disjoint_and_complete(vader):
    train, val, test = data.split(vader, seed=0)
    size = len(vader)
    assert (len(val), len(test)) == (size // 10, size // 10)
    assert len(train) + len(val) + len(test) == size
    parts = [set(part.texts) for part in (train, val, test)]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert parts[0] | parts[1] | parts[2] == set(vader.texts)
    assert [part.name for part in (train, val, test)] == ["vader/train", "vader/val", "vader/test"]
    position = {text: i for i, text in enumerate(vader.texts)}
    for part in (train, val, test):
        indices = [position[text] for text in part.texts]
        np.testing.assert_array_equal(part.labels, vader.labels[indices])


def test_split_is_deterministic_per_seed_and_differs_across_seeds(vader):
    first = data.split(vader, seed=3)
    again = data.split(vader, seed=3)
    other = data.split(vader, seed=4)
    for one, two in zip(first, again, strict=True):
        assert one.texts == two.texts
    assert first[2].texts != other[2].texts
    order = np.random.default_rng(3).permutation(len(vader))
    assert first[0].texts[:5] == [vader.texts[i] for i in order[:5]]


@pytest.mark.parametrize(
    ("size", "fractions", "expected"),
    [
        (10, (0.8, 0.1, 0.1), (8, 1, 1)),
        (30, (0.7, 0.2, 0.1), (21, 6, 3)),
        (100, (0.42, 0.29, 0.29), (42, 29, 29)),  # 0.29 * 100 is 28.999999999999996
        (7, (0.5, 0.25, 0.25), (5, 1, 1)),  # floors for val/test, remainder to train
        (5, (1.0, 0.0, 0.0), (5, 0, 0)),
        (0, (0.8, 0.1, 0.1), (0, 0, 0)),
    ],
)
def test_split_sizes_floor_with_remainder_to_train(size, fractions, expected):
    dataset = data.Dataset([f"t{i}" for i in range(size)], np.zeros(size), "toy")
    assert tuple(len(part) for part in data.split(dataset, fractions=fractions)) == expected


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.8, 0.3, 0.1), (1.2, -0.1, -0.1)])
def test_split_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        data.split(data.Dataset(["a"], [0.0], "toy"), fractions=fractions)


def test_dataset_checks_lengths():
    with pytest.raises(ValueError, match="one label per text"):
        data.Dataset(["a", "b"], [1.0], "toy")


# ----------------------------------------------------------------------------- tables


def test_load_csv(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text(
        'id,review,score\n1,"Great, really great",3.5\n\n2,"Bad ""very"" bad",-2\n3,meh,0\n',
        encoding="utf-8",
    )
    dataset = data.load_table(path, "review", "score")
    assert dataset.texts == ["Great, really great", 'Bad "very" bad', "meh"]
    np.testing.assert_array_equal(dataset.labels, np.array([3.5, -2.0, 0.0], np.float32))
    assert dataset.name == "reviews.csv"


def test_load_csv_with_byte_order_mark(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("text,label\nhello,1\n".encode("utf-8-sig"))
    assert data.load_table(path, "text", "label", name="bom").texts == ["hello"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_load_json_lines(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    rows = [{"text": "good 😀", "y": 2}, {"text": "bad", "y": -1.5, "extra": None}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n", encoding="utf-8")
    dataset = data.load_table(path, "text", "y")
    assert dataset.texts == ["good 😀", "bad"]
    np.testing.assert_array_equal(dataset.labels, np.array([2.0, -1.5], np.float32))


def test_load_json_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"t": "a", "v": "0.5"}, {"t": "b", "v": 1}]), encoding="utf-8")
    np.testing.assert_array_equal(data.load_table(path, "t", "v").labels, [0.5, 1.0])


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.csv"
    with pytest.raises(data.DataError, match=f"file not found: {path}"):
        data.load_table(path, "text", "label")


def test_unknown_column_lists_available_columns(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("sentence,valence\nhi,1\n", encoding="utf-8")
    with pytest.raises(data.DataError) as error:
        data.load_table(path, "text", "valence")
    message = str(error.value)
    assert "unknown column 'text'" in message and "['sentence', 'valence']" in message
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"sentence": "hi", "valence": 1}\n', encoding="utf-8")
    with pytest.raises(data.DataError, match=r"unknown column 'label'.*\['sentence', 'valence'\]"):
        data.load_table(jsonl, "sentence", "label")


@pytest.mark.parametrize("bad", ["high", "", "nan", "inf"])
def test_non_numeric_csv_label_names_line_and_value(tmp_path, bad):
    path = tmp_path / "t.csv"
    path.write_text(f"text,label\nok,1\nfine,2\nbad row,{bad}\n", encoding="utf-8")
    with pytest.raises(data.DataError, match=f"line 4: label '{bad}' in column 'label'"):
        data.load_table(path, "text", "label")


@pytest.mark.parametrize("bad", ['"x"', "true", "null", "[1]"])
def test_non_numeric_jsonl_label_names_line_and_value(tmp_path, bad):
    path = tmp_path / "t.jsonl"
    path.write_text(f'{{"text": "a", "label": 1}}\n{{"text": "b", "label": {bad}}}\n')
    with pytest.raises(data.DataError, match="line 2: label .* is not a finite number"):
        data.load_table(path, "text", "label")


def test_invalid_json_and_non_object_lines(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(data.DataError, match="line 2: invalid JSON"):
        data.load_table(path, "text", "label")
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(data.DataError, match="record 1: expected a JSON object"):
        data.load_table(path, "text", "label")


def test_non_string_text(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": 5, "label": 1}\n', encoding="utf-8")
    with pytest.raises(data.DataError, match="line 1: text 5 in column 'text' is not a string"):
        data.load_table(path, "text", "label")


@pytest.mark.parametrize(
    ("name", "content"),
    [("e.csv", ""), ("h.csv", "text,label\n"), ("e.jsonl", ""), ("b.jsonl", "\n  \n")],
)
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(data.DataError, match=f"empty file: {path}"):
        data.load_table(path, "text", "label")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("text\tlabel\n", encoding="utf-8")
    with pytest.raises(data.DataError, match=r"unsupported file type '\.tsv'"):
        data.load_table(path, "text", "label")


def test_data_error_is_a_value_error():
    assert issubclass(data.DataError, ValueError)


# ----------------------------------------------------------------------------- metrics


def test_metrics_match_numpy():
    rng = np.random.default_rng(0)
    target = rng.uniform(-4, 4, size=500)
    pred = 0.7 * target + rng.normal(scale=1.0, size=500)
    assert isinstance(data.pearson(pred, target), float)
    assert_close(data.pearson(pred, target), np.corrcoef(pred, target)[0, 1])
    assert_close(data.mse(pred, target), np.mean((pred - target) ** 2))

    def sentiment(value: float) -> str:
        return "neg" if value < -0.5 else "pos" if value > 0.5 else "neu"

    agree = [sentiment(p) == sentiment(t) for p, t in zip(pred, target, strict=True)]
    assert_close(data.acc3(pred, target), sum(agree) / len(agree))


def test_acc3_band_edges_are_neutral():
    edges = np.array([-0.5, 0.5, -0.50001, 0.50001])
    assert data.acc3(edges, np.array([0.0, 0.0, -3.0, 3.0])) == 1.0
    assert data.acc3(np.array([-0.5]), np.array([-0.6])) == 0.0


def test_metrics_accept_float32_and_lists():
    pred32 = np.array([0.1, 0.2, 0.4], np.float32)
    # float64 rounding of the squares (~0.4^2) of the values: the float32 ones equal these.
    assert_close(data.mse(pred32, [0.1, 0.2, 0.4]), 0.0, scale=0.4**2)
    assert_close(data.pearson([1, 2, 3], [3, 2, 1]), -1.0)


def test_pearson_is_numerically_careful():
    base = np.linspace(-1, 1, 101)
    shifted = base + 1e8  # a huge offset would ruin a naive sum-of-products formula
    # The inputs carry float64 rounding of their 1e8 offset; a naive formula is off by O(1).
    assert_close(data.pearson(shifted, 2 * base), 1.0, scale=1e8)
    assert math.isnan(data.pearson(np.ones(5), base[:5]))
    assert math.isnan(data.pearson(base[:5], np.full(5, 3.0)))
    assert -1.0 <= data.pearson(base, base) <= 1.0


def test_metric_input_errors_and_nan():
    with pytest.raises(ValueError, match="as many predictions as targets"):
        data.mse([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        data.pearson([], [])
    assert math.isnan(data.acc3([math.nan, 1.0], [1.0, 1.0]))
    assert math.isnan(data.mse([math.nan], [1.0]))
