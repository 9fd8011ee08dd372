"""Seeds, learning-rate selection and intervals (experiments.stats) on synthetic results files."""

from __future__ import annotations

import json
import math

import pytest
from helpers import assert_close

from experiments import stats, sweep


def _record(run, lr, seed, val, test, method="lora", rank=8, targets="q,v"):
    return {"run": run, "method": method, "rank": rank, "targets": targets, "lr": lr,
            "seed": seed, "trainable_params": 74_113,
            "val": {"pearson": val, "mse": 1.0 - val, "acc3": val / 2},
            "test": {"pearson": test, "mse": 1.0 - test, "acc3": test / 2}}


# Validation prefers lr 1e-3 for "a" (mean 0.80 vs 0.75); test would prefer 3e-3 (0.90 vs 0.70).
# For "full", validation prefers 1e-4 (0.71 vs 0.70) and test 3e-4.
SYNTHETIC = [
    _record("a", 1e-3, 0, 0.79, 0.69), _record("a", 1e-3, 1, 0.80, 0.70),
    _record("a", 1e-3, 2, 0.81, 0.74),
    _record("a", 3e-3, 0, 0.74, 0.90), _record("a", 3e-3, 1, 0.75, 0.91),
    _record("a", 3e-3, 2, 0.76, 0.89),
    *[_record("full", 1e-4, s, 0.71, t, "full", None, None) for s, t in enumerate((0.6, 0.5, 0.4))],
    *[_record("full", 3e-4, s, 0.70, 0.95, "full", None, None) for s in range(3)],
]


@pytest.fixture
def results_file(tmp_path):
    with open(tmp_path / "results.jsonl", "w") as f:
        for r in SYNTHETIC:
            f.write(json.dumps(r) + "\n")
        f.write('{"run": "cut by a cra')  # a crash mid-line: skipped
    return str(tmp_path)


def test_aggregate_matches_hand_computed_values(results_file):
    records = sweep._read_records(results_file)
    assert len(records) == len(SYNTHETIC)
    rows = {r.run: r for r in stats.aggregate(records)}
    a, full = rows["a"], rows["full"]
    assert (a.lr, full.lr) == (1e-3, 1e-4)
    assert a.seeds == (0, 1, 2) and a.test["pearson"].kind == "min-max"
    # Test Pearson of lr 1e-3's seeds: 0.69, 0.70, 0.74 -> mean 0.71, range [0.69, 0.74].
    assert_close(a.test["pearson"].mean, 0.71)
    assert (a.test["pearson"].lo, a.test["pearson"].hi) == (0.69, 0.74)
    assert_close(a.test["mse"].mean, 0.29)
    assert_close(a.test["acc3"].mean, 0.355)
    assert_close(a.val["pearson"].mean, 0.80)
    assert_close(full.test["pearson"].mean, 0.5)
    assert (full.test["pearson"].lo, full.test["pearson"].hi) == (0.4, 0.6)
    assert_close(a.lr_scores[3e-3], 0.75)
    assert_close(full.lr_scores[3e-4], 0.70)
    table = stats.report(list(rows.values()))
    assert "| a | lora | q,v | 8 | 74,113 | 0.001 | 3 | 0.7100 [0.6900, 0.7400] |" in table
    assert "**0.001: 0.8000**" in table and "0.003: 0.7500" in table


def test_t_interval_for_five_seeds():
    values = [0.70, 0.72, 0.71, 0.75, 0.77]
    got = stats.interval(values)
    mean = 3.65 / 5
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t_{0.975, 4} from tables
    assert got.kind == "t95"
    assert_close(got.mean, mean)
    # scipy's t quantile is an iterative solve: within 1 eps here, given room across versions.
    assert_close(got.lo, mean - half, ulps=1e6)
    assert_close(got.hi, mean + half, ulps=1e6)


def test_interval_kinds_and_quantiles():
    assert stats.interval([0.5]) == stats.Interval(1, 0.5, 0.5, 0.5, "single")
    assert stats.interval([1.0, 3.0]) == stats.Interval(2, 2.0, 1.0, 3.0, "min-max")
    assert math.isnan(stats.interval([1.0, float("nan"), 2.0]).mean)
    for df, table in ((1, 12.706), (2, 4.303), (4, 2.776), (29, 2.045)):
        assert abs(stats.t_quantile(df) - table) <= 5e-4 * table
    with pytest.raises(ValueError):
        stats.interval([])


class _NoTest(dict):
    """A record whose test metrics raise when read."""

    def __getitem__(self, key):
        if key == "test":
            raise AssertionError("learning-rate selection read a test metric")
        return super().__getitem__(key)

    def get(self, key, default=None):
        return self[key] if key in self else default


def test_lr_selection_never_looks_at_test_metrics():
    # Test metrics would pick 3e-3 and 3e-4; validation picks 1e-3 and 1e-4.
    assert stats.select_lrs(SYNTHETIC) == {"a": 1e-3, "full": 1e-4}
    blind = [_NoTest(r) for r in SYNTHETIC]
    assert stats.select_lrs(blind) == {"a": 1e-3, "full": 1e-4}
    without = [{k: v for k, v in r.items() if k != "test"} for r in SYNTHETIC]
    assert stats.select_lrs(without) == {"a": 1e-3, "full": 1e-4}
    # Swapping the test metrics between learning rates changes nothing.
    swapped = [dict(r, test=SYNTHETIC[(i + 3) % 6]["test"]) if r["run"] == "a" else r
               for i, r in enumerate(SYNTHETIC)]
    assert stats.select_lrs(swapped) == stats.select_lrs(SYNTHETIC)
    assert [r["lr"] for r in stats.chosen_records(SYNTHETIC) if r["run"] == "a"] == [1e-3] * 3


def test_selection_on_mse_ties_and_divergence():
    records = [_record("b", 1e-3, 0, 0.6, 0.0), _record("b", 2e-3, 0, 0.6, 0.0),
               _record("b", 4e-3, 0, float("nan"), 0.0)]
    assert stats.select_lrs(records) == {"b": 1e-3}  # tie: the smaller; NaN: never
    records[1]["val"]["mse"] = 0.1  # lower is better for mse
    assert stats.select_lrs(records, "mse") == {"b": 2e-3}


def test_separated():
    a, b = stats.interval([0.70, 0.71, 0.72]), stats.interval([0.72, 0.73, 0.74])
    assert not stats.separated(a, b)  # touching ranges overlap
    assert stats.separated(a, stats.interval([0.7201, 0.74]))


def test_parse_lrs_and_presets():
    assert sweep.parse_lrs(["1e-3", "3e-3", "full=1e-4,3e-5"]) == {
        "*": (1e-3, 3e-3), "full": (3e-5, 1e-4)}
    for bad in (["nope=1e-3"], ["-1"], ["full="], ["x"]):
        with pytest.raises(ValueError):
            sweep.parse_lrs(bad)
    default = sweep.parse_args([])
    assert default.seeds == [0] and default.lrs == {"*": (1e-3,)} and len(default.cells) == 24
    paper = sweep.parse_args(["--preset", "paper"])
    assert len(paper.seeds) >= 3
    assert all(len(sweep.lrs_for(paper.lrs, m)) >= 3 for m in ("lora", "full", "head"))
    assert max(sweep.lrs_for(paper.lrs, "full")) < max(sweep.lrs_for(paper.lrs, "lora"))
    # Flags override the preset; METHOD= entries replace only that method's grid.
    custom = sweep.parse_args(["--preset", "paper", "--seeds", "4", "--lrs", "full=1e-5",
                               "--ranks", "2", "--targets", "q"])
    assert custom.seeds == [4] and custom.cells == [("q", 2)]
    assert custom.lrs["full"] == (1e-5,) and custom.lrs["*"] == paper.lrs["*"]
    with pytest.raises(SystemExit):
        sweep.parse_args(["--lrs", "bogus=1"])
