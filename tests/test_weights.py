"""Weight precision: ``weights:`` choices, HF ``quantization_config`` import, the GEMM path per GPU, pricing.

quantization_config mappings below are the fields vLLM reads, in the shapes each tool writes them:
compressed-tensors as llm-compressor writes ``config_groups`` (float-quantized FP8, pack-quantized
W4A16, nvfp4-pack-quantized), ModelOpt ``quant_algo``, AutoAWQ / AutoGPTQ ``bits``/``group_size``,
bitsandbytes ``load_in_4bit``, DeepSeek-V3's fp8 ``weight_block_size`` and gpt-oss's mxfp4.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest

from kvsim.cli import main
from kvsim.cost import Batch, CostModel
from kvsim.cost.calibration import GROUPED_MM_CURVE, find_calibration
from kvsim.errors import KvsimError
from kvsim.kv import layout_for
from kvsim.memory import GIB, EngineMemoryConfig, plan_memory, rotary_cache_bytes
from kvsim.spec.hardware import load_hardware
from kvsim.spec.hf_import import model_from_hf_config
from kvsim.spec.model import load_model, model_from_dict
from kvsim.spec.quant import INT4_BITS, MXFP4_BITS, NVFP4_BITS, quant_from_hf, weight_kernel, with_weights

CT_W = {"dynamic": False, "num_bits": 8, "observer": "minmax", "strategy": "tensor", "symmetric": True, "type": "float"}
CT_A = {"dynamic": True, "num_bits": 8, "observer": None, "strategy": "token", "symmetric": True, "type": "float"}


def ct(weights: dict, acts: dict | None, ignore: list[str] | None = None) -> dict:
    return {"quant_method": "compressed-tensors", "format": "x", "ignore": ignore or ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}}}


@pytest.mark.parametrize("q,precision,bits,weight_only,modules", [
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "fp8", 8 + 32 / 128**2, False, "linear"),
    ({"quant_method": "fp8"}, "fp8", 8, False, "linear"),
    (ct(CT_W, CT_A), "fp8", 8, False, "linear"),
    (ct(CT_W, None), "fp8", 8, True, "linear"),
    (ct({**CT_W, "type": "int", "num_bits": 4, "strategy": "group", "group_size": 128}, None), "int4", 4 + 16 / 128,
     True, "linear"),
    (ct({**CT_W, "type": "int", "strategy": "channel"}, {**CT_A, "type": "int"}), "int8", 8, False, "linear"),
    (ct({**CT_W, "num_bits": 4, "strategy": "tensor_group", "group_size": 16}, None), "nvfp4", NVFP4_BITS, True,
     "linear"),
    (ct(CT_W, CT_A, ignore=["lm_head", "re:.*self_attn.*"]), "fp8", 8, False, "mlp"),
    ({"quant_method": "modelopt", "quant_algo": "FP8"}, "fp8", 8, False, "linear"),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4", "exclude_modules": ["lm_head"]}, "nvfp4", NVFP4_BITS, False,
     "linear"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}, "int4", INT4_BITS, True, "linear"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True}, "int4", INT4_BITS, True, "linear"),
    ({"quant_method": "gptq", "bits": 8, "group_size": -1}, "int8", 8, True, "linear"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_use_double_quant": True}, "int4",
     4 + (8 + 32 / 256) / 64, True, "linear"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "int8", 8, True, "linear"),
    ({"quant_method": "mxfp4"}, "mxfp4", MXFP4_BITS, False, "experts"),
])
def test_quantization_config_import(q: dict, precision: str, bits: float, weight_only: bool, modules: str) -> None:
    wq = quant_from_hf({"quantization_config": q}, "config.json")
    assert (wq["precision"], wq["weight_only"], wq["modules"]) == (precision, weight_only, modules)
    assert wq["bits_per_weight"] == pytest.approx(bits)


@pytest.mark.parametrize("q,field", [
    ({"quant_method": "hqq"}, "quantization_config.quant_method"),
    ({"quant_method": "modelopt", "quant_algo": "W4A8_AWQ"}, "quantization_config.quant_algo"),
    ({"quant_method": "gptq", "bits": 3}, "quantization_config.bits"),
    ({"quant_method": "bitsandbytes"}, "quantization_config.load_in_4bit"),
])
def test_unknown_quantization_is_an_error_never_bf16(q: dict, field: str) -> None:
    with pytest.raises(KvsimError, match=field.replace(".", r"\.")):
        quant_from_hf({"quantization_config": q}, "config.json")


def test_fp8_checkpoint_weights_llama_3_1_8b() -> None:
    """Llama-3.1-8B with FP8 linears: 6.98e9 linear weights at 1 B + 2 x 128,256 x 4,096 bf16 embedding and
    head + norms = 8.46 GiB, and the 32 MiB rotary cache vLLM allocates with it (131,072 x 128 x 2 B)."""
    m = with_weights(load_model("llama-3.1-8b"), "fp8")
    plan = plan_memory(m, load_hardware("h100-sxm"), layout_for(m, "bf16"))
    assert rotary_cache_bytes(m) == 131_072 * 128 * 2
    assert (plan.weights.total - plan.weights.buffers) / GIB == pytest.approx(8.46, abs=0.005)
    assert plan.weights.embedding == plan.weights.lm_head == 128_256 * 4096 * 2  # stay bf16


def test_hf_config_with_fp8_blocks_is_not_planned_as_bf16() -> None:
    cfg = {"model_type": "qwen3", "torch_dtype": "bfloat16", "hidden_size": 4096, "intermediate_size": 12288,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 36,
           "vocab_size": 151936, "max_position_embeddings": 40960, "tie_word_embeddings": False,
           "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    m = model_from_dict(model_from_hf_config(cfg, name="qwen3-8b-fp8", config_file="config.json"))
    assert m.weight_quant.precision == "fp8"
    plan = plan_memory(m, load_hardware("h100-sxm"), layout_for(m, "bf16"))
    assert plan.weights.total / GIB == pytest.approx(8.80, abs=0.005)  # vLLM logged 8.80 GiB (test_memory)


def test_weights_choice_bytes_and_modules() -> None:
    base = load_model("qwen3-30b-a3b")
    h = load_hardware("h100-sxm")
    bf16 = plan_memory(base, h, layout_for(base, "bf16")).weights
    for choice, bits in (("fp8", 8), ("int4", INT4_BITS), ("nvfp4", NVFP4_BITS)):
        w = plan_memory(m := with_weights(base, choice), h, layout_for(m, "bf16")).weights
        assert w.experts == pytest.approx(bf16.experts * bits / 16)
        assert w.attention == pytest.approx(bf16.attention * bits / 16)
        assert (w.embedding, w.lm_head, w.router, w.norms) == (bf16.embedding, bf16.lm_head, bf16.router, bf16.norms)
    mx = plan_memory(m := with_weights(base, "mxfp4"), h, layout_for(m, "bf16")).weights
    assert mx.experts == pytest.approx(bf16.experts * MXFP4_BITS / 16) and mx.attention == bf16.attention
    assert with_weights(load_model("deepseek-v3"), "bf16").weight_quant is None  # served dequantized


@pytest.mark.parametrize("model,weights,gpu,path", [
    ("llama-3.1-8b", "fp8", "h100-sxm", "fp8"), ("llama-3.1-8b", "fp8", "a100-sxm-80gb", "w8a16"),
    ("llama-3.1-8b", "int8", "a100-sxm-80gb", "int8"), ("llama-3.1-8b", "int4", "h100-sxm", "w4a16"),
    ("llama-3.1-8b", "nvfp4", "h100-sxm", "w4a16"), ("gpt-oss-20b", None, "h100-sxm", "w4a16"),
    ("llama-3.1-8b", "bf16", "h100-sxm", "bf16"),
])
def test_gemm_path_per_gpu(model: str, weights: str | None, gpu: str, path: str) -> None:
    m = load_model(model) if weights is None else with_weights(load_model(model), weights)
    assert weight_kernel(m, load_hardware(gpu)).path == path


def test_modelopt_fp8_cannot_run_on_ampere() -> None:
    m = load_model("llama-3.1-8b")
    wq = quant_from_hf({"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8"}}, "c.json")
    from dataclasses import replace

    from kvsim.spec.model import WeightQuantSpec
    m = replace(m, weight_quant=WeightQuantSpec(**{k: v for k, v in wq.items() if k != "source"}))
    with pytest.raises(KvsimError, match="weights='fp8'"):
        weight_kernel(m, load_hardware("a100-sxm-80gb"), "x.yaml")
    with pytest.raises(KvsimError, match="MoE experts only"):
        with_weights(m, "mxfp4")


def _gemm_s(model, gpu: str, tokens: int) -> tuple[float, CostModel]:
    cm = CostModel(model, load_hardware(gpu), layout_for(model, "bf16"), calibration="none")
    step = cm.step(Batch(prefill_tokens=np.array([tokens]), prefill_context=np.array([0])))
    return sum(op.seconds for op in step.ops if op.name.startswith("gemm.") and op.name != "gemm.lm_head"), cm


def test_fp8_gemms_run_at_the_fp8_peak_and_say_the_curve_is_a_prior() -> None:
    """A compute-bound 8,192-token prefill on H100: FP8 linears take half the bf16 time (1,979 vs 989 TFLOP/s
    dense), on the bf16 curve, labelled a prior."""
    base = load_model("llama-3.1-8b")
    t16, _ = _gemm_s(base, "h100-sxm", 8192)
    t8, cm = _gemm_s(with_weights(base, "fp8"), "h100-sxm", 8192)
    assert t8 == pytest.approx(t16 / 2, rel=0.02)
    assert any("PRIOR" in n and "gemm.fp8" in n for n in cm.notes)


@pytest.mark.parametrize("q,block_scaled", [
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, True),
    ({"quant_method": "fp8"}, False),
    (ct({**CT_W, "strategy": "block", "block_structure": [128, 128]}, {**CT_A, "strategy": "group",
                                                                      "group_size": 128}), True),
    (ct(CT_W, CT_A), False),
])
def test_block_scaled_fp8_checkpoints_say_so(q: dict, block_scaled: bool) -> None:
    wq = quant_from_hf({"quantization_config": q}, "config.json")
    assert wq.get("block_scaled", False) is block_scaled
    assert wq["bits_per_weight"] == pytest.approx(8 + 32 / 128**2 if block_scaled else 8)


def test_block_fp8_linears_ask_for_vllms_blockwise_kernel_and_say_where_it_is_unmeasured() -> None:
    """A block-FP8 checkpoint's dense linears (DeepSeek-V3: 128 x 128 weight blocks) price on
    gemm.fp8.block, vLLM's CUTLASS blockwise kernel on Hopper, not on the per-tensor FP8 curve; a profile
    without that curve prices them on its per-tensor one and says so; a per-tensor checkpoint never asks."""
    h = load_hardware("h100-sxm")
    v3 = load_model("deepseek-v3")
    k = weight_kernel(v3, h)
    assert (k.curve, k.fallback_curve, k.grouped_curve) == ("gemm.fp8.block", "gemm.fp8", "gemm_grouped.fp8_block")
    assert weight_kernel(with_weights(load_model("llama-3.1-8b"), "fp8"), h).curve == "gemm.fp8"
    cal = find_calibration(h, None)
    without = replace(cal, ops=MappingProxyType({n: c for n, c in cal.ops.items() if n != "gemm.fp8.block"}))
    cm = CostModel(v3, h, layout_for(v3, "bf16"), calibration=without)
    assert cm.weight_kernel.curve == "gemm.fp8"
    assert any("block-FP8 GEMMs are unmeasured in this profile" in n for n in cm.notes)


def test_fp8_routed_experts_run_on_the_fused_moe_curve_of_their_scales() -> None:
    """DeepSeek-V3's checkpoint (128x128 blocks) prices its experts on gemm_grouped.fp8_block, a
    per-tensor FP8 choice on gemm_grouped.fp8; the H100 profile measured both (fused_moe.csv), and a
    profile without them (the pure roofline) says the experts fall back to the FP8 GEMM curve."""
    h = load_hardware("h100-sxm")
    v3 = load_model("deepseek-v3")
    assert v3.weight_quant.block_scaled
    assert weight_kernel(v3, h).grouped_curve == "gemm_grouped.fp8_block"
    assert with_weights(v3, "fp8").weight_quant.block_scaled  # the checkpoint's own scales stay
    per_tensor = with_weights(load_model("qwen3-30b-a3b"), "fp8")
    assert weight_kernel(per_tensor, h).grouped_curve == "gemm_grouped.fp8"
    assert weight_kernel(load_model("qwen3-30b-a3b"), h).grouped_curve == ""  # bf16: gemm_grouped
    for model, curve in ((v3, "gemm_grouped.fp8_block"), (per_tensor, "gemm_grouped.fp8")):
        cm = CostModel(model, h, layout_for(model, "bf16"))
        assert curve in cm.cal.ops
        g = cm._gemms
        experts = g.names.index("gemm.experts")
        assert {g.curve_names[c] for c, n in zip(g.curve, g.role, strict=True) if n == experts} == {curve}
        assert any(f"on the {curve} curve (fused-MoE kernel; measured" in n for n in cm.notes)
    bare = CostModel(per_tensor, h, layout_for(per_tensor, "bf16"), calibration="none")
    assert any("no gemm_grouped.fp8 curve" in n for n in bare.notes)


def test_16_bit_experts_run_vllms_fused_moe_kernel_and_the_reference_engine_its_own() -> None:
    """vLLM runs 16-bit routed experts through its Triton fused-MoE kernel (gemm_grouped, fitted on
    fused_moe.csv's bf16 rows); the reference engine runs torch._grouped_mm (gemm_grouped.grouped_mm,
    gemm_grouped.csv), and is judged on that."""
    h = load_hardware("h100-sxm")
    cal = find_calibration(h)
    assert {"gemm_grouped", GROUPED_MM_CURVE} <= set(cal.ops) and cal.ops["gemm_grouped"] != cal.ops[GROUPED_MM_CURVE]
    ref = cal.for_reference_engine()
    assert ref.ops["gemm_grouped"] is cal.ops[GROUPED_MM_CURVE] and ref.ops["gemm"] is cal.ops["gemm"]
    model = load_model("qwen3-30b-a3b")
    batch = Batch(decode_context=np.full(64, 1024))
    vllm, reference = (CostModel(model, h, layout_for(model, "bf16"), 1, c).step(batch).breakdown["gemm.experts"]
                       for c in (cal, ref))
    assert vllm != reference
    dense = {k: v for k, v in cal.ops.items() if k not in ("gemm_grouped", GROUPED_MM_CURVE)}
    only_mm = replace(cal, ops=MappingProxyType({**dense, GROUPED_MM_CURVE: cal.ops[GROUPED_MM_CURVE]}))
    fallback = CostModel(model, h, layout_for(model, "bf16"), 1, only_mm)
    assert fallback.step(batch).breakdown["gemm.experts"] == reference  # the other measured grouped kernel
    assert any("no gemm_grouped curve" in n and GROUPED_MM_CURVE in n for n in fallback.notes)


def test_w8a8_experts_pay_their_input_quantization_and_an_imported_moe_table_holds_its_layer() -> None:
    """vLLM's fused MoE quantizes each W8A8 expert GEMM's input in a kernel of its own: DeepSeek-V3 (block
    FP8, 58 MoE layers of 3 dense) at TP 8 reads 16-bit and writes 8-bit hidden states once per token
    (7,168 wide, 56 fp32 group scales) and top-8 rows of the 256-wide intermediate shard (2 scales),
    two kernels a layer; 16-bit experts quantize nothing. An imported profile's MoE table times the
    whole routed-expert layer, so there neither routing, nor the routed activation, nor the
    quantization is priced again: the activation row keeps the dense MLPs and the shared expert."""
    v3, h100, b200 = load_model("deepseek-v3"), load_hardware("h100-sxm"), load_hardware("b200")
    names, per_token, kernels = CostModel(v3, h100, layout_for(v3, "bf16"), 8)._elementwise
    per_layer = (7168 * 3 + 4 * 56) + 8 * (256 * 3 + 4 * 2)
    assert per_token[names.index("moe_act_quant")] == pytest.approx(58 * per_layer)
    assert kernels[names.index("moe_act_quant")] == 2 * 58
    assert kernels[names.index("moe_routing")] == 4 * 58
    assert "moe_act_quant" not in CostModel(load_model("qwen3-30b-a3b"), h100,
                                            layout_for(load_model("qwen3-30b-a3b"), "bf16"))._elementwise[0]
    imported = CostModel(v3, b200, layout_for(v3, "bf16"), 8)
    assert imported.cal.kind == "imported"
    names, per_token, kernels = imported._elementwise
    assert "moe_routing" not in names and "moe_act_quant" not in names
    assert any("which times the engine's whole MoE layer" in n for n in imported.notes)
    assert not any("whole MoE layer" in n for n in CostModel(v3, h100, layout_for(v3, "bf16"), 8).notes)
    activation = names.index("activation")
    assert per_token[activation] == 3 * (3 * 18432 // 8 * 2) + 58 * (3 * 2048 // 8 * 2)
    assert kernels[activation] == 61
    step = imported.step(Batch(decode_context=np.full(32, 1024)))
    assert "moe_routing" not in step.breakdown and step.breakdown["gemm.experts"] > 0
    # every MLP routed, no shared expert (MiniMax-M2.5's layout): no activation kernel at all, not one of
    # zero launches (a 0 / 0 size)
    moe_only = replace(v3, layers=tuple(replace(layer, moe=True) for layer in v3.layers),
                       moe=replace(v3.moe, num_shared_experts=0, shared_intermediate_size=None))
    with np.errstate(all="raise"):
        step = CostModel(moe_only, b200, layout_for(moe_only, "bf16"), 8).step(Batch(decode_context=np.full(8, 512)))
    assert "activation" not in step.breakdown and step.total_s == pytest.approx(sum(step.breakdown.values()))


def test_w4a16_decode_reads_a_quarter_and_prefill_pays_dequantization() -> None:
    base, q = load_model("llama-3.1-8b"), with_weights(load_model("llama-3.1-8b"), "int4")
    d16, _ = _gemm_s(base, "h100-sxm", 1)
    d4, cm = _gemm_s(q, "h100-sxm", 1)
    assert d4 / d16 == pytest.approx(INT4_BITS / 16, rel=0.05)  # memory-bound: weight bytes
    p16, _ = _gemm_s(base, "h100-sxm", 8192)
    p4, _ = _gemm_s(q, "h100-sxm", 8192)
    assert p4 > p16  # compute-bound: bf16 FLOPs plus the in-kernel dequantization
    assert any("W4A16" in n for n in cm.notes)


def test_cli_weights_and_version(capsys) -> None:
    main(["memory", "--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--weights", "fp8", "--vllm-version", "0.11",
          "--json"])
    r = json.loads(capsys.readouterr().out)
    assert r["weights"] == "fp8" and "0.11-0.16" in r["vllm_rule"]
    assert r["weight_bytes"] / GIB == pytest.approx(8.46 + 0.03, abs=0.01)


def test_predict_labels_a_weights_prior(capsys) -> None:
    """`kvsim predict` says how quantized weights are priced, and labels a prior as one (it printed only
    the method's notes before, so a W4A16 price on the bf16 curve came with no label)."""
    main(["predict", "--model", "llama-3.1-8b", "--hardware", "a100-sxm-80gb", "--weights", "int4", "--batch", "8",
          "--context", "1024"])
    out = capsys.readouterr().out
    assert "note: weights int4" in out and "note: PRIOR: profile a100-sxm-80gb has no gemm.w4a16 curve" in out
    # the H100's profile measured Marlin (run h100-call20): priced on it, nothing labelled a prior
    main(["predict", "--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--weights", "int4", "--batch", "8",
          "--context", "1024"])
    out = capsys.readouterr().out
    assert "note: weights int4" in out and "PRIOR" not in out
    main(["predict", "--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--batch", "8", "--context", "1024"])
    assert "note:" not in capsys.readouterr().out  # 16-bit weights on measured kernels: nothing to label


@pytest.mark.parametrize("argv,match", [
    (["--weights", "mxfp4"], "weights='mxfp4'"),
    (["--vllm-version", "0.9"], "vllm_version='0.9'"),
    (["--vllm-version", "0.21"], "cuda_graph_gib"),
])
def test_cli_bad_weights_or_version_one_line(capsys, argv: list[str], match: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["memory", "--model", "llama-3.1-8b", "--hardware", "h100-sxm", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_engine_config_default_is_the_rule_file_default() -> None:
    assert "0.17-0.19" in EngineMemoryConfig().rule.label


def test_weights_and_vllm_version_are_sweepable() -> None:
    from kvsim.sweep import expand

    raw = {"model": "llama-3.1-8b", "hardware": "a100-sxm-80gb",
           "workload": {"synthetic": {"rate": 1.0, "num_requests": 4, "input": {"kind": "fixed", "tokens": 64},
                                      "output": {"kind": "fixed", "tokens": 8}}},
           "sweep": {"grid": {"weights": ["bf16", "fp8", "int4"], "engine.vllm_version": ["0.11", "0.19"]}}}
    assert len(expand(raw, "s.yaml").points) == 6
    bad = {**raw, "sweep": {"grid": {"weights": ["bf16", "mxfp4"]}}}  # a dense model has no experts for MXFP4
    with pytest.raises(KvsimError, match="weights"):
        expand(bad, "s.yaml")


def _measured_mxfp4_layers() -> dict[tuple[str, int], float]:
    """(shard label, tokens) -> seconds of both expert GEMMs of one gpt-oss layer, as validation/oai_moe.py
    measured vLLM's Triton matmul_ogs on the H100 (the fitted rows: weights streamed layer after layer)."""
    from kvsim.measured import rows

    out: dict[tuple[str, int], float] = {}
    path = Path(__file__).resolve().parents[1] / "validation" / "results" / "h100-sxm" / "fused_moe.csv"
    for r in rows(path):
        if r["mode"] == "mxfp4":
            key = (r["layer"].rsplit(".", 1)[0], int(r["tokens"]))
            out[key] = out.get(key, 0.0) + float(r["time_s"])
    return out


@pytest.mark.parametrize("tp,tokens", [(1, 16), (2, 64), (4, 16), (8, 4), (8, 64), (4, 1024), (2, 4096), (8, 8192)])
def test_mxfp4_experts_on_hopper_cost_what_vllms_kernel_measured(tp: int, tokens: int) -> None:
    """gpt-oss's MXFP4 experts on the H100 are priced on the curves fitted to vLLM's own kernel (OpenAI's
    Triton matmul_ogs, gate/up and down apart: at the same weight bytes the down GEMM, which scatters and
    sums each token's top-4 rows, took up to 1.6x longer, and one table of both priced a TP 8 decode layer
    38% over its measured time), at the width vLLM pads each rank's experts to (a multiple of 64: 360 -> 384
    at TP 8; unpadded, an 8k-token TP 8 prefill layer came out 53% short). The priced layer is within 20% of
    the measured one at the measured shards, decode and prefill sizes (uniform routing on both sides)."""
    m, hw = load_model("gpt-oss-120b"), load_hardware("h100-sxm")
    cm = CostModel(m, hw, layout_for(m, "bf16"), tp)
    step = cm.step(Batch(prefill_tokens=np.array([tokens]), prefill_context=np.array([0])))
    per_layer = step.breakdown["gemm.experts"] / m.moe_layers
    measured = _measured_mxfp4_layers()[(f"gpt-oss-120b.tp{tp}", tokens)]
    assert per_layer == pytest.approx(measured, rel=0.2)
    # the kernel gathers, activates and sums inside its GEMMs: no routed activation or permutation apart
    assert "activation" not in step.breakdown
    assert not any("PRIOR" in n for n in cm.notes)
    assert any("gemm_grouped.mxfp4.gate_up, gemm_grouped.mxfp4.down" in n for n in cm.notes)


def test_the_h200s_own_mxfp4_kernel_times_bear_out_its_twin_rule() -> None:
    """H200 run h200-call7 timed vLLM's matmul_ogs on the H200 itself: its experts cost 0.96-0.98x the H100's at
    1-64 decode rows and TP 1-8, where the twin rule it was priced by before (a measured profile without the
    curves takes its compute twin's kernel times: public vLLM 0.18 gpt-oss runs put the H200's TPOT at 0.94-1.00x
    the H100's, a bandwidth-scaled price at 0.75-0.85x) gave 1.0x. A profile without them (the H200's with its
    curves removed) still takes the H100's, labelled so."""
    from kvsim.cost.calibration import _compute_twin_curves

    m, h100, h200 = load_model("gpt-oss-120b"), load_hardware("h100-sxm"), load_hardware("h200-sxm")
    for tp in (1, 2, 4, 8):
        for rows in (1, 16, 64):
            batch = Batch(decode_context=np.full(rows, 1500))
            own, h100_s = (CostModel(m, hw, layout_for(m, "bf16"), tp).step(batch).breakdown["gemm.experts"]
                           for hw in (h200, h100))
            assert 0.95 < own / h100_s < 0.99, (tp, rows, own / h100_s)
    cal = find_calibration(h200)
    assert "h100-sxm's measured kernel times" not in " ".join(cal.derived.values())
    stripped = replace(cal, ops=MappingProxyType({k: v for k, v in cal.ops.items()
                                                  if not k.startswith("gemm_grouped.mxfp4")}))
    twin = _compute_twin_curves(stripped, h200)
    assert "h100-sxm's measured kernel times" in twin.derived["gemm_grouped.mxfp4.gate_up"]
    batch = Batch(decode_context=np.full(16, 1500))
    priced = {name: CostModel(m, hw, layout_for(m, "bf16"), 4, c).step(batch).breakdown["gemm.experts"]
              for name, hw, c in (("twin", h200, twin), ("h100", h100, None))}
    assert priced["twin"] == pytest.approx(priced["h100"], rel=1e-6)
    # a GPU of another compute (the A100: Marlin, not matmul_ogs) keeps its own path and labels its prior
    assert weight_kernel(m, load_hardware("a100-sxm-80gb")).grouped_curve == ""


def test_hopper_mxfp4_experts_hold_the_padded_width() -> None:
    """vLLM pads each rank's MXFP4 expert width to a multiple of 64 for the Triton kernel it runs on Hopper
    (quantization/mxfp4.py): gpt-oss-120b's 2,880 splits evenly at TP 1 (45 x 64) and becomes 1,472 / 768 /
    384 at TP 2 / 4 / 8, so the experts hold 2.2% / 6.7% / 6.7% more than their checkpoint share; elsewhere
    (the A100's Marlin path, not modelled) the planner keeps the checkpoint's width."""
    m = load_model("gpt-oss-120b")
    h100, a100 = load_hardware("h100-sxm"), load_hardware("a100-sxm-80gb")
    whole = plan_memory(m, h100, layout_for(m, "bf16"), 1).weights.experts
    for tp, width in ((2, 1472), (4, 768), (8, 384)):
        share = plan_memory(m, h100, layout_for(m, "bf16"), tp).weights.experts
        assert share == pytest.approx(whole / tp * width / (2880 / tp))
        assert plan_memory(m, a100, layout_for(m, "bf16"), tp).weights.experts == pytest.approx(whole / tp)


def test_linears_far_below_the_measured_weight_sizes_are_labelled_extrapolated() -> None:
    """A GEMM table clamps below its smallest measured weight: a dense linear more than 2x below it
    (gpt-oss-120b's router, 0.7 MiB, and its TP-8 attention linears, 2.8 and 3.5 MiB, against a table
    measured from 32 MiB) is labelled extrapolated in the notes; Llama-3-8B's linears (32 MiB and up)
    and routed experts (whose touched share varies with the tokens) are not."""
    h = load_hardware("h200-sxm")
    cal = find_calibration(h, None)
    g = cal.ops["gemm"]
    from_32_mib = replace(g, log2_size2=tuple(x - g.log2_size2[0] + 25 for x in g.log2_size2))
    cal = replace(cal, ops=MappingProxyType({**cal.ops, "gemm": from_32_mib}))
    oss = load_model("gpt-oss-120b")
    notes = [n for n in CostModel(oss, h, layout_for(oss, "bf16"), tp=8, calibration=cal).notes if "extrapolated" in n]
    assert notes == ["gemm.attention 3.5 MiB, gemm.attention 2.8 MiB, gemm.router 0.7 MiB: weights below the "
                     "smallest measured on curve gemm of profile h200-sxm (32 MiB); priced at its efficiency "
                     "(extrapolated)"]
    llama = load_model("llama-3-8b")
    assert not [n for n in CostModel(llama, h, layout_for(llama, "bf16"), calibration=cal).notes
                if "extrapolated" in n]
