"""CPU side of calibration and validation, on committed GPU result files."""

from __future__ import annotations

import shutil

import pytest
import yaml

from conftest import ROOT
from kvsim.calibrate import calibrate
from kvsim.cli import main
from kvsim.cost.calibration import calibration_from_dict, find_calibration
from kvsim.errors import KvsimError
from kvsim.spec.hardware import load_hardware
from kvsim.validate import validate

SMOKE = ROOT / "validation" / "results" / "smoke-h100"


@pytest.fixture()
def results(tmp_path):
    """A results root holding the committed H100 smoke measurements as h100-sxm."""
    shutil.copytree(SMOKE, tmp_path / "h100-sxm")
    return tmp_path


def test_calibrate_fits_a_loadable_profile_from_kernels_only(results) -> None:
    out = calibrate("h100-sxm", results)
    data = yaml.safe_load(out.read_text())
    assert data["kind"] == "measured" and "engine" not in " ".join(data["fit"]["rows_used"])
    cal = calibration_from_dict(data, load_hardware("h100-sxm"), str(out))
    for curve in cal.ops.values():
        assert all(0 < v <= 1.5 for v in curve.compute + curve.memory)
    assert cal.ceilings.copy_bytes_per_s == pytest.approx(2.9537e12, rel=1e-3)


def test_validate_reports_errors_and_exact_kv_bytes(results) -> None:
    calibrate("h100-sxm", results)
    report, summary = validate("h100-sxm", results=results)
    text = report.read_text()
    assert "| decode |" in text and (results / "h100-sxm" / "predicted_vs_measured.png").is_file()
    kv = next(s for s in summary if s["kind"] == "kv_bytes" and s["model"] == "all")
    assert kv["max_abs_err"] == 0.0, "allocated KV bytes must be predicted exactly"
    decode = next(s for s in summary if s["kind"] == "decode" and s["model"] == "all")
    assert decode["n"] > 0 and decode["median_abs_err"] < 1.0


def test_validate_needs_a_profile(results) -> None:
    with pytest.raises(KvsimError, match="kvsim calibrate"):
        validate("h100-sxm", results=results)


def test_missing_measurements_are_a_clear_error(tmp_path) -> None:
    with pytest.raises(KvsimError, match="no measurements"):
        calibrate("h100-sxm", tmp_path)


def test_cli_calibrate_and_validate(results, capsys) -> None:
    main(["calibrate", "--gpu", "h100-sxm", "--results", str(results)])
    main(["validate", "--gpu", "h100-sxm", "--results", str(results), "--json"])
    out = capsys.readouterr().out
    assert "calibration_reference.yaml" in out and '"kind": "decode"' in out


def test_profile_lookup_by_gpu_name(results, monkeypatch) -> None:
    calibrate("h100-sxm", results)
    monkeypatch.setattr("kvsim.cost.calibration.results_dir", lambda: results)
    assert find_calibration(load_hardware("h100-sxm")).kind == "measured"
    borrowed = find_calibration(load_hardware("h200-sxm"))  # same family: borrows, scaled
    assert borrowed.kind == "borrowed" and "h100-sxm" in borrowed.note
    assert find_calibration(load_hardware("a100-sxm-80gb")).kind == "prior"
