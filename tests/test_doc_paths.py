"""Every ``lorax.…`` path the docs cite resolves to the object it names.

A public function named like its module once hid that module (``lorax.wrap`` the function
hid ``lorax.wrap`` the module), so docstrings cited paths no user could reach. The test reads
every Sphinx role (``:func:`lorax.x.y```, ``:class:``, ``:mod:``, ``:meth:``) in the library's
docstrings and every ``lorax.x.y`` in README.md and walks the attributes from ``import lorax``.
"""

from __future__ import annotations

import pathlib
import re

import pytest

import lorax

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROLE = re.compile(r":(?:func|class|mod|meth|attr|data):`~?(lorax(?:\.\w+)+)`")
README = re.compile(r"\b(lorax(?:\.\w+)+)")


def _cited() -> dict[str, str]:
    cited = {}
    for path in sorted((ROOT / "lorax").rglob("*.py")):
        for name in ROLE.findall(path.read_text()):
            cited.setdefault(name, str(path.relative_to(ROOT)))
    readme = (ROOT / "README.md").read_text()
    for block in re.findall(r"`([^`]+)`", readme) + re.findall(r"```python\n(.*?)```", readme,
                                                                 re.S):
        for name in README.findall(block):
            cited.setdefault(name, "README.md")
    return cited


CITED = _cited()


def test_the_docs_cite_paths():
    # The scan itself must find the paths the README's API table names.
    assert {"lorax.wrap", "lorax.peft.save", "lorax.layouts.default_layout"} <= set(CITED)


@pytest.mark.parametrize("name", sorted(CITED))
def test_cited_path_resolves(name):
    obj = lorax
    for part in name.split(".")[1:]:
        assert hasattr(obj, part), f"{name!r} (cited in {CITED[name]}) does not resolve at {part!r}"
        obj = getattr(obj, part)
