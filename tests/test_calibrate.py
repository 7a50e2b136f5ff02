"""CPU side of calibration and validation, on committed GPU result files."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import yaml
from conftest import FITTED, ROOT

from kvsim.calibrate import calibrate
from kvsim.cli import main
from kvsim.cost.calibration import calibration_from_dict, find_calibration
from kvsim.errors import KvsimError
from kvsim.spec.hardware import load_hardware
from kvsim.validate import DECODE_TARGETS, validate

MEASURED = ROOT / "validation" / "results" / "h100-sxm"


@pytest.fixture()
def results(tmp_path):
    """A results root holding the committed H100 measurements (without their fitted profile)."""
    shutil.copytree(MEASURED, tmp_path / "h100-sxm")
    for fitted in FITTED:
        (tmp_path / "h100-sxm" / fitted).unlink(missing_ok=True)
    return tmp_path


def test_calibrate_fits_a_loadable_profile_from_kernels_only(calibrated_root) -> None:
    results = calibrated_root
    out = results / "h100-sxm" / "calibration_reference.yaml"
    data = yaml.safe_load(out.read_text())
    assert data["kind"] == "measured" and "engine" not in " ".join(data["fit"]["rows_used"])
    cal = calibration_from_dict(data, load_hardware("h100-sxm"), str(out))
    for curve in cal.ops.values():
        rows = (curve.compute + curve.memory) if curve.log2_size2 else (curve.compute, curve.memory)
        assert all(0 < v <= 1.5 for row in rows for v in row)
    assert len(cal.ops["gemm"].log2_size2) > 5  # one row per measured weight shape
    ceilings = json.loads((results / "h100-sxm" / "ceilings.json").read_text())
    assert cal.ceilings.copy_bytes_per_s == ceilings["copy"]["bw_Bps"]


def test_the_committed_profile_is_what_its_measurements_fit(calibrated_root) -> None:
    """validation/results/h100-sxm/calibration_reference.yaml is regenerated whenever its CSVs or the fit
    change (it once lacked the gemm.fp8 curve its gemm.csv rows held); FP8 experts get their fused-MoE curves."""
    fresh = yaml.safe_load((calibrated_root / "h100-sxm" / "calibration_reference.yaml").read_text())
    committed = yaml.safe_load((MEASURED / "calibration_reference.yaml").read_text())
    assert fresh["ops"] == committed["ops"] and fresh["ceilings"] == committed["ceilings"]
    assert {"gemm.fp8", "gemm_grouped", "gemm_grouped.fp8", "gemm_grouped.fp8_block"} <= set(fresh["ops"])
    assert fresh["fit"]["rows_used"]["fused_moe.csv (fp8_block)"] == 168  # 12 expert shapes x 14 token counts


def test_the_committed_h200_profile_is_what_its_measurements_fit(tmp_path) -> None:
    folder = ROOT / "validation" / "results" / "h200-sxm"
    shutil.copytree(folder, tmp_path / "h200-sxm")
    calibrate("h200-sxm", tmp_path)
    fresh = yaml.safe_load((tmp_path / "h200-sxm" / "calibration_reference.yaml").read_text())
    committed = yaml.safe_load((folder / "calibration_reference.yaml").read_text())
    assert fresh["ops"] == committed["ops"] and fresh["ceilings"] == committed["ceilings"]
    assert {"gemm_grouped.fp8", "gemm_grouped.fp8_block"} <= set(fresh["ops"])
    # its gemm.csv also times W4A16 with torch's tinygemm, a kernel vLLM never runs: not fitted (a 1k-token
    # gpt-oss-120b prefill once cost 259 ms on it); `gemm.w4a16` is fitted on Marlin's rows (run h200-call7) only
    assert any(r.startswith("w4a16,") for r in (folder / "gemm.csv").read_text().splitlines())
    assert fresh["fit"]["rows_used"]["gemm.csv (w4a16)"] == 351
    # run h200-call7 measured what the H200 had borrowed: fp32 routers, MXFP4 experts, fp8 / MLA / MTLA decode
    assert {"gemm.w4a16", "gemm.fp32", "gemm_grouped.mxfp4.gate_up", "gemm_grouped.mxfp4.down",
            "attention_decode.fp8", "attention_decode.mla", "attention_decode.mtla"} <= set(fresh["ops"])


def test_tiling_comparison_rows_are_not_fitted(tmp_path) -> None:
    """fused_moe.csv rows of `--tilings vllm` (params src=...) time vLLM's own tiling beside the same
    call's best of 13: a comparison, not the tuned kernel, so appending them (here at 10x the recorded
    times) changes neither the fit nor its row counts."""
    folder = tmp_path / "h200-sxm"
    shutil.copytree(ROOT / "validation" / "results" / "h200-sxm", folder)
    moe = folder / "fused_moe.csv"
    lines = moe.read_text().splitlines()
    head = lines[0].split(",")
    t, params = head.index("time_s"), head.index("params")
    extra = []
    for line in lines[1:40]:
        cells = line.split(",")
        cells[t] = str(10 * float(cells[t]))
        cells[params] = "src=vllm-0.12-default;" + cells[params]
        extra.append(",".join(cells))
    moe.write_text("\n".join(lines + extra) + "\n")
    calibrate("h200-sxm", tmp_path)
    fresh = yaml.safe_load((folder / "calibration_reference.yaml").read_text())
    committed = yaml.safe_load((ROOT / "validation" / "results" / "h200-sxm" / "calibration_reference.yaml")
                               .read_text())
    assert fresh["ops"] == committed["ops"] and fresh["fit"]["rows_used"] == committed["fit"]["rows_used"]


def test_validate_reports_errors_and_exact_kv_bytes(calibrated_root) -> None:
    results = calibrated_root
    report, summary = validate("h100-sxm", results=results)
    text = report.read_text()
    assert "| decode |" in text and (results / "h100-sxm" / "predicted_vs_measured.png").is_file()
    kv = next(s for s in summary if s["kind"] == "kv_bytes" and s["model"] == "all")
    assert kv["max_abs_err"] == 0.0, "allocated KV bytes must be predicted exactly"
    decode = next(s for s in summary if s["kind"] == "decode" and s["model"] == "all")
    assert decode["points"] > decode["configs"] > 0 and decode["median_abs_err"] < 1.0


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


def test_profile_lookup_by_gpu_name(calibrated_root, monkeypatch) -> None:
    monkeypatch.setattr("kvsim.cost.calibration.results_dir", lambda: calibrated_root)
    assert find_calibration(load_hardware("h100-sxm")).kind == "measured"
    assert find_calibration(load_hardware("h200-sxm")).kind == "measured"  # validation/results/h200-sxm
    assert find_calibration(load_hardware("b200")).kind == "imported"  # shipped, from the database
    borrowed = find_calibration(load_hardware("h100-pcie"))  # no profile of its own: same family, scaled
    assert borrowed.kind == "borrowed" and "h100-sxm (measured" in borrowed.note
    assert find_calibration(load_hardware("a30")).note.startswith("borrowed from a100-sxm-80gb (imported")
    assert find_calibration(load_hardware("mi300x")).kind == "prior"


def test_decode_family_names_the_kernel_a_layout_needs() -> None:
    from kvsim.cost.model import decode_family
    from kvsim.kv import layout_for
    from kvsim.spec.model import load_model

    llama, dsv2 = load_model("llama-3-8b"), load_model("deepseek-v2-lite")
    expected = {"bf16": "dense", "fp8": "fp8", "kivi:bits=2": "kivi.k2v2", "snapkv:budget=512+kivi:bits=4": "kivi.k4v4",
                "asymkv:k_bits=4,v_bits=2": "asymkv.k4v2",
                "h2o:budget=512": "h2o", "snapkv:budget=512": "dense", "cla:factor=2": "dense",
                "lrkv:rank=32": "lrkv", "shadowkv": "shadowkv"}
    for spec, family in expected.items():
        assert decode_family(layout_for(llama, spec)) == family, spec
    assert decode_family(layout_for(dsv2)) == "mla"
    assert decode_family(layout_for(dsv2, "mtla:stride=2")) == "mtla"


def test_held_out_shapes_leave_every_method_shapes_on_both_sides() -> None:
    from kvsim.measured import KernelRow, held_out_rows

    rows = [KernelRow(kernel, spec, b, c, 1, (32, 8, 128), False, 1e-4, "attention_decode.csv")
            for kernel, spec in (("triton_bf16", "bf16"), ("triton_kivi", "kivi:bits=2"))
            for b in (1, 16) for c in (1024, 4096, 16384)]
    held = held_out_rows(rows)
    for spec in ("bf16", "kivi:bits=2"):
        mine = [r for r in rows if r.spec == spec]
        n_held = sum(r in held for r in mine)
        assert 0 < n_held < len(mine) and n_held == len(mine) // 2


def test_profile_rejects_an_unknown_op_curve(tmp_path) -> None:
    one = {"size": [1], "compute": [1.0], "memory": [1.0]}
    ops = dict.fromkeys(("gemm", "attention_decode", "attention_prefill", "elementwise", "allreduce"), one)
    good = calibration_from_dict({"ops": {**ops, "attention_decode.kivi.k2v2": one}}, load_hardware("h100-sxm"),
                                 "p.yaml")
    assert "attention_decode.kivi.k2v2" in good.ops
    with pytest.raises(KvsimError, match="ops.attention_decode.kivvi"):
        calibration_from_dict({"ops": {**ops, "attention_decode.kivvi": one}}, load_hardware("h100-sxm"), "p.yaml")


def test_committed_h100_runs_meet_the_accuracy_targets(calibrated_root) -> None:
    """Issue targets on measurements never used in fitting, over distinct configurations: single-GPU
    decode median <= 5% and worst <= 15%, prefill median <= 10%, KV bytes exact; TP=2 decode median <= 8%."""
    tp_results = calibrated_root
    out = yaml.safe_load((tp_results / "h100-sxm" / "calibration_reference.yaml").read_text())
    assert "h100-sxm-x2/allreduce.csv" in out["fit"]["note"] and 1e-6 < out["ceilings"]["link_latency_s"] < 1e-5
    _, single = validate("h100-sxm", results=tp_results)
    _, tp = validate("h100-sxm-x2", "h100-sxm", results=tp_results)
    _, other = validate("h100-sxm-m2", "h100-sxm", results=tp_results)

    def row(summary: list[dict], kind: str) -> dict:
        return next(s for s in summary if s["kind"] == kind and s["model"] == "all")

    for summary in (single, other):
        decode = row(summary, "decode")
        median, worst = DECODE_TARGETS["own profile"]
        assert decode["configs"] > 250 and decode["median_abs_err"] <= median and decode["max_abs_err"] <= worst
        assert row(summary, "prefill")["median_abs_err"] <= 0.10
        assert row(summary, "kv_bytes")["max_abs_err"] == 0.0
    assert row(tp, "decode tp=2")["configs"] > 50 and row(tp, "decode tp=2")["median_abs_err"] <= 0.08


def test_only_gemm_and_decode_curves_may_be_tables() -> None:
    one = {"size": [1], "compute": [1.0], "memory": [1.0]}
    table = {"size": [1, 16], "size2": [1e6, 1e8], "compute": [[0.5, 0.9], [0.6, 1.0]],
             "memory": [[0.5, 0.9], [0.6, 1.0]]}
    ops = dict.fromkeys(("gemm", "attention_decode", "attention_prefill", "elementwise", "allreduce"), one)
    hw = load_hardware("h100-sxm")
    assert calibration_from_dict({"ops": {**ops, "gemm": table}}, hw, "p.yaml").ops["gemm"].log2_size2
    with pytest.raises(KvsimError, match="ops.elementwise.size2"):
        calibration_from_dict({"ops": {**ops, "elementwise": table}}, hw, "p.yaml")


def _refit_without(tmp_path, csv_name: str, prefixes: tuple[str, ...]) -> dict:
    """The H100 profile kvsim calibrate fits from a copy of its results without the ``csv_name`` rows that
    start with any of ``prefixes`` (a method or dtype column first)."""
    folder = tmp_path / "h100-sxm"
    shutil.copytree(MEASURED, folder)
    lines = (folder / csv_name).read_text().splitlines(keepends=True)
    (folder / csv_name).write_text("".join(x for x in lines if not x.startswith(prefixes)))
    calibrate("h100-sxm", tmp_path)
    return yaml.safe_load((folder / "calibration_reference.yaml").read_text())


def test_marlin_rows_are_the_w4a16_curve_and_lift_the_prior_label(tmp_path) -> None:
    """The H100's Marlin rows (validation/gemm.py --part marlin, dtype w4a16_marlin; run h100-call20, and
    h100-call21 for the four down projections call20 skipped) are what kvsim calibrate fits as gemm.w4a16,
    and the profile prices 4-bit weights on it without the PRIOR label; fitted without them (tinygemm and
    the Triton stand-in rows are never fitted), the prior and its label come back."""
    import numpy as np

    from kvsim.cost.model import Batch, CostModel
    from kvsim.kv import layout_for
    from kvsim.spec.model import load_model
    from kvsim.spec.quant import with_weights

    committed = yaml.safe_load((MEASURED / "calibration_reference.yaml").read_text())
    assert "gemm.w4a16" in committed["ops"] and committed["fit"]["rows_used"]["gemm.csv (w4a16)"] == 299 + 52
    without = _refit_without(tmp_path, "gemm.csv", ("w4a16_marlin,",))
    assert "gemm.w4a16" not in without["ops"] and without["ops"]["gemm"] == committed["ops"]["gemm"]
    hw = load_hardware("h100-sxm")
    # an AWQ checkpoint: vLLM <= 0.12 runs it in Marlin on Hopper too (GPTQ runs in Machete, below)
    gptq = with_weights(load_model("llama-3-8b"), "int4")
    assert gptq.weight_quant is not None
    model = replace(gptq, weight_quant=replace(gptq.weight_quant, method="awq", from_checkpoint=True))
    batch = Batch(decode_context=np.full(8, 1024))
    measured = CostModel(model, hw, layout_for(model, "bf16"),
                         calibration=calibration_from_dict(committed, hw, str(MEASURED / "calibration_reference.yaml")))
    prior = CostModel(model, hw, layout_for(model, "bf16"),
                      calibration=calibration_from_dict(without, hw, "without.yaml"))
    assert measured.weight_kernel.curve == "gemm.w4a16"
    # served at its own precision, an AWQ checkpoint keeps its method (and kernel)
    again = with_weights(model, "int4")
    assert again.weight_quant is not None and again.weight_quant.method == "awq"
    assert not any(n.startswith("PRIOR") for n in measured.notes)
    assert any(n.startswith("PRIOR") and "gemm.w4a16" in n for n in prior.notes)
    assert any("AWQ checkpoints in Marlin" in n for n in measured.notes)
    assert measured.step(batch).total_s != prior.step(batch).total_s


def test_machete_rows_price_gptq_on_hopper_and_marlin_stands_in_where_they_are_missing(tmp_path) -> None:
    """vLLM's Machete rows (validation/vllm_gemm.py, dtype w4a16_machete, run h100-call26) are what kvsim
    calibrate fits as gemm.w4a16.machete, the curve a GPTQ (or ``weights: int4``) model prices its linears on
    on an H100, measured; fitted without them, the same model falls back to Marlin's measured curve and says
    so (no PRIOR label: a measured kernel of the same kind); off Hopper it is Marlin's curve."""
    import numpy as np

    from kvsim.cost.model import Batch, CostModel
    from kvsim.kv import layout_for
    from kvsim.spec.model import load_model
    from kvsim.spec.quant import with_weights

    committed = yaml.safe_load((MEASURED / "calibration_reference.yaml").read_text())
    # run h100-call26's 756 rows and run h100-call32's 56 (MiniMax-M2.5's two small TP-8 shapes)
    assert committed["fit"]["rows_used"]["gemm.csv (w4a16.machete)"] == 756 + 56
    without = _refit_without(tmp_path, "gemm.csv", ("w4a16_machete,",))
    assert "gemm.w4a16.machete" not in without["ops"] and without["ops"]["gemm.w4a16"] == committed["ops"]["gemm.w4a16"]
    hw = load_hardware("h100-sxm")
    model = with_weights(load_model("llama-3-8b"), "int4")
    measured = CostModel(model, hw, layout_for(model, "bf16"),
                         calibration=calibration_from_dict(committed, hw, str(MEASURED / "calibration_reference.yaml")))
    fallback = CostModel(model, hw, layout_for(model, "bf16"),
                         calibration=calibration_from_dict(without, hw, "without.yaml"))
    assert measured.weight_kernel.curve == "gemm.w4a16.machete" and fallback.weight_kernel.curve == "gemm.w4a16"
    assert not any(n.startswith("PRIOR") for n in (*measured.notes, *fallback.notes))
    assert any("Machete is unmeasured in this profile" in n for n in fallback.notes)
    assert not any("unmeasured" in n for n in measured.notes)
    # a 4k-token prefill: Machete runs it in about half Marlin's time (run h100-call26)
    prefill = Batch(prefill_tokens=np.array([4096]), prefill_context=np.array([0]))
    gemm_s = [sum(o.seconds for o in c.step(prefill).ops if o.name.startswith("gemm.") and o.name != "gemm.lm_head")
              for c in (measured, fallback)]
    assert gemm_s[0] < 0.75 * gemm_s[1]
    a100 = CostModel(model, load_hardware("a100-sxm-80gb"), layout_for(model, "bf16"))
    assert a100.weight_kernel.curve == "gemm.w4a16"


def test_cutlass_block_fp8_rows_price_block_checkpoints_and_per_tensor_stands_in_without_them(tmp_path) -> None:
    """vLLM's CUTLASS blockwise rows (validation/vllm_gemm.py, dtype fp8_cutlass_block, run h100-call30) are
    what kvsim calibrate fits as gemm.fp8.block, the curve a block-FP8 checkpoint's linears price on on an
    H100; fitted without them, the same model falls back to the per-tensor FP8 curve and says so. The rows
    hold what the curve is for: at one row the blockwise kernel takes longer than the per-tensor one of the
    same shape (1.4-1.6x in median over the shapes at 1-16 rows in that run), and so does the fitted step."""
    import csv
    import statistics

    import numpy as np

    from kvsim.cost.model import Batch, CostModel
    from kvsim.kv import layout_for
    from kvsim.spec.model import load_model

    committed = yaml.safe_load((MEASURED / "calibration_reference.yaml").read_text())
    # run h100-call30's 720 rows and run h100-call32's 56 (MiniMax-M2.5's two small TP-8 shapes)
    assert committed["fit"]["rows_used"]["gemm.csv (fp8.block)"] == 720 + 56
    without = _refit_without(tmp_path, "gemm.csv", ("fp8_cutlass_block,",))
    assert "gemm.fp8.block" not in without["ops"] and without["ops"]["gemm.fp8"] == committed["ops"]["gemm.fp8"]
    times: dict[str, dict[tuple[str, str, str], float]] = {"fp8_cutlass_block": {}, "fp8_cutlass": {}}
    with (MEASURED / "gemm.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            # run h100-call30's shapes, whose figure the docstring quotes (run h100-call32's small TP-8 shapes
            # run 1.8-3.7x at 1-16 rows; README "Small linears")
            if r["dtype"] in times and int(r["m"]) <= 16 and r["run"] in ("h100-call30", "h100-call26"):
                times[r["dtype"]][(r["m"], r["n"], r["k"])] = float(r["time_s"])
    ratios = [t / times["fp8_cutlass"][key] for key, t in times["fp8_cutlass_block"].items()]
    assert len(ratios) >= 150 and 1.3 < statistics.median(ratios) < 1.7
    hw = load_hardware("h100-sxm")
    model = load_model("deepseek-v3")
    measured = CostModel(model, hw, layout_for(model, "bf16"), 8,
                         calibration=calibration_from_dict(committed, hw, str(MEASURED / "calibration_reference.yaml")))
    fallback = CostModel(model, hw, layout_for(model, "bf16"), 8,
                         calibration=calibration_from_dict(without, hw, "without.yaml"))
    assert measured.weight_kernel.curve == "gemm.fp8.block" and fallback.weight_kernel.curve == "gemm.fp8"
    assert any("block-FP8 GEMMs are unmeasured in this profile" in n for n in fallback.notes)
    assert not any("unmeasured in this profile" in n for n in measured.notes)
    decode = Batch(decode_context=np.full(1, 2048))
    dense = [c.step(decode).breakdown["gemm.attention"] for c in (measured, fallback)]
    assert dense[0] > 1.2 * dense[1]


def test_vllm_decode_kernel_rows_price_the_family_and_the_stand_in_stays_for_the_reference_engine(tmp_path) -> None:
    """Rows of vLLM's own FlashMLA (validation/flashmla.py, methods vllm_flashmla*) are what kvsim calibrate
    fits as attention_decode.mla; kvsim's Triton stand-in (triton_mla_absorbed), which the reference engine
    runs, becomes attention_decode.mla.reference, and the reference engine's profile prices on it exactly as
    before. Here the FlashMLA rows are the stand-in's shapes at half its time."""
    import numpy as np

    from kvsim.cost.model import Batch, CostModel
    from kvsim.kv import layout_for
    from kvsim.spec.model import load_model

    folder = tmp_path / "h100-sxm"
    shutil.copytree(MEASURED, folder)
    path = folder / "attention_decode.csv"
    lines = path.read_text().splitlines()
    head = lines[0].split(",")
    method, t = head.index("method"), head.index("time_s")
    # the measured FlashMLA rows (run h100-call25) out: this test's FlashMLA is the stand-in at half its time
    lines = [lines[0]] + [line for line in lines[1:] if not line.split(",")[method].startswith("vllm_flashmla")]
    extra = []
    for line in lines[1:]:
        cells = line.split(",")
        if cells[method] == "triton_mla_absorbed" and cells[t]:
            cells[method], cells[t] = "vllm_flashmla", str(float(cells[t]) / 2)
            extra.append(",".join(cells))
    assert len(extra) >= 8
    path.write_text("\n".join(lines + extra) + "\n")
    calibrate("h100-sxm", tmp_path)
    fresh = yaml.safe_load((folder / "calibration_reference.yaml").read_text())
    committed = yaml.safe_load((MEASURED / "calibration_reference.yaml").read_text())
    stand_in = committed["ops"].get("attention_decode.mla.reference", committed["ops"]["attention_decode.mla"])
    assert fresh["ops"]["attention_decode.mla.reference"] == stand_in
    assert fresh["ops"]["attention_decode.mla"] != stand_in
    hw = load_hardware("h100-sxm")
    vllm = calibration_from_dict(fresh, hw, "fresh.yaml")
    before = calibration_from_dict({**fresh, "ops": {**fresh["ops"], "attention_decode.mla": stand_in}}, hw, "b.yaml")
    model = load_model("deepseek-v2-lite")
    batch = Batch(decode_context=np.full(32, 4096))

    def attention(cal) -> float:
        step = CostModel(model, hw, layout_for(model, "bf16"), calibration=cal).step(batch)
        return next(o.seconds for o in step.ops if o.name == "attention.decode")

    assert attention(vllm.for_reference_engine()) == pytest.approx(attention(before.for_reference_engine()))
    assert attention(vllm) < 0.75 * attention(before)


def test_a_twin_gpu_borrows_vllms_own_decode_kernel_and_keeps_its_stand_in(monkeypatch) -> None:
    """Where a twin GPU (same family, SM count and bf16 peak: the H100 for the H200) measured vLLM's own MLA
    kernel (its profile keeps the stand-in as attention_decode.mla.reference), a profile without it prices
    MLA decode on the twin's curve, labelled derived, and keeps its own stand-in for the reference engine."""
    from dataclasses import replace
    from types import MappingProxyType

    from kvsim.cost import calibration as calmod

    h100, h200 = load_hardware("h100-sxm"), load_hardware("h200-sxm")
    donor = find_calibration(h100)
    # the H200's own fitted profile, before find_calibration borrows the H100's measured FlashMLA
    path = calmod.profile_path("h200-sxm", "reference")
    assert path is not None
    own = calmod.calibration_from_dict(calmod._read(path), h200, str(path))
    faster = replace(donor.ops["attention_decode.mla"], floor_s=0.0)
    donor = replace(donor, ops=MappingProxyType({**donor.ops, "attention_decode.mla": faster}))
    monkeypatch.setattr(calmod, "_twins", lambda hw: [("h100-sxm", donor)] if hw.name == "h200-sxm" else [])
    got = calmod._compute_twin_curves(own, h200)
    assert got.ops["attention_decode.mla"] == faster
    assert got.ops["attention_decode.mla.reference"] == own.ops["attention_decode.mla"]
    assert "h100-sxm" in got.derived["attention_decode.mla"]
    assert got.for_reference_engine().ops["attention_decode.mla"] == own.ops["attention_decode.mla"]
    # vLLM's FP8-cache FlashMLA, which the H200 never measured, comes with it
    assert got.ops["attention_decode.mla.k8v8"] == donor.ops["attention_decode.mla.k8v8"]
    assert "h100-sxm" in got.derived["attention_decode.mla.k8v8"]
    # vLLM's FlashAttention 3 (dense and FP8 cache, prefill) likewise, each over the H200's own stand-in; the
    # H100's Triton method kernels the H200 lacks are no variants of the dense family and stay the H200's
    # business (priced by kvsim.cost.kernels' rules, not borrowed as vLLM's kernel)
    for key in ("attention_decode", "attention_decode.fp8", "attention_prefill"):
        assert got.ops[key] == donor.ops[key] and "h100-sxm" in got.derived[key]
        assert got.ops[key + ".reference"] == own.ops[key]
    assert not [k for k in got.derived if k.split(".")[1:2] in (["kivi"], ["intkv"], ["asymkv"], ["packkv"])]


def test_vllm_fa3_decode_rows_price_dense_and_fp8_attention_and_the_stand_ins_stay_for_the_reference_engine(
        tmp_path) -> None:
    """vLLM's FlashAttention 3 decode rows (validation/vllm_decode.py: methods vllm_fa3 and vllm_fa3_fp8, runs
    h100-call28 and h100-call29) are what the H100 profile prices dense and FP8-cache decode attention on;
    kvsim's Triton kernels (triton_bf16, triton_fp8), which the reference engine runs, are kept as
    attention_decode.reference and attention_decode.fp8.reference, and fitted without the FA3 rows the profile
    is the stand-ins' again. The notes of a dense model say nothing of a stand-in."""
    import numpy as np

    from kvsim.cost.model import Batch, CostModel
    from kvsim.kv import layout_for
    from kvsim.spec.model import load_model

    committed = yaml.safe_load((MEASURED / "calibration_reference.yaml").read_text())
    ops = committed["ops"]
    assert {"attention_decode.reference", "attention_decode.fp8.reference"} <= set(ops)
    fresh = _refit_without(tmp_path, "attention_decode.csv", ("vllm_fa3,", "vllm_fa3_fp8,"))["ops"]
    assert "attention_decode.reference" not in fresh and "attention_decode.fp8.reference" not in fresh
    assert fresh["attention_decode"] == ops["attention_decode.reference"]
    assert fresh["attention_decode.fp8"] == ops["attention_decode.fp8.reference"]
    hw = load_hardware("h100-sxm")
    cal = calibration_from_dict(committed, hw, str(MEASURED / "calibration_reference.yaml"))
    model = load_model("llama-3-8b")
    batch = Batch(decode_context=np.full(64, 8192))

    def attention(spec: str, profile) -> float:
        step = CostModel(model, hw, layout_for(model, spec), calibration=profile).step(batch)
        return next(o.seconds for o in step.ops if o.name == "attention.decode")

    # FA3's FP8 cache reads half the bytes but takes 0.6-0.9x the bf16 time (run h100-call29), where kvsim's
    # Triton FP8 kernel comes closer to half: the FP8 speed-up priced on vLLM's kernels is the smaller
    vllm = attention("bf16", cal) / attention("fp8", cal)
    stand_in = attention("bf16", cal.for_reference_engine()) / attention("fp8", cal.for_reference_engine())
    assert 1.0 < vllm < stand_in
    notes = CostModel(model, hw, layout_for(model, "fp8"), calibration=cal).cost_notes
    assert not any("stand-in" in n for n in notes)


def test_an_imported_profile_derives_vllms_fp8_kernel_against_vllms_bf16_one() -> None:
    """The imported (database) profiles carry no KV-method kernels: each is derived from the measured H100 as
    its efficiency relative to the bf16 kernel of its own kind, vLLM's FlashAttention 3 for vLLM's FP8 cache
    kernel, kvsim's Triton bf16 kernel for kvsim's Triton method kernels (KIVI); no stand-in curve is derived."""
    from kvsim.cost.calibration import is_engine_kernel

    cal = find_calibration(load_hardware("h100-sxm"), "imported")
    measured = find_calibration(load_hardware("h100-sxm"))
    assert is_engine_kernel(measured.ops, "attention_decode.fp8")
    assert is_engine_kernel(measured.ops, "attention_decode.mla.k8v8")
    assert not is_engine_kernel(measured.ops, "attention_decode.kivi.k2v2")
    assert not any(k.endswith(".reference") for k in cal.ops)
    assert "vLLM's kernels" in cal.derived["attention_decode.fp8"]
    assert "kvsim's Triton kernels" in cal.derived["attention_decode.kivi.k2v2"]


def test_the_machete_fallback_note_quotes_the_measured_ratio() -> None:
    """The note a Hopper profile without Machete rows prints (kvsim.spec.quant.weight_kernel) quotes
    Machete's time against Marlin's on the H100 (run h100-call26): 1.2-1.3x at 1-16 rows, about half from
    512 rows on. The quote must stay what the measured rows give (median over the shapes both kernels ran)."""
    import csv
    import statistics

    from kvsim.spec.model import load_model
    from kvsim.spec.quant import weight_kernel, with_weights

    times: dict[str, dict[tuple[int, int, int], float]] = {"w4a16_machete": {}, "w4a16_marlin": {}}
    with (MEASURED / "gemm.csv").open() as f:
        for r in csv.DictReader(f):
            if r["dtype"] in times and r["time_s"]:
                times[r["dtype"]][(int(r["m"]), int(r["n"]), int(r["k"]))] = float(r["time_s"])
    machete, marlin = times["w4a16_machete"], times["w4a16_marlin"]
    by_rows: dict[int, list[float]] = {}
    for key, t in machete.items():
        if key in marlin:
            by_rows.setdefault(key[0], []).append(t / marlin[key])
    medians = {m: statistics.median(v) for m, v in by_rows.items()}
    small = [round(medians[m], 1) for m in (1, 4, 16)]
    large = [medians[m] for m in medians if m >= 512]
    assert min(small) == 1.2 and max(small) == 1.3
    assert large and all(0.45 <= r <= 0.6 for r in large)  # "about half"
    note = weight_kernel(with_weights(load_model("llama-3-8b"), "int4"), load_hardware("h100-sxm")).fallback_note
    assert "1.2-1.3x Marlin's time at 1-16 rows and about half of it from 512 rows on" in note
