"""The E2E data loader against the shipped CSV files read independently here."""

from __future__ import annotations

import csv
import dataclasses
import re
from collections import Counter
from pathlib import Path

import pytest

from experiments import e2e_data

DATA = Path(__file__).resolve().parents[1] / "experiments" / "datasets" / "e2e"
E2E_ATTRIBUTES = {
    "name",
    "eatType",
    "food",
    "priceRange",
    "customer rating",
    "area",
    "familyFriendly",
    "near",
}


def _rows(file_name: str) -> list[tuple[str, str]]:
    with open(DATA / file_name, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["mr", "ref"]
    return [(mr, ref) for mr, ref in rows[1:]]


@pytest.fixture(scope="module")
def dev() -> list[e2e_data.Example]:
    return e2e_data.load("dev")


@pytest.fixture(scope="module")
def test_set() -> list[e2e_data.Example]:
    return e2e_data.load("test")


@pytest.mark.parametrize(
    ("split", "file_name", "n_mrs", "n_refs"),
    [("dev", "devset.csv", 547, 4672), ("test", "testset_w_refs.csv", 630, 4693)],
)
def test_load_groups_rows_by_mr_in_file_order(split, file_name, n_mrs, n_refs):
    examples = e2e_data.load(split)
    rows = _rows(file_name)
    assert len(rows) == n_refs
    assert len(examples) == n_mrs
    assert sum(len(ex.refs) for ex in examples) == n_refs
    # Rebuild the grouping independently: first-seen MR order, references in row order.
    first_seen = list(dict.fromkeys(mr for mr, _ in rows))
    assert [ex.mr for ex in examples] == first_seen
    by_mr = {ex.mr: ex.refs for ex in examples}
    position = Counter()
    for mr, ref in rows:
        assert by_mr[mr][position[mr]] == ref
        position[mr] += 1
    assert all(position[ex.mr] == len(ex.refs) for ex in examples)


def test_every_row_parses_and_round_trips(dev, test_set):
    attributes = set()
    for ex in dev + test_set:
        parsed = e2e_data.parse_mr(ex.mr)
        assert ", ".join(f"{name}[{value}]" for name, value in parsed) == ex.mr
        assert parsed[0][0] == "name"
        attributes.update(name for name, _ in parsed)
    assert attributes == E2E_ATTRIBUTES == set(e2e_data.ATTRIBUTES)


def test_parse_mr_examples():
    assert e2e_data.parse_mr("name[Alimentum], area[city centre], familyFriendly[no]") == (
        ("name", "Alimentum"),
        ("area", "city centre"),
        ("familyFriendly", "no"),
    )
    # The attribute with a space, and a value with a currency sign and a dash.
    assert e2e_data.parse_mr("customer rating[low], priceRange[£20-25]") == (
        ("customer rating", "low"),
        ("priceRange", "£20-25"),
    )
    # No E2E value contains a comma, but one would not split an item.
    assert e2e_data.parse_mr("name[Cotto, Cambridge], area[riverside]") == (
        ("name", "Cotto, Cambridge"),
        ("area", "riverside"),
    )


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "name",
        "name[Cotto",
        "name[Cotto],",
        "name[Cotto] area[riverside]",
        "name[Cotto],,area[riverside]",
        "name[a[b]]",
        "[Cotto]",
        "name[Cotto], name[Zizzi]",
    ],
)
def test_parse_mr_rejects_malformed_input_and_quotes_it(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        e2e_data.parse_mr(bad)


def test_mr_text():
    assert (
        e2e_data.mr_text("name[Alimentum], area[city centre], familyFriendly[no]")
        == "name: Alimentum; area: city centre; family friendly: no"
    )
    assert (
        e2e_data.mr_text("eatType[pub], priceRange[cheap], customer rating[5 out of 5]")
        == "eat type: pub; price range: cheap; customer rating: 5 out of 5"
    )


def test_mr_text_on_real_data_keeps_every_value_and_no_camel_case(dev):
    for ex in dev:
        text = e2e_data.mr_text(ex.mr)
        items = text.split("; ")
        parsed = e2e_data.parse_mr(ex.mr)
        assert len(items) == len(parsed)
        for item, (_, value) in zip(items, parsed, strict=True):
            name, _, rendered = item.partition(": ")
            assert rendered == value
            assert name == name.lower() and name.replace(" ", "").isalpha()


def test_example_is_frozen_and_keeps_refs_as_tuple():
    ex = e2e_data.Example("name[Cotto]", ["Cotto.", "It is Cotto."])
    assert ex.refs == ("Cotto.", "It is Cotto.")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ex.mr = "name[Zizzi]"  # type: ignore[misc]
    with pytest.raises(ValueError, match="refs"):
        e2e_data.Example("name[Cotto]", ())


def test_load_rejects_unknown_split_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="split"):
        e2e_data.load("train")
    (tmp_path / "devset.csv").write_text("source,target\nname[x],X\n", encoding="utf-8")
    with pytest.raises(ValueError, match="header"):
        e2e_data.load("dev", data_dir=tmp_path)
    (tmp_path / "devset.csv").write_text("mr,ref\nname[x],X\nname x,Y\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"devset\.csv:3: mr is not"):
        e2e_data.load("dev", data_dir=tmp_path)


def test_split_dev_is_disjoint_complete_ordered_and_deterministic(dev):
    train, val = e2e_data.split_dev(dev, val_fraction=0.1, seed=0)
    assert (len(train), len(val)) == (492, 55)  # round(547 * 0.1) = 55
    train_mrs, val_mrs = {ex.mr for ex in train}, {ex.mr for ex in val}
    assert not train_mrs & val_mrs
    assert train_mrs | val_mrs == {ex.mr for ex in dev}
    order = {ex.mr: i for i, ex in enumerate(dev)}
    for part in (train, val):
        positions = [order[ex.mr] for ex in part]
        assert positions == sorted(positions)
    again = e2e_data.split_dev(dev, val_fraction=0.1, seed=0)
    assert again == (train, val)
    other = e2e_data.split_dev(dev, val_fraction=0.1, seed=1)
    assert {ex.mr for ex in other[1]} != val_mrs
    # Whole MRs move: the pairs of both parts are exactly the pairs of the dev set.
    assert Counter(e2e_data.pairs(train) + e2e_data.pairs(val)) == Counter(e2e_data.pairs(dev))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, 0.99])
def test_split_dev_rejects_bad_fractions(fraction):
    examples = [e2e_data.Example(f"name[{c}]", ("x",)) for c in "abcdef"]
    with pytest.raises(ValueError, match="val_fraction"):
        e2e_data.split_dev(examples, val_fraction=fraction)


def test_split_dev_rejects_duplicate_mrs():
    examples = [e2e_data.Example("name[a]", ("x",))] * 3
    with pytest.raises(ValueError, match="distinct MRs"):
        e2e_data.split_dev(examples, val_fraction=0.5)


def test_pairs_flattens_in_order(dev):
    flat = e2e_data.pairs(dev)
    assert flat == _rows("devset.csv")  # the dev file lists each MR's rows contiguously


def test_subset(test_set):
    assert e2e_data.subset(test_set, None) == test_set
    assert e2e_data.subset(test_set, 10_000) == test_set
    picked = e2e_data.subset(test_set, 100, seed=3)
    assert len(picked) == 100 == len({ex.mr for ex in picked})
    order = {ex.mr: i for i, ex in enumerate(test_set)}
    positions = [order[ex.mr] for ex in picked]
    assert positions == sorted(positions)
    assert e2e_data.subset(test_set, 100, seed=3) == picked
    assert e2e_data.subset(test_set, 100, seed=4) != picked
    for bad in (0, -1):
        with pytest.raises(ValueError, match="n must be"):
            e2e_data.subset(test_set, bad)
