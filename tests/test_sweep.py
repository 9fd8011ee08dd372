"""End-to-end tests of `python -m experiments.sweep` and `python -m experiments.analysis`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import assert_close

from experiments import analysis, sweep

OUTPUTS = ("results.jsonl", "results.md", "metric_vs_rank.png", "metric_vs_params.png",
           "training_curves.png", "config.json")
REQUIRED_KEYS = {"run", "method", "rank", "targets", "trainable_params", "test", "step_time_s",
                 "wall_s", "seed", "lr", "steps", "val_curve"}


def _records(out):
    with open(os.path.join(out, "results.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("quick"))
    assert sweep.main(["--quick", "--out", out, "--no-progress"]) == 0
    return out


def test_quick_writes_every_output(quick_run):
    for name in OUTPUTS:
        path = os.path.join(quick_run, name)
        assert os.path.getsize(path) > 0, name
    records = _records(quick_run)
    assert [r["run"] for r in records] == ["head", "full", "lora-r4-q+v", "lora-r4-all-linear"]
    for r in records:
        assert REQUIRED_KEYS <= set(r)
        assert set(r["test"]) == {"pearson", "mse", "acc3"}
        assert all(np.isfinite(v) for v in r["test"].values())
        assert (r["seed"], r["lr"], r["steps"]) == (0, 1e-3, 20)
        assert os.path.isdir(os.path.join(quick_run, "adapters", r["run"], "seed0-lr0.001-steps20"))
        # Validation along the way (every 10 steps) ends with the end-of-run metrics.
        assert [p[0] for p in r["val_curve"]] == [10, 20]
        assert r["val_curve"][-1][1:] == [r["val"]["mse"], r["val"]["pearson"]]
    by_run = {r["run"]: r for r in records}
    # Independent parameter counts: MiniLM has 6 layers, d=384, FFN 1536; the head is 384 + 1.
    d, ffn, head = 384, 1536, 385
    assert by_run["lora-r4-q+v"]["trainable_params"] == 6 * 2 * 4 * (d + d) + head
    assert by_run["lora-r4-all-linear"]["trainable_params"] == (
        6 * (4 * 4 * (d + d) + 4 * (d + ffn) * 2) + head
    )
    assert by_run["head"]["trainable_params"] == head
    assert by_run["full"]["trainable_params"] > 22_000_000
    with open(os.path.join(quick_run, "results.md")) as f:
        table = f.read()
    assert all(r["run"] in table for r in records)


def test_adapters_hold_no_base_weights(quick_run):
    directory = os.path.join(quick_run, "adapters", "lora-r4-q+v", "seed0-lr0.001-steps20")
    size = sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(directory)
               for f in files)
    factor_bytes = (6 * 2 * 4 * (384 + 384) + 385) * 4
    assert size < 1.5 * factor_bytes + 64_000  # the 90 MB base is not in there


def test_resume_skips_finished_runs(quick_run, capsys):
    records = _records(quick_run)
    # Drop one finished run: the rerun must redo exactly that one and keep the others.
    with open(os.path.join(quick_run, "results.jsonl"), "w") as f:
        for r in records:
            if r["run"] != "head":
                f.write(json.dumps(r) + "\n")
    assert sweep.main(["--quick", "--out", quick_run, "--no-progress"]) == 0
    rerun = _records(quick_run)
    assert sorted(r["run"] for r in rerun) == sorted(r["run"] for r in records)
    kept = {r["run"]: r["wall_s"] for r in rerun if r["run"] != "head"}
    assert kept == {r["run"]: r["wall_s"] for r in records if r["run"] != "head"}
    assert "(3 already done)" in capsys.readouterr().err


def test_changed_settings_refuse_to_mix(quick_run, capsys):
    assert sweep.main(["--quick", "--out", quick_run, "--alpha", "8", "--no-progress"]) == 2
    assert "different settings (alpha)" in capsys.readouterr().err


def test_restored_run_reproduces_its_metrics(quick_run):
    from experiments import data, hf_bert, train

    tree = sweep.load_run(quick_run, "lora", 4, "q,v")  # lorax.restore, metadata checked
    model, _, tokenizer = hf_bert.load_pretrained(max_length=64)
    task = train.tokenize_task(tokenizer, data.split(data.load_vader(), seed=0), 64)
    regressor = train.SentimentRegressor(model.config)
    pred = train.predict(train._predict_fn(regressor), tree, task.val, task)
    saved = {r["run"]: r for r in _records(quick_run)}["lora-r4-q+v"]["val"]["pearson"]
    assert_close(data.pearson(pred, task.val.labels), saved, dtype=np.float32)


def test_new_seeds_and_lrs_resume_per_run(quick_run, capsys):
    # Adding a seed and a learning rate to a finished sweep trains only the new (seed, lr) runs.
    argv = ["--quick", "--targets", "q,v", "--baselines", "--seeds", "0", "1", "--lrs", "1e-3",
            "2e-3", "--steps", "20", "--out", quick_run, "--no-progress"]
    before = {(r["run"], r["seed"], r["lr"]): r["wall_s"] for r in _records(quick_run)}
    assert sweep.main(argv) == 0
    err = capsys.readouterr()
    assert "4 runs (1 already done)" in err.err
    after = {(r["run"], r["seed"], r["lr"]): r["wall_s"] for r in _records(quick_run)}
    assert {k: after[k] for k in before} == before
    assert {k for k in after if k[0] == "lora-r4-q+v"} == {
        ("lora-r4-q+v", s, lr) for s in (0, 1) for lr in (1e-3, 2e-3)}
    assert "| lora-r4-q+v | lora | q,v | 4 | 37,249 |" in err.out and "[min, max]" in err.out


def test_analysis_on_quick_run(quick_run):
    # The CLI compares two different ranks (equal ones would list every row twice); the quick
    # run has one, so the same run is compared with itself through the module's functions:
    # every kernel's subspace similarity is 1 on the diagonal.
    assert pytest.raises(SystemExit, analysis.main,
                         ["--out", quick_run, "--ranks", "4", "4"]).value.code == 2
    seeds = [s for s, _ in sweep.chosen_runs(quick_run, "lora", 4, "q,v")]
    lrs = dict(sweep.chosen_runs(quick_run, "lora", 4, "q,v"))
    per_seed = []
    for seed in seeds:
        run = analysis._kernels(sweep.load_run(quick_run, "lora", 4, "q,v", seed, lrs[seed]))
        per_seed.append(analysis.analyze(run, run))
    rows, grids = per_seed[0]
    assert len(rows) == 2 * 12  # q and v of 6 layers, both sides
    summary = analysis.summarize(per_seed, (4, 4))
    for s in summary:
        assert_close(s["phi_top"].mean, 1.0)  # float64 analysis of the same factors
        assert s["amplification_small"] == s["amplification_large"]
    assert len(grids) == 12
    for grid in grids.values():
        assert_close(np.diag(grid), 1.0)
    for row in rows:
        assert row["delta_norm"] > 0 and np.isfinite(row["amplification"])


def test_budgets_resume_per_config_seed_lr_budget(quick_run, capsys):
    # A second budget, and a second seed for full: only the missing (config, seed, lr, budget)
    # runs train; each budget is its own run, with its own lr pick and a budget table.
    argv = ["--quick", "--targets", "q,v", "--baselines", "full", "--seeds", "0", "1",
            "--steps", "10", "20", "--out", quick_run, "--no-progress"]
    before = {(r["run"], r["seed"], r["lr"], r["steps"]): r["wall_s"] for r in _records(quick_run)}
    assert sweep.main(argv) == 0
    err = capsys.readouterr()
    planned = {(run, s, 1e-3, n) for run in ("full", "lora-r4-q+v") for s in (0, 1)
               for n in (10, 20)}
    done_before = planned & set(before)
    assert f"8 runs ({len(done_before)} already done)" in err.err
    after = {(r["run"], r["seed"], r["lr"], r["steps"]): r["wall_s"] for r in _records(quick_run)}
    assert {k: after[k] for k in before} == before
    assert planned <= set(after)
    for r in _records(quick_run):
        assert len(r["curve"]) == r["steps"]
    assert "## Test pearson per training budget" in err.out
    assert "| full | " in err.out and "[min, max]" in err.out and "## Paired gap" in err.out
    assert os.path.getsize(os.path.join(quick_run, "metric_vs_budget.png")) > 0
    # Dropping one finished (config, seed, lr, budget) run redoes exactly that one.
    records = _records(quick_run)
    with open(os.path.join(quick_run, "results.jsonl"), "w") as f:
        for r in records:
            if (r["run"], r["seed"], r["steps"]) != ("full", 1, 10):
                f.write(json.dumps(r) + "\n")
    assert sweep.main(argv) == 0
    assert "8 runs (7 already done)" in capsys.readouterr().err
    rerun = {(r["run"], r["seed"], r["lr"], r["steps"]): r["wall_s"] for r in _records(quick_run)}
    assert set(rerun) == set(after)
    assert {k: v for k, v in rerun.items() if k != ("full", 1, 1e-3, 10)} == {
        k: v for k, v in after.items() if k != ("full", 1, 1e-3, 10)}


def test_analysis_missing_run_exits_2(tmp_path, capsys):
    assert analysis.main(["--out", str(tmp_path)]) == 2
    assert "run experiments.sweep first" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--targets", "q,x"], "unknown target set 'q,x'"),
        (["--data", "/nonexistent/file.csv"], "/nonexistent/file.csv"),
    ],
)
def test_bad_input_exits_2(tmp_path, capsys, argv, message):
    assert sweep.main([*argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_wrong_column_exits_2(tmp_path, capsys):
    table = tmp_path / "data.csv"
    table.write_text("sentence,score\ngood,1\nbad,-1\n")
    argv = ["--data", str(table), "--text-col", "text", "--label-col", "score"]
    assert sweep.main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "text" in err and "sentence" in err  # names the missing and the available columns


def test_bad_input_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.sweep", "--targets", "nope", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 2
    assert "unknown target set" in proc.stderr and "Traceback" not in proc.stderr


def test_negative_rank_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        sweep.parse_args(["--ranks", "0"])
    assert exc.value.code == 2


def test_analysis_refuses_equal_ranks(tmp_path, capsys):
    # The same run twice would print every row twice.
    with pytest.raises(SystemExit) as exit_:
        analysis.main(["--out", str(tmp_path), "--ranks", "4", "4"])
    assert exit_.value.code == 2
    assert "two different ranks" in capsys.readouterr().err
