"""The benchmark's FLOP ratios as deterministic regressions, and ``--quick`` end to end.

FLOPs come from XLA's cost analysis of compiled programs, so they depend on shapes only: the
thresholds below are exact regressions, not timing. No test asserts anything about wall time.
"""

from __future__ import annotations

import doctest
import json
import math

import jax
import jax.numpy as jnp
import pytest
from helpers import assert_close

import lorax
from experiments import gpt
from experiments.bench import (
    cli,
    cost,
    decode,
    footprint,
    ranks,
    report,
    scale,
    steps,
    timing,
    tracetime,
    workloads,
)

# d = 512 as in the benchmark (the low-rank share of a kernel is about 1.5 r (1/d_in + 1/d_out)
# of the frozen floor, so d must be large against r = 8), with fewer layers and tokens.
CONFIG = gpt.GPTConfig(n_layers=2, max_len=64)
BATCH = 4
RANK = 8

REQUIRED = (
    "model",
    "rank",
    "lora_over_full_flops",
    "lora_over_frozen_flops",
    "merged_over_base_flops",
    "lora_over_full_wall",
    "factor_bytes",
    "optstate_bytes_lora",
    "optstate_bytes_full",
    "ckpt_bytes",
)


@pytest.fixture(scope="module")
def workload() -> workloads.Workload:
    return workloads.gpt_workload(CONFIG, batch_size=BATCH, abstract_params=True)


@pytest.fixture(scope="module")
def costs(workload) -> dict[str, cost.Cost]:
    return cost.measure_flops(workload, RANK)


@pytest.fixture(scope="module")
def ratios(costs) -> dict[str, float]:
    return cost.flop_ratios(costs)


def test_lora_step_costs_at_most_70_percent_of_full_fine_tuning(ratios):
    # Forward + input gradient, no weight gradient: the floor is about 2/3.
    assert 0.55 < ratios["lora_over_full_flops"] <= 0.70


def test_lora_step_costs_at_most_3_percent_over_the_frozen_floor(ratios):
    assert 0.9 < ratios["lora_over_frozen_flops"] <= 1.03


def test_merged_forward_costs_exactly_the_base_forward(costs, ratios):
    assert ratios["merged_over_base_flops"] == 1.0
    assert costs["merged_forward"].bytes_accessed == costs["base_forward"].bytes_accessed


def test_unmerged_factorized_forward_costs_a_little_more(ratios):
    assert 1.0 < ratios["lora_forward_over_base_flops"] <= 1.05


def test_flop_counts_agree_with_an_independent_count(workload, costs):
    # Independent of the bench's ratio logic: a forward pass is 2 FLOPs per weight per token
    # (plus attention scores and elementwise work), and a full training step is forward +
    # input gradient + weight gradient, at least three forwards.
    tokens = BATCH * CONFIG.max_len
    analytic = 2 * tokens * CONFIG.matmul_params()
    plain = jax.jit(workload.forward).lower(workload.params, workload.batch).compile(
        compiler_options=cost.FAST_COMPILE)
    forward = plain.cost_analysis()["flops"]
    assert analytic <= forward <= 1.1 * analytic
    assert costs["base_forward"].flops == forward
    assert costs["full"].flops >= 3 * forward
    assert costs["frozen"].flops >= 2 * forward


def test_optimizer_state_holds_nothing_for_frozen_kernels(workload):
    fns = steps.make_steps(workload)
    lp = lorax.wrap(cost.abstract(workload.params), RANK)
    lora = footprint.optstate_bytes(fns.tx_lora, lorax.split(lp)[0])
    full = footprint.optstate_bytes(fns.tx_full, workload.params)
    # Adam: mu and nu per trainable float, plus a 4-byte step count.
    assert lora == 2 * footprint.factor_bytes(lp) + 4
    assert full == 2 * footprint.tree_bytes(workload.params) + 4


def test_scale_planning_counts_llama2_7b_exactly():
    plan = scale.plan_scale("llama2-7b", "qkvo")
    per_layer = 4 * RANK * (4096 + 4096)
    assert plan["trainable_params"] == 32 * per_layer == 8_388_608
    assert plan["adapter_bytes"] == 4 * plan["trainable_params"]  # float32 factors (default)
    assert plan["optstate_bytes_lora"] == 2 * plan["adapter_bytes"] + 4
    assert plan["live_arrays_delta"] == 0
    assert plan["total_params"] == 6_738_415_616 + per_layer * 32  # Llama-2-7B + adapters


def test_minilm_split_matches_the_plain_encoder():
    from experiments import bert

    workload = workloads.make_workload("minilm", quick=True)
    ids, mask, _ = workload.batch

    @jax.jit
    def plain(params):
        hidden = bert.BertModel(workload.config).apply({"params": params["bert"]}, ids, mask)
        pooled = bert.mean_pool(hidden, mask)
        return (pooled @ params["head"]["kernel"] + params["head"]["bias"][None])[:, 0]

    split = jax.jit(workload.forward)(workload.params, workload.batch)
    assert_close(split, plain(workload.params))
    assert workload.wrap_kwargs == {"train": "^head/"}


def test_quick_run_writes_both_files_with_finite_positive_numbers(tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli.main(["--quick", "--models", "gpt,minilm", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    results = json.loads((out / "bench.json").read_text())
    planned = json.loads((out / "bench_scale.json").read_text())
    markdown = (out / "bench.md").read_text()
    assert printed["results"] == results
    assert isinstance(results, list)
    assert [(r["model"], r["rank"]) for r in results] == [("gpt", 8), ("minilm", 8)]
    assert results[0]["flops_lora"] == planned["rank_scaling"][1]["flops_lora"]  # r = 8 reused
    for row in results:
        for key in REQUIRED[2:]:
            value = row[key]
            assert isinstance(value, int | float) and math.isfinite(value) and value > 0, key
        assert row["merged_over_base_flops"] == 1.0
        assert row["ckpt_bytes"] < row["ckpt_bytes_full"]
        assert 0 < row["ckpt_bytes_lorax_save"] < row["ckpt_bytes_full"]
        assert row["optstate_bytes_lora"] < row["optstate_bytes_full"]
        assert row["machine"]["jax"] == jax.__version__
    assert [p["model"] for p in planned["scale_planning"]] == [
        "llama2-7b", "llama2-7b", "llama2-70b", "llama2-70b"
    ]
    assert [r["rank"] for r in planned["rank_scaling"]] == list(ranks.QUICK_SWEEP)
    assert planned["machine"]["device_kind"] == jax.devices()[0].device_kind
    trace = planned["trace"]
    assert trace["n_layers"] == workloads.QUICK_GPT.n_layers and trace["sweep"] == []
    for key in ("lora_over_full_trace", "trace_s_lora", "trace_s_full"):
        assert math.isfinite(trace[key]) and trace[key] > 0, key
    assert trace["lora_over_full_trace_min"] <= trace["lora_over_full_trace"]
    assert trace["lora_over_full_trace"] <= trace["lora_over_full_trace_max"]
    for heading in ("## Compute", "## Memory", "## Scale planning", "## Rank scaling",
                    "## Trace time", "## Step memory by frozen base"):
        assert heading in markdown
    memory = {(r["batch"], r["program"]): r for r in planned["memory"]}
    assert sorted({batch for batch, _ in memory}) == [1, workloads.QUICK_BATCH]
    for batch in (1, workloads.QUICK_BATCH):
        assert memory[batch, "lora_f32"]["peak_over_lora_f32"] == 1.0
        assert memory[batch, "lora_nf4"]["peak_bytes"] < memory[batch, "lora_f32"]["peak_bytes"]
    assert planned["machine"]["date"] in markdown


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory) -> dict:
    # The tiny random-init Llama of --quick (d = 64): the low-rank share of the LoRA step is about
    # 1.5 r (1/d_in + 1/d_out) of the floor, so r = 2 here stands for r = 8 at SmolLM2's d = 576.
    out = tmp_path_factory.mktemp("bench_smollm2")
    argv = ["--quick", "--models", "smollm2", "--ranks", "2", "--no-extras", "--out", str(out)]
    assert cli.main(argv) == 0
    return {"results": json.loads((out / "bench.json").read_text()),
            **json.loads((out / "bench_scale.json").read_text()),
            "markdown": (out / "bench.md").read_text()}


def test_smollm2_lora_step_costs_near_the_floor_and_below_full(smollm2_run):
    (row,) = smollm2_run["results"]
    assert (row["model"], row["rank"]) == ("smollm2", 2)
    assert 0.9 < row["lora_over_frozen_flops"] <= 1.10
    assert 0.55 < row["lora_over_full_flops"] < 0.8
    assert row["merged_over_base_flops"] == 1.0
    assert not any("handwritten" in key for key in row)  # GPT only: skipped, not failed
    for key in ("lora_over_frozen_bytes_accessed", "lora_over_full_wall",
                "lora_over_frozen_wall", "tokens_per_s_lora", "tokens_per_s_full",
                "peak_bytes_lora", "peak_bytes_frozen", "temp_bytes_lora"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["tokens"] == workloads.QUICK_BATCH * 32
    assert row["shapes"]["n_kv_heads"] < row["shapes"]["n_heads"]  # grouped-query attention


def test_smollm2_cost_analysis_counts_every_layer(smollm2_run):
    # ``unroll=True``: a scanned model's while-loop body would be counted once (about half of
    # this analytic lower bound with 2 layers).
    (row,) = smollm2_run["results"]
    c = workloads.quick_llama()
    per_layer = c.d_model * (2 * c.d_model + 2 * c.n_kv_heads * c.head_dim + 3 * c.d_ff)
    analytic = 2 * row["tokens"] * (c.n_layers * per_layer + c.vocab_size * c.d_model)
    assert analytic <= row["flops_base_forward"] <= 1.2 * analytic
    assert row["flops_full"] >= 3 * row["flops_base_forward"]


def test_smollm2_decode_runs_and_unmerged_matches_merged(smollm2_run):
    rows = smollm2_run["decode"]
    assert [d["rows"] for d in rows] == list(decode.QUICK["batches"])
    for d in rows:
        assert d["tokens_match"] == 1.0
        assert d["step_bytes_merged"] == d["step_bytes_base"] < d["step_bytes_unmerged"]
        assert d["step_flops_merged"] == d["step_flops_base"] < d["step_flops_unmerged"]
        for key in ("tokens_per_s_base", "tokens_per_s_merged", "tokens_per_s_unmerged",
                    "unmerged_over_merged_wall", "merged_over_base_wall"):
            assert math.isfinite(d[key]) and d[key] > 0, key
        assert d["unmerged_over_merged_wall_min"] <= d["unmerged_over_merged_wall"]
        assert d["unmerged_over_merged_wall"] <= d["unmerged_over_merged_wall_max"]
    assert "## Decode" in smollm2_run["markdown"]


def test_smollm2_split_matches_the_plain_model():
    from experiments import llama

    workload = workloads.make_workload("smollm2", quick=True)
    tokens, mask = workload.batch
    assert mask[:, :16].sum() == 0 and bool(mask[:, 16:].all())
    logits, _ = jax.jit(llama.Llama(workload.config).apply)({"params": workload.params}, tokens)
    assert_close(jax.jit(workload.loss)(workload.params, workload.batch),
                 llama.causal_lm_loss(logits, tokens, mask))
    assert_close(jax.jit(workload.forward)(workload.params, workload.batch), logits)


def test_decode_adapter_is_nonzero_and_factorized_matches_merged():
    from experiments import llama

    workload = workloads.make_workload("smollm2", quick=True)
    config, params = workload.config, workload.params
    lp = decode.random_adapter(params, 2)
    merged = lorax.merge(lp)
    ids, valid = decode.prompts(config, 2, 8)
    assert not valid[:, 0].all() and valid[:, -1].all()  # left-padded

    def logits(tree):
        return llama.Llama(config).apply({"params": tree}, ids)[0]

    unmerged_logits, merged_logits = jax.jit(lorax.lora(logits))(lp), jax.jit(logits)(merged)
    assert float(jnp.max(jnp.abs(unmerged_logits - merged_logits))) < 1e-4
    assert float(jnp.max(jnp.abs(merged_logits - jax.jit(logits)(params)))) > 1e-3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "gpt,llama"], "unknown model 'llama'"),
        (["--quick", "--models", "smollm2", "--ranks", "64"],
         "rank 64 is too large for 'smollm2'"),
        (["--ranks", "0"], "expected a positive rank, got 0"),
        (["--ranks", "8,x"], "expected a positive rank, got 'x'"),
        (["--quick", "--ranks", "4096"], "rank 4096 is too large for 'gpt'"),
    ],
)
def test_bad_arguments_exit_with_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_worker_subprocess_reports_peak_rss():
    peak = footprint.run_worker("lora", "gpt", RANK, quick=True, steps=1)
    assert 2**20 < peak < 2**40


def test_interleaved_wall_alternates_and_summarizes():
    order = []
    runners = {name: (lambda n=name: order.append(n) or jnp.zeros(())) for name in
               ("lora", "full", "frozen")}
    times = timing.interleaved_wall(runners, steps=3, warmup=1)
    assert order == ["lora", "full", "frozen"] * 4
    summary = timing.wall_summary(times)
    assert summary["wall_steps"] == 3
    assert summary["lora_over_full_wall_min"] <= summary["lora_over_full_wall"]
    assert summary["lora_over_full_wall"] <= summary["lora_over_full_wall_max"]


@pytest.mark.parametrize(
    "module", [workloads, steps, cost, timing, tracetime, footprint, scale, ranks, report, gpt],
    ids=lambda m: m.__name__,
)
def test_docstring_examples(module):
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_memory_help_prints_usage_and_runs_nothing(capsys, monkeypatch):
    from experiments import memory

    monkeypatch.setattr(memory, "memory_rows", lambda config: pytest.fail("ran the job"))
    with pytest.raises(SystemExit) as exit_:
        memory.main(["--help"])
    assert exit_.value.code == 0
    assert "--quick" in capsys.readouterr().out
