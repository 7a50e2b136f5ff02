"""Honest judging (issue 15 item 4): distinct configurations, per-method judged points with
same-call baselines, leave-one-model-out refits, and the H200 commands (item 5) on fixtures."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from conftest import FITTED, ROOT

from kvsim import measured
from kvsim.cli import main
from kvsim.cost.calibration import find_calibration
from kvsim.lomo import leave_one_model_out, leave_out, model_shapes
from kvsim.method_coverage import method_coverage
from kvsim.spec.hardware import load_hardware
from kvsim.spec.model import load_model
from kvsim.validate import Point, distinct, summary, validate

MEASURED = ROOT / "validation" / "results" / "h100-sxm"


def test_paged_and_contiguous_of_one_configuration_count_once() -> None:
    points = [Point("decode", "m", "paged", 1.0, 2.0, (32, 1, 4, 512)),
              Point("decode", "m", "contiguous", 3.0, 2.0, (32, 1, 4, 512)),
              Point("decode", "m", "contiguous", 1.0, 1.1, (32, 1, 8, 512))]
    configs = distinct(points)
    assert [(c.points, c.measured, c.spread, c.error) for c in configs] == [(2, 2.0, 2.0, 0.0),
                                                                            (1, 1.0, 0.0, pytest.approx(0.1))]
    row = next(s for s in summary(points) if s["model"] == "all")
    assert (row["points"], row["configs"], row["averaged"], row["max_spread"]) == (3, 2, 1, 2.0)
    assert row["median_abs_err"] == pytest.approx(0.05) and row["max_abs_err"] == pytest.approx(0.1)


def test_model_shapes_are_the_kernel_rows_measured_for_it() -> None:
    llama = model_shapes(load_model("llama-3-8b"))
    assert {(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)} <= llama.gemm_nk
    assert llama.attention == (32, 8, 128) and not llama.grouped_nk
    assert model_shapes(load_model("deepseek-v2-lite")).attention == (16, 1, 576)  # latent 512 + RoPE 64
    moe = model_shapes(load_model("mixtral-8x7b"))
    assert moe.grouped_nk == {(28672, 4096), (4096, 14336)} and (28672, 4096) not in moe.gemm_nk
    keep = leave_out(MEASURED, load_model("mistral-7b"))  # llama-3-8b's layers and element-wise ops exactly
    assert keep.same_elementwise == {"llama-3-8b"}
    assert not keep("gemm.csv", {"n": "4096", "k": "14336"}) and not keep("gemm.csv", {"n": "6144", "k": "4096"})
    assert keep("gemm.csv", {"n": "128256", "k": "4096"})  # llama-3's LM head: mistral's vocabulary is 32000
    assert not keep("attention_prefill.csv", {"q_heads": "32", "kv_heads": "8", "head_dim": "128"})
    assert keep("attention_decode.csv", {"q_heads": "32", "kv_heads": "32", "head_dim": "128"})
    assert not keep("elementwise.csv", {"params": "q_heads=32;k_heads=8;rot=128;model=llama-3-8b"})
    assert keep("elementwise.csv", {"params": "model=gemma-2b"}) and keep("engine_decode.csv", {})


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed H100 kernels with the engine rows of two models only: gemma-2b (its GEMMs were
    measured) and phi-3-mini (none of its kernel shapes was)."""
    root = tmp_path_factory.mktemp("lomo")
    folder = root / "h100-sxm"
    shutil.copytree(MEASURED, folder)
    for fitted in FITTED:
        (folder / fitted).unlink(missing_ok=True)
    for name in ("engine_decode.csv", "engine_prefill.csv"):
        with (MEASURED / name).open(encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if r["model"] in ("gemma-2b", "phi-3-mini")]
            fields = reader.fieldnames
        with (folder / name).open("w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fields or [])
            w.writeheader()
            w.writerows(rows)
    return root


def test_leave_one_model_out_refits_without_the_model_and_is_deterministic(two_models) -> None:
    report, tables = leave_one_model_out("h100-sxm", two_models)
    text = report.read_text()
    again = leave_one_model_out("h100-sxm", two_models)[1]
    assert again == tables and report.read_text() == text

    def decode(which: str, model: str) -> dict:
        return next(s for s in tables[which] if s["kind"] == "decode" and s["model"] == model)

    # gemma-2b loses its 564 GEMM rows (bf16 and torch fp8: 150; Marlin and tinygemm W4A16: 39 each; vLLM's
    # CUTLASS FP8, per-tensor and per-token, and Machete, run h100-call26, and its CUTLASS blockwise FP8, run
    # h100-call30: 84 each), 72 decode-attention rows
    # (kvsim's Triton kernel and vLLM's FA3 with a bf16 and an FP8 cache, runs h100-call28 and 29: 24 each), 18
    # prefill-attention rows of its head shape (8 query heads, 1 KV head, 256 wide: FA3 and SDPA, run
    # h100-call27) and 20 element-wise rows (no routed experts: nothing of the grouped or fused-MoE files);
    # phi-3-mini loses only its 20 element-wise rows, so its decode figures barely move
    assert "| gemma-2b |" in text and "| 564, 0, 0, 72, 18, 20 | - |" in text and "| 0, 0, 0, 0, 0, 20 | - |" in text
    # without its own rows gemma-2b's error grows by a third (1.1% -> 1.5%): it doubled until run h100-call32
    # measured GEMMs of 0.7-6 MiB, near gemma-2b's smallest linear (its 10 MiB qkv), stay in the refit
    assert decode("lomo", "gemma-2b")["median_abs_err"] > 1.25 * decode("headline", "gemma-2b")["median_abs_err"]
    assert decode("lomo", "phi-3-mini")["median_abs_err"] == pytest.approx(
        decode("headline", "phi-3-mini")["median_abs_err"], abs=0.01)
    assert decode("lomo", "all")["configs"] == decode("headline", "all")["configs"] == 39 + 31
    assert decode("lomo", "all")["points"] == 78 + 62


def test_cli_leave_one_model_out_and_its_bad_flags(two_models, capsys) -> None:
    main(["validate", "--gpu", "h100-sxm", "--results", str(two_models), "--leave-one-model-out"])
    assert "report_lomo.md" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["validate", "--gpu", "h100-sxm", "--results", str(two_models), "--leave-one-model-out",
              "--calibration-from", "h100-sxm"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == ("kvsim: error: --calibration-from='h100-sxm': --leave-one-model-out "
                                               "refits on the GPU's own kernel rows; drop --calibration-from")


def _decode_csv(path: Path, rows: list[tuple]) -> None:
    """attention_decode.csv rows: (method, spec, batch, context, phase, run)."""
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "batch", "q_heads", "kv_heads", "head_dim", "context", "time_s", "kvsim_spec", "phase",
                    "layers", "run"])
        for method, spec, b, c, phase, run in rows:
            w.writerow([method, b, 32, 8, 128, c, 1e-4, spec, phase, 1, run])


def test_every_method_gets_a_line_and_baselines_come_from_the_same_call(tmp_path) -> None:
    shapes = [(1, 1024), (1, 4096), (4, 1024), (4, 4096)]  # held out: (1, 4096) and (4, 4096)
    rows = [("triton_bf16", "bf16", b, c, "decode", "a") for b, c in shapes]
    rows += [("triton_kivi", "kivi:bits=2", b, c, "decode", "a") for b, c in shapes]
    rows += [("triton_intkv", "intkv:bits=8", b, c, "decode", "b") for b, c in shapes]  # another call
    rows += [("triton_h2o_step", "h2o:budget=512", 8, c, "decode", "a") for c in (1024, 4096)]  # no bf16 at b=8
    rows += [("lightkv_merge", "lightkv:keep=0.5", 1, 4096, "prefill", "a")]
    _decode_csv(tmp_path / "attention_decode.csv", rows)
    cov = {c.method: c for c in method_coverage(tmp_path)}
    assert (cov["kivi"].judged, cov["kivi"].held_out, cov["kivi"].kernel_rows) == (2, 2, 4)
    assert cov["intkv"].judged == 0 and "same harness, shape and call" in cov["intkv"].why_not_judged
    assert cov["h2o"].judged == 0 and cov["h2o"].held_out == 1
    assert cov["lightkv"].why_not_judged.startswith("only prefill-phase rows")
    assert cov["lrkv"].why_not_judged == "no decode-attention kernel rows on this GPU"
    assert "bf16" not in cov
    judged = measured.judged_rows(measured.decode_rows(tmp_path))
    assert all(base.call == row.call == "a" and base.spec == "bf16" for row, base in judged)


def test_h200_commands_on_a_copy_of_the_h100_folder(calibrated_root, tmp_path, monkeypatch, capsys) -> None:
    """Item 5's two commands, with the H100 measurements standing in for H200 ones: predict h200-sxm
    with the H100-only profile (cross-GPU target, PASS/FAIL printed), then calibrate on h200-sxm; its
    measured profile is then found for h200-sxm ahead of the imported one."""
    shutil.copytree(calibrated_root / "h100-sxm", tmp_path / "h100-sxm")
    shutil.copytree(MEASURED, tmp_path / "h200-sxm")
    for fitted in FITTED:
        (tmp_path / "h200-sxm" / fitted).unlink(missing_ok=True)
    main(["validate", "--gpu", "h200-sxm", "--calibration-from", "h100-sxm", "--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Decode target (another GPU's profile, issue 15): median <= 10% and worst <= 25%" in out
    assert ": PASS" in out or ": FAIL" in out
    report = (tmp_path / "h200-sxm" / "report_from_h100-sxm.md").read_text()
    assert "Decode target (another GPU's profile" in report and "fitted on h100-sxm" in report

    monkeypatch.setattr("kvsim.cost.calibration._CHECKOUT_RESULTS", tmp_path)
    monkeypatch.setattr("kvsim.cost.calibration._PACKAGED_PROFILES", tmp_path / "no-wheel")
    assert find_calibration(load_hardware("h200-sxm")).kind == "imported"
    main(["calibrate", "--gpu", "h200-sxm", "--results", str(tmp_path)])
    assert (tmp_path / "h200-sxm" / "calibration_reference.yaml").is_file()
    cal = find_calibration(load_hardware("h200-sxm"))
    assert cal.kind == "measured" and "validation/results/h200-sxm" in cal.source
    _, own = validate("h200-sxm", results=tmp_path)
    assert next(s for s in own if s["kind"] == "decode" and s["model"] == "all")["configs"] == 315
