"""The closed-loop workload (``vllm bench serve --max-concurrency N``): each client sends its next
request when its previous one ends; the simulator feeds completions back to the stream."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import examples
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvsim.errors import KvsimError
from kvsim.scenario import apply_override, run_scenario, scenario_from_dict
from kvsim.serve.closed_loop import ClosedLoop
from kvsim.serve.metrics import COMPLETED, STATUSES
from kvsim.serve.synthetic import ArrivalProcess, LengthDist

BASE = {"model": "llama-3-8b", "hardware": "h100-sxm",
        "workload": {"closed_loop": {"concurrency": 4, "num_requests": 24,
                                     "input": {"kind": "fixed", "tokens": 1024},
                                     "output": {"kind": "fixed", "tokens": 64}}},
        "slo": {"ttft_s": 0.5, "tpot_s": 0.05}}


def scenario(**overrides: object):
    raw = BASE
    for key, value in overrides.items():
        raw = apply_override(raw, key.replace("__", "."), value)
    return scenario_from_dict(raw, "closed.yaml")


def columns(sc) -> dict[str, np.ndarray]:  # noqa: ANN001 - a Scenario
    return run_scenario(sc).simulation.recorder.arrays()


def test_one_client_sends_each_request_when_the_previous_one_finishes() -> None:
    a = columns(scenario(workload__closed_loop__concurrency=1, workload__closed_loop__num_requests=5))
    assert a["arrival_s"][0] == 0.0
    np.testing.assert_array_equal(a["arrival_s"][1:], a["finish_s"][:-1])
    assert (a["scheduled_s"] >= a["arrival_s"]).all()


def test_at_most_concurrency_requests_are_in_flight() -> None:
    a = columns(scenario())
    assert (a["arrival_s"][:4] == 0.0).all() and (a["arrival_s"][4:] > 0).all()
    for t in a["arrival_s"]:
        in_flight = (a["arrival_s"] <= t) & (a["finish_s"] > t)
        assert in_flight.sum() <= 4
    # every later request was sent exactly when an earlier one finished
    assert set(a["arrival_s"][4:].tolist()) <= set(a["finish_s"].tolist())


def test_a_rejected_request_frees_its_client() -> None:
    sc = scenario(workload__closed_loop__input={"kind": "fixed", "tokens": 9000})  # past llama-3-8b's 8,192
    a = columns(sc)
    assert len(a["request_id"]) == 24
    assert (a["status"] == STATUSES.index("prompt_exceeds_context")).all()


def test_random_range_ratio_draws_lengths_around_the_given_ones() -> None:
    loop = ClosedLoop(2, 2000, LengthDist.fixed(1000), LengthDist.fixed(100), random_range_ratio=0.5, seed=3)
    assert min(loop.inputs) >= 500 and max(loop.inputs) <= 1500
    assert min(loop.outputs) >= 50 and max(loop.outputs) <= 150
    assert abs(np.mean(loop.inputs) - 1000) < 20


def test_a_request_rate_schedules_the_sends_and_the_clients_cap_them() -> None:
    """vllm bench serve --request-rate R --max-concurrency N: request i is scheduled at the sum of i
    Gamma gaps (the first at once) and sent when a client is free; with more clients than requests the
    sends are the schedule itself, here Poisson at 4 requests/s (mean gap 0.25 s)."""
    open_loop = ClosedLoop(5000, 5000, LengthDist.fixed(100), LengthDist.fixed(10), seed=7,
                           schedule=ArrivalProcess.poisson(4.0))
    sent = np.array([r.arrival_s for r in open_loop])
    assert sent[0] == 0.0 and (np.diff(sent) > 0).all()
    assert np.mean(np.diff(sent)) == pytest.approx(0.25, rel=0.05)
    # the same lengths as without a rate: the schedule is drawn after them
    plain = ClosedLoop(5000, 5000, LengthDist.fixed(100), LengthDist.fixed(10), seed=7)
    assert plain.inputs == open_loop.inputs and plain.outputs == open_loop.outputs
    # two clients: the third request waits for the first to end even though its time has come
    capped = ClosedLoop(2, 3, LengthDist.fixed(100), LengthDist.fixed(10), seed=7,
                        schedule=ArrivalProcess.poisson(1000.0))
    first_two = [r.arrival_s for r in capped]
    assert len(first_two) == 2
    capped.request_done(5.0)
    assert [r.arrival_s for r in capped] == [5.0]


def test_a_client_round_trip_adds_to_ttft_and_delays_what_the_engine_sees() -> None:
    """One client, a fixed 20 ms round trip: the engine does exactly what it did without one, 20 ms
    later per request, so each TTFT and latency grow by 20 ms and TPOT not at all; the next request
    is still sent when the previous one finishes."""
    plain = columns(scenario(workload__closed_loop__concurrency=1, workload__closed_loop__num_requests=5))
    rt = columns(scenario(workload__closed_loop__concurrency=1, workload__closed_loop__num_requests=5,
                          workload__closed_loop__round_trip_ms=20.0))
    ttft0, ttft = plain["first_token_s"] - plain["arrival_s"], rt["first_token_s"] - rt["arrival_s"]
    np.testing.assert_allclose(ttft, ttft0 + 0.020, rtol=0, atol=1e-9)
    np.testing.assert_allclose(rt["finish_s"] - rt["first_token_s"], plain["finish_s"] - plain["first_token_s"],
                               rtol=0, atol=1e-9)
    np.testing.assert_array_equal(rt["arrival_s"][1:], rt["finish_s"][:-1])
    assert (rt["scheduled_s"] >= rt["arrival_s"] + 0.020 - 1e-12).all()


def test_a_think_time_delays_the_next_send_and_stays_outside_ttft() -> None:
    """One client thinking 30 ms after each answer: each request is sent 30 ms after the previous one
    ended; the engine does the same work, so every TTFT and TPOT is unchanged (the client had not sent
    during its think time), unlike a round trip, which TTFT counts."""
    plain = columns(scenario(workload__closed_loop__concurrency=1, workload__closed_loop__num_requests=5))
    thinking = columns(scenario(workload__closed_loop__concurrency=1, workload__closed_loop__num_requests=5,
                                workload__closed_loop__think_ms=30.0))
    np.testing.assert_allclose(thinking["arrival_s"][1:], thinking["finish_s"][:-1] + 0.030, rtol=0, atol=1e-9)
    assert thinking["arrival_s"][0] == 0.0
    np.testing.assert_allclose(thinking["first_token_s"] - thinking["arrival_s"],
                               plain["first_token_s"] - plain["arrival_s"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(thinking["finish_s"] - thinking["first_token_s"],
                               plain["finish_s"] - plain["first_token_s"], rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", ["exponential", "uniform"])
def test_random_think_times_have_their_mean_and_change_nothing_else(kind: str) -> None:
    loop = ClosedLoop(4, 5000, LengthDist.fixed(100), LengthDist.fixed(10), seed=4, round_trip_s=0.01,
                      round_trip="uniform", think_s=0.02, think=kind)
    assert np.mean(loop.thinks_s) == pytest.approx(0.02, rel=0.05) and min(loop.thinks_s) >= 0
    plain = ClosedLoop(4, 5000, LengthDist.fixed(100), LengthDist.fixed(10), seed=4, round_trip_s=0.01,
                       round_trip="uniform")
    assert (plain.inputs, plain.outputs, plain.round_trips_s) == (loop.inputs, loop.outputs, loop.round_trips_s)
    assert [r.arrival_s for r in loop] == [r.arrival_s for r in plain]  # the first sends do not think
    loop.request_done(1.0)
    (nxt,) = list(loop)
    assert nxt.arrival_s == pytest.approx(1.0 + loop.thinks_s[4] + loop.round_trips_s[4])


@pytest.mark.parametrize("kind", ["exponential", "uniform"])
def test_random_round_trips_keep_sending_order_and_their_mean(kind: str) -> None:
    loop = ClosedLoop(5000, 5000, LengthDist.fixed(100), LengthDist.fixed(10), seed=4, round_trip_s=0.015,
                      round_trip=kind)
    assert np.mean(loop.round_trips_s) == pytest.approx(0.015, rel=0.05)
    reqs = list(loop)  # all 5000 sent at once: the front end passes them on in sending order
    reach = np.array([r.arrival_s for r in reqs])
    assert (np.diff(reach) >= 0).all() and all(r.front_end_s == r.arrival_s for r in reqs)
    assert reach[0] == loop.round_trips_s[0] and (reach >= np.array(loop.round_trips_s)).all()
    plain = ClosedLoop(5000, 5000, LengthDist.fixed(100), LengthDist.fixed(10), seed=4)
    assert plain.inputs == loop.inputs and plain.outputs == loop.outputs  # drawn after the lengths


@pytest.mark.parametrize("sampling", ["shuffle", "sequential", "random"])
def test_a_prompt_dataset_repeats_its_prompts_as_aiperf_samples_them(sampling: str) -> None:
    """aiperf --num-dataset-entries 7 --dataset-sampling-strategy S: each request sends one of 7 prompts,
    which keeps its lengths and its content hash; shuffle sends every prompt once per pass of 7,
    sequential in order; without a dataset no request carries a hash (every prompt new)."""
    loop = ClosedLoop(30, 30, LengthDist.fixed(1000), LengthDist.fixed(100), random_range_ratio=0.5, seed=5,
                      dataset_entries=7, dataset_sampling=sampling)
    reqs = list(loop)
    assert len(loop.inputs) == len(loop.outputs) == 7
    by_hash: dict[tuple[int, ...], set[tuple[int, int]]] = {}
    for r in reqs:
        assert len(r.prefix_hashes) == 1 and r.prefix_block_tokens == r.input_tokens
        by_hash.setdefault(r.prefix_hashes, set()).add((r.input_tokens, r.output_tokens))
    assert all(len(lengths) == 1 for lengths in by_hash.values())  # a prompt keeps its lengths
    assert len(by_hash) <= 7
    entries = loop.entries
    assert entries is not None and len(entries) == 30
    if sampling == "shuffle":
        for start in range(0, 28, 7):
            assert sorted(entries[start:start + 7]) == list(range(7))
    if sampling == "sequential":
        assert entries == [i % 7 for i in range(30)]
    assert not any(r.prefix_hashes for r in ClosedLoop(30, 30, LengthDist.fixed(1000), LengthDist.fixed(100)))


def test_a_repeated_prompt_is_served_from_the_prefix_cache() -> None:
    """One client sending one dataset prompt over and over: from the second request on, vLLM's prefix
    cache holds all of the prompt's full blocks but the last (the engine recomputes at least one token),
    so those requests prefill one block and reach their first token sooner; without prefix caching
    every request prefills the whole prompt."""
    one = dict(workload__closed_loop__concurrency=1, workload__closed_loop__num_requests=4,
               workload__closed_loop__dataset_entries=1)
    cached = columns(scenario(**one))
    block = 16  # vLLM's default block size, kvsim's default
    assert cached["prefix_hit_tokens"][0] == 0
    assert (cached["prefix_hit_tokens"][1:] >= 1024 - block).all()
    ttft = cached["first_token_s"] - cached["arrival_s"]
    assert (ttft[1:] < 0.5 * ttft[0]).all()
    plain = columns(scenario(engine__enable_prefix_caching=False, **one))
    assert (plain["prefix_hit_tokens"] == 0).all()


def test_a_closed_loop_run_says_its_ttft_is_the_least_certain_output() -> None:
    """TTFT in a closed loop is how each cycle splits between waiting and decoding, which the judged real
    vLLM runs do not confirm: a closed-loop run says so, an open-loop run of the same lengths does not."""
    from kvsim.scenario.run import CLOSED_LOOP_NOTE

    closed = run_scenario(scenario()).summary
    assert CLOSED_LOOP_NOTE in closed["notes"]
    lengths = {"input": {"kind": "fixed", "tokens": 1024}, "output": {"kind": "fixed", "tokens": 64}}
    open_loop = scenario_from_dict({**BASE, "workload": {"synthetic": {"rate": 4, "num_requests": 24, **lengths}}},
                                   "open.yaml")
    assert CLOSED_LOOP_NOTE not in run_scenario(open_loop).summary.get("notes", [])


@pytest.mark.parametrize(("key", "value"), [("concurrency", 0), ("num_requests", 0), ("random_range_ratio", 1.0),
                                            ("request_rate", 0), ("burstiness", -1), ("round_trip_ms", -1),
                                            ("round_trip_ms", float("nan")), ("round_trip_distribution", "gamma"),
                                            ("dataset_entries", 0), ("dataset_sampling", "lottery"),
                                            ("think_ms", -1), ("think_ms", float("inf")),
                                            ("think_distribution", "gamma"), ("burstiness", 1e-300)])
def test_bad_closed_loops_are_refused(key: str, value: object) -> None:
    with pytest.raises(KvsimError, match=f"workload.closed_loop.{key}"):
        scenario(**{f"workload__closed_loop__{key}": value})


@pytest.mark.parametrize(("key", "value"), [("think_ms", 1e308), ("think_ms", 1e12), ("round_trip_ms", 1e15),
                                            ("request_rate", 1e-9)])
def test_a_loop_past_what_float_seconds_resolve_is_refused(key: str, value: float) -> None:
    # think_ms 1e12: 20 think times (the first 4 requests think none) of 1e9 s over 4 clients is 5e9 s at
    # least, past 2**30 s
    with pytest.raises(KvsimError) as exc:
        run_scenario(scenario(**{f"workload__closed_loop__{key}": value}))
    assert (exc.value.file, exc.value.field, exc.value.value) == ("closed.yaml", f"workload.closed_loop.{key}", value)
    assert "float64 seconds lose the microsecond" in str(exc.value)


def test_a_loop_pushed_past_the_bound_by_its_serving_stops() -> None:
    # think times that together stay under the bound, pushed past it by the serving in between
    loop = ClosedLoop(1, 3, LengthDist.fixed(10), LengthDist.fixed(1), think_s=2.0**29 - 1)
    assert [r.arrival_s for r in loop] == [0.0]
    loop.request_done(1.0)
    assert [r.arrival_s for r in loop] == [2.0**29]
    with pytest.raises(KvsimError, match="think_ms=536870911000.0: the workload would run to 1.07e\\+09 s"):
        loop.request_done(2.0**29 + 2.0)


def test_a_closed_loop_has_no_arrival_times_to_rescale() -> None:
    with pytest.raises(KvsimError, match="workload.rate_scale"):
        scenario(workload__rate_scale=2.0)


@settings(max_examples=examples(15))
@given(seed=st.integers(0, 1000), concurrency=st.integers(1, 24), requests=st.integers(1, 60),
       ratio=st.sampled_from([0.0, 0.3, 0.9]), seqs=st.integers(1, 16), blocks=st.integers(200, 2000),
       chunked=st.booleans(), rate=st.sampled_from([None, 0.5, 5.0, 200.0]),
       burstiness=st.sampled_from([0.3, 1.0, 4.0]),
       round_trip=st.sampled_from([(0.0, "fixed"), (10.0, "fixed"), (5.0, "exponential"), (20.0, "uniform")]),
       dataset=st.sampled_from([None, (1, "shuffle"), (5, "random"), (40, "sequential")]),
       think=st.sampled_from([(0.0, "fixed"), (15.0, "exponential"), (30.0, "uniform")]))
# found by the long search (seed 3838): sent times recorded as arrival - (arrival - sent), one of them
# rounded 1.7e-18 s below its predecessor's; the send time is now kept as it was
@example(seed=30, concurrency=8, requests=18, ratio=0.3, seqs=1, blocks=200, chunked=False, rate=None,
         burstiness=0.3, round_trip=(5.0, "exponential"), dataset=(1, "shuffle"), think=(0.0, "fixed"))
def test_closed_loops_lose_nothing_and_fast_forward_changes_nothing(seed, concurrency, requests, ratio, seqs,
                                                                    blocks, chunked, rate, burstiness,
                                                                    round_trip, dataset, think) -> None:
    sc = scenario(seed=seed, workload__closed_loop__concurrency=concurrency,
                  workload__closed_loop__num_requests=requests, workload__closed_loop__random_range_ratio=ratio,
                  workload__closed_loop__input={"kind": "lognormal", "p50": 600, "p90": 2500, "max_tokens": 6000},
                  workload__closed_loop__request_rate=rate, workload__closed_loop__burstiness=burstiness,
                  workload__closed_loop__round_trip_ms=round_trip[0],
                  workload__closed_loop__round_trip_distribution=round_trip[1],
                  workload__closed_loop__think_ms=think[0], workload__closed_loop__think_distribution=think[1],
                  **({} if dataset is None else {"workload__closed_loop__dataset_entries": dataset[0],
                                                 "workload__closed_loop__dataset_sampling": dataset[1]}),
                  engine__max_num_seqs=seqs, engine__num_gpu_blocks_override=blocks,
                  engine__enable_chunked_prefill=chunked)
    fast = run_scenario(sc, check=True)
    s = fast.summary
    assert s["requests"] == requests
    assert s["completed"] + s["rejected"]["total"] + s["unfinished"] == requests
    assert s["unfinished"] == 0
    slow = run_scenario(scenario_from_dict(apply_override(sc.raw, "engine.fast_forward", False), "c.yaml"))
    a, b = fast.simulation.recorder.arrays(), slow.simulation.recorder.arrays()
    for key in ("arrival_s", "scheduled_s", "first_token_s", "finish_s", "status", "preemptions"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    done = a["status"] == STATUSES.index(COMPLETED)
    assert (a["first_token_s"][done] >= a["scheduled_s"][done]).all()
    # never more than `concurrency` requests in flight: request i is sent no earlier than the end of
    # the i - concurrency-th end (the slot it takes); sends stay in request order
    assert (np.diff(a["arrival_s"]) >= 0).all()
    ends = np.sort(np.where(done, a["finish_s"], a["arrival_s"]))  # a rejected request ends as it arrives
    queued = max(requests - concurrency, 0)
    assert (a["arrival_s"][concurrency:] >= ends[:queued] - 1e-12).all()


def test_itl_percentiles_weight_each_step_by_its_decoding_sequences() -> None:
    """One client: every step after the prefill decodes the one sequence, so the ITL samples are the
    decode step times and their mean is the TPOT."""
    res = run_scenario(scenario(workload__closed_loop__concurrency=1, workload__closed_loop__num_requests=3))
    s = res.summary
    assert s["itl_s"]["mean"] == pytest.approx(s["tpot_s"]["mean"], rel=1e-9)
    assert s["itl_s"]["p50"] <= s["itl_s"]["p90"] <= s["itl_s"]["p99"]


def test_weighted_stats_known_answer() -> None:
    from kvsim.serve.metrics import weighted_stats

    got = weighted_stats(np.array([3.0, 1.0, 2.0]), np.array([1.0, 8.0, 1.0]))  # 1 x8, 2 x1, 3 x1
    assert got == {"mean": pytest.approx(1.3), "p50": 1.0, "p90": 2.0, "p99": 3.0}
