"""Shared test helpers: where ../shared/data is (tests that need it skip cleanly without it)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KVSIM_SHARED_DATA", ROOT.parent / "shared" / "data"))


FITTED = ("calibration_reference.yaml", "report.md", "validation.csv", "predicted_vs_measured.png")


@pytest.fixture(scope="session")
def calibrated_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed H100 runs (single GPU, TP=2 and a second machine) in a scratch results root,
    their profile fitted and the single GPU validated once per test run (fitting takes seconds)."""
    import shutil

    from kvsim.calibrate import calibrate
    from kvsim.validate import validate

    root = tmp_path_factory.mktemp("results")
    for name in ("h100-sxm", "h100-sxm-x2", "h100-sxm-m2"):
        shutil.copytree(ROOT / "validation" / "results" / name, root / name)
    for fitted in FITTED:
        (root / "h100-sxm" / fitted).unlink(missing_ok=True)
    calibrate("h100-sxm", root)
    validate("h100-sxm", None, root)
    return root


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module, registered under ``name`` (dataclasses resolve a module by name)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/data is read in place)")
    return path


# Property tests (hypothesis). CI runs the "ci" profile: derandomized (the same examples on every
# run, so CI never fails by chance) with each test's modest example count. The long search runs the
# "long" profile, random and seeded, with KVSIM_EXAMPLES examples per property:
#   KVSIM_HYPOTHESIS_PROFILE=long KVSIM_EXAMPLES=2000 .venv/bin/pytest -p no:cacheprovider \
#       --hypothesis-seed=1 -k "random or property or hypothesis" tests/
settings.register_profile("ci", derandomize=True, deadline=None, database=None, print_blob=True)
settings.register_profile("long", derandomize=False, deadline=None, database=None, print_blob=True)
settings.load_profile(os.environ.get("KVSIM_HYPOTHESIS_PROFILE", "ci"))


def examples(n: int) -> int:
    """A property test's example count: ``n`` in CI, ``KVSIM_EXAMPLES`` in a long search."""
    return int(os.environ.get("KVSIM_EXAMPLES", n))
