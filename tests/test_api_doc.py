"""docs/api.md is executed: every ``python`` block, in order, in one namespace."""

from __future__ import annotations

import re

import kvsim
from tests.conftest import ROOT


def test_api_page_runs():
    text = (ROOT / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)  # noqa: S102 - our own documentation


def test_public_names_are_exported_and_documented():
    for name in kvsim.__all__:
        obj = getattr(kvsim, name)
        assert name == "__version__" or obj.__doc__, name
    page = (ROOT / "docs" / "api.md").read_text()
    assert all(f"kvsim.{name}" in page for name in kvsim.__all__ if name != "__version__")
