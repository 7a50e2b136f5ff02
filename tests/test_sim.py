"""The serving simulator: known answers, invariants (blocks never leak, limits never exceeded,
prefix hits bounded by the hashes), fast-forward and SimPy equivalence, every KV method's runtime
effect, routers, rejections and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ROOT, examples
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvsim.cost.model import Batch
from kvsim.errors import KvsimError
from kvsim.scenario import apply_override, load_scenario, run_scenario, scenario_from_dict
from kvsim.scenario.run import simulation, summarize, workload
from kvsim.serve.engine import Simulation
from kvsim.serve.metrics import COMPLETED, STATUSES, UNFINISHED, separability
from kvsim.serve.replica import Replica
from kvsim.serve.sequence import CacheKeys, SharingPolicy
from kvsim.serve.workload import ReadStats, Request

SESSIONS = {
    "rate": 3.0, "num_requests": 60,
    "input": {"kind": "lognormal", "p50": 500, "p90": 1800, "max_tokens": 5000},
    "output": {"kind": "lognormal", "p50": 60, "p90": 250, "max_tokens": 800},
    "sessions": {"turns": {"kind": "fixed", "tokens": 3}, "think_mean_s": 4.0},
    "shared_prefix": {"tokens": 512, "num_users": 6, "num_prompts": 2},
}
BASE = {"model": "llama-3-8b", "hardware": "h100-sxm", "workload": {"synthetic": SESSIONS},
        "slo": {"ttft_s": 0.5, "tpot_s": 0.05}}


def scenario(**overrides: object):
    raw = BASE
    for key, value in overrides.items():
        raw = apply_override(raw, key.replace("__", "."), value)
    return scenario_from_dict(raw, "test.yaml")


def simulate(sc, *, simpy: bool = False, check: bool = True,  # noqa: ANN001 - a Scenario
             stream: list[Request] | None = None) -> Simulation:
    sim = simulation(sc, check=check)
    requests = stream if stream is not None else workload(sc, sim.dep, False, ReadStats())[0]
    return sim.run_simpy(requests) if simpy else sim.run(requests)


def timings(sim: Simulation) -> dict[str, np.ndarray]:
    a = sim.recorder.arrays()
    keys = ("first_token_s", "finish_s", "prefix_hit_tokens", "preemptions", "replica", "status")
    return {k: a[k] for k in keys}


# ---------------------------------------------------------------------------------------------
# Known answers
# ---------------------------------------------------------------------------------------------

def test_a_lone_request_costs_one_prefill_then_its_decode_steps() -> None:
    """TTFT = the prefill step; every later token = one decode step over a context one longer."""
    prompt, out = 1000, 20
    sim = simulate(scenario(), stream=[Request(0, 0.0, prompt, out)])
    cost = sim.dep.cost
    t = cost.step_time_s(Batch(prefill_tokens=np.array([prompt]), prefill_context=np.array([0]),
                               prefill_samples=1))
    first = 0.0 + t
    end = first
    for dt in cost.decode_times_s(np.array([prompt]), out - 1):
        end += dt
    a = sim.recorder.arrays()
    assert a["first_token_s"][0] == first
    assert a["finish_s"][0] == pytest.approx(end, rel=1e-12)
    assert sim.steps == out


def test_chunked_prefill_splits_a_prompt_by_the_token_budget() -> None:
    sc = scenario(engine__max_num_batched_tokens=256, engine__max_num_seqs=8)
    sim = simulate(sc, stream=[Request(0, 0.0, 1000, 2)])
    st_ = sim.recorder.steps
    assert list(st_["prefill_tokens"]) == [256, 256, 256, 232, 0]
    assert sim.steps == 5


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_async_scheduling_admits_an_arrival_one_step_later(async_scheduling: bool) -> None:
    """vLLM's async scheduling plans step k + 1 while step k runs (EngineCore.step_with_batch_queue):
    a request arriving during request 0's prefill (step 1) joins step 2 without it and step 3 with it,
    after one decode step of request 0. An engine with nothing in flight admits an arrival at once."""
    sc = scenario(engine__async_scheduling=async_scheduling)
    sim = simulate(sc, stream=[Request(0, 0.0, 1000, 50), Request(1, 1e-3, 1000, 5)])
    a = sim.recorder.arrays()
    steps = sim.recorder.steps
    assert a["scheduled_s"][0] == 0.0  # idle engine: at once, with or without async scheduling
    assert steps["decode_seqs"][1] == 1 and steps["prefill_seqs"][1] == (0 if async_scheduling else 1)
    joined = steps["start_s"][2 if async_scheduling else 1]
    assert a["scheduled_s"][1] == joined
    assert a["scheduled_s"][1] == (steps["end_s"][1] if async_scheduling else a["first_token_s"][0])
    alone = simulate(sc, stream=[Request(1, 1e-3, 1000, 5)]).recorder.arrays()
    assert alone["scheduled_s"][0] == 1e-3


def test_async_fast_forward_runs_through_the_held_step() -> None:
    """A request that arrives during a decode run is held back one step under async scheduling, which it
    cannot change: the run goes on through that step (one priced run, not a run cut at the arrival and a
    lone step after it) and the request joins the plan after it, when step-by-step simulation admits it."""
    stream = [Request(0, 0.0, 1000, 60), Request(1, 0.2, 1000, 5)]
    fast = simulate(scenario(engine__async_scheduling=True), stream=stream)
    slow = simulate(scenario(engine__async_scheduling=True, engine__fast_forward=False), stream=stream)
    a, b = fast.recorder.arrays(), slow.recorder.arrays()
    np.testing.assert_array_equal(a["scheduled_s"], b["scheduled_s"])
    np.testing.assert_array_equal(a["finish_s"], b["finish_s"])
    st_ = fast.recorder.steps
    joins = list(st_["start_s"]).index(a["scheduled_s"][1])
    before = joins - 1  # the run before the step that admits request 1 covers the arrival and the held step
    assert st_["start_s"][before] < 0.2 <= st_["end_s"][before] and st_["steps"][before] >= 2
    # step by step, the step before the admission is the held one: a decode step that starts after the arrival
    slow_st = slow.recorder.steps
    i = list(slow_st["start_s"]).index(b["scheduled_s"][1])
    assert slow_st["start_s"][i - 1] >= 0.2 > slow_st["start_s"][i - 2] and slow_st["prefill_seqs"][i - 1] == 0


def test_sglang_takes_vllms_step_while_any_sequence_waits_swapped_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sequence swapped out to host memory comes back through vLLM's step, which prices its copy. It need
    not head the waiting queue: once swap space runs out, a later preemption recomputes and goes in front of
    it. SGLang's prefill batch is not tried while any swapped-out sequence waits."""
    from types import SimpleNamespace

    from kvsim.serve.policy import StepPlan, VllmFcfs

    taken: list[str] = []
    monkeypatch.setattr(VllmFcfs, "_prefill_batch", lambda self, rep, now: taken.append("prefill batch"))
    def vllm_step(self: VllmFcfs, rep: object, now: float, admit: bool) -> StepPlan:
        taken.append(f"vllm admit={admit}")
        return StepPlan([], [], 0.0, False)

    monkeypatch.setattr(VllmFcfs, "_vllm_step", vllm_step)
    recomputed, swapped = SimpleNamespace(swapped_blocks=0), SimpleNamespace(swapped_blocks=3)
    rep = SimpleNamespace(cfg=SimpleNamespace(prefill_alone=True), waiting=[recomputed, swapped], swap_used_blocks=3)
    VllmFcfs().schedule(rep, 0.0)  # type: ignore[arg-type]
    assert taken == ["vllm admit=True"]


@pytest.mark.parametrize("mixed", [None, True])
def test_sglang_runs_a_prefill_batch_alone_unless_mixed_chunk(mixed: bool | None) -> None:
    """SGLang (engine kind sglang, SGLang's default): each prefill batch runs without the running decodes and
    takes waiting prompts whole while they fit the 1,500-token budget (only a batch's first prompt is cut),
    so three 1,000-token prompts take three batches and decode afterwards; with --enable-mixed-chunk the
    step is vLLM's: decodes first, the next prompt chunked into what is left."""
    sc = scenario(engine__kind="sglang", engine__max_num_batched_tokens=1500, engine__async_scheduling=False,
                  **({"engine__enable_mixed_chunk": mixed} if mixed is not None else {}))
    sim = simulate(sc, stream=[Request(i, 0.0, 1000, 5) for i in range(3)])
    steps = sim.recorder.steps
    if mixed:
        assert list(steps["prefill_tokens"])[:3] == [1500, 1499, 1]
        assert list(steps["decode_seqs"])[:3] == [0, 1, 2]
    else:
        assert list(steps["prefill_tokens"])[:3] == [1000, 1000, 1000]
        assert list(steps["decode_seqs"])[:4] == [0, 0, 0, 3]
    a = sim.recorder.arrays()
    assert (a["status"] == STATUSES.index(COMPLETED)).all()


def test_sglang_prefill_pauses_the_running_decodes() -> None:
    """A prompt that reaches an SGLang engine while another request decodes is prefilled in a step of its
    own: that decoding request's next token waits for the whole prefill."""
    sc = scenario(engine__kind="sglang", engine__async_scheduling=False)
    sim = simulate(sc, stream=[Request(0, 0.0, 100, 40), Request(1, 0.05, 2000, 2)])
    steps = sim.recorder.steps
    prefill_steps = [i for i, n in enumerate(steps["prefill_tokens"]) if n == 2000]
    assert len(prefill_steps) == 1 and steps["decode_seqs"][prefill_steps[0]] == 0


# ---------------------------------------------------------------------------------------------
# Invariants under random small workloads and engine limits (hypothesis)
# ---------------------------------------------------------------------------------------------

@settings(max_examples=examples(25))
# an eviction mid-prefix let a waiting prompt in (fast-forward ran past the step that admitted it)
@example(seed=90, seqs=4, extra_tokens=7, block=8, chunked=True, caching=True, preemption="swap", blocks=765,
         replicas=2, router="least_outstanding_tokens", policy="fcfs", graphs=None, async_scheduling=True,
         sglang=False)
# recompute of prompt + output past the token budget (the request and those behind it were lost)
@example(seed=8072, seqs=10, extra_tokens=1196, block=16, chunked=False, caching=False, preemption="recompute",
         blocks=288, replicas=1, router="round_robin", policy="fcfs", graphs=None, async_scheduling=False,
         sglang=False)
# SGLang's prefill batch refused a prompt its blocks before the decodes took theirs and evicted a cached
# block; fast-forward ran past the step that then admitted it
@example(seed=1, seqs=2, extra_tokens=0, block=8, chunked=True, caching=True, preemption="recompute", blocks=183,
         replicas=1, router="round_robin", policy="lpm", graphs=None, async_scheduling=False, sglang=True)
@given(seed=st.integers(0, 10_000), seqs=st.integers(1, 12), extra_tokens=st.integers(0, 1500),
       block=st.sampled_from([8, 16, 32]), chunked=st.booleans(), caching=st.booleans(),
       preemption=st.sampled_from(["recompute", "swap"]), blocks=st.integers(150, 1200),
       replicas=st.integers(1, 3), router=st.sampled_from(["round_robin", "least_outstanding_tokens",
                                                             "prefix_affinity"]),
       policy=st.sampled_from(["fcfs", "lpm"]),
       graphs=st.one_of(st.none(), st.lists(st.integers(1, 16), min_size=1, max_size=6)),
       async_scheduling=st.booleans(), sglang=st.booleans())
def test_invariants_hold_for_random_workloads_and_limits(seed, seqs, extra_tokens, block, chunked, caching,
                                                         preemption, blocks, replicas, router, policy,
                                                         graphs, async_scheduling, sglang) -> None:
    """check=True asserts after every step that used + cached-free + free == total blocks, that
    reference counts match the sequences, and that no step exceeds max_num_seqs or
    max_num_batched_tokens; here every request must also end completed or rejected, and
    step-by-step simulation must give the same times as fast-forward (also with any CUDA-graph
    capture list: ``graphs``, None for vLLM's), with or without async scheduling and SGLang's prefill-alone
    batching."""
    sc = scenario(seed=seed, replicas=replicas, router=router, engine__max_num_seqs=seqs,
                  engine__max_num_batched_tokens=seqs + 64 + extra_tokens, engine__block_size=block,
                  engine__enable_chunked_prefill=chunked, engine__enable_prefix_caching=caching,
                  engine__preemption=preemption, engine__swap_space_gib=0.5,
                  engine__num_gpu_blocks_override=blocks, engine__scheduling_policy=policy,
                  engine__cudagraph_capture_sizes=graphs, engine__async_scheduling=async_scheduling,
                  engine__kind="sglang" if sglang else "vllm", workload__synthetic__num_requests=30)
    sim = simulate(sc)
    a = sim.recorder.arrays()
    assert len(a["request_id"]) == sim.arrived == 30
    assert sorted(a["request_id"]) == list(range(30))  # each request reported exactly once
    assert not (a["status"] == STATUSES.index(UNFINISHED)).any()  # no time limit: nothing is left over
    summary = summarize(sc, sim, ReadStats())
    assert summary["completed"] + summary["rejected"]["total"] + summary["unfinished"] == summary["requests"] == 30
    done = a["status"] == STATUSES.index(COMPLETED)
    assert (a["generated_tokens"][done] >= 1).all()
    assert (a["first_token_s"][done] >= a["arrival_s"][done]).all()
    assert (a["finish_s"][done] >= a["first_token_s"][done]).all()
    for rep in sim.replicas:
        assert not rep.running and not rep.waiting and rep.bm.num_used == 0
    s = sim.recorder.series
    rows = zip(s["blocks_used"], s["blocks_cached_free"], s["blocks_free"], strict=True)
    assert all(u + c + f == blocks for u, c, f in rows)
    step_by_step = scenario_from_dict(apply_override(sc.raw, "engine.fast_forward", False), "t.yaml")
    slow = timings(simulate(step_by_step, check=False))
    for key, value in timings(sim).items():
        np.testing.assert_array_equal(value, slow[key], err_msg=key)


def test_prefix_hits_never_exceed_what_the_hashes_allow() -> None:
    sim = simulate(scenario(replicas=2, router="prefix_affinity"))
    seen: list[list[tuple[int, ...]]] = [[], []]
    hits = 0
    for seq in sorted(_all_seqs(sim), key=lambda s: s.req.request_id):
        best = max((_common(seq.keys, k) for k in seen[seq.replica]), default=0)
        limit = min(best, (seq.prompt - 1) // sim.tables.block_size)
        assert seq.hit_tokens <= limit * sim.tables.block_size
        hits += seq.hit_tokens
        seen[seq.replica].append(seq.keys)
    assert hits > 0


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b):  # noqa: B905 - prefixes of different lengths
        if x != y:
            break
        n += 1
    return n


def _all_seqs(sim: Simulation):
    """Every finished sequence (kept by wrapping the finish callback)."""
    return sim.finished_seqs


@pytest.fixture(autouse=True)
def _keep_finished(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Simulation._finished

    def keep(self: Simulation, seq) -> None:  # noqa: ANN001
        self.__dict__.setdefault("finished_seqs", []).append(seq)
        original(self, seq)

    monkeypatch.setattr(Simulation, "_finished", keep)


# ---------------------------------------------------------------------------------------------
# Fast-forward and SimPy equivalence
# ---------------------------------------------------------------------------------------------

CONFIGS = {
    "prefix-cache+preempt": {"engine__num_gpu_blocks_override": 500, "engine__max_num_seqs": 16},
    "swap+chunked-256": {"engine__num_gpu_blocks_override": 450, "engine__preemption": "swap",
                         "engine__max_num_batched_tokens": 256, "engine__max_num_seqs": 12},
    "3-replicas-affinity": {"replicas": 3, "router": "prefix_affinity",
                            "engine__num_gpu_blocks_override": 700},
    "snapkv-no-chunking": {"method": "snapkv:budget=256", "engine__enable_chunked_prefill": False,
                           "engine__num_gpu_blocks_override": 500},
    "kivi+matkv": {"method": "kivi:bits=2+matkv", "engine__num_gpu_blocks_override": 300},
}
SEEDS = range(6)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("seed", SEEDS)
def test_fast_forward_equals_step_by_step(name: str, seed: int) -> None:
    """Identical per-request times, hits, preemptions and replicas on 6 seeds x 5 configurations."""
    over = {**CONFIGS[name], "seed": seed}
    fast = simulate(scenario(**over))
    slow = simulate(scenario(**over, engine__fast_forward=False))
    a, b = timings(fast), timings(slow)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert fast.steps == slow.steps
    assert len(fast.recorder.steps["steps"]) < len(slow.recorder.steps["steps"])  # it did fast-forward


@pytest.mark.parametrize("name", ["prefix-cache+preempt", "3-replicas-affinity", "kivi+matkv"])
def test_simpy_processes_give_the_heap_loop_results(name: str) -> None:
    a = timings(simulate(scenario(**CONFIGS[name])))
    b = timings(simulate(scenario(**CONFIGS[name]), simpy=True))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_streams_are_read_lazily() -> None:
    """The engine pulls one arrival ahead of the clock, never the whole stream."""
    sc = scenario()
    sim = simulation(sc)
    stream = workload(sc, sim.dep, False, ReadStats())[0]

    def watched():
        for i, r in enumerate(stream):
            assert sim.arrived >= i - 1
            yield r

    sim.run(watched())
    assert sim.arrived == 60


# ---------------------------------------------------------------------------------------------
# KV methods through the layout: eviction, merged vision tokens, MatKV, SafeKV
# ---------------------------------------------------------------------------------------------

def _series_blocks(sim: Simulation) -> list[int]:
    return list(sim.recorder.series["blocks_used"])


def test_eviction_holds_the_full_prompt_while_prefilling_then_shrinks_to_the_budget() -> None:
    # step by step: a fast-forwarded run reserves the blocks of all its steps when it starts
    sc = scenario(method="snapkv:budget=256", output__timeseries_interval_s=1e-9, engine__fast_forward=False)
    sim = simulate(sc, stream=[Request(0, 0.0, 2000, 40)])
    plan = sim.dep.plan
    used = _series_blocks(sim)
    assert used[0] == int(plan.prefill_blocks_for(2000)[0]) == 125  # the whole prompt, during prefill
    assert used[1] == int(plan.blocks_for(2001)[0]) < 30  # budget + page slack, once compressed
    assert sim.dep.layout.prefill is not None and not sim.cfg.prefix_caching


def test_lightkv_requests_carry_image_tokens_and_keep_a_fraction_of_them() -> None:
    sc = scenario(model="llava-1.5-7b", method="lightkv:keep=0.55", workload__images_per_request=1,
                  output__timeseries_interval_s=1e-9, engine__max_model_len=4096, engine__fast_forward=False)
    sim = simulation(sc, check=True)
    stream = workload(sc, sim.dep, False, ReadStats())[0]
    sim.run(r for r, _ in zip(stream, range(1)))  # noqa: B905 - first request only
    seq = sim.finished_seqs[0]
    image = sim.dep.layout.model.vision.image_tokens
    assert seq.req.image_tokens == image == 576  # llava-1.5: 24 x 24 patches
    assert seq.prompt == seq.req.input_tokens + image
    assert seq.dropped == int(0.45 * image)  # merged away after prefill
    used = _series_blocks(sim)
    assert used[1] == int(sim.dep.plan.blocks_for(seq.prompt - seq.dropped + 1)[0]) < used[0]


def test_matkv_loads_document_blocks_from_ssd_instead_of_prefilling_them() -> None:
    base = run_scenario(scenario(engine__enable_prefix_caching=False)).summary
    sc = scenario(method="matkv", engine__enable_prefix_caching=False)
    sim = simulate(sc)
    cost, bb = sim.dep.cost, sim.dep.plan.block_bytes
    loaded = [s for s in sim.finished_seqs if s.doc_tokens]
    assert loaded
    for s in loaded:  # the first token waits at least for its document KV to arrive
        read = cost.ssd_read_s(s.doc_tokens // sim.tables.block_size * bb)
        assert s.first_token_s - s.req.arrival_s >= read
    summary = run_scenario(sc).summary
    assert summary["doc_ssd_tokens"] == sum(s.doc_tokens for s in sim.finished_seqs)
    assert summary["engine_steps"] != base["engine_steps"]


@pytest.mark.parametrize("policy", ["global", "user", "selective"])
def test_safekv_policies_set_who_can_hit_whose_prefix(policy: str) -> None:
    method = "bf16" if policy == "global" else f"safekv:policy={policy}"
    s = run_scenario(scenario(method=method)).summary
    sc_ = s["side_channel"]
    assert sc_["policy"] == policy
    if policy == "user":  # isolation: only a user's own blocks, so the channel carries nothing
        assert sc_["cross_user_hit_requests"] == 0 and sc_["auc"] is None
    else:
        assert sc_["cross_user_hit_requests"] > 0
        assert sc_["auc"] > 0.5 and sc_["ttft_gap_p50_s"] > 0  # hits are faster: the leak
    assert s["prefix_hit_rate"] > 0  # own-session hits survive every policy


def test_safekv_selective_shares_less_than_global_and_more_than_isolation() -> None:
    rates = {p: run_scenario(scenario(method=m)).summary["prefix_hit_rate"]
             for p, m in (("global", "bf16"), ("selective", "safekv:policy=selective"),
                          ("user", "safekv:policy=user"))}
    assert rates["global"] >= rates["selective"] >= rates["user"]
    assert rates["global"] > rates["user"]


def test_selective_sharing_shares_what_two_users_sent_and_nothing_else() -> None:
    policy = SharingPolicy("selective", 16, 1000)
    system, alice, bob = (1, 2, 3), (11, 12), (21, 22)

    def keys(user: str, blocks: tuple[int, ...]) -> tuple[int, ...]:
        return policy.keys(Request(0, 0.0, 16 * len(blocks), 1, blocks, 16, user))

    first = keys("alice", system + alice)
    assert not set(first) & set(system + alice)  # all private: nobody else sent any of it yet
    second = keys("bob", system + bob)
    assert second[:3] == system and not set(second[3:]) & set(bob)  # the system prompt is now shared
    assert keys("alice", system + alice)[:3] == system
    assert keys("carol", (5,) + system)[1:] != system  # after a private block, everything is private


def test_separability_known_answers() -> None:
    hits, misses = np.array([0.1, 0.2]), np.array([0.3, 0.4])
    assert separability(hits, misses) == {"auc": 1.0, "best_threshold_s": 0.2, "best_balanced_accuracy": 1.0}
    same = separability(np.array([0.1, 0.2]), np.array([0.1, 0.2]))
    assert same["auc"] == 0.5
    assert separability(np.array([]), misses)["auc"] is None


# ---------------------------------------------------------------------------------------------
# Routers, rejections, bad input
# ---------------------------------------------------------------------------------------------

def _sessions_on_one_replica(sim: Simulation) -> float:
    by_session: dict[int, set[int]] = {}
    for s in sim.finished_seqs:
        by_session.setdefault(s.req.session_id, set()).add(s.replica)
    return sum(len(r) == 1 for r in by_session.values()) / len(by_session)


def test_routers() -> None:
    rr = simulate(scenario(replicas=3, router="round_robin"))
    counts = np.bincount(timings(rr)["replica"], minlength=3)
    assert counts.max() - counts.min() <= 1
    lot = simulate(scenario(replicas=3, router="least_outstanding_tokens"))
    assert (np.bincount(timings(lot)["replica"], minlength=3) > 0).all()
    aff = simulate(scenario(replicas=3, router="prefix_affinity"))
    assert _sessions_on_one_replica(aff) > _sessions_on_one_replica(rr)
    assert aff.recorder.arrays()["prefix_hit_tokens"].sum() > rr.recorder.arrays()["prefix_hit_tokens"].sum()


def test_a_preempted_sequence_finds_its_own_blocks_still_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM caches every full block of a request, generated ones too, and a preempted request's freed
    blocks stay cached until evicted (vllm/v1/core/kv_cache_manager.py, block_pool.py). Two 1,600-token
    prompts with 400 output tokens share 230 blocks of 16 tokens: both prompts (100 blocks each) and 15
    more blocks each fit, then the second is preempted at 1,841 tokens (115 full blocks), the first takes
    10 of them (its 125th block is its last), evicting the freed tail first, and the second comes back
    with its leading 105 blocks still cached: 161 tokens to recompute, not 1,841."""
    readmitted: list[tuple[int, int, int]] = []
    admit = Replica.admit

    def recorded(self: Replica, s, now: float, budget: int):  # noqa: ANN001, ANN202
        taken = admit(self, s, now, budget)
        if taken is not None and s.preemptions:
            readmitted.append((s.computed, s.total, taken[0]))
        return taken

    monkeypatch.setattr(Replica, "admit", recorded)
    stream = [Request(0, 0.0, 1600, 400), Request(1, 0.0, 1600, 400)]
    for caching, want in ((True, (1680, 1841, 161)), (False, (0, 1841, 1841))):
        readmitted.clear()
        sim = simulate(scenario(engine__num_gpu_blocks_override=230, engine__enable_prefix_caching=caching),
                       stream=stream)
        assert sim.preemptions == 1 and readmitted == [want], caching
        assert (sim.recorder.arrays()["status"] == STATUSES.index(COMPLETED)).all()


def test_cache_keys_are_the_content_keys_then_private_ones() -> None:
    keys = CacheKeys((7, 8), request_id=3, n_blocks=5)
    private = [(4 << 64) + i for i in (2, 3, 4)]
    assert len(keys) == 5 and list(keys) == [7, 8, *private] and keys[-1] == private[-1]
    assert keys[1:4] == (8, *private[:2]) and keys[:0] == () and keys[3:] == tuple(private[1:])
    other = CacheKeys((), request_id=2, n_blocks=2**20)[:]  # another request's: none shared
    assert not set(other) & set(keys) and min(*other, *private) >= 2**64  # above every 64-bit content hash
    with pytest.raises(IndexError):
        keys[5]


def test_requests_that_can_never_run_are_rejected_with_a_reason() -> None:
    stream = [Request(0, 0.0, 9000, 10),  # longer than llama-3-8b's 8,192-token context
              Request(1, 0.1, 3000, 10),  # more blocks than the whole cache (100 x 16 tokens)
              Request(2, 0.2, 1000, 10),
              Request(3, 0.3, 1400, 500)]  # its prompt fits, but not prompt + output (119 blocks)
    sim = simulate(scenario(engine__num_gpu_blocks_override=100), stream=stream)
    status = [STATUSES[i] for i in sim.recorder.arrays()["status"]]
    assert status == ["prompt_exceeds_context", "exceeds_kv_cache", "completed", "exceeds_kv_cache"]
    tiny = scenario(engine__num_gpu_blocks_override=100, workload__synthetic__num_requests=20)
    s = run_scenario(tiny).summary
    assert s["completed"] + s["rejected"]["total"] == 20
    no_chunks = simulate(scenario(engine__enable_chunked_prefill=False, engine__max_num_batched_tokens=2048),
                         stream=[Request(0, 0.0, 3000, 5), Request(1, 0.0, 2000, 5)])
    assert [STATUSES[i] for i in no_chunks.recorder.arrays()["status"]] == ["prompt_exceeds_batch_tokens",
                                                                           "completed"]


def test_no_request_is_lost_when_a_preempted_sequence_is_recomputed_without_chunked_prefill() -> None:
    """Issue 10's case: recompute preemption without chunked prefill once left a preempted sequence
    (prompt + generated tokens past the token budget) and everything queued behind it unreported."""
    sc = load_scenario(str(ROOT / "examples" / "fixture-sessions.yaml"),
                       ["engine.enable_chunked_prefill=false", "engine.enable_prefix_caching=false",
                        "engine.max_num_seqs=3", "engine.max_num_batched_tokens=1434",
                        "engine.num_gpu_blocks_override=175"])
    s = run_scenario(sc).summary
    assert s["requests"] == 200
    assert s["preemptions"] > 0
    assert s["unfinished"] == 0
    assert s["completed"] + s["rejected"]["total"] == 200
    assert s["completed"] > 11  # before the fix: 11 completed, 119 rejected, 70 missing
    assert any("no sequence grows past 1,434 tokens" in n for n in s["notes"])


def test_without_chunked_prefill_outputs_stop_at_the_token_budget() -> None:
    """vLLM: max_num_batched_tokens below max_model_len without chunked prefill limits every sequence
    to max_num_batched_tokens tokens."""
    sim = simulate(scenario(engine__enable_chunked_prefill=False, engine__max_num_batched_tokens=2048),
                   stream=[Request(0, 0.0, 2000, 100), Request(1, 0.0, 2048, 5)])
    a = sim.recorder.arrays()
    assert list(a["generated_tokens"]) == [48, 0]
    assert [STATUSES[i] for i in a["status"]] == ["completed", "prompt_exceeds_batch_tokens"]
    assert sim.admission.truncated == 1


def test_outputs_past_the_context_are_clamped_and_counted() -> None:
    sim = simulate(scenario(), stream=[Request(0, 0.0, 8000, 500)])
    assert sim.recorder.arrays()["generated_tokens"][0] == 192  # 8,192 - 8,000: vLLM stops at max_model_len
    assert sim.admission.truncated == 1


def test_bad_trace_rows_stop_the_run_naming_file_and_lines(tmp_path) -> None:  # noqa: ANN001
    trace = tmp_path / "t.csv"
    rows = ["arrival_time_s,input_tokens,output_tokens"] + [f"{i * 0.1},100,10" for i in range(20)]
    rows[3] = "0.25,abc,10"
    rows[8] = "0.7,100"
    rows[12] = "1.1,100,-4"
    trace.write_text("\n".join(rows) + "\n")
    sc = scenario(workload={"trace": str(trace)})
    with pytest.raises(KvsimError) as exc:
        run_scenario(sc)
    text = str(exc.value)
    assert "found 3 bad row(s)" in text and f"{trace}:4" in text and f"{trace}:9" in text
    assert "--skip-bad-rows" in text and exc.value.file == "test.yaml"
    s = run_scenario(sc, skip_bad_rows=True).summary
    assert s["bad_rows"]["skipped"] == 3 and s["completed"] == 17


# ---------------------------------------------------------------------------------------------
# Scheduling policies (kvsim.serve.policy)
# ---------------------------------------------------------------------------------------------

def test_the_replica_mechanics_name_no_policy() -> None:
    source = (ROOT / "kvsim" / "serve" / "replica.py").read_text()
    for name in ("fcfs", "lpm", "VllmFcfs", "LongestPrefixFirst"):
        assert name not in source


@pytest.mark.parametrize(("policy", "first"), [("fcfs", 1), ("lpm", 2)])
def test_lpm_admits_the_longest_cached_prefix_first(policy: str, first: int) -> None:
    """One sequence slot. Request 0 runs and caches its 1,024-token prompt; 1 (nothing cached) and
    2 (request 0's prompt + 100 tokens) wait. FCFS admits 1 next; lpm admits 2, whose prefix is cached."""
    shared = tuple(range(1000, 1064))  # 64 blocks of 16 tokens
    stream = [Request(0, 0.0, 1024, 20, shared, 16),
              Request(1, 0.001, 1024, 20, tuple(range(2000, 2064)), 16),
              Request(2, 0.002, 1124, 20, shared + tuple(range(3000, 3006)), 16)]
    sim = simulate(scenario(engine__max_num_seqs=1, engine__scheduling_policy=policy), stream=stream)
    a = sim.recorder.arrays()
    order = sorted((1, 2), key=lambda i: a["first_token_s"][i])
    assert order[0] == first
    assert a["prefix_hit_tokens"][2] == 1024  # all 64 shared blocks
