"""What users look for in a repository: the license the metadata names, a changelog, contributing
notes, type information, and `make run` installing no test tools."""

from __future__ import annotations

import shutil
import subprocess
import tomllib

import pytest

from tests.conftest import ROOT


def test_license_is_the_one_pyproject_names():
    license_name = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert license_name == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a pointer to it


def test_changelog_contributing_and_types_exist():
    assert "## Unreleased" in (ROOT / "CHANGELOG.md").read_text()
    contributing = (ROOT / "CONTRIBUTING.md").read_text()
    for topic in ("## Add a model", "## Add a GPU", "## Add a KV method", "## Add a kernel", "## Run the GPU suite"):
        assert topic in contributing
    assert (ROOT / "kvsim" / "py.typed").is_file()


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_run_installs_no_test_extras():
    def commands(target: str) -> str:
        return subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout

    run, test = commands("run"), commands("test")
    assert "pip install -q -e .\n" in run and "[test]" not in run
    assert "pip install -q -e '.[test]'" in test
