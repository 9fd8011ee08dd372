"""The README's snippets run as written: the Quickstart alone, and the Quickstart followed by
the Checkpoints section (a resumed step), silently."""

import pathlib
import re
import subprocess
import sys
import textwrap

from helpers import assert_close, cpu_devices_env

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(section: str) -> list[str]:
    """The ```python blocks under the README heading ``## <section>``, in order."""
    text = README.read_text()
    parts = re.split(r"^## ", text, flags=re.M)
    body = next(p for p in parts if p.startswith(section + "\n"))
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_quickstart_runs(capsys):
    (quickstart,) = python_blocks("Quickstart")
    assert "lorax.wrap" in quickstart and len(quickstart.splitlines()) <= 25
    namespace: dict = {}
    exec(compile(quickstart, str(README), "exec"), namespace)  # noqa: S102
    assert "layers_0/kernel" in capsys.readouterr().out
    lp, loss = namespace["lp"], float(namespace["loss"])
    assert loss >= 0.0 and lp["layers_0"]["kernel"].b.any()  # B moved off zero after one step


def test_quickstart_then_checkpoints_run_in_order_without_warnings(tmp_path):
    blocks = python_blocks("Quickstart") + python_blocks("Checkpoints")
    assert len(blocks) == 2 and "CheckpointManager" in blocks[1]
    # After the README's code: the resumed step continued from the restored state.
    check = textwrap.dedent("""
        import numpy as np
        assert restored.step == 1 and restored.data == {"epoch": 0, "batch": 8}
        assert int(np.asarray(opt_state.inner_states["lorax_trainable"].inner_state[0].count)) == 2
        print("RESUMED", float(loss))
    """)
    script = "\n".join(blocks) + check
    run = subprocess.run([sys.executable, "-W", "error", "-c", script], cwd=tmp_path,
                         env=cpu_devices_env(1), capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "RESUMED" in run.stdout
    assert not re.search(r"warn", output, flags=re.I), output  # absl, Python or JAX warnings


def test_nnx_modules_section_runs(capsys):
    (block,) = python_blocks("NNX modules")
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    assert "fc/kernel" in capsys.readouterr().out
    losses = [float(v) for v in namespace["losses"]]
    assert losses[2] < losses[0]
    model, served, x = namespace["model"], namespace["served"], namespace["x"]
    assert type(served.fc).__name__ == "Linear" and model.fc.kernel_lora_b.get_value().any()
    assert_close(served(x), model(x))
