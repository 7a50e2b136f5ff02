"""``kvsim calibrate --from aiconfigurator``: importing NVIDIA aiconfigurator's kernel database.

CI runs on a small database that the tests write in the database's own file format (parquet tables
under ``<system>/<op>/<engine>/<version>/``, latencies in milliseconds), with latencies made by a
known roofline, so the fit must give those efficiencies back. One test runs on the real package
when it is installed.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from kvsim.cli import main  # noqa: E402
from kvsim.cost import Batch, CostModel  # noqa: E402
from kvsim.cost.calibration import calibration_from_dict, find_calibration  # noqa: E402
from kvsim.cost.model import calibration_summary  # noqa: E402
from kvsim.errors import KvsimError  # noqa: E402
from kvsim.fileio import read_yaml_file  # noqa: E402
from kvsim.importers.aiconfigurator import import_profile, write_profile  # noqa: E402
from kvsim.kv import layout_for  # noqa: E402
from kvsim.spec.hardware import load_hardware  # noqa: E402
from kvsim.spec.model import load_model  # noqa: E402

GPU = load_hardware("h200-sxm")
PEAK, BW = GPU.peak_flops_per_s["bf16"], GPU.hbm_bandwidth_bytes_per_s
EFF_C, EFF_M, FLOOR_S = 0.7, 0.8, 5e-6  # the made-up database's kernels: these efficiencies and floor
HD = 128


def _ms(flops: float, nbytes: float, peak: float = PEAK) -> float:
    return (max(flops / (peak * EFF_C), nbytes / (BW * EFF_M)) + FLOOR_S) * 1e3


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def make_database(root: Path, system: str = "h200_sxm", version: str = "0.24.0") -> Path:
    """A database in aiconfigurator's layout with roofline latencies; returns its systems/data folder."""
    data = root / "systems" / "data"
    base = {"framework": "VLLM", "version": version, "device": "NVIDIA H200"}
    gemm = []
    for dtype, kernel, wb, peak in (("bfloat16", "torch.nn.functional.linear", 2, PEAK),
                                    ("fp8", "CutlassFP8ScaledMMLinearKernel", 1, GPU.peak_flops_per_s["fp8"])):
        for m in (1, 16, 256, 4096):
            for n, k in ((4096, 4096), (14336, 4096), (4096, 14336)):
                nbytes = n * k * wb + (m * k + m * n) * 2
                gemm.append({**base, "op_name": "gemm", "kernel_source": kernel, "gemm_dtype": dtype, "m": m, "n": n,
                             "k": k, "latency": _ms(2.0 * m * n * k, nbytes, peak)})
    _write(data / system / "gemm" / "vllm" / version / "gemm_perf.parquet", gemm)
    attn = {**base, "kernel_source": "vllm_flash_attn_fa3", "head_dim": HD, "beam_width": 1, "attn_dtype": "bfloat16",
            "kv_cache_dtype": "bfloat16", "window_size": 0}
    gen = []
    for b in (1, 8, 64):
        for step in (127, 1023, 8191):
            for h, kvh in ((32, 8), (64, 8)):
                ctx = 1 + step
                gen.append({**attn, "op_name": "generation_attention", "batch_size": b, "isl": 1, "num_heads": h,
                            "num_key_value_heads": kvh, "step": step,
                            "latency": _ms(b * ctx * 2.0 * h * 2 * HD, b * ctx * kvh * 2 * HD * 2)})
    ctxt = []
    for b in (1, 4):
        for n in (128, 1024, 4096):
            ctxt.append({**attn, "op_name": "context_attention", "batch_size": b, "isl": n, "num_heads": 32,
                         "num_key_value_heads": 8, "step": 0,
                         "latency": _ms(b * 2.0 * 32 * 2 * HD * n * (n + 1) / 2, b * n * 40 * 2 * HD * 2)})
    _write(data / system / "attention" / "vllm" / version / "generation_attention_perf.parquet", gen)
    _write(data / system / "attention" / "vllm" / version / "context_attention_perf.parquet", ctxt)
    moe = []
    for dtype, kernel, wb, peak in (("bfloat16", "vllm_unquantizedfusedmoe_triton_tritonexperts", 2, PEAK),
                                    ("fp8_block", "vllm_fp8moe_triton_tritonexperts", 1, GPU.peak_flops_per_s["fp8"])):
        for tok in (1, 16, 256, 2048):
            active = min(128, tok * 8)  # balanced routing: every pick its own expert until all are touched
            moe.append({**base, "op_name": "moe", "kernel_source": kernel,
                        "moe_dtype": dtype, "num_tokens": tok, "hidden_size": 4096, "inter_size": 1536, "topk": 8,
                        "num_experts": 128, "moe_tp_size": 1, "moe_ep_size": 1, "distribution": "balanced",
                        "latency": _ms(2.0 * tok * 8 * 3 * 4096 * 1536,
                                       active * 3 * 4096 * 1536 * wb + tok * 8 * (2 * 4096 + 3 * 1536) * 2, peak)})
    _write(data / system / "moe" / "vllm" / version / "moe_perf.parquet", moe)
    link = GPU.nvlink_bandwidth_bytes_per_s * 0.5  # half the link's bandwidth, 4 us a ring hop
    nccl = [{"op_name": "all_reduce", "nccl_dtype": "half", "num_gpus": tp, "message_size": size,
             "latency": (2 * (tp - 1) * 4e-6 + 2 * (tp - 1) / tp * size / link) * 1e3}
            for tp in (2, 4, 8) for size in (1024, 1 << 20, 1 << 26)]
    _write(data / system / "comm" / "nccl" / "2.27.3" / "nccl_perf.parquet", nccl)
    return data


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_database(tmp_path_factory.mktemp("aic"))


@pytest.fixture(scope="module")
def profile(database: Path) -> dict:
    return import_profile("h200_sxm", "vllm", None, None, database)


def test_the_fit_reproduces_the_database_latencies(profile: dict, database: Path) -> None:
    """Priced with the fitted curves (kvsim's own fitting: efficiency above the fastest kernel's
    floor), every imported kernel's time comes back within 3 %."""
    cal = calibration_from_dict(profile, GPU, "<test>")
    gemm = cal.ops["gemm"]
    for r in pq.read_table(database / "h200_sxm" / "gemm" / "vllm" / "0.24.0" / "gemm_perf.parquet").to_pylist():
        if r["gemm_dtype"] != "bfloat16":
            continue
        m, n, k = r["m"], r["n"], r["k"]
        ce, me = (float(v[0]) for v in gemm.eff_many([float(m)], [float(n * k * 2)]))
        t = max(2.0 * m * n * k / (PEAK * ce), (n * k * 2 + (m * k + m * n) * 2) / (BW * me)) + gemm.floor_s
        assert t * 1e3 == pytest.approx(r["latency"], rel=0.03), (m, n, k)
    decode = cal.ops["attention_decode"]
    for r in pq.read_table(database / "h200_sxm" / "attention" / "vllm" / "0.24.0" /
                           "generation_attention_perf.parquet").to_pylist():
        b, h, kvh, ctx = r["batch_size"], r["num_heads"], r["num_key_value_heads"], 1 + r["step"]
        nbytes = b * ctx * kvh * 2 * HD * 2
        ce, me = (float(v[0]) for v in decode.eff_many([float(nbytes)], [float(h // kvh)]))
        t = max(b * ctx * 2.0 * h * 2 * HD / (PEAK * ce), nbytes / (BW * me)) + decode.floor_s
        assert t * 1e3 == pytest.approx(r["latency"], rel=0.03), (b, h, kvh, ctx)
    fp8 = GPU.peak_flops_per_s["fp8"]
    for r in pq.read_table(database / "h200_sxm" / "moe" / "vllm" / "0.24.0" / "moe_perf.parquet").to_pylist():
        # the whole routed-expert layer: per touched expert, its rows; the touched experts' bytes per linear
        tok, wb = r["num_tokens"], 2 if r["moe_dtype"] == "bfloat16" else 1
        curve = cal.ops["gemm_grouped" if wb == 2 else "gemm_grouped.fp8_block"]
        active = min(128, tok * 8)  # balanced routing: every pick its own expert until all are touched
        nbytes = active * 3 * 4096 * 1536 * wb + tok * 8 * (2 * 4096 + 3 * 1536) * 2
        ce, me = (float(v[0]) for v in curve.eff_many([tok * 8 / active], [active * 3 * 4096 * 1536 * wb / 2]))
        t = max(2.0 * tok * 8 * 3 * 4096 * 1536 / ((PEAK if wb == 2 else fp8) * ce), nbytes / (BW * me)) + curve.floor_s
        assert t * 1e3 == pytest.approx(r["latency"], rel=0.03), (r["moe_dtype"], tok)
    ops = profile["ops"]
    assert "gemm_grouped" in ops and "gemm.fp8" in ops and ops["attention_decode"]["size2"] == [4.0, 8.0]
    assert "gemm_grouped.fp8" not in ops  # the database has no per-tensor FP8 MoE table: nothing invented
    assert profile["imported"]["tables"]["gemm_grouped.fp8_block"]["kernel"] == "vllm_fp8moe_triton_tritonexperts"
    assert math.isclose(profile["ceilings"]["link_latency_s"], 4e-6, rel_tol=0.01)


def test_profile_records_where_it_came_from(profile: dict) -> None:
    assert profile["kind"] == "imported" and profile["engine"] == "vllm" and profile["engine_version"] == "0.24.0"
    imported = profile["imported"]
    assert imported["system"] == "h200_sxm" and imported["database"] == "aiconfigurator-core"
    assert imported["tables"]["gemm"]["kernel"] == "torch.nn.functional.linear"
    assert imported["tables"]["attention_decode"]["rows_used"] == 18
    assert "elementwise" in profile["fit"]["note"]  # the prior's curve, said so


def test_imported_profile_prices_a_step_like_the_database(profile: dict) -> None:
    cal = calibration_from_dict(profile, GPU, "<test>")
    assert cal.label.startswith("imported (aiconfigurator-core") and cal.label.endswith("vllm 0.24.0)")
    model = load_model("llama-3-8b")
    cost = CostModel(model, GPU, layout_for(model, "bf16"), 1, cal)
    op = next(o for o in cost.step(Batch(decode_context=[1024] * 8)).ops if o.name == "gemm.attention")
    # a decode GEMM of 8 tokens is weight-bound: the database's kernels stream weights at EFF_M, plus
    # the floor of each kernel (qkv and o projections, or q, k, v and o: at most 4 a layer)
    streamed = op.bytes / (BW * EFF_M)
    assert streamed < op.seconds <= streamed * 1.001 + FLOOR_S * 4 * model.num_layers


def test_block_fp8_experts_price_on_the_imported_moe_table(profile: dict) -> None:
    """A block-FP8 MoE checkpoint on an imported profile prices its routed experts on the database's
    own block-FP8 MoE table, and the run says which curve and which profile."""
    cal = calibration_from_dict(profile, GPU, "<test>")
    model = load_model("deepseek-v3")
    assert model.weight_quant is not None and model.weight_quant.block_scaled
    cost = CostModel(model, GPU, layout_for(model, "bf16"), 8, cal)
    assert any("gemm_grouped.fp8_block curve (fused-MoE kernel; imported (aiconfigurator-core" in n
               for n in cost.notes), cost.notes


def test_fp8_moe_tables_are_imported_for_vllm_only() -> None:
    """vLLM's FP8 MoE tables hold the kernel its oracle chose (H100 0.24: Triton for blocks); TRT-LLM's
    most-rows block kernel (DeepGEMM on B200) priced DeepSeek-R1 decode 2-5x slower than its public runs."""
    shipped = Path(__file__).resolve().parents[1] / "kvsim" / "data" / "calibration"
    vllm = read_yaml_file(shipped / "h100-sxm.vllm.yaml", "profile")
    assert vllm["imported"]["tables"]["gemm_grouped.fp8_block"]["kernel"] == "vllm_fp8moe_triton_tritonexperts"
    for name in ("b200.trtllm.yaml", "h100-sxm.sglang.yaml"):
        ops = read_yaml_file(shipped / name, "profile")["ops"]
        assert "gemm_grouped" in ops and not {"gemm_grouped.fp8", "gemm_grouped.fp8_block"} & set(ops), name


def test_user_directory_profile_is_found_after_the_shipped_ones(profile: dict, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    mine = dict(profile, gpu="rtx-4090")  # a GPU with no shipped imported profile
    write_profile(mine, tmp_path)
    monkeypatch.setenv("KVSIM_CALIBRATION_DIR", str(tmp_path))
    cal = find_calibration(load_hardware("rtx-4090"))
    assert cal.kind == "imported" and cal.gpu == "rtx-4090"
    # a GPU kvsim measured keeps its measured profile; 'imported' asks for the imported one
    assert find_calibration(load_hardware("h100-sxm")).kind == "measured"
    assert find_calibration(load_hardware("h100-sxm"), "imported").kind == "imported"


def test_kv_method_kernels_on_an_imported_gpu_are_derived_and_labelled(profile: dict) -> None:
    cal = find_calibration(GPU, "imported")
    model = load_model("llama-3-8b")
    cost = CostModel(model, GPU, layout_for(model, "kivi"), 1, cal)
    summary = calibration_summary(cost)
    assert "relative to bf16 decode attention as measured on h100-sxm" in summary["decode_curve"]
    assert summary["decode_kernel"]["status"] == "derived"
    assert "relative to bf16 decode attention" in summary["decode_kernel"]["reason"]
    dense = CostModel(model, GPU, layout_for(model, "bf16"), 1, cal)
    assert "fitted" in calibration_summary(dense)["decode_curve"]


def test_engine_kind_picks_the_engines_profile() -> None:
    # the H200 has a measured profile (found first for every engine kind); 'imported' asks per engine
    assert find_calibration(GPU, "imported", engine="sglang").engine == "sglang"
    assert find_calibration(GPU, "imported", engine="trtllm").engine == "trtllm"
    b200 = load_hardware("b200")  # no measured profile: the lookup picks the engine's imported one
    assert find_calibration(b200, engine="sglang").engine == "sglang"
    assert find_calibration(b200, engine="trtllm").engine == "trtllm"
    with pytest.raises(KvsimError, match="unknown engine kind"):
        find_calibration(GPU, engine="tgi")


@pytest.mark.parametrize("argv,match", [
    (["--system", "nope_sxm"], "has: h200_sxm"),
    (["--system", "h200_sxm", "--engine", "sglang"], "has: vllm"),
    (["--system", "h200_sxm", "--engine", "vllm==0.19.0"], "has: 0.24.0"),
    (["--system", "h200_sxm", "--engine", "vllm=="], "ENGINE==VERSION"),
])
def test_unknown_system_engine_or_version_lists_what_the_database_has(database: Path, tmp_path: Path, capsys,
                                                                       argv: list[str], match: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--from", "aiconfigurator", "--database", str(database), "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and match in err and len(err.strip().splitlines()) == 1


def test_malformed_or_missing_tables_are_one_line(tmp_path: Path, capsys) -> None:
    data = make_database(tmp_path / "a")
    (data / "h200_sxm" / "gemm" / "vllm" / "0.24.0" / "gemm_perf.parquet").write_bytes(b"not parquet")
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--from", "aiconfigurator", "--database", str(data), "--system", "h200_sxm",
              "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "gemm_perf.parquet" in err and len(err.strip().splitlines()) == 1

    data = make_database(tmp_path / "b")
    (data / "h200_sxm" / "attention" / "vllm" / "0.24.0" / "context_attention_perf.parquet").unlink()
    with pytest.raises(KvsimError, match="missing context_attention_perf.parquet"):
        import_profile("h200_sxm", "vllm", None, None, data)

    data = make_database(tmp_path / "c")
    _write(data / "h200_sxm" / "gemm" / "vllm" / "0.24.0" / "gemm_perf.parquet",
           [{"kernel_source": "x", "gemm_dtype": "bfloat16", "m": 1, "n": 2}])  # no k, no latency
    with pytest.raises(KvsimError, match="malformed database table"):
        import_profile("h200_sxm", "vllm", None, None, data)


def test_cli_writes_the_profile_into_the_user_directory(database: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("KVSIM_CALIBRATION_DIR", str(tmp_path / "cal"))
    main(["calibrate", "--from", "aiconfigurator", "--database", str(database), "--system", "h200_sxm"])
    out = tmp_path / "cal" / "h200-sxm.vllm.yaml"
    assert str(out) in capsys.readouterr().out
    assert read_yaml_file(out, "profile")["kind"] == "imported"


@pytest.mark.skipif(importlib.util.find_spec("aiconfigurator_core") is None,
                    reason="aiconfigurator-core is not installed (pip install 'kvsim[aic]')")
def test_shipped_profile_is_what_the_installed_database_gives() -> None:
    """The shipped H200 vLLM profile is reproduced by importing the installed package again."""
    fresh = import_profile("h200_sxm", "vllm")
    shipped = read_yaml_file(Path(__file__).resolve().parents[1] / "kvsim" / "data" / "calibration" /
                             "h200-sxm.vllm.yaml", "profile")
    if fresh["imported"]["package_version"] != shipped["imported"]["package_version"]:
        pytest.skip("a different aiconfigurator-core version is installed")
    assert fresh["ops"] == shipped["ops"] and fresh["imported"]["tables"] == shipped["imported"]["tables"]
