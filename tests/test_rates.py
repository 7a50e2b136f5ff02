"""Rates in absolute terms: a trace's own rate in the summary, ``workload.rate`` (requests/s) for a
trace, ``kvsim search --target-rate`` in requests/s; overload said, not hidden."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from kvsim.cli import main
from kvsim.errors import KvsimError
from kvsim.scenario import run_scenario, scenario_from_dict
from kvsim.scenario.outputs import text_summary
from kvsim.scenario.overload import overload

ROOT = Path(__file__).resolve().parents[1]
TRACE = {"model": "llama-3-8b", "hardware": "h100-sxm",
         "workload": {"trace": str(ROOT / "traces" / "synthetic_sessions.csv"), "max_requests": 60},
         "slo": {"ttft_s": 0.5, "tpot_s": 0.05}}
SYNTHETIC = {"model": "llama-3-8b", "hardware": "h100-sxm",
             "workload": {"synthetic": {"rate": 25.0, "num_requests": 600,
                                        "input": {"kind": "fixed", "tokens": 2048},
                                        "output": {"kind": "fixed", "tokens": 512}}},
             "slo": {"ttft_s": 1.0, "tpot_s": 0.1}}


def _with(raw: dict, **workload: object) -> dict:
    return {**raw, "workload": {**raw["workload"], **workload}}


def test_summary_gives_the_traces_own_rate_and_the_offered_one():
    native = run_scenario(scenario_from_dict(TRACE, "t.yaml")).summary["workload"]
    assert native["rate_scale"] == 1.0 and native["offered_rate_per_s"] == native["trace_native_rate_per_s"] > 0
    doubled = run_scenario(scenario_from_dict(_with(TRACE, rate_scale=2.0), "t.yaml")).summary
    assert math.isclose(doubled["workload"]["offered_rate_per_s"], 2 * native["offered_rate_per_s"], rel_tol=1e-9)
    assert math.isclose(doubled["workload"]["trace_native_rate_per_s"], native["offered_rate_per_s"], rel_tol=1e-9)
    assert f"the trace's own {native['offered_rate_per_s']:,.3g} req/s x rate scale 2" in text_summary(doubled)


def test_workload_rate_is_requests_per_second_for_a_trace():
    native = run_scenario(scenario_from_dict(TRACE, "t.yaml")).summary["workload"]["offered_rate_per_s"]
    got = run_scenario(scenario_from_dict(_with(TRACE, rate=7.5), "t.yaml")).summary["workload"]
    assert math.isclose(got["offered_rate_per_s"], 7.5, rel_tol=1e-9)
    assert math.isclose(got["rate_scale"], 7.5 / native, rel_tol=1e-9)
    assert math.isclose(got["trace_native_rate_per_s"], native, rel_tol=1e-9)


@pytest.mark.parametrize("raw, words", [
    (_with(TRACE, rate=2.0, rate_scale=1.0), "not both"),
    (_with(SYNTHETIC, rate=2.0), "workload.synthetic.rate"),
])
def test_workload_rate_conflicts(raw, words):
    with pytest.raises(KvsimError) as exc:
        scenario_from_dict(raw, "t.yaml")
    assert exc.value.field == "workload.rate" and words in str(exc.value)


def test_search_on_a_trace_varies_requests_per_second(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**TRACE, "sweep": {"search": {"tolerance": 0.5, "rate_max": 64.0}}}))
    main(["search", str(path), "--jobs", "1", "--target-rate", "10", "--json", "--quiet"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["rate_path"] == "workload.rate" and doc["target_rate"] == 10
    config = doc["configs"][0]
    native = run_scenario(scenario_from_dict(TRACE, "t.yaml")).summary["workload"]["offered_rate_per_s"]
    assert config["probes"][0][0] == pytest.approx(native)  # starts at the trace's own rate, in req/s
    assert config["max_rate"] > 0 and config["replicas"] == math.ceil(10 / config["max_rate"])
    # a search that still varies the scale cannot take a target in requests/s
    path.write_text(yaml.safe_dump({**TRACE, "sweep": {"search": {"rate_path": "workload.rate_scale"}}}))
    with pytest.raises(SystemExit) as stop:
        main(["search", str(path), "--target-rate", "10"])
    assert stop.value.code == 2 and "--target-rate=10.0: is requests per second" in capsys.readouterr().err


def test_overload_rule_on_known_queues():
    n = 200
    arrival = np.arange(n) * 0.1  # 10 req/s
    # a FIFO server completing 5 req/s: the queue grows with arrival index
    finish = (np.arange(n) + 1) * 0.2
    v = overload(arrival, finish - arrival - 0.01, finish)
    assert v["overloaded"] and v["sustained_rate_per_s"] == pytest.approx(5.0, rel=0.02)
    assert v["offered_rate_per_s"] == pytest.approx(10.0)
    # one that keeps up: every request done 50 ms after it arrives
    v = overload(arrival, np.full(n, 0.01), arrival + 0.05)
    assert not v["overloaded"] and v["sustained_rate_per_s"] == pytest.approx(10.0, rel=0.02)
    assert overload(arrival[:10], np.full(10, 0.01), arrival[:10] + 0.05) is None  # too few to judge


def test_an_overloaded_run_says_so_and_suggests_a_rate():
    s = run_scenario(scenario_from_dict(SYNTHETIC, "o.yaml")).summary
    v = s["overload"]
    assert v["overloaded"] and v["sustained_rate_per_s"] < 0.5 * v["offered_rate_per_s"]
    note = next(n for n in s["notes"] if n.startswith("OVERLOADED"))
    assert f"at most about {v['sustained_rate_per_s']:.3g} req/s" in note and "kvsim search" in note
    assert "OVERLOADED" in text_summary(s)
    # well below that rate: no verdict of overload
    calm = run_scenario(scenario_from_dict(_with(SYNTHETIC, synthetic={
        **SYNTHETIC["workload"]["synthetic"], "rate": 0.5 * v["sustained_rate_per_s"], "num_requests": 100}),
        "o.yaml")).summary
    assert calm["overload"]["overloaded"] is False and not any("OVERLOADED" in n for n in calm.get("notes", []))
