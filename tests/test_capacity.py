"""The vectorized capacity grid and the memory planner are one planner: the same answer everywhere."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import examples
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvsim.capacity import capacity_grid
from kvsim.errors import KvsimError
from kvsim.kv import METHODS, layout_for
from kvsim.memory import GIB, EngineMemoryConfig, plan_memory
from kvsim.spec.hardware import hardware_names, load_hardware
from kvsim.spec.linears import check_tp
from kvsim.spec.model import load_model, model_names

CONTEXTS = [1, 100, 4096, 32_768, 200_000]


def test_engine_overheads_count_in_the_grid() -> None:
    """The grid once ignored non-torch memory and CUDA graphs (53 sequences of 8k tokens of
    Llama-3-8B on an H100 where plan_memory gave fewer): it must agree with plan_memory under a
    rule with a large non-torch term (vLLM 0.6.5: 1.79 GiB) and one that charges CUDA graphs (0.20)."""
    m, h = load_model("llama-3-8b"), load_hardware("h100-sxm")
    engines = (EngineMemoryConfig(vllm_version="0.6.5"),
               EngineMemoryConfig(vllm_version="0.20.0", cuda_graph_bytes=2 * GIB), EngineMemoryConfig())
    got = []
    for engine in engines:
        grid = capacity_grid([m], ["bf16"], [h], [8192], engine=engine)
        got.append(grid.max_concurrency[0, 0, 0, 0])
        assert got[-1] == plan_memory(m, h, layout_for(m), 1, engine).max_concurrency(8192)[0]
    assert got[0] < got[2] and got[1] < got[2]  # 1.79 GiB of non-torch, 2 GiB of graphs: fewer sequences


def test_each_gpu_of_one_grid_gets_its_own_profiling_peak() -> None:
    """The profiling peak depends on the GPU (the Triton sampler buffer's SMs, the cuBLAS workspace):
    a grid over every catalogue GPU agrees with plan_memory on each of them."""
    m = load_model("llama-3.1-8b")
    gpus = [load_hardware(n) for n in hardware_names()]
    grid = capacity_grid([m], ["bf16", "kivi:bits=2"], gpus, CONTEXTS)
    for j, method in enumerate(("bf16", "kivi:bits=2")):
        for g, hw in enumerate(gpus):
            plan = plan_memory(m, hw, layout_for(m, method), 1, None)
            assert np.array_equal(grid.max_concurrency[0, j, g], plan.max_concurrency(np.array(CONTEXTS))), hw.name


@settings(max_examples=examples(40))
@given(model=st.sampled_from(model_names()), method=st.sampled_from([m.example for m in METHODS.values()]),
       gpu=st.sampled_from(hardware_names()), tp=st.sampled_from([1, 2, 4, 8]),
       util=st.floats(0.3, 1.0), block_size=st.sampled_from([1, 8, 16, 32, 128]),
       batched=st.integers(256, 65_536), seqs=st.integers(1, 1024),
       version=st.sampled_from(["0.6.5", "0.11.0", "0.17.0", "0.20.0"]), graphs_gib=st.floats(0.0, 4.0))
def test_grid_equals_the_planner(model: str, method: str, gpu: str, tp: int, util: float, block_size: int,
                                 batched: int, seqs: int, version: str, graphs_gib: float) -> None:
    m, hw = load_model(model), load_hardware(gpu)
    try:
        check_tp(m, tp)
        layout = layout_for(m, method)
    except KvsimError:
        assume(False)
    engine = EngineMemoryConfig(util, block_size, batched, seqs, vllm_version=version,
                                cuda_graph_bytes=graphs_gib * GIB)
    grid = capacity_grid([m], [method], [hw], CONTEXTS, tp, engine)
    plan = plan_memory(m, hw, layout, tp, engine)
    assert np.array_equal(grid.max_concurrency[0, 0, 0], plan.max_concurrency(np.array(CONTEXTS)))


def test_capacity_tokens_are_what_the_method_holds() -> None:
    """kvsim memory printed 436,624 tokens for every method on Llama-3.1-8B / H100 (the 16-bit pages
    times 16): SnapKV at 32k context holds 6.93 M context tokens, 2-bit KIVI 2.29 M."""
    m, h = load_model("llama-3.1-8b"), load_hardware("h100-sxm")
    ctx = 32_768
    v065 = EngineMemoryConfig(vllm_version="0.6.5")  # the memory rule the figures were read under
    bf16 = plan_memory(m, h, layout_for(m), 1, v065)
    assert bf16.kv_capacity_tokens(ctx) == bf16.num_gpu_blocks * 16
    for spec in ("kivi:bits=2", "snapkv:budget=2048", "streamingllm:window=2044"):
        plan = plan_memory(m, h, layout_for(m, spec), 1, v065)
        per_token = float(plan.seq_gpu_bytes(ctx)[0]) / ctx  # paged GPU bytes a context token costs
        assert plan.kv_capacity_tokens(ctx) == pytest.approx(plan.kv_cache_bytes / per_token, rel=0.01)
        assert plan.kv_capacity_tokens(ctx) >= plan.max_concurrency(ctx)[0] * ctx
    snap = plan_memory(m, h, layout_for(m, "snapkv:budget=2048"), 1, v065).kv_capacity_tokens(ctx)
    assert snap == pytest.approx(6.93e6, rel=0.01)


def test_host_memory_bounds_an_offload_plan() -> None:
    """A 128k-context offload plan of Llama-3.1-8B on an H100 'fitted' 106 sequences, 1.76 TB of
    host memory, on a DGX H100 whose 2 TB serve 8 GPUs: 250 GB per GPU hold 15 sequences of
    15.5 GiB of host KV each, and the plan says the host binds."""
    m, h = load_model("llama-3.1-8b"), load_hardware("h100-sxm")
    ctx = 131_072
    v065 = EngineMemoryConfig(vllm_version="0.6.5")  # the memory rule the 106 was read under
    plan = plan_memory(m, h, layout_for(m, "offload:gpu_tokens=4096"), 1, v065)
    host_per_seq = (ctx - 4096) * 131_072
    assert plan.offload_budget_bytes["host"] == 2e12 / 8
    assert plan.concurrency_by_tier(ctx)["gpu"][0] == 106
    assert plan.max_concurrency(ctx)[0] == int(2e12 / 8 // host_per_seq) == 15
    assert plan.binding_tier(ctx) == "host"
    assert plan.kv_capacity_tokens(ctx) == int(2e12 / 8 / host_per_seq * ctx)
    assert plan.max_context(15) == ctx and plan.max_context(16) < ctx
    grid = capacity_grid([m], ["offload:gpu_tokens=4096"], [h], [ctx], engine=v065)
    assert grid.max_concurrency[0, 0, 0, 0] == 15


def test_nvme_tier_without_a_disk_size_is_refused() -> None:
    from dataclasses import replace

    m, h = load_model("llama-3.1-8b"), load_hardware("h100-sxm")
    layout = layout_for(m)
    on_ssd = layout.with_layers([replace(layer, streams=tuple(replace(s, tier="ssd", gpu_recent_tokens=16)
                                                              for s in layer.streams)) for layer in layout.layers])
    plan = plan_memory(m, h, on_ssd, 1)
    per_seq = (100_000 - 16) * 131_072
    assert plan.max_concurrency(100_000)[0] == int(30.72e12 / 8 // per_seq)  # DGX H100: 8x 3.84 TB NVMe
    assert plan.binding_tier(100_000) == "ssd"
    no_disk = replace(h, host=replace(h.host, nvme_bytes=None))
    with pytest.raises(KvsimError, match="host.nvme_bytes"):
        plan_memory(m, no_disk, on_ssd, 1).max_concurrency(1000)
