"""Capacity search: the bisection on monotone functions (known answers and properties), cost ranking
with loser reasons, and the price catalogue it reads."""

from __future__ import annotations

import math
from dataclasses import replace
from importlib import resources

import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsim.errors import KvsimError
from kvsim.search import ConfigResult, Probe, bisect_rate, judge, price_per_gpu_hour, rank
from kvsim.spec.hardware import hardware_names, load_hardware


def threshold_probe(threshold: float, calls: list[float] | None = None):
    """A monotone toy system: every rate up to ``threshold`` meets the SLOs, none above."""

    def evaluate(rate: float) -> Probe:
        if calls is not None:
            calls.append(rate)
        ok = rate <= threshold
        return Probe(rate, ok, 1.0 if ok else 0.5, "" if ok else "ttft", f"toy at {rate}")

    return evaluate


def test_bisection_known_answer():
    calls: list[float] = []
    found = bisect_rate(threshold_probe(7.3, calls), rate_start=0.25, rate_min=0.05, rate_max=1024,
                        tolerance=0.05)
    assert found.rate <= 7.3 < found.fail_rate
    assert (found.fail_rate - found.rate) / found.rate <= 0.05
    assert found.limit == "ttft"
    # 0.25 .. 8 by doubling (6 probes), then log2(log 2 / log 1.05) ~ 3.8 -> 4 bisection steps
    assert len(calls) == 6 + 4
    assert len(found.probes) == len(calls)


@settings(max_examples=examples(200))
@given(threshold=st.floats(0.06, 900), start=st.floats(0.05, 1024),
       tolerance=st.sampled_from([0.01, 0.05, 0.2]))
def test_bisection_brackets_the_threshold(threshold: float, start: float, tolerance: float):
    found = bisect_rate(threshold_probe(threshold), start, 0.05, 1024, tolerance)
    assert found.rate <= threshold < found.fail_rate  # never reports a rate that fails
    assert (found.fail_rate - found.rate) / found.rate <= tolerance + 1e-12


def test_bisection_searches_down_from_a_failing_start():
    calls: list[float] = []
    found = bisect_rate(threshold_probe(3.0, calls), 100.0, 0.05, 1024, 0.05)
    assert calls[:7] == [100.0, 50.0, 25.0, 12.5, 6.25, 3.125, 1.5625]
    assert found.rate <= 3.0 < found.fail_rate


def test_bisection_edges():
    never = bisect_rate(threshold_probe(0.01), 0.2, 0.05, 64, 0.05)
    assert never.rate == 0 and never.fail_rate == 0.05 and [p.rate for p in never.probes] == [0.2, 0.1, 0.05]
    always = bisect_rate(threshold_probe(1e9), 0.25, 0.05, 64, 0.05)
    assert always.rate == 64 and always.fail_rate is None and always.limit == "rate_max"
    with pytest.raises(KvsimError, match="rate_min"):
        bisect_rate(threshold_probe(1), 0.01, 0.05, 64, 0.05)


def _summary(goodput: float, ttft: float, tpot: float, too_big: int = 0) -> dict:
    return {"goodput": goodput, "requests": 100, "num_gpu_blocks": 1000,
            "rejected": {"total": too_big, "by_reason": {"exceeds_kv_cache": too_big}},
            "slo_attainment": {"ttft": ttft, "tpot": tpot}, "ttft_s": {"p90": 0.5}, "tpot_s": {"p90": 0.02}}


def test_judge_names_the_slo_missed_first():
    assert judge(_summary(0.95, 0.97, 0.99), 0.9)[0]
    assert judge(_summary(0.5, 0.6, 0.95), 0.9)[2] == "ttft"
    assert judge(_summary(0.5, 0.95, 0.55), 0.9)[2] == "tpot"
    assert judge(_summary(0.85, 0.85, 0.85, too_big=15), 0.9)[2] == "memory"  # 15% can never be served
    assert judge(_summary(0.85, 0.85, 0.95, too_big=5), 0.9)[2] == "ttft"
    with pytest.raises(KvsimError, match="goodput"):
        judge({"num_gpu_blocks": 10}, 0.9)


def _config(point: int, hardware: str, gpus: int, price: float | None, rate: float, limit: str = "ttft"):
    return ConfigResult(point=point, label=f"cfg{point}", hardware=hardware, gpus_per_replica=gpus,
                        price_per_gpu_hour_usd=price, rate_path="workload.synthetic.rate", max_rate=rate,
                        limit=limit,
                        limit_detail="detail", probes=((rate, 1.0),), replicas=None, cost_usd_per_hour=None,
                        usd_per_hour_per_rate=None)


def test_rank_cheapest_for_a_target_and_why_losers_lost():
    configs = [_config(0, "h100-sxm", 1, 2.95, 10.0),  # 5 replicas -> 14.75 $/h
               _config(1, "h200-sxm", 1, 2.25, 12.0),  # 5 replicas -> 11.25 $/h (cheapest)
               _config(2, "h100-sxm", 2, 2.95, 30.0, "tpot"),  # 2 replicas x 2 GPUs -> 11.80 $/h
               _config(3, "rtx-4090", 1, 0.60, 0.0, "memory"),  # fails even at the lowest rate
               _config(4, "custom", 1, None, 5.0)]  # no price
    ranked = rank(configs, target=50.0)
    by_point = {r.point: r for r in ranked}
    assert [r.point for r in ranked[:3]] == [1, 2, 0]
    assert by_point[1].replicas == 5 and by_point[1].cost_usd_per_hour == pytest.approx(11.25)
    assert by_point[2].replicas == 2 and by_point[2].cost_usd_per_hour == pytest.approx(11.80)
    assert by_point[1].verdict.startswith("cheapest")
    assert "more expensive" in by_point[0].verdict and "TTFT SLO" in by_point[0].verdict
    assert "TPOT SLO" in by_point[2].verdict
    assert by_point[3].rank is None and "does not fit in memory" in by_point[3].verdict
    assert by_point[4].rank is None and "no price" in by_point[4].verdict
    assert by_point[0].usd_per_hour_per_rate == pytest.approx(2.95 / 10)


def test_rank_without_target_is_per_unit_of_rate():
    ranked = rank([_config(0, "a", 1, 2.0, 10.0), _config(1, "b", 4, 1.0, 50.0)], target=None)
    assert [r.point for r in ranked] == [1, 0]  # 0.08 vs 0.2 $/h per request/s
    assert ranked[0].replicas == 1 and math.isclose(ranked[0].cost_usd_per_hour, 4.0)


@pytest.mark.parametrize("name", hardware_names())
def test_every_gpu_price_is_cited_or_left_out_on_purpose(name: str):
    hw = load_hardware(name)
    if hw.price_per_gpu_hour_usd is None:  # search says "no price" and takes --price GPU=USD
        text = (resources.files("kvsim") / "data" / "hardware" / f"{name}.yaml").read_text()
        assert "price_per_gpu_hour_usd: null" in text and "no price" in text
        return
    assert 0.1 < hw.price_per_gpu_hour_usd < 20
    assert any("USD" in s.note for s in hw.sources), "the price needs a source entry"


def test_price_override_replaces_the_catalogue_price(tmp_path):
    scenario = tmp_path / "s.yaml"
    scenario.write_text("model: llama-3-8b\nhardware: a30\n")
    raw = {"model": "llama-3-8b", "hardware": "a30"}
    assert price_per_gpu_hour(raw, str(scenario)) is None
    assert price_per_gpu_hour(raw, str(scenario), {"a30": 0.9}) == 0.9


def test_uncalibrated_configurations_rank_last_and_are_flagged():
    calibrated = _config(0, "h100-sxm", 8, 2.95, 10.0)
    borrowed = replace(_config(1, "h100-pcie", 1, 0.5, 10.0), calibrated=False,
                       calibration="borrowed from h100-sxm (measured)", unshipped=("kivi",))
    ranked = rank([borrowed, calibrated], target=None)
    assert [r.point for r in ranked] == [0, 1]  # cheaper per rate, but uncalibrated
    assert "UNCALIBRATED GPU" in ranked[1].verdict and "kivi not shipped" in ranked[1].verdict


# ---------------------------------------------------------------- on the real simulator

def test_search_on_a_tiny_real_scenario(tmp_path, capsys):
    import json

    from sweep_scenario import write_scenario

    from kvsim.cli import main
    from kvsim.search import evaluate_rate, run_search
    from kvsim.sweep import expand, load_raw

    sweep = {"zip": {"model": ["llama-3-8b", "llama-3-8b", "llama-2-13b"],
                     "hardware": ["h100-sxm", "l40s", "rtx-4090"]},
             "search": {"rate_max": 256.0, "tolerance": 0.1}}
    # a sustained load: the number of requests grows with the rate (a fixed count would be a burst)
    workload = {"synthetic": {"rate": 1.0, "duration_s": 8.0, "input": {"kind": "fixed", "tokens": 512},
                              "output": {"kind": "fixed", "tokens": 64}}}
    path = write_scenario(tmp_path, sweep, workload=workload)
    plan = expand(load_raw(path), str(path))
    results = {r.hardware: r for r in run_search(plan, target_rate=40.0, jobs=2)}
    h100, l40s, rtx = results["h100-sxm"], results["l40s"], results["rtx-4090"]
    assert rtx.rank is None and rtx.max_rate == 0 and "does not fit in memory" in rtx.verdict
    for r in (h100, l40s):  # the bracket holds when re-simulated
        assert r.max_rate > 0 and r.limit in ("ttft", "tpot")
        raw = plan.points[r.point].raw
        assert evaluate_rate(raw, plan.file, "workload.synthetic.rate", r.max_rate, 0.9, 200).passes
        fail = r.max_rate * (1 + 0.1)
        assert not evaluate_rate(raw, plan.file, "workload.synthetic.rate", fail, 0.9, 200).passes
        assert r.replicas == math.ceil(40.0 / r.max_rate)
    assert h100.max_rate > l40s.max_rate  # 3.35 vs 0.86 TB/s, 989 vs 362 TFLOPS
    winner = min((h100, l40s), key=lambda r: r.cost_usd_per_hour)
    assert winner.rank == 1 and winner.verdict.startswith("cheapest")

    main(["search", str(path), "--jobs", "2", "--target-rate", "40", "--configs", "hardware=rtx-4090",
          "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert [c["hardware"] for c in doc["configs"]] == ["rtx-4090"]
    assert doc["rate_path"] == "workload.synthetic.rate"
    with pytest.raises(SystemExit) as stop:
        main(["search", str(path), "--configs", "hardware=tpu-v5"])
    assert stop.value.code == 2 and "no configuration matches" in capsys.readouterr().err


def test_closed_loop_search_without_a_start_rate_is_one_error():
    from kvsim.search import TRACE_RATE, rate_path, start_rate
    from kvsim.sweep import SearchConfig

    raw = {"model": "llama-3-8b", "hardware": "h100-sxm",
           "workload": {"closed_loop": {"concurrency": 4, "num_requests": 24,
                                        "input": {"kind": "fixed", "tokens": 1024},
                                        "output": {"kind": "fixed", "tokens": 64}}},
           "slo": {"ttft_s": 0.5, "tpot_s": 0.05}}
    cfg = SearchConfig()
    assert rate_path(raw, cfg) == TRACE_RATE
    with pytest.raises(KvsimError, match="rate_start"):
        start_rate(raw, TRACE_RATE, cfg, "closed.yaml")
    assert start_rate(raw, TRACE_RATE, SearchConfig(rate_start=2.0)) == 2.0
