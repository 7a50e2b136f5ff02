"""Disaggregated prefill/decode serving: known answers (a lone request's prefill, transfer and
decode), the KV bytes that cross the link (fp8 halves them), invariants (no request lost, blocks
never leak on either side, decode instances never preempt), fast-forward equals step-by-step, the
aggregated limit, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsim.cli import main
from kvsim.cost.model import Batch
from kvsim.scenario import apply_override, scenario_from_dict
from kvsim.scenario.run import simulation, summarize, workload
from kvsim.serve.disagg import DisaggSimulation, Link
from kvsim.serve.metrics import COMPLETED, STATUSES, UNFINISHED
from kvsim.serve.workload import ReadStats, Request

WORKLOAD = {"synthetic": {
    "rate": 6.0, "num_requests": 60,
    "input": {"kind": "lognormal", "p50": 500, "p90": 1800, "max_tokens": 5000},
    "output": {"kind": "lognormal", "p50": 60, "p90": 250, "max_tokens": 800},
    "shared_prefix": {"tokens": 512, "num_users": 6, "num_prompts": 2}}}
DISAGG = {"prefill": {"replicas": 1}, "decode": {"replicas": 1},
          "link": {"bandwidth_gbps": 100, "latency_us": 10}}
BASE = {"model": "llama-3-8b", "hardware": "h100-sxm", "workload": WORKLOAD, "disaggregation": DISAGG}
LLAMA_8B_TOKEN_BYTES = 32 * 2 * 8 * 128 * 2  # layers x (K, V) x KV heads x head dim x bf16 bytes


def scenario(**overrides: object):
    raw = BASE
    for key, value in overrides.items():
        raw = apply_override(raw, key.replace("__", "."), value)
    return scenario_from_dict(raw, "test.yaml")


def simulate(sc, stream: list[Request] | None = None, check: bool = True):  # noqa: ANN001, ANN201
    sim = simulation(sc, check=check)
    requests = stream if stream is not None else workload(sc, sim.dep, False, ReadStats())[0]
    return sim.run(requests)


def timings(sim) -> dict[str, np.ndarray]:  # noqa: ANN001
    a = sim.recorder.arrays()
    return {k: a[k] for k in ("first_token_s", "finish_s", "prefix_hit_tokens", "preemptions", "replica", "status")}


# ---------------------------------------------------------------------------------------------
# Known answers
# ---------------------------------------------------------------------------------------------

def test_a_lone_request_is_prefilled_sent_and_decoded() -> None:
    """TTFT = the prefill step; the KV (63 blocks of 16 tokens x 128 KiB a token) takes latency +
    bytes / (100 Gb/s / 8); then every later token is one decode step on the decode instance."""
    prompt, out = 1000, 20
    sim = simulate(scenario(), [Request(0, 0.0, prompt, out)])
    assert isinstance(sim, DisaggSimulation)
    t = sim.prefill.cost.step_time_s(Batch(prefill_tokens=np.array([prompt]), prefill_context=np.array([0]),
                                           prefill_samples=1))
    nbytes = math.ceil(prompt / 16) * 16 * LLAMA_8B_TOKEN_BYTES
    assert sim.transfer_bytes == nbytes
    landed = t + (10e-6 + nbytes / 12.5e9)
    end = landed
    for dt in sim.decode.cost.decode_times_s(np.array([prompt]), out - 1):
        end += dt
    a = sim.recorder.arrays()
    assert a["first_token_s"][0] == t
    assert a["finish_s"][0] == pytest.approx(end, rel=1e-12)
    assert a["replica"][0] == 1  # the decode instance (prefill instances are numbered first)
    assert sim.transfer_s == sim.wire_s == [pytest.approx(landed - t, rel=1e-12)]
    s = summarize(sim_scenario := scenario(), sim, ReadStats())["disaggregation"]
    assert s["transfers"] == 1 and s["link_utilisation"] == pytest.approx((landed - t) / end, rel=1e-9)
    assert sim_scenario.spec.disaggregation is not None


def test_a_one_token_output_never_leaves_the_prefill_instance() -> None:
    sim = simulate(scenario(), [Request(0, 0.0, 300, 1)])
    assert sim.recorder.arrays()["replica"][0] == 0 and not sim.transfer_s


@pytest.mark.parametrize(("method", "ratio"), [("fp8", 0.5), ("kivi:bits=2", None)])
def test_the_kv_bytes_as_stored_are_what_crosses_the_link(method: str, ratio: float | None) -> None:
    """fp8 moves exactly half of bf16's bytes (same blocks, half the block bytes); KIVI less still."""
    stream = [Request(i, 10.0 * i, 400 + 300 * i, 8) for i in range(4)]
    bf16 = simulate(scenario(), stream)
    other = simulate(scenario(method=method), stream)
    if ratio is not None:
        assert other.transfer_bytes == ratio * bf16.transfer_bytes
    else:
        assert other.transfer_bytes < 0.5 * bf16.transfer_bytes
    assert max(other.transfer_s) < max(bf16.transfer_s)


def test_a_decode_instance_without_room_holds_the_transfer_until_a_sequence_finishes() -> None:
    """200 blocks a side; each request needs 119 on the decode side at its last token (1,500 + 399
    tokens of 16), so the second transfer starts when the first request finishes decoding, and
    until then its prompt's blocks stay on the prefill instance."""
    sc = scenario(engine__num_gpu_blocks_override=200, engine__max_model_len=2048)
    sim = simulate(sc, [Request(0, 0.0, 1500, 400), Request(1, 0.0, 1500, 400)])
    a = sim.recorder.arrays()
    assert a["first_token_s"][0] == a["first_token_s"][1]  # prefilled in one step
    waited = sim.transfer_s[1] - sim.wire_s[1]
    assert a["first_token_s"][1] + waited == pytest.approx(a["finish_s"][0], rel=1e-12)
    assert a["finish_s"][1] > a["finish_s"][0] + 399 * min(sim.recorder.itl_s)


def test_tp_on_the_prefill_side_sends_every_rank_s_share() -> None:
    """TP 2 on the prefill side: each rank holds half of every block and sends it, so the bytes
    are the same as TP 1's (llama-3-8b's 8 KV heads split without replication)."""
    stream = [Request(0, 0.0, 1000, 4)]
    one = simulate(scenario(), stream)
    two = simulate(scenario(disaggregation__prefill__tp=2), stream)
    assert two.transfer_bytes == one.transfer_bytes
    assert two.recorder.arrays()["first_token_s"][0] < one.recorder.arrays()["first_token_s"][0]


# ---------------------------------------------------------------------------------------------
# The aggregated limit (issue 14, item 5)
# ---------------------------------------------------------------------------------------------

def test_an_infinite_link_reproduces_the_aggregated_run_when_requests_do_not_overlap() -> None:
    """With an infinite, zero-latency link and both sides on the same GPU and TP, a request is
    prefilled in the same step and decoded in the same steps as on one aggregated replica: the
    tolerance is float equality (1e-12 relative). It holds only while requests do not overlap: once
    they do, an aggregated replica mixes one request's prefill chunks into the other's decode steps
    on one GPU, while the disaggregated pair runs them on two GPUs at once, which no single-GPU
    run reproduces."""
    stream = [Request(i, 30.0 * i, 200 + 700 * i, 10 + 37 * i) for i in range(6)]
    sc = scenario()
    sim = simulation(sc, check=True)
    assert isinstance(sim, DisaggSimulation)
    sim.link = Link(math.inf, 0.0)
    sim.run(stream)
    agg = simulate(scenario(disaggregation=None), stream)
    a, b = sim.recorder.arrays(), agg.recorder.arrays()
    np.testing.assert_allclose(a["first_token_s"], b["first_token_s"], rtol=1e-12)
    np.testing.assert_allclose(a["finish_s"], b["finish_s"], rtol=1e-12)
    assert sim.transfer_s == [0.0] * 6


# ---------------------------------------------------------------------------------------------
# Invariants and fast-forward
# ---------------------------------------------------------------------------------------------

def _check_invariants(sim: DisaggSimulation, n: int) -> None:
    a = sim.recorder.arrays()
    assert sorted(a["request_id"]) == list(range(n))  # each request reported exactly once
    assert not (a["status"] == STATUSES.index(UNFINISHED)).any()
    done = a["status"] == STATUSES.index(COMPLETED)
    assert (a["first_token_s"][done] >= a["arrival_s"][done]).all()
    assert (a["finish_s"][done] >= a["first_token_s"][done]).all()
    assert not sim.queue and not sim.inflight
    for rep in sim.replicas:  # blocks never leak, on either side
        assert not rep.running and not rep.waiting and not rep.parked and rep.bm.num_used == 0
        rep.bm.check()
    assert not any(sim.reserved)
    assert sum(r.preemptions for r in sim.decode_replicas) == 0  # a decode instance never recomputes
    multi = done & (a["generated_tokens"] > 1)
    assert len(sim.transfer_s) == int(multi.sum())  # every multi-token request crossed the link once
    assert (a["replica"][multi] >= len(sim.prefill_replicas)).all()


@settings(max_examples=examples(20))
@given(seed=st.integers(0, 10_000), seqs=st.integers(1, 12), block=st.sampled_from([8, 16]),
       caching=st.booleans(), preemption=st.sampled_from(["recompute", "swap"]), blocks=st.integers(260, 900),
       prefill=st.integers(1, 3), decode=st.integers(1, 3), gbps=st.sampled_from([1.0, 25.0, 400.0]))
def test_invariants_hold_for_random_disaggregated_runs(seed, seqs, block, caching, preemption, blocks,  # noqa: ANN001
                                                       prefill, decode, gbps) -> None:
    """check=True asserts the block accounting (parked blocks included) after every step; every
    request ends completed or rejected; fast-forward gives the step-by-step times."""
    sc = scenario(seed=seed, engine__max_num_seqs=seqs, engine__max_num_batched_tokens=seqs + 256,
                  engine__block_size=block, engine__enable_prefix_caching=caching, engine__preemption=preemption,
                  engine__swap_space_gib=0.5, engine__num_gpu_blocks_override=blocks, engine__max_model_len=2048,
                  disaggregation__prefill__replicas=prefill, disaggregation__decode__replicas=decode,
                  disaggregation__link__bandwidth_gbps=gbps, workload__synthetic__num_requests=30)
    sim = simulate(sc)
    assert isinstance(sim, DisaggSimulation)
    _check_invariants(sim, 30)
    summary = summarize(sc, sim, ReadStats())
    assert summary["completed"] + summary["rejected"]["total"] == summary["requests"] == 30
    assert 0 <= summary["disaggregation"]["link_utilisation"] <= 1
    slow = simulate(scenario_from_dict(apply_override(sc.raw, "engine.fast_forward", False), "t.yaml"), check=False)
    for key, value in timings(sim).items():
        np.testing.assert_array_equal(value, timings(slow)[key], err_msg=key)


CONFIGS = {
    "1p1d": {},
    "2p3d-tight-decode": {"disaggregation__prefill__replicas": 2, "disaggregation__decode__replicas": 3,
                          "engine__num_gpu_blocks_override": 700, "engine__max_model_len": 4096,
                          "engine__max_num_seqs": 8},
    "slow-link": {"disaggregation__link__bandwidth_gbps": 2, "disaggregation__decode__replicas": 2},
    "snapkv-decode-tp2": {"method": "snapkv:budget=256", "disaggregation__decode__tp": 2},
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("seed", range(3))
def test_fast_forward_equals_step_by_step(name: str, seed: int) -> None:
    over = {**CONFIGS[name], "seed": seed}
    fast = simulate(scenario(**over))
    slow = simulate(scenario(**over, engine__fast_forward=False))
    _check_invariants(fast, 60)
    a, b = timings(fast), timings(slow)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert fast.transfer_s == slow.transfer_s
    assert all(t >= w for t, w in zip(fast.transfer_s, fast.wire_s, strict=True))
    assert fast.steps == slow.steps
    assert len(fast.recorder.steps["steps"]) < len(slow.recorder.steps["steps"])  # it did fast-forward


def test_a_closed_loop_feeds_back_from_decode_completions() -> None:
    """Clients send their next request when the decode instance finishes the previous one; a slow
    link makes transfers wait for it (transfer time above wire time); fast-forward stays exact."""
    loop = {"concurrency": 12, "num_requests": 80, "input": {"kind": "fixed", "tokens": 2048},
            "output": {"kind": "fixed", "tokens": 64}}
    over = {"workload": {"closed_loop": loop}, "disaggregation__link__bandwidth_gbps": 10,
            "disaggregation__decode__replicas": 2}
    fast = simulate(scenario(**over))
    slow = simulate(scenario(**over, engine__fast_forward=False))
    _check_invariants(fast, 80)
    for key, value in timings(fast).items():
        np.testing.assert_array_equal(value, timings(slow)[key], err_msg=key)
    assert max(t - w for t, w in zip(fast.transfer_s, fast.wire_s, strict=True)) > 0


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "named"), [
    ({"prefill": {"replicas": 0}}, "disaggregation.prefill.replicas=0"),
    ({"decode": {"replicas": 0}}, "disaggregation.decode.replicas=0"),
    ({"link": {"bandwidth_gbps": 0}}, "disaggregation.link.bandwidth_gbps=0"),
    ({"link": {"latency_us": 10}}, "disaggregation.link.bandwidth_gbps"),
    ({"decode": {"replicas": 1, "hardware": "no-such-gpu"}}, "disaggregation.decode.hardware='no-such-gpu'"),
])
def test_bad_disaggregation_blocks_are_one_line_exit_2(tmp_path, capsys, change: dict, named: str) -> None:  # noqa: ANN001
    raw = {**BASE, "disaggregation": {**DISAGG, **change}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    _fails(capsys, ["run", str(path)], named, str(path))


def test_a_decode_side_that_cannot_hold_one_request_is_one_line_exit_2(tmp_path, capsys) -> None:  # noqa: ANN001
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**BASE, "engine": {"num_gpu_blocks_override": 100}}))
    _fails(capsys, ["run", str(path)], "disaggregation.decode.tp", "one request of max_model_len")


def test_top_level_replicas_do_not_mix_with_disaggregation(tmp_path, capsys) -> None:  # noqa: ANN001
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**BASE, "replicas": 2}))
    _fails(capsys, ["run", str(path)], "replicas=2", "disaggregation.prefill.replicas")


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], *named: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("kvsim: error: "), err
    for text in named:
        assert text in err, err


def test_a_search_counts_the_gpus_of_both_sides_and_prices_one_gpu() -> None:
    from kvsim.errors import KvsimError
    from kvsim.search import gpus_per_replica, price_per_gpu_hour

    raw = {**BASE, "tp": 4, "disaggregation": {**DISAGG, "decode": {"replicas": 2, "tp": 2}}}
    assert gpus_per_replica(raw) == 1 * 4 + 2 * 2
    other = {**raw, "disaggregation": {**DISAGG, "decode": {"replicas": 1, "hardware": "a100-sxm-40gb"}}}
    with pytest.raises(KvsimError, match="disaggregation.decode.hardware='a100-sxm-40gb'"):
        price_per_gpu_hour(other, "s.yaml")
