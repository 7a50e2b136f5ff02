"""Memory planner: vLLM's published profiling results, invariants, and property tests."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import yaml
from conftest import ROOT, examples
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsim.cli import main
from kvsim.errors import KvsimError
from kvsim.kv import layout_for
from kvsim.memory import (
    FLASHINFER_SAMPLER_BYTES_PER_LOGIT,
    GIB,
    EngineMemoryConfig,
    plan_memory,
    vllm_batch_limits,
    vllm_rule,
)
from kvsim.spec.hardware import load_hardware
from kvsim.spec.model import WeightQuantSpec, load_model
from kvsim.spec.parallel import Parallel
from kvsim.spec.quant import with_weights

PROFILES = yaml.safe_load((ROOT / "validation/reference/vllm_memory_profiles.yaml").read_text())["profiles"]


def _plan(model: str, hw: str = "h100-sxm", method: str = "bf16", tp: int = 1, **engine):
    m = load_model(model)
    return plan_memory(m, load_hardware(hw), layout_for(m, method), tp, EngineMemoryConfig(**engine))


def _log_plan(p: dict):
    """The plan of a public log's deployment under its vLLM version's rule, on the total it printed."""
    m = with_weights(load_model(str(ROOT / p["model"]) if p["model"].endswith(".json") else p["model"]), p["weights"])
    if "weight_block" in p:  # block-scaled FP8 checkpoint: one fp32 scale per block
        rows, cols = p["weight_block"]
        m = replace(m, weight_quant=WeightQuantSpec("linear", 8 + 32 / (rows * cols), "fp8"))
    hw = load_hardware(p["hardware"])
    if p["total_gib"] is not None:  # the total the log printed; else the catalogue's
        hw = replace(hw, memory_bytes=round(p["total_gib"] * GIB))
    # a log that does not print them ran `vllm serve`'s defaults for its version and GPU
    limits = vllm_batch_limits(p["vllm_version"], hw, m, p["max_model_len"], p.get("max_num_batched_tokens"),
                               p.get("max_num_seqs"))
    engine = EngineMemoryConfig(p["gpu_memory_utilization"], 16, limits.max_num_batched_tokens, limits.max_num_seqs,
                                vllm_version=p["vllm_version"], enforce_eager=p["enforce_eager"])
    par = Parallel(expert_parallel=p.get("enable_expert_parallel", False))
    return plan_memory(m, hw, layout_for(m, "bf16"), p["tp"], engine, par)


@pytest.mark.parametrize(("version", "gpu", "model", "max_len", "given", "want"), [
    # vllm/engine/arg_utils.py get_batch_defaults: >= 70 GiB and not an A100 -> 8,192 / 1,024, else 2,048 / 256
    ("0.19", "h100-sxm", "qwen3-32b", 40960, {}, (8192, 1024, True)),
    ("0.19", "h200-sxm", "qwen3-32b", 40960, {}, (8192, 1024, True)),
    ("0.19", "a100-sxm-80gb", "qwen3-32b", 40960, {}, (2048, 256, True)),
    ("0.19", "l40s", "qwen3-32b", 40960, {}, (2048, 256, True)),
    ("0.19", "rtx-4090", "llama-3.1-8b", 8192, {}, (2048, 256, True)),
    # from 0.28 a GPU of >= 160 GiB takes 16,384 tokens
    ("0.27.0", "b200", "qwen3-32b", 40960, {}, (8192, 1024, True)),
    ("0.28.0", "b200", "qwen3-32b", 40960, {}, (16384, 1024, True)),
    ("0.33.0", "h100-sxm", "qwen3-32b", 40960, {}, (8192, 1024, True)),
    # chunked prefill off: 0.11 takes max_model_len as the budget, 0.12+ the larger of it and the default
    ("0.11.0", "h100-sxm", "llama-3.1-8b", 4096, {"enable_chunked_prefill": False}, (4096, 1024, False)),
    ("0.12.0", "h100-sxm", "llama-3.1-8b", 4096, {"enable_chunked_prefill": False}, (8192, 1024, False)),
    ("0.12.0", "h100-sxm", "llama-3.1-8b", 16384, {"enable_chunked_prefill": False}, (16384, 1024, False)),
    # 0.12+: at most max_num_seqs x max_model_len, then the sequences at most the budget
    ("0.19", "h100-sxm", "llama-3.1-8b", 4, {}, (4096, 1024, True)),
    ("0.19", "l40s", "llama-3.1-8b", 4, {"max_num_seqs": 300}, (1200, 300, True)),
    ("0.11.0", "rtx-4090", "llama-3.1-8b", 4096, {"max_num_batched_tokens": 128}, (128, 128, True)),
    # a value given is kept
    ("0.19", "l40s", "qwen3-32b", 40960, {"max_num_seqs": 512}, (2048, 512, True)),
    ("0.19", "h100-sxm", "qwen3-32b", 40960, {"max_num_batched_tokens": 2048}, (2048, 1024, True)),
    # 0.6.x (V0): chunked prefill only past 32K tokens of context, then 2,048 tokens; else max(context, 2,048)
    ("0.6.5", "h100-sxm", "llama-3-8b", 8192, {}, (8192, 256, False)),
    ("0.6.5", "h100-sxm", "llama-3-8b", 1024, {}, (2048, 256, False)),
    ("0.6.5", "h100-sxm", "qwen3-32b", 40960, {}, (2048, 256, True)),
    # 0.10.2's V1 defaults are 0.11's (its _set_default_args_v1)
    ("0.10.2", "h100-sxm", "gpt-oss-120b", 32768, {}, (8192, 1024, True)),
    ("0.10.2", "a100-sxm-80gb", "gpt-oss-120b", 32768, {}, (2048, 256, True)),
])
def test_vllm_batch_defaults_by_version_and_gpu(version, gpu, model, max_len, given, want) -> None:
    got = vllm_batch_limits(version, load_hardware(gpu), load_model(model), max_len, **given)
    assert (got.max_num_batched_tokens, got.max_num_seqs, got.enable_chunked_prefill) == want
    assert f"vLLM {version} " in got.source and all(f in got.source for f in given)


def test_batch_defaults_refuse_a_budget_below_the_sequences() -> None:
    """vLLM's SchedulerConfig refuses max_num_batched_tokens < max_num_seqs; so does kvsim, naming the field."""
    with pytest.raises(KvsimError) as err:
        vllm_batch_limits("0.19", load_hardware("l40s"), load_model("qwen3-32b"), 40960, max_num_seqs=4096)
    assert err.value.field == "max_num_batched_tokens" and err.value.value == 2048
    with pytest.raises(KvsimError) as err:
        vllm_batch_limits("0.9.0", load_hardware("h100-sxm"), load_model("qwen3-32b"), 40960)
    assert err.value.field == "vllm_version"


def test_plan_defaults_to_the_gpus_vllm_serve_limits() -> None:
    """An engine config that leaves the step limits unset is planned with `vllm serve`'s for the GPU: on an
    H100 the sampler's dummy run covers 1,024 rows, on an L40S 256 (a larger profiling peak on the H100)."""
    h100 = _plan("qwen3-8b", "h100-sxm")
    assert h100.engine.batch == (8192, 1024)
    assert _plan("qwen3-8b", "l40s").engine.batch == (2048, 256)
    assert h100.activation_peak_bytes > _plan("qwen3-8b", "h100-sxm", max_num_seqs=256).activation_peak_bytes


@pytest.mark.parametrize("p", [p for p in PROFILES if "weights_gib" in p], ids=lambda p: p["id"])
def test_reproduces_public_vllm_memory_logs(p: dict) -> None:
    """Weights, profiling peak, non-torch memory and KV GiB as vLLM logged them, within 1% (or the 0.005 GiB
    of the log's 2-decimal rounding, for the small terms)."""
    plan = _log_plan(p)
    for got, logged in ((plan.weights.total, p["weights_gib"]), (plan.activation_peak_bytes, p["activation_peak_gib"]),
                        (plan.non_torch_bytes, p["non_torch_gib"]), (plan.kv_cache_bytes, p["kv_cache_gib"])):
        if logged is not None:
            assert got / GIB == pytest.approx(logged, rel=0.01, abs=0.005 + 1e-9)  # half the last printed digit
    if p.get("kv_cache_tokens") is not None:
        assert plan.kv_capacity_tokens(p["max_model_len"]) == pytest.approx(p["kv_cache_tokens"], rel=0.01)


def test_public_log_kv_tokens() -> None:
    """The Qwen3-8B-FP8 log's 8.60 GiB held 62,608 tokens: pages of 16 tokens x 147,456 B."""
    p = next(p for p in PROFILES if p["id"] == "public-notes-qwen3-8b-fp8-tp1-24gb")
    plan = _log_plan(p)
    assert plan.kv_capacity_tokens(plan.model.max_position_embeddings) == pytest.approx(p["kv_cache_tokens"], rel=0.01)


def test_kv_tokens_from_kv_bytes_match_vllm() -> None:
    """Qwen3-235B-A22B at TP 4: vLLM put 178,880 tokens in 8.11 GiB (issue 21348)."""
    p = next(p for p in PROFILES if p["id"] == "vllm-21348-qwen3-235b-fp8-tp4")
    plan = _plan("qwen3-235b-a22b", tp=4)
    tokens = p["kv_cache_gib"] * GIB / plan.block_bytes * plan.engine.block_size
    assert tokens == pytest.approx(p["kv_cache_tokens"], rel=0.02)


@pytest.mark.parametrize("version,label", [("0.6.6", "0.6.5-0.6.x"), ("0.10.2", "0.10.2"), ("0.11.0", "0.11-0.16"),
                                           ("0.16.1", "0.11-0.16"),
                                           ("0.19", "0.17-0.19"), ("v0.19.1rc1", "0.17-0.19"), ("0.20.1", "0.20-0.21"),
                                           ("0.27.1", "0.27"), ("0.33.0", "0.29-0.33")])
def test_version_picks_its_rule(version: str, label: str) -> None:
    assert label in vllm_rule(version).label


def test_vllm_0_10_2_plans_as_0_11_at_tp_1_and_by_interconnect_past_it() -> None:
    """0.10.2's memory code is 0.11.0's but for where it takes the baseline (before NCCL starts): the same
    plan at TP 1; at TP > 1 NCCL's start-up memory falls inside the budget, as two public 0.10.2 logs measured
    it: 1.38 GiB at TP 2 over NVLink (two H200s), 0.21 GiB at TP 8 over PCIe (eight L40S)."""
    old, new = _plan("llama-3-8b", vllm_version="0.10.2"), _plan("llama-3-8b", vllm_version="0.11.0")
    assert (old.num_gpu_blocks, old.activation_peak_bytes) == (new.num_gpu_blocks, new.activation_peak_bytes)
    nvlink = next(p for p in PROFILES if p["id"] == "vllm0102-h200-qwen3-next-tp2")
    pcie = next(p for p in PROFILES if p["id"] == "vllm0102-l40s-qwen3-235b-fp8-tp8-ep")
    for p in (nvlink, pcie):
        plan = _plan("qwen3-32b", p["hardware"], tp=p["tp"], vllm_version="0.10.2")
        assert plan.non_torch_bytes / GIB == pytest.approx(p["non_torch_gib"], abs=0.005)
    # NVLink grows by the per-rank part past TP 2 (borrowed from the 0.17 rule); PCIe does not
    at = {(gpu, tp): _plan("qwen3-32b", gpu, tp=tp, vllm_version="0.10.2").non_torch_bytes
          for gpu in ("h200-sxm", "l40s") for tp in (2, 8)}
    assert at["h200-sxm", 8] - at["h200-sxm", 2] == pytest.approx(6 * vllm_rule("0.19").non_torch_extra_per_rank_bytes)
    assert at["l40s", 8] == at["l40s", 2]


def test_a_rule_without_measured_tp_growth_refuses_more_ranks() -> None:
    """A version range whose growth over the baseline at TP > 1 is not measured plans TP 1 and refuses TP 2,
    naming the version."""
    rule = replace(vllm_rule("0.10.2"), non_torch_extra_bytes=None, non_torch_extra_pcie_bytes=None)
    assert rule.non_torch(1, load_hardware("h100-sxm")) == vllm_rule("0.10.2").non_torch_bytes
    with pytest.raises(KvsimError, match="TP > 1 is not modelled") as err:
        rule.non_torch(2, load_hardware("h100-sxm"))
    assert (err.value.field, err.value.value) == ("vllm_version", "0.10.2")


@pytest.mark.parametrize("version", ["0.8.5", "0.10.1", "0.5.4", "1.0.0", "latest"])
def test_unmodelled_version_is_an_error(version: str) -> None:
    with pytest.raises(KvsimError, match="vllm_version"):
        EngineMemoryConfig(vllm_version=version)


def test_sampler_peak_by_version() -> None:
    """Qwen3-8B on an H100, 256 rows x 151,936 vocabulary: the sort-based sampler (0.11-0.16) holds 38 B per
    logit, the Triton one (0.17+) 14 B and its kernel's buffer of 132 rows (one per SM); both hold the
    profile's 2048 x 4096 bf16 hidden states, the 256 sampled rows twice (gathered, then rand_like) and
    PyTorch's 32 MiB Hopper cuBLAS workspace."""
    base = dict(max_num_batched_tokens=2048, max_num_seqs=256)
    rows_vocab, hidden, rows, workspace = 256 * 151_936, 2048 * 4096 * 2, 2 * 256 * 4096 * 2, 32 * 2**20
    assert _plan("qwen3-8b", vllm_version="0.11", **base).activation_peak_bytes == \
        rows_vocab * 38 + hidden + rows + workspace
    assert _plan("qwen3-8b", vllm_version="0.19", **base).activation_peak_bytes == \
        rows_vocab * 14 + 132 * 151_936 * 4 + hidden + rows + workspace


def _measured_sampler_rows(sampler: str) -> list[dict]:
    import csv

    rows = csv.DictReader((ROOT / "validation/results/h100-sxm/sampler_peak.csv").read_text().splitlines())
    return [r for r in rows if r["sampler"].split()[0] == sampler]


def test_the_native_sort_samplers_bytes_per_logit_are_measured() -> None:
    """The 0.10.2-0.16 rules' 36 B per logit (derived from vLLM's sampler and torch's sort) is what the
    sampler's dummy run holds on an H100 (validation/sampler_peak.py, runs h100-call22 and h100-call23 on two
    cards: 256 and 1,024 rows of three vocabularies, 36.02-36.06 B, the same bytes on both)."""
    rows = _measured_sampler_rows("native")
    assert len(rows) == 12 and {r["run"] for r in rows} == {"h100-call22", "h100-call23"}
    for version in ("0.10.2", "0.11.0", "0.16.1"):
        for r in rows:
            assert float(r["per_logit"]) == pytest.approx(vllm_rule(version).sampler_bytes_per_logit, abs=0.1)


def test_flashinfers_sampler_bytes_per_logit_are_measured() -> None:
    """FlashInfer's 12 B per logit (derived from flashinfer/sampling.py) is what its top_k_top_p_sampling_from_logits
    holds when called as vLLM's V1 sampler calls it (FlashInfer 0.5.3 on an H100, run h100-call23: 12.00-12.07 B at
    the same 6 points)."""
    rows = _measured_sampler_rows("flashinfer")
    assert len(rows) == 6
    for r in rows:
        assert float(r["per_logit"]) == pytest.approx(FLASHINFER_SAMPLER_BYTES_PER_LOGIT, abs=0.1)


def test_flashinfer_sampler_holds_12_bytes_a_logit_and_no_triton_buffer() -> None:
    """engine.sampler flashinfer (vLLM 0.10.2-0.11 wherever FlashInfer is installed, 0.12+ opted in):
    FlashInfer's top-k/top-p dummy run holds 12 B per logit plus the bf16 logits, under 0.11 and 0.19
    alike (no Triton row buffer); vLLM 0.6.x's V0 engine refuses it, naming the field."""
    base = dict(max_num_batched_tokens=2048, max_num_seqs=256, sampler="flashinfer")
    rows_vocab, hidden, rows, workspace = 256 * 151_936, 2048 * 4096 * 2, 2 * 256 * 4096 * 2, 32 * 2**20
    for version in ("0.11", "0.19"):
        assert _plan("qwen3-8b", vllm_version=version, **base).activation_peak_bytes == \
            rows_vocab * 14 + hidden + rows + workspace
    with pytest.raises(KvsimError, match="V1 engine") as err:
        EngineMemoryConfig(vllm_version="0.6.5", sampler="flashinfer")
    assert err.value.field == "sampler"
    with pytest.raises(KvsimError, match="native, flashinfer"):
        EngineMemoryConfig(sampler="triton")


@pytest.mark.parametrize("version,model,charged", [
    ("0.21.0", "llama-3.1-8b", True),       # every model on the V1 runner
    ("0.22.0", "llama-3.1-8b", False),      # dense, unquantized: V2, whose estimate is 0
    ("0.22.0", "qwen3-30b-a3b", True),      # MoE: V1
    ("0.24.0", "llama-3.1-8b", False),      # LlamaForCausalLM is on 0.24's V2 list
    ("0.24.0", "qwen2.5-7b", True),         # Qwen2ForCausalLM is not
    ("0.24.0", "deepseek-v2-lite", False),  # a listed MoE architecture
    ("0.27.1", "qwen2.5-7b", False),        # dense: V2
    ("0.27.1", "qwen3-30b-a3b", True),      # Qwen3MoeForCausalLM is not listed: V1
    ("0.27.1", "deepseek-v2-lite", False),
    ("0.29.0", "llama-3.1-8b", True),       # the V2 runner measures its graphs too
])
def test_graph_charge_follows_the_model_runner_vllm_picks(version: str, model: str, charged: bool) -> None:
    """From 0.20 vLLM subtracts its model runner's CUDA-graph estimate; the V2 runner's is 0 up to 0.28,
    and which models run V2 by default changed release by release (kvsim/data/vllm_memory.yaml)."""
    plan = _plan(model, vllm_version=version, cuda_graph_bytes=GIB, max_num_seqs=64)
    assert plan.cuda_graph_bytes == (GIB if charged else 0)
    if not charged:  # nothing measured is needed
        assert _plan(model, vllm_version=version, max_num_seqs=64).cuda_graph_bytes == 0


def test_quantized_checkpoints_run_v1_in_0_22_but_load_time_quantization_does_not() -> None:
    """0.22-0.23 keep a checkpoint with a quantization_config on the V1 runner (ModelConfig.is_quantized);
    a bf16 checkpoint quantized as it loads has none."""
    engine = EngineMemoryConfig(vllm_version="0.22.0", cuda_graph_bytes=GIB)
    m = load_model("llama-3.1-8b")
    online = with_weights(m, "fp8")
    checkpoint = replace(m, weight_quant=WeightQuantSpec("linear", 8.0, "fp8"))
    assert engine.graph_bytes(online) == 0 and engine.graph_bytes(checkpoint) == GIB
    assert engine.graph_bytes(with_weights(checkpoint, "int4")) == GIB  # still a quantized checkpoint


def test_a_model_without_its_architecture_is_an_error_where_the_runner_depends_on_it() -> None:
    m = replace(load_model("llama-3.1-8b"), architecture=None)
    with pytest.raises(KvsimError, match="architecture"):
        EngineMemoryConfig(vllm_version="0.24.0", cuda_graph_bytes=GIB).graph_bytes(m)
    assert EngineMemoryConfig(vllm_version="0.25.0").graph_bytes(m) == 0  # dense: V2 whatever its class
    moe = replace(load_model("qwen3-30b-a3b"), architecture=None)
    with pytest.raises(KvsimError, match="architecture"):
        EngineMemoryConfig(vllm_version="0.25.0", cuda_graph_bytes=GIB).graph_bytes(moe)


def test_graphs_charged_from_0_20() -> None:
    with pytest.raises(KvsimError, match="cuda_graph_gib"):
        _plan("llama-3-8b", vllm_version="0.20.0")
    eager = _plan("llama-3-8b", vllm_version="0.20.0", enforce_eager=True)
    charged = _plan("llama-3-8b", vllm_version="0.20.0", cuda_graph_bytes=GIB)
    assert eager.kv_cache_bytes - charged.kv_cache_bytes == GIB
    assert _plan("llama-3-8b", vllm_version="0.19", cuda_graph_bytes=GIB).cuda_graph_bytes == 0


def test_issue_11_24gb_card_kv_pool() -> None:
    """Qwen3-8B bf16 on an RTX 4090 (24,081 MiB as CUDA reports it), vLLM 0.19 `vllm serve` defaults on a
    < 70 GiB card (2048 tokens, 256 sequences): the old fitted rule charged 1.79 GiB non-torch + 10 fp32
    copies of the logits (1.45 GiB) besides the weights; the 0.19 rule charges 0.245 GiB non-torch (its
    H100 measurement) + 14 B per logit + the Triton kernel's 128 rows (128 SMs) + the hidden states and
    sampled rows + PyTorch's 8.125 MiB cuBLAS workspace (not Hopper) = 0.84 GiB."""
    plan = _plan("qwen3-8b", "rtx-4090", max_num_batched_tokens=2048, max_num_seqs=256, vllm_version="0.19")
    assert plan.hardware.memory_bytes == 24_081 * 2**20
    charged = (256 * 151_936 * 14 + 128 * 151_936 * 4 + 2048 * 4096 * 2 + 2 * 256 * 4096 * 2
               + 4096 * 1024 * 2 + 16 * 1024 * 8 + round(0.245 * GIB))
    assert plan.activation_peak_bytes + plan.non_torch_bytes == pytest.approx(charged)


def test_tp_replicates_kv_heads_when_fewer_than_ranks() -> None:
    one, eight = _plan("qwen2.5-7b"), _plan("qwen2.5-7b", tp=4)  # 4 KV heads
    assert eight.block_bytes == one.block_bytes / 4
    rep = _plan("qwen2.5-7b", tp=4).layout.gpu_bytes(1, tp=4)[0]
    assert rep == 57_344 / 4
    with pytest.raises(KvsimError, match="attention heads"):
        _plan("qwen2.5-7b", tp=8)  # 28 heads


def test_mla_latent_is_replicated_on_every_rank() -> None:
    plan = _plan("deepseek-v2-lite", tp=2)
    assert plan.layout.gpu_bytes(1, tp=2)[0] == 31_104


def test_does_not_fit_says_why() -> None:
    plan = _plan("llama-3.1-405b")
    assert not plan.fits and plan.num_gpu_blocks == 0
    assert "does not fit: weights" in plan.reason and "GiB" in plan.reason
    assert plan.max_context(1) == 0 and plan.max_concurrency(1000)[0] == 0


def test_capacity_numbers_are_consistent() -> None:
    plan = _plan("llama-3-8b")
    assert plan.num_gpu_blocks == int(plan.kv_cache_bytes // (16 * 131_072))
    assert plan.max_concurrency(8192)[0] == plan.num_gpu_blocks // 512
    big = plan.max_context(64)
    assert 64 * plan.blocks_for(big)[0] <= plan.num_gpu_blocks < 64 * plan.blocks_for(big + 16)[0]


def test_sliding_window_pages() -> None:
    """A sliding layer that has slid holds its window plus one page (the window is not page-aligned)."""
    plan = _plan("mistral-7b")
    assert plan.blocks_for(100_000)[0] == 4096 // 16 + 1


@settings(max_examples=examples(40))
@given(util=st.floats(0.3, 1.0), bs=st.sampled_from([8, 16, 32]), ctx=st.integers(1, 8192),
       method=st.sampled_from(["bf16", "fp8", "kivi:bits=2", "snapkv:budget=512", "cla:factor=2"]),
       version=st.sampled_from(["0.10.2", "0.11.0", "0.19"]), sampler=st.sampled_from(["native", "flashinfer"]),
       tp=st.sampled_from([1, 2, 4, 8]), gpu=st.sampled_from(["h100-sxm", "l40s"]))
def test_planner_properties(util: float, bs: int, ctx: int, method: str, version: str, sampler: str, tp: int,
                            gpu: str) -> None:
    engine = dict(gpu_memory_utilization=util, block_size=bs, vllm_version=version)
    plan = _plan("llama-3-8b", gpu, method=method, tp=tp, sampler=sampler, **engine)
    # more ranks never shrink the memory outside torch (NCCL's buffers only add to it), over NVLink or PCIe
    assert plan.non_torch_bytes >= _plan("llama-3-8b", gpu, tp=1, **engine).non_torch_bytes
    used = plan.weights.total + plan.activation_peak_bytes + plan.non_torch_bytes + plan.kv_cache_bytes
    assert used == pytest.approx(plan.budget_bytes)
    n = int(plan.max_concurrency(ctx)[0])
    assert n * plan.blocks_for(ctx)[0] <= plan.num_gpu_blocks
    assert (n + 1) * plan.blocks_for(ctx)[0] > plan.num_gpu_blocks
    more = _plan("llama-3-8b", gpu, method=method, tp=tp, sampler=sampler,
                 **{**engine, "gpu_memory_utilization": min(1.0, util + 0.05)})
    assert more.num_gpu_blocks >= plan.num_gpu_blocks
    # FlashInfer's sampler never holds more than the native one, so never leaves less KV cache
    assert _plan("llama-3-8b", gpu, method=method, tp=tp, sampler="flashinfer", **engine).num_gpu_blocks >= \
        _plan("llama-3-8b", gpu, method=method, tp=tp, **engine).num_gpu_blocks


@pytest.mark.parametrize(("gpu", "tp", "version", "basis"), [
    ("h100-sxm", 1, "0.19", "TP 1 growth"),
    ("h100-sxm", 2, "0.19", "growth at TP > 1 over NVLink"),
    ("l40s", 4, "0.10.2", "growth at TP > 1 over PCIe"),  # the 0.10.2 rule measured PCIe (eight L40S)
    ("l40s", 4, "0.11.0", "growth at TP > 1 measured over NVLink, not on PCIe (a PCIe group may hold less or"),
    ("rtx-4090", 2, "0.19", "growth at TP > 1 measured over NVLink, not on PCIe (without peer access NCCL keeps"),
    ("rtx-pro-6000", 2, "0.19", "growth at TP > 1 measured over NVLink, not on PCIe (with peer access NCCL's buffers"),
])
def test_memory_says_which_non_torch_growth_it_used(capsys, gpu: str, tp: int, version: str, basis: str) -> None:
    """A figure measured over NVLink and applied to a PCIe group is labelled so, in the JSON and the table, with
    which way the GPU's peer access (catalogue peer_to_peer) likely moves it."""
    import json

    args = ["memory", "--model", "llama-3.1-8b", "--hardware", gpu, "--tp", str(tp), "--vllm-version", version]
    main([*args, "--json"])
    assert json.loads(capsys.readouterr().out)["non_torch_basis"].startswith(basis)
    main(args)
    assert f"(non-torch: the rule's {basis}" in capsys.readouterr().out


def test_cli_memory_json(capsys) -> None:
    main(["memory", "--model", "llama-3-8b", "--hardware", "h100-sxm", "--context", "8192", "--batch", "32",
          "--json"])
    import json

    r = json.loads(capsys.readouterr().out)
    for key in ("kv_bytes_per_token", "weight_bytes", "activation_peak_bytes", "kv_cache_bytes",
                "num_gpu_blocks", "max_concurrency", "max_context", "fits"):
        assert key in r
    assert r["kv_bytes_per_token"] == 131_072 and r["fits"] is True


@pytest.mark.parametrize("argv,match", [
    (["--gpu-memory-utilization", "0"], "gpu_memory_utilization=0.0"),
    (["--block-size", "0"], "--block-size=0"), (["--tp", "5"], "tp=5"),
    (["--method", "kivi:bits=x"], "method.kivi.bits"), (["--hardware", "h100"], "did you mean"),
])
def test_cli_bad_input_is_one_line_exit_2(capsys, argv: list[str], match: str) -> None:
    base = ["memory", "--model", "llama-3-8b", "--hardware", "h100-sxm"]
    args = base + argv
    if "--hardware" in argv:
        args = ["memory", "--model", "llama-3-8b"] + argv
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and "Traceback" not in err


def test_capacity_plot(tmp_path) -> None:
    out = tmp_path / "cap.png"
    main(["plot", "capacity", "--model", "llama-3-8b", "--hardware", "h100-sxm", "--methods", "bf16,fp8",
          "--contexts", "512,4096,8192", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".cap.png.*")), "no temporary file left behind"


def test_fine_grained_moe_profiling_peak_holds_the_hidden_width_per_routed_token() -> None:
    """vLLM's fused MoE keeps M x top_k x max(N, K) + M x top_k x N/2 elements (fused_experts_impl): for
    Qwen3-235B at TP 4 (N = 2 x 1536 / 4 = 768 < K = 4096) that is 8 x (4096 + 384) per token, beside the
    residual and normed hidden states. (A public vLLM 0.27.1 log of this model at TP 4 printed a 0.76 GiB
    peak; kvsim's gate_up-only cache gave 0.27.)"""
    workspace = 32 * 2**20  # PyTorch's Hopper cuBLAS workspace
    old = dict(max_num_batched_tokens=8192, max_num_seqs=32, vllm_version="0.16.0")  # before the workspace manager
    plan = _plan("qwen3-235b-a22b", tp=4, **old)
    assert plan.activation_peak_bytes == 8192 * 2 * (2 * 4096 + 8 * (4096 + 384)) + workspace
    # coarse experts (N > K) keep the gate_up width: Mixtral's 1.5 x N per routed token
    mixtral = _plan("mixtral-8x7b", tp=2, **old)
    assert mixtral.activation_peak_bytes == 8192 * 2 * (2 * 4096 + 2 * 1.5 * 14336) + workspace


def test_vllm_0_19_keeps_the_moe_workspace_through_the_sampler_run() -> None:
    """0.17-0.19 run bf16 and FP8 MoE on the modular kernel, whose workspaces vLLM's WorkspaceManager
    keeps: the peak is them plus the larger of the rest of the forward pass and the sampler run.
    Qwen3-235B at TP 4, 32 sequences: TritonExperts' M x top_k x (max(N/2, K) + max(N, K)) = 1 GiB + the
    forward's residual, normed hidden and attention outputs (2,304 + 4,096 wide) + the cuBLAS workspace,
    for bf16 and for dynamic or block FP8 experts on Hopper; ModelOpt's static FP8 experts run
    FlashInferExperts (M x K); weight-only experts, and FP8 experts on a GPU whose FP8 path was not
    read, free fused_experts_impl's caches after each layer (beside the residual and normed hidden)."""
    cfg = EngineMemoryConfig(max_num_batched_tokens=8192, max_num_seqs=32, vllm_version="0.19")
    rest = 8192 * 2 * (2 * 4096 + 2304 + 4096) + 32 * 2**20
    triton = 8192 * 8 * 2 * (4096 + 4096)
    base = load_model("qwen3-235b-a22b")

    def peak(weight_quant: WeightQuantSpec | None, gpu: str = "h100-sxm") -> float:
        m = replace(base, weight_quant=weight_quant)
        return plan_memory(m, load_hardware(gpu), layout_for(m), 4, cfg).activation_peak_bytes

    assert peak(None) == triton + rest
    assert peak(WeightQuantSpec("linear", 8.0, "fp8")) == triton + rest
    assert peak(WeightQuantSpec("linear", 8.0, "fp8", needs_native_fp8=True)) == 8192 * 4096 * 2 + rest
    freed = 8192 * 2 * (2 * 4096 + 8 * (4096 + 384)) + 32 * 2**20
    assert peak(WeightQuantSpec("linear", 4.25, "int4", weight_only=True)) == freed
    assert peak(WeightQuantSpec("linear", 8.0, "fp8"), "a100-sxm-80gb") < triton < peak(None, "a100-sxm-80gb")


def test_kvsim_memory_names_the_moe_workspace_it_keeps(capsys: pytest.CaptureFixture[str]) -> None:
    """``kvsim memory`` says how much of the activation peak a MoE kernel's workspace holds, and which
    kernel: Qwen3-235B FP8 at TP 4 on H100 keeps TritonExperts' 1 GiB; a dense model keeps none."""
    main(["memory", "--model", "qwen3-235b-a22b", "--hardware", "h100-sxm", "--tp", "4", "--weights", "fp8",
          "--json"])
    r = json.loads(capsys.readouterr().out)
    assert (r["moe_experts_kernel"], r["moe_workspace_bytes"]) == ("triton", 8192 * 8 * 2 * (4096 + 4096))
    assert r["moe_workspace_bytes"] < r["activation_peak_bytes"]
    main(["memory", "--model", "llama-3-8b", "--hardware", "h100-sxm"])
    assert "MoE experts' workspace" not in capsys.readouterr().out
