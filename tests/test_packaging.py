"""An installed kvsim is the same kvsim: the wheel carries the model catalogue and the fitted
calibration profiles, and gives the checkout's numbers from outside the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT


def test_every_fitted_profile_ships_in_the_wheel():
    """A profile `kvsim calibrate` wrote but pyproject.toml does not force-include would make an
    installed kvsim fall back to a borrowed or prior profile: different numbers, silently."""
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"][
        "wheel"]["force-include"]
    fitted = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "validation" / "results").glob("*/calibration_*.yaml"))
    assert fitted, "no fitted profile in validation/results"
    for path in fitted:
        gpu, name = Path(path).parts[-2:]
        assert include.get(path) == f"kvsim/_catalog/calibration/{gpu}/{name}", path


def _build_wheel(out: Path) -> Path:
    """The wheel, built without network when hatchling is importable, else through pip's index."""
    try:
        import hatchling  # noqa: F401
        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(out),
                           str(ROOT)], capture_output=True, text=True, timeout=120)
    wheels = sorted(out.glob("kvsim-*.whl"))
    if done.returncode != 0 or not wheels:
        pytest.skip(f"cannot build the wheel (build backend unavailable?): {done.stderr.strip()[-300:]}")
    return wheels[0]


def test_installed_wheel_gives_the_checkouts_numbers(tmp_path):
    wheel = _build_wheel(tmp_path / "dist")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    # The dependencies come from this interpreter's environment (no download); a .pth file adds its
    # site-packages after the new venv's own, so the wheel's kvsim is the one imported.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KVSIM_SHARED_DATA")}
    scenario = ROOT / "examples" / "fixture-sessions.yaml"
    installed = subprocess.run([str(venv / "bin" / "kvsim"), "run", str(scenario), "--json"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, installed.stderr
    where = subprocess.check_output([str(py), "-c", "import kvsim; print(kvsim.__file__)"], cwd=tmp_path, env=env,
                                    text=True)
    assert where.startswith(str(site)), where

    from kvsim.scenario import load_scenario, run_scenario

    checkout = run_scenario(load_scenario(scenario, [])).summary
    got = json.loads(installed.stdout)
    assert got["scenario"]["calibration"]["kind"] == checkout["scenario"]["calibration"]["kind"] == "measured"
    assert got == json.loads(json.dumps(checkout))

    assert (site / "kvsim" / "py.typed").is_file()

    # Kernel measurements are not shipped: the commands that need them say so in one line.
    for argv in (["calibrate", "--gpu", "h100-sxm"], ["validate", "--gpu", "h100-sxm"],
                 ["plot", "validation", "--gpu", "h100-sxm", "--out", "v.png"]):
        out = subprocess.run([str(venv / "bin" / "kvsim"), *argv], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 2 and "needs a checkout's validation/results" in out.stderr, argv
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_every_data_file_the_code_names_is_in_the_package():
    """Code names its data files as the repository paths reports cite (kvsim/data/...); each must be
    a file of the package, read the one way kvsim.fileio.data_file reads it."""
    import re

    from kvsim.fileio import data_file, load_data_file

    named = set()
    for source in (ROOT / "kvsim").rglob("*.py"):
        named.update(re.findall(r'"(kvsim/data/[\w./-]+\.yaml)"', source.read_text()))
    assert {"kvsim/data/vllm_memory.yaml", "kvsim/data/vllm_releases.yaml", "kvsim/data/calibration_prior.yaml",
            "kvsim/data/vllm_host_step.yaml"} <= named
    for path in sorted(named):
        assert data_file(path).is_file(), path
        assert isinstance(load_data_file(path), dict), path
    with pytest.raises(ValueError, match="not one of kvsim's data files"):
        data_file("validation/results/h100-sxm/gemm.csv")
