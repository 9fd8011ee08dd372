"""The README's quickstart runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_quickstart_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    quickstart = blocks[0]
    assert "lorax.wrap" in quickstart and len(quickstart.splitlines()) <= 25
    namespace: dict = {}
    exec(compile(quickstart, str(README), "exec"), namespace)  # noqa: S102
    assert "layers_0/kernel" in capsys.readouterr().out
    lp, loss = namespace["lp"], float(namespace["loss"])
    assert loss >= 0.0 and lp["layers_0"]["kernel"].b.any()  # B moved off zero after one step
