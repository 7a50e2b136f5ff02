"""MiniMax-M2's query/key norm over all heads: read from its HF config, and priced under tensor
parallelism as vLLM runs it (MiniMaxText01RMSNormTP.forward_qk: each rank's sums of squares of its Q
and K slices, one all-reduce of the two fp32 sums per token, then the normalization)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from kvsim.cost import Batch, CostModel
from kvsim.cost.execution import vllm_execution
from kvsim.errors import KvsimError
from kvsim.kv import layout_for
from kvsim.spec.hardware import load_hardware
from kvsim.spec.hf_import import model_from_hf_config
from kvsim.spec.model import ModelSpec, model_from_dict

# ai-dynamo/aiconfigurator@095f58a5 aic-core/src/aiconfigurator_core/model_configs/
# MiniMaxAI--MiniMax-M2.5_config.json, the fields the importer reads
MINIMAX_M25 = {"model_type": "minimax_m2", "num_hidden_layers": 62, "hidden_size": 3072, "num_attention_heads": 48,
               "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 1536, "vocab_size": 200064,
               "num_experts_per_tok": 8, "num_local_experts": 256, "torch_dtype": "bfloat16",
               "max_position_embeddings": 196608, "use_qk_norm": True, "qk_norm_type": "per_layer"}


def load(config: dict) -> ModelSpec:
    return model_from_dict(model_from_hf_config(config, name="m", config_file="m.json"))


def test_the_config_says_which_qk_norm() -> None:
    assert load(MINIMAX_M25).attention.qk_norm_across_heads
    assert not load({**MINIMAX_M25, "qk_norm_type": "per_head"}).attention.qk_norm_across_heads
    assert not load({**MINIMAX_M25, "use_qk_norm": False}).attention.qk_norm_across_heads
    with pytest.raises(KvsimError) as err:  # the kind changes the price: never assumed
        load({k: v for k, v in MINIMAX_M25.items() if k != "qk_norm_type"})
    assert err.value.field == "qk_norm_type" and err.value.file == "m.json"
    with pytest.raises(KvsimError) as err:
        load({**MINIMAX_M25, "qk_norm_type": "per_group"})
    assert err.value.field == "qk_norm_type" and err.value.value == "per_group"


def _step(model: ModelSpec, tp: int, tokens: int) -> tuple[CostModel, dict[str, float], float]:
    """vLLM's step (its all-reduce tables; its host time, overlapped under async scheduling, left out of
    the GPU terms it hides behind)."""
    hw = load_hardware("h200-sxm")
    cm = CostModel(model, hw, layout_for(model, "bf16"), tp, None, vllm_execution(hw, tp, 256, 8192, ""))
    step = cm.step(Batch(decode_context=np.full(tokens, 2048)))
    gpu = {op.name: op.seconds for op in step.ops if op.bound != "overlapped"}
    assert step.total_s == pytest.approx(sum(gpu.values()), rel=1e-12)  # the GPU terms add up to the step
    return cm, gpu, step.total_s


def test_tensor_parallel_adds_one_small_all_reduce_per_layer() -> None:
    model = load(MINIMAX_M25)
    cm, parts, total = _step(model, 4, 16)
    # 62 layers x one all-reduce of 16 tokens x 2 fp32 sums, priced as any other all-reduce of that size
    # (vLLM's custom all-reduce: a latency-bound call of microseconds)
    per_call = float(cm._allreduce_call_s(np.array([16 * 2 * 4.0]))[0])
    assert parts["allreduce.qk_norm"] == pytest.approx(62 * per_call, rel=1e-12)
    assert 62 * 2e-6 < parts["allreduce.qk_norm"] < 62 * 20e-6
    assert parts["qk_norm"] > 0
    # the same model with a per-head norm: exactly those two terms less
    _, plain, plain_total = _step(replace(model, attention=replace(model.attention, qk_norm_across_heads=False)), 4, 16)
    assert "allreduce.qk_norm" not in plain and "qk_norm" not in plain
    assert total - plain_total == pytest.approx(parts["allreduce.qk_norm"] + parts["qk_norm"], rel=1e-9)


def test_one_gpu_has_nothing_to_reduce() -> None:
    _, parts, _ = _step(load(MINIMAX_M25), 1, 16)
    assert "allreduce.qk_norm" not in parts and "qk_norm" not in parts


def _router_s(model: ModelSpec, gpu: str) -> tuple[float, tuple[str, ...]]:
    """gemm.router of a 4,096-token prefill at TP 4, and the cost model's notes."""
    cm = CostModel(model, load_hardware(gpu), layout_for(model, "bf16"), 4)
    step = cm.step(Batch(prefill_tokens=np.array([4096]), prefill_context=np.array([0])))
    return step.breakdown["gemm.router"], cm.notes


def test_minimax_routes_in_fp32_at_the_fp32_peak() -> None:
    """vLLM's MiniMax-M2 gate holds fp32 weights and runs on hidden states cast to fp32 (minimax_m2.py):
    twice the router's weight bytes, and a prefill-sized router GEMM at the FP32 peak, several times the
    bf16 one: on the measured gemm.fp32 curve of the H100 profile (run h100-call12) and the H200's
    (h200-call7), on a labelled prior where a profile has none."""
    from kvsim.spec.linears import layer_linears

    model = load(MINIMAX_M25)
    plain = replace(model, moe=replace(model.moe, router_fp32=False))
    assert model.moe.router_fp32 and not load({**MINIMAX_M25, "model_type": "qwen3_moe"}).moe.router_fp32
    router = next(lin for lin in layer_linears(model, model.layers[0], 4) if lin.role == "router")
    assert router.bits == 32 and router.bytes == 3072 * 256 * 4
    flops = 62 * 2 * 4096 * 3072 * 256  # every layer's router over the 4,096 prompt tokens
    for gpu, label in (("h100-sxm", "gemm.fp32 curve"), ("h200-sxm", "gemm.fp32 curve, measured (h200-sxm"),
                       ("b200", "PRIOR: the router runs in fp32")):
        fp32, notes = _router_s(model, gpu)
        bf16, plain_notes = _router_s(plain, gpu)
        assert any(label in n for n in notes) and not any("runs in fp32" in n for n in plain_notes)
        peak = load_hardware(gpu).peak_flops_per_s["fp32"]
        assert fp32 >= flops / peak > bf16  # never faster than the FP32 peak, which a bf16 GEMM beats
        assert fp32 > 3 * bf16
    # measured on the H100 (validation/results/h100-sxm/gemm.csv, dtype fp32): 136.5 us for 4,096 rows
    # of this router at TP-independent size, so 62 layers take about 8.5 ms
    assert _router_s(model, "h100-sxm")[0] == pytest.approx(62 * 136.5e-6, rel=0.1)
