"""MoE data-parallel attention and expert parallelism (vLLM --data-parallel-size,
--enable-expert-parallel): weights and KV per GPU by hand, the per-rank step's MoE terms, the DP
load balancer, lockstep ranks, and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from kvsim.cli import main
from kvsim.cost import Batch, CostModel
from kvsim.errors import KvsimError
from kvsim.kv import METHODS, layout_for
from kvsim.memory import EngineMemoryConfig, plan_memory
from kvsim.scenario import scenario_from_dict
from kvsim.scenario.run import run_scenario, simulation
from kvsim.serve.dp import DPGroup
from kvsim.serve.router import dp_rank
from kvsim.spec.hardware import load_hardware
from kvsim.spec.model import load_model
from kvsim.spec.parallel import SINGLE, Parallel, max_rank_load

H100 = load_hardware("h100-sxm")
QWEN = load_model("qwen3-30b-a3b")  # 48 layers, hidden 2048, 128 experts of width 768, top 8, 4 KV heads of 128
EP4 = Parallel(4, True)
DP4 = Parallel(4, False)

# Qwen3-30B-A3B's routed experts, per layer: gate_up 2048 x (2 x 768) + down 768 x 2048
EXPERT_PARAMS = 2048 * 1536 + 768 * 2048  # 4,718,592
ALL_EXPERTS_BYTES = 128 * EXPERT_PARAMS * 48 * 2  # bf16: 57,982,058,496 B = 54.0 GiB


def plan(par: Parallel = SINGLE, tp: int = 1, model=QWEN):
    engine = EngineMemoryConfig(max_num_batched_tokens=8192, max_num_seqs=256)  # the figures below assume these
    return plan_memory(model, H100, layout_for(model), tp, engine, par)


# ---------------------------------------------------------------- memory

def test_routed_experts_per_gpu_by_hand() -> None:
    assert plan().weights.experts == ALL_EXPERTS_BYTES
    # EP over 4 DP ranks x TP 1: 128 / 4 = 32 whole experts per GPU
    assert plan(EP4).weights.experts == 32 * EXPERT_PARAMS * 48 * 2 == 14_495_514_624
    # DP 4 without EP: all 128 experts, each split 4 ways (768 / 4 = 192): the same bytes
    assert plan(DP4).weights.experts == 128 * (2048 * 384 + 192 * 2048) * 48 * 2 == 14_495_514_624
    # EP over 3 x 1 GPUs: vLLM's determine_expert_map gives the first 128 % 3 = 2 ranks 43 experts
    assert plan(Parallel(3, True)).weights.experts == 43 * EXPERT_PARAMS * 48 * 2
    # EP over DP 2 x TP 2 = 4 GPUs: still 32 whole experts; attention is split by the TP 2 only
    two = plan(Parallel(2, True), tp=2)
    assert two.weights.experts == 32 * EXPERT_PARAMS * 48 * 2
    assert two.weights.attention == plan(tp=2).weights.attention


def test_dense_parts_are_replicated_on_every_dp_rank() -> None:
    base, ep = plan().weights, plan(EP4).weights
    for role in ("embedding", "lm_head", "attention", "router", "norms", "buffers"):
        assert getattr(ep, role) == getattr(base, role), role
    assert base.total - ep.total == ALL_EXPERTS_BYTES - 14_495_514_624


def test_kv_per_gpu_and_pool_per_rank() -> None:
    """Each DP rank keeps only its own sequences' KV, its 4 KV heads TP-sharded as usual: 48 layers x
    4 heads x 128 x (K, V) x 2 B = 98,304 B per token on one GPU at TP 1; the GPU memory the experts
    free goes to the rank's KV pool (less the larger profiling transient of gathered tokens)."""
    base, ep = plan(), plan(EP4)
    assert ep.block_bytes == base.block_bytes == 16 * 48 * 4 * 128 * 2 * 2
    # profiling run (vLLM 0.19): 8,192 tokens per rank, gathered from 4 ranks, 8 routed rows each, in the
    # modular MoE kernel's kept workspaces of max(768, 2,048) + max(1,536, 2,048) elements, plus the
    # larger of the rest (here the sampler over 256 rows of 151,936 logits at 14 B, its hidden states and
    # rows, and the Triton kernel's 132 rows of 4 B) and PyTorch's 32 MiB Hopper cuBLAS workspace
    sampler = 256 * 151_936 * 14 + 8192 * 2048 * 2 + 2 * 256 * 2048 * 2 + 132 * 151_936 * 4
    assert ep.activation_peak_bytes == 8192 * 4 * 8 * 2 * (2048 + 2048) + sampler + 32 * 2**20
    freed = (base.weights.total - ep.weights.total) - (ep.activation_peak_bytes - base.activation_peak_bytes)
    assert ep.kv_cache_bytes == pytest.approx(base.kv_cache_bytes + freed, rel=1e-12)
    assert ep.num_gpu_blocks == int(ep.kv_cache_bytes // ep.block_bytes) > 3.8 * base.num_gpu_blocks


# ---------------------------------------------------------------- cost

def cost(par: Parallel = SINGLE, model=QWEN, method: str = "bf16", tp: int = 1) -> CostModel:
    return CostModel(model, H100, layout_for(model, method), tp, "none", None, par)


def op(step, name: str):
    return next(o for o in step.ops if o.name == name)


@pytest.mark.parametrize("par", [DP4, EP4, Parallel(2, True)], ids=["dp4", "dp4-ep", "dp2-ep"])
@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "deepseek-v2-lite", "mixtral-8x7b"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_breakdown_adds_up_under_dp_and_ep(method: str, model: str, par: Parallel) -> None:
    m = load_model(model)
    try:
        c = cost(par, m, METHODS[method].example)
    except KvsimError as err:  # a method that does not apply to this model says so
        assert model in str(err) or "needs" in str(err) or "not" in str(err)
        return
    batch = Batch(prefill_tokens=np.array([300]), prefill_context=np.array([100]),
                  decode_context=np.array([5000, 7000]))
    step = c.step(batch)
    assert {"moe.dispatch", "moe.combine"} <= set(step.breakdown)
    serial = sum(o.seconds for o in step.ops if o.bound != "overlapped")
    hidden = max((o.seconds for o in step.ops if o.bound == "overlapped"), default=0.0)
    assert step.total_s == pytest.approx(max(serial, hidden), rel=1e-12)
    assert c.step_time_s(batch) == step.total_s
    assert c.decode_times_s(np.array([5000, 7000]), 3)[0] == c.step_time_s(Batch(decode_context=np.array([5000, 7000])))


def test_dispatch_and_combine_move_every_ranks_hidden_states() -> None:
    """64 tokens on each of 4 ranks: dispatch gathers 4 x 64 x (2048 x 2 B + 8 x (4 + 4) B) per MoE
    layer, combine reduce-scatters 4 x 64 x 2048 x 2 B; a ring moves 3/4 of it over 3 hops."""
    c = cost(EP4)
    step = c.step(Batch(decode_context=np.full(64, 1000)))
    dispatch, combine = op(step, "moe.dispatch"), op(step, "moe.combine")
    assert dispatch.bytes == 4 * 64 * (2048 * 2 + 64) * 48
    assert combine.bytes == 4 * 64 * 2048 * 2 * 48
    link = H100.nvlink_bandwidth_bytes_per_s
    curve = c.cal.ops["allreduce"]
    _, me = curve.eff(combine.bytes / 48)
    want = 48 * (0.75 * combine.bytes / 48 / (link * me) + 3 * c.cal.ceilings.link_latency_s + curve.floor_s)
    assert combine.seconds == pytest.approx(float(want), rel=1e-12)
    assert "moe.dispatch" not in cost().step(Batch(decode_context=np.full(64, 1000))).breakdown


def test_ep_decode_reads_a_quarter_of_the_experts_and_computes_the_busiest_ranks_share() -> None:
    base = op(cost().step(Batch(decode_context=np.full(256, 1000))), "gemm.experts")
    ep = op(cost(EP4).step(Batch(decode_context=np.full(64, 1000))), "gemm.experts")
    # the same 256 tokens over the group: each rank holds 32 of 128 experts, all of which they touch
    assert ep.bytes < base.bytes / 4 + 4 * 64 * 8 * (2048 + 1536) * 2 * 48 * 1.5
    # FLOPs: the busiest rank's token-expert pairs, mean 256 x 8 / 4 = 512 plus sqrt(2 x 512 x ln 4)
    pairs = 512 + math.sqrt(2 * 512 * math.log(4))
    assert ep.flops == pytest.approx(base.flops / (256 * 8) * pairs, rel=1e-9)


def test_balls_into_bins_load() -> None:
    assert max_rank_load(np.array(100.0), 8, np.array(1e9)) == pytest.approx(100 + math.sqrt(200 * math.log(8)))
    assert max_rank_load(np.array(1.0), 8, np.array(2.0)) == 2.0  # a token brings at most min(k, held) pairs
    assert max_rank_load(np.array(5.0), 1, np.array(9.0)) == 5.0


def test_defaults_are_unchanged() -> None:
    batch = Batch(prefill_tokens=np.array([300]), prefill_context=np.array([0]), decode_context=np.full(8, 900))
    assert CostModel(QWEN, H100, layout_for(QWEN), 2, "none").step(batch) == cost(SINGLE, tp=2).step(batch)


# ---------------------------------------------------------------- simulator

class _Rank:
    def __init__(self, waiting: int, running: int) -> None:
        self.waiting, self.running = [0] * waiting, [0] * running


def test_dp_load_balancer_scores_waiting_four_times_running() -> None:
    assert dp_rank([_Rank(1, 0), _Rank(0, 3), _Rank(0, 5)]) == 1  # scores 4, 3, 5
    assert dp_rank([_Rank(0, 2), _Rank(0, 2)]) == 0  # the first of equals


def _scenario(engine: dict, model: str = "qwen3-30b-a3b", replicas: int = 1) -> dict:
    return {"model": model, "hardware": "h100-sxm", "replicas": replicas, "engine": engine,
            "workload": {"synthetic": {"rate": 60, "num_requests": 120, "input": {"kind": "fixed", "tokens": 700},
                                       "output": {"kind": "fixed", "tokens": 40}}}}


def test_moe_dp_ranks_step_in_lockstep() -> None:
    res = run_scenario(scenario_from_dict(_scenario({"data_parallel_size": 4, "expert_parallel": True}), "t.yaml"),
                       check=True)
    s = res.summary
    assert s["completed"] == 120 and len(s["per_replica"]) == 4
    assert all(r["completed"] >= 25 for r in s["per_replica"])  # the balancer spreads them
    st = res.simulation.recorder.steps
    ends: dict[float, set[float]] = {}
    for start, end in zip(st["start_s"], st["end_s"], strict=True):
        ends.setdefault(start, set()).add(end)
    assert len(ends) > 50 and all(len(e) == 1 for e in ends.values())  # ranks starting together end together
    assert set(st["steps"]) == {1}
    assert s["scenario"]["data_parallel_size"] == 4 and s["scenario"]["expert_parallel"] is True


def test_lockstep_step_is_the_slowest_ranks() -> None:
    sim = simulation(scenario_from_dict(_scenario({"data_parallel_size": 2, "expert_parallel": True}), "t.yaml"))
    assert isinstance(sim.units[0], DPGroup)
    st = run_scenario(scenario_from_dict(_scenario({"data_parallel_size": 2, "expert_parallel": True}), "t.yaml"))
    base = run_scenario(scenario_from_dict(_scenario({}, replicas=2), "t.yaml"))
    assert st.summary["completed"] == base.summary["completed"] == 120


def test_dense_dp_ranks_are_independent_engines() -> None:
    sim = simulation(scenario_from_dict(_scenario({"data_parallel_size": 2}, model="llama-3-8b"), "t.yaml"))
    assert sim.units is sim.replicas and len(sim.replicas) == 2
    assert sim.replicas[0].cfg.fast_forward


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize(("engine", "model", "tp", "field", "words"), [
    ({"expert_parallel": True}, "llama-3-8b", 1, "engine.expert_parallel", "dense model"),
    ({"data_parallel_size": 0}, "qwen3-30b-a3b", 1, "engine.data_parallel_size", "greater than 0"),
    ({"data_parallel_size": 1.5}, "qwen3-30b-a3b", 1, "engine.data_parallel_size", "integer"),
    ({"data_parallel_size": 8}, "qwen3-30b-a3b", 2, "engine.data_parallel_size", "16 GPUs"),
])
def test_bad_parallel_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, engine: dict,
                                                    model: str, tp: int, field: str, words: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**_scenario(engine, model), "tp": tp}))
    with pytest.raises(SystemExit) as e:
        main(["run", str(path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert field in err and str(path) in err and words in err, err


def test_cli_flags(capsys: pytest.CaptureFixture) -> None:
    main(["memory", "--model", "qwen3-30b-a3b", "--hardware", "h100-sxm", "--dp", "4", "--enable-expert-parallel"])
    out = capsys.readouterr().out
    assert "(TP 1, DP 4, expert parallel)" in out and "16.38 GiB" in out
    with pytest.raises(SystemExit) as e:
        main(["predict", "--model", "llama-3-8b", "--hardware", "h100-sxm", "--batch", "1", "--context", "10",
              "--enable-expert-parallel"])
    assert e.value.code == 2 and "dense model" in capsys.readouterr().err
