"""Capacity search: the bisection on monotone functions (known answers and properties), cost ranking
with loser reasons, and the price catalogue it reads."""

from __future__ import annotations

import datetime
import math
from dataclasses import replace
from importlib import resources

import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsim.errors import KvsimError
from kvsim.search import ConfigResult, Probe, bisect_rate, judge, price_per_gpu_hour, rank
from kvsim.spec.hardware import PRICE_SOURCE_URL, hardware_names, load_hardware


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
    assert by_point[0].verdict.startswith("costs 5 x 1 h100-sxm at $2.95 ($14.75/h) vs 5 x 1 h200-sxm at $2.25 "
                                          "($11.25/h); limited by the TTFT SLO above 10 req/s")
    assert "TPOT SLO" in by_point[2].verdict
    assert by_point[3].rank is None and by_point[3].verdict.startswith("does not fit")
    assert by_point[4].rank is None and "no price per GPU-hour for custom" in by_point[4].verdict
    assert "--price custom=USD" in by_point[4].verdict
    assert by_point[0].usd_per_hour_per_rate == pytest.approx(2.95 / 10)


def test_rank_without_target_is_per_unit_of_rate():
    ranked = rank([_config(0, "a", 1, 2.0, 10.0), _config(1, "b", 4, 1.0, 50.0)], target=None)
    assert [r.point for r in ranked] == [1, 0]  # 0.08 vs 0.2 $/h per request/s
    assert ranked[0].replicas == 1 and math.isclose(ranked[0].cost_usd_per_hour, 4.0)


@pytest.mark.parametrize("name", hardware_names())
def test_every_gpu_price_comes_from_the_one_source_with_a_date(name: str):
    """Issue 12: one kind of source for every price (mixing a median with a lowest advertised rate
    made an H200 cheaper than an H100); a GPU that source does not list is unpriced."""
    hw = load_hardware(name)
    if hw.price_per_gpu_hour_usd is None:  # search says "no price" and takes --price GPU=USD
        text = (resources.files("kvsim") / "data" / "hardware" / f"{name}.yaml").read_text()
        assert "price_per_gpu_hour_usd: null" in text and "no price" in text and hw.price_source is None
        return
    src = hw.price_source
    assert src is not None, "a catalogue price names its source, date and offer (price_source)"
    assert src.url == PRICE_SOURCE_URL
    assert datetime.date.fromisoformat(src.read_on) <= datetime.date.today()
    assert f"{hw.price_per_gpu_hour_usd:.2f} USD per GPU-hour" in src.offer  # the offer quotes the price
    assert any(s.url == PRICE_SOURCE_URL and src.read_on in s.note for s in hw.sources)


def test_prices_are_read_on_one_date_and_order_like_the_hardware():
    priced = {n: load_hardware(n) for n in hardware_names() if load_hardware(n).price_per_gpu_hour_usd}
    assert len({hw.price_source.read_on for hw in priced.values() if hw.price_source}) == 1
    price = {n: hw.price_per_gpu_hour_usd for n, hw in priced.items()}
    assert price["a100-sxm-40gb"] < price["a100-sxm-80gb"] < price["h100-sxm"] < price["b200"]


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
             "search": {"rate_max": 256.0, "tolerance": 0.1, "prices": {"l40s": 1.0}}}
    # a sustained load: the number of requests grows with the rate (a fixed count would be a burst)
    workload = {"synthetic": {"rate": 1.0, "duration_s": 8.0, "input": {"kind": "fixed", "tokens": 512},
                              "output": {"kind": "fixed", "tokens": 64}}}
    path = write_scenario(tmp_path, sweep, workload=workload)
    plan = expand(load_raw(path), str(path))
    results = {r.hardware: r for r in run_search(plan, target_rate=40.0, jobs=2)}
    h100, l40s, rtx = results["h100-sxm"], results["l40s"], results["rtx-4090"]
    assert rtx.rank is None and rtx.max_rate == 0 and rtx.verdict.startswith("model='llama-2-13b': does not fit")
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


CLOSED_LOOP = {"closed_loop": {"concurrency": 4, "num_requests": 20, "input": {"kind": "fixed", "tokens": 256},
                               "output": {"kind": "fixed", "tokens": 32}}}


@pytest.mark.parametrize(("search", "fields", "named"), [
    # a price in the YAML is checked like --price: a negative one ranked configurations by a negative cost
    ({"prices": {"h100-sxm": -3}}, {}, ["sweep.search.prices.h100-sxm=-3", "greater than 0"]),
    ({"prices": {"h100-sxm": 0}}, {}, ["sweep.search.prices.h100-sxm=0", "greater than 0"]),
    ({"prices": {"h100-sxm": float("inf")}}, {}, ["sweep.search.prices.h100-sxm=inf", "finite"]),
    ({"prices": {"h100-sxm": True}}, {}, ["sweep.search.prices.h100-sxm=True", "valid number"]),
    # the rate knob must be a request rate of the workload: max_num_seqs was reported as "req/s"
    ({"rate_path": "engine.max_num_seqs"}, {},
     ["sweep.search.rate_path='engine.max_num_seqs'", "not a request rate", "workload.synthetic.rate"]),
    ({"rate_path": "workload.rate"}, {}, ["sweep.search.rate_path='workload.rate'", "give workload.synthetic.rate"]),
    # each was a "cannot run" row per configuration with exit 0
    ({}, {"slo": None}, ["slo: ", "give slo:"]),
    ({}, {"workload": CLOSED_LOOP}, ["workload.closed_loop: ", "concurrency"]),
    ({"rate_min": 10, "rate_max": 1}, {}, ["sweep.search.rate_max=1: must be above rate_min=10"]),
    ({"rate_start": 0.01}, {}, ["sweep.search.rate_start=0.01: must lie within rate_min=0.05"]),
    ({"space": {"tp": [3]}}, {}, ["sweep.search.space.tp=3: does not divide", "aggregated TP3"]),
    ({"space": {"prefill_tp": [3], "decode_tp": [1], "link": {"bandwidth_gbps": 100}}}, {},
     ["sweep.search.space.prefill_tp=3: does not divide"]),
])
def test_a_search_input_error_is_one_line_before_anything_runs(tmp_path, capsys, search, fields, named):
    from sweep_scenario import write_scenario

    from kvsim.cli import main

    path = write_scenario(tmp_path, {"search": search}, **fields)
    with pytest.raises(SystemExit) as stop:
        main(["search", str(path), "--quiet"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"kvsim: error: {path}: "), err
    for text in named:
        assert text in err, err


# ---------------------------------------------------------------- aggregated and disaggregated deployments

def test_the_space_lists_coprime_units_within_the_gpu_cap():
    from kvsim.search import Layout, layouts
    from kvsim.sweep import SearchSpace

    space = SearchSpace(tp=[8, 4, 16], prefill_tp=[4], decode_tp=[4, 8], prefill_replicas=[1, 2],
                        decode_replicas=[1, 2, 3], max_gpus=12)
    found = layouts(space)
    assert found[:2] == [Layout(4), Layout(8)]  # TP 16 is over the cap
    units = {(lay.prefill, lay.decode) for lay in found[2:]}
    assert ((2, 4), (2, 4)) not in units  # 2P:2D is two copies of 1P:1D
    assert ((1, 4), (2, 4)) in units and ((2, 4), (1, 4)) in units and ((1, 4), (1, 8)) in units
    assert all(lay.gpus <= 12 for lay in found) and ((1, 4), (3, 4)) not in units  # 16 GPUs
    assert Layout(0, (1, 4), (2, 8)).label == "disaggregated 1P TP4 : 2D TP8 (4:16 GPUs)"
    raw = {"model": "m", "tp": 2, "replicas": 3, "disaggregation": {"link": {}}}
    assert Layout(4).apply(raw, None) == {"model": "m", "tp": 4, "replicas": 1}
    unit = Layout(0, (1, 4), (2, 8)).apply(raw, {"bandwidth_gbps": 400})
    assert unit["disaggregation"] == {"prefill": {"replicas": 1, "tp": 4}, "decode": {"replicas": 2, "tp": 8},
                                      "link": {"bandwidth_gbps": 400}}


def _space_scenario(tmp_path, tpot_s: float):
    """Llama-3-8B on H100s, 4,096-token prompts and 128-token outputs: an aggregated replica mixes
    prefill chunks into its decode steps, which stretches the time per output token."""
    from sweep_scenario import write_scenario

    from kvsim.sweep import expand, load_raw

    space = {"tp": [1], "prefill_tp": [1], "decode_tp": [1], "link": {"bandwidth_gbps": 400, "latency_us": 10}}
    workload = {"synthetic": {"rate": 1.0, "duration_s": 20, "input": {"kind": "fixed", "tokens": 4096},
                              "output": {"kind": "fixed", "tokens": 128}}}
    path = write_scenario(tmp_path, {"search": {"tolerance": 0.1, "space": space}}, workload=workload,
                          slo={"ttft_s": 0.5, "tpot_s": tpot_s})
    return expand(load_raw(path), str(path))


def test_disaggregation_wins_when_prefill_interference_breaks_the_tpot_slo(tmp_path):
    from kvsim.search import run_search

    results = {r.disaggregated: r for r in run_search(_space_scenario(tmp_path, 0.012), target_rate=20.0, jobs=2)}
    agg, dis = results[False], results[True]
    assert dis.rank == 1 and dis.gpus_per_replica == 2 and dis.deployment.startswith("disaggregated 1P TP1")
    # per GPU the disaggregated pair sustains more: the aggregated replica's TPOT fails first
    assert dis.max_rate / 2 > agg.max_rate and agg.limit == "tpot"
    assert agg.verdict.startswith(f"costs {agg.replicas} x 1 h100-sxm at $3.99")
    assert "limited by the TPOT SLO above" in agg.verdict and "TPOT p90" in agg.verdict and "> SLO 12.0 ms" in \
        agg.verdict


def test_aggregation_wins_when_the_tpot_slo_is_loose(tmp_path):
    from kvsim.search import run_search

    results = {r.disaggregated: r for r in run_search(_space_scenario(tmp_path, 0.1), target_rate=20.0, jobs=2)}
    agg, dis = results[False], results[True]
    assert agg.rank == 1 and dis.rank == 2 and agg.limit == "ttft"
    assert dis.cost_usd_per_hour > agg.cost_usd_per_hour and dis.verdict.startswith("costs ")


@pytest.mark.parametrize(("space", "named"), [
    ({"prefill_tp": [1], "decode_tp": [1]}, ["sweep.search.space.link: ", "a link"]),
    ({"tp": [0]}, ["sweep.search.space.tp", "positive"]),
    ({"prefill_tp": [1]}, ["sweep.search.space", "decode_tp"]),
    ({"tp": [4], "max_gpus": 2}, ["sweep.search.space=", "no deployment within max_gpus=2"]),
    ({"tp": [1], "sizes": [1]}, ["sweep.search.space.sizes"]),
    ({"tp": [1, 1]}, ["sweep.search.space.tp=[1, 1]", "lists 1 twice"]),
])
def test_a_bad_space_is_one_line_naming_the_field(tmp_path, capsys, space, named):
    from sweep_scenario import write_scenario

    from kvsim.cli import main

    path = write_scenario(tmp_path, {"search": {"space": space}})
    with pytest.raises(SystemExit) as stop:
        main(["search", str(path), "--quiet"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    assert str(path) in err
    for text in named:
        assert text in err, err


def test_the_search_cli_counts_what_it_tried_and_plots_the_ranking(tmp_path, capsys):
    from kvsim.cli import main

    plan = _space_scenario(tmp_path, 0.1)
    main(["search", plan.file, "--jobs", "2", "--target-rate", "20", "--quiet", "--out", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert "2 configurations tried (1 aggregated, 1 disaggregated)" in out and " simulations;" in out
    assert "aggregated TP1: cheapest: 3 x 1 h100-sxm at $3.99" in out
    main(["plot", "search", "--results", str(tmp_path / "s"), "--out", str(tmp_path / "costs.png")])
    assert (tmp_path / "costs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as stop:
        main(["plot", "search", "--results", str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert stop.value.code == 2 and "no search.json" in capsys.readouterr().err
