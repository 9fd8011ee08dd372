"""`python -m experiments.sweep --variants`: DoRA and PiSSA rows next to plain LoRA."""

import json
import os

import pytest

from experiments import sweep


def test_variants_run_as_extra_rows(tmp_path):
    out = str(tmp_path)
    argv = ["--quick", "--variants", "lora,dora,pissa", "--ranks", "2", "--targets", "q",
            "--baselines", "--steps", "3", "--out", out, "--no-progress"]
    assert sweep.main(argv) == 0
    with open(os.path.join(out, "results.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert [(r["run"], r["method"]) for r in records] == [
        ("lora-r2-q", "lora"), ("dora-r2-q", "dora"), ("pissa-r2-q", "pissa")]
    by_method = {r["method"]: r for r in records}
    # DoRA adds one magnitude per output unit of each adapted kernel (6 query kernels, d=384).
    assert by_method["dora"]["trainable_params"] == by_method["lora"]["trainable_params"] + 6 * 384
    assert by_method["pissa"]["trainable_params"] == by_method["lora"]["trainable_params"]
    with open(os.path.join(out, "results.md")) as f:
        table = f.read()
    assert "| dora-r2-q | dora |" in table and "| pissa-r2-q | pissa |" in table


@pytest.mark.parametrize("value", ["lora,qlora", "", "dora,dora"])
def test_bad_variants_are_usage_errors(value):
    with pytest.raises(SystemExit):
        sweep.parse_args(["--variants", value])
