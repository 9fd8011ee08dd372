"""The sweep's budget axis (experiments.budgets, `--steps A B`) on synthetic results files."""

from __future__ import annotations

import json
import os

import pytest
from helpers import assert_close

from experiments import budgets, stats, sweep

LORA = "lora-r8-q+v"


def _record(run, steps, lr, seed, val, test):
    lora = run != "full"
    return {"run": run, "method": "lora" if lora else "full", "rank": 8 if lora else None,
            "targets": "q,v" if lora else None, "trainable_params": 74_113 if lora else 22_565_761,
            "steps": steps, "lr": lr, "seed": seed, "train_size": 160,
            "val": {"pearson": val, "mse": 1.0 - val, "acc3": val / 2},
            "test": {"pearson": test, "mse": 1.0 - test, "acc3": test / 2},
            "wall_s": steps * (0.5 if lora else 1.0), "step_time_s": 0.5 if lora else 1.0,
            "curve": [[i, 1.0 / i] for i in range(1, steps + 1)],
            "val_curve": [[i, 1.0 - val, val * i / steps] for i in range(5, steps + 1, 5)],
            "config": {"batch_size": 32, "alpha": 16.0}}


def _cells(run, steps, lr, val, tests):
    return [_record(run, steps, lr, s, val, t) for s, t in enumerate(tests)]


# Validation picks per budget; test metrics would pick the other lr every time, and pooling the
# two budgets would pick full's 3e-4 at 10 steps too (mean val 0.72 over both budgets).
# 10 steps: full 1e-4 (val 0.70 > 0.69), LoRA 3e-3 (0.55 > 0.50).
# 40 steps: full 3e-4 (0.75 > 0.70), LoRA 1e-3 (0.74 > 0.60).
SYNTHETIC = [
    *_cells("full", 10, 1e-4, 0.70, (0.60, 0.62, 0.64)),
    *_cells("full", 10, 3e-4, 0.69, (0.9,) * 3),
    *_cells(LORA, 10, 1e-3, 0.50, (0.8,) * 3), *_cells(LORA, 10, 3e-3, 0.55, (0.50, 0.53, 0.56)),
    *_cells("full", 40, 1e-4, 0.70, (0.9,) * 3),
    *_cells("full", 40, 3e-4, 0.75, (0.70, 0.71, 0.75)),
    *_cells(LORA, 40, 1e-3, 0.74, (0.66, 0.70, 0.71)), *_cells(LORA, 40, 3e-3, 0.60, (0.99,) * 3),
]
PICKED = {(10, "full"): 1e-4, (10, LORA): 3e-3, (40, "full"): 3e-4, (40, LORA): 1e-3}


class _NoTest(dict):
    """A record whose test metrics raise when read."""

    def __getitem__(self, key):
        if key == "test":
            raise AssertionError("learning-rate selection read a test metric")
        return super().__getitem__(key)


def test_selection_per_budget_never_sees_test_metrics():
    assert budgets.select_lrs(SYNTHETIC) == PICKED
    assert budgets.select_lrs([_NoTest(r) for r in SYNTHETIC]) == PICKED
    assert budgets.select_lrs([{k: v for k, v in r.items() if k != "test"}
                               for r in SYNTHETIC]) == PICKED
    # Any test metrics, e.g. each record's replaced by another's, leave the picks alone.
    shuffled = [dict(r, test=SYNTHETIC[(i + 7) % len(SYNTHETIC)]["test"])
                for i, r in enumerate(SYNTHETIC)]
    assert budgets.select_lrs(shuffled) == PICKED
    # Pooled over budgets, full would get 3e-4 at both: the budget is part of the key.
    assert stats.select_lrs(SYNTHETIC)["full"] == 3e-4
    rows = budgets.aggregate(SYNTHETIC)
    assert {(s, r.run): r.lr for s, rs in rows.items() for r in rs} == PICKED


def test_budget_report_numbers_come_from_the_rows():
    text = budgets.report(SYNTHETIC)
    # Budget table: mean [min, max] of the picked lr's seeds; 10 steps x 32 / 160 = 2 epochs.
    assert "| run | 10 steps (2 ep) | 40 steps (8 ep) |" in text
    assert ("| full | 0.6200 [0.6000, 0.6400] (lr 0.0001, 3 seeds) | "
            "0.7200 [0.7000, 0.7500] (lr 0.0003, 3 seeds) |") in text
    assert (f"| {LORA} | 0.5300 [0.5000, 0.5600] (lr 0.003, 3 seeds) | "
            "0.6900 [0.6600, 0.7100] (lr 0.001, 3 seeds) |") in text
    # Paired gaps, full minus LoRA, seed by seed: 10 steps 0.10, 0.09, 0.08; 40 steps 0.04,
    # 0.01, 0.04.
    assert (f"| 10 | {LORA} | +0.0900 [0.0800, 0.1000] | s0: +0.1000; s1: +0.0900; "
            "s2: +0.0800 |") in text
    assert (f"| 40 | {LORA} | +0.0300 [0.0100, 0.0400] | s0: +0.0400; s1: +0.0100; "
            "s2: +0.0400 |") in text
    gaps = budgets.paired_gaps(SYNTHETIC)
    assert list(gaps) == [10, 40] and list(gaps[40]) == [LORA]  # adapters only, not full
    for seed, (ref, lora) in enumerate([(0.70, 0.66), (0.71, 0.70), (0.75, 0.71)]):
        assert_close(gaps[40][LORA][seed], ref - lora)
    # Wall time: 10 steps: 6 full runs x 10 s + 6 LoRA runs x 5 s = 90 s = 1.5 min.
    assert "| 10 | 12 | 1.5 | full 10; lora-r8-q+v 5 | full 1000; lora-r8-q+v 500 |" in text
    assert "| 40 | 12 | 6.0 |" in text


def test_gap_pairs_only_seeds_both_sides_finished():
    records = [r for r in SYNTHETIC if not (r["run"] == "full" and r["seed"] == 2)]
    gaps = budgets.paired_gaps(records)
    assert sorted(gaps[10][LORA]) == [0, 1]
    assert budgets.paired_gaps([r for r in SYNTHETIC if r["run"] == LORA]) == {}


def test_write_report_with_budgets(tmp_path):
    out = str(tmp_path)
    text = sweep.write_report(SYNTHETIC, out)
    with open(os.path.join(out, "results.md")) as f:
        assert f.read() == text
    assert "## Paired gap" in text and "## 10 steps" in text and "## 40 steps" in text
    for name in ("metric_vs_budget.png", "val_curves.png", "metric_vs_rank.png",
                 "metric_vs_params.png", "training_curves.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    one = [r for r in SYNTHETIC if r["steps"] == 40]
    single = sweep.write_report(one, out)
    assert single == stats.report(stats.aggregate(one))  # one budget: the tables as before


def test_records_before_budgets_read_their_steps_from_config(tmp_path):
    # A results directory written before --steps took several budgets: no "steps" in records
    # or in the saved settings beyond config.json's one value.
    legacy = {k: v for k, v in SYNTHETIC[0].items() if k != "steps"}
    legacy["config"] = {**legacy["config"], "steps": 100}
    assert budgets.steps_of(legacy) == 100
    args = sweep.parse_args(["--out", str(tmp_path)])
    config = sweep._config(args)
    with open(tmp_path / "config.json", "w") as f:
        json.dump({**config, "steps": 100}, f)
    with open(tmp_path / "results.jsonl", "w") as f:
        f.write(json.dumps(legacy) + "\n")
    done = sweep._finished(str(tmp_path), config)
    assert list(done) == [sweep.run_key("full", 0, 1e-4, 100)]


def test_steps_flag_and_budget_preset():
    assert sweep.parse_args(["--steps", "20", "10", "20"]).budgets == [10, 20]
    assert sweep.parse_args([]).budgets == [100]  # the default command: one budget of 100
    with pytest.raises(SystemExit):
        sweep.parse_args(["--steps", "10", "0"])
    preset = sweep.parse_args(["--preset", "budget"])
    assert preset.seeds == [0, 1, 2] and min(preset.budgets) == 100
    assert max(preset.budgets) * 32 >= 4 * 6006  # at least 4 epochs of the training split
    assert preset.cells == [("q,v", 8), ("all-linear", 1)]
    assert preset.baselines == ["head", "full"]
    # Each grid holds the paper preset's pick (README) and a neighbour on both sides.
    for method, pick in (("lora", 3e-3), ("full", 3e-4), ("head", 1e-2)):
        grid = sweep.lrs_for(preset.lrs, method)
        assert min(grid) < pick < max(grid) and pick in grid

