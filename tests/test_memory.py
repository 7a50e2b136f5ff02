"""Memory planner: vLLM's published profiling results, invariants, and property tests."""

from __future__ import annotations

import pytest
import yaml
from conftest import ROOT, examples
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsim.cli import main
from kvsim.errors import KvsimError
from kvsim.kv import layout_for
from kvsim.memory import GIB, EngineMemoryConfig, plan_memory
from kvsim.spec.hardware import load_hardware
from kvsim.spec.model import load_model

PROFILES = yaml.safe_load((ROOT / "validation/reference/vllm_memory_profiles.yaml").read_text())["profiles"]


def _plan(model: str, hw: str = "h100-sxm", method: str = "bf16", tp: int = 1, **engine):
    m = load_model(model)
    return plan_memory(m, load_hardware(hw), layout_for(m, method), tp, EngineMemoryConfig(**engine))


@pytest.mark.parametrize("p", [p for p in PROFILES if "weights_gib" in p], ids=lambda p: p["id"])
def test_reproduces_vllm_profiling_logs(p: dict) -> None:
    """Weights and activation peak as vLLM measured them (GiB printed to 2 decimals). The TP-1 log
    is the point the engine overheads were fitted on; TP 2 was not."""
    plan = _plan(p["model"], p["hardware"], tp=p["tp"], gpu_memory_utilization=p["gpu_memory_utilization"],
                 max_num_batched_tokens=p["max_num_batched_tokens"], max_num_seqs=p["max_num_seqs"])
    assert plan.weights.total / GIB == pytest.approx(p["weights_gib"], abs=0.01)
    assert plan.activation_peak_bytes / GIB == pytest.approx(p["activation_peak_gib"], rel=0.05)
    assert plan.non_torch_bytes / GIB == pytest.approx(p["non_torch_gib"], abs=0.01)
    if p["kv_cache_gib"] is not None:
        # vLLM's total was 79.22 GiB on that driver; the catalogue's device total is 79.19 GiB
        assert plan.kv_cache_bytes / GIB == pytest.approx(p["kv_cache_gib"], rel=0.005)


def test_kv_tokens_from_kv_bytes_match_vllm() -> None:
    """Qwen3-235B-A22B at TP 4: vLLM put 178,880 tokens in 8.11 GiB (issue 21348)."""
    p = next(p for p in PROFILES if p["id"] == "vllm-21348-qwen3-235b-fp8-tp4")
    plan = _plan("qwen3-235b-a22b", tp=4)
    tokens = p["kv_cache_gib"] * GIB / plan.block_bytes * plan.engine.block_size
    assert tokens == pytest.approx(p["kv_cache_tokens"], rel=0.02)


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
       method=st.sampled_from(["bf16", "fp8", "kivi:bits=2", "snapkv:budget=512", "cla:factor=2"]))
def test_planner_properties(util: float, bs: int, ctx: int, method: str) -> None:
    plan = _plan("llama-3-8b", method=method, gpu_memory_utilization=util, block_size=bs)
    used = plan.weights.total + plan.activation_peak_bytes + plan.non_torch_bytes + plan.kv_cache_bytes
    assert used == pytest.approx(plan.budget_bytes)
    n = int(plan.max_concurrency(ctx)[0])
    assert n * plan.blocks_for(ctx)[0] <= plan.num_gpu_blocks
    assert (n + 1) * plan.blocks_for(ctx)[0] > plan.num_gpu_blocks
    more = _plan("llama-3-8b", method=method, gpu_memory_utilization=min(1.0, util + 0.05), block_size=bs)
    assert more.num_gpu_blocks >= plan.num_gpu_blocks


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
          "--contexts", "512,4096,32768", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".cap.png.*")), "no temporary file left behind"
