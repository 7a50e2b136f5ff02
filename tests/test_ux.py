"""Defaults a user expects: --version, defaults in --help, YAML 1.2 numbers, every schema error at
once, a scenario without SLOs, progress of sweep and search when stderr is not a terminal."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

import kvsim
from kvsim.cli import build_parser, main
from kvsim.errors import KvsimError
from kvsim.fileio import load_yaml
from kvsim.scenario import load_scenario, run_scenario, scenario_from_dict
from kvsim.scenario.outputs import text_summary

SMALL = {"model": "llama-3-8b", "hardware": "h100-sxm",
         "workload": {"synthetic": {"rate": 2.0, "num_requests": 12, "input": {"kind": "fixed", "tokens": 256},
                                    "output": {"kind": "fixed", "tokens": 16}}}}


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"kvsim {kvsim.__version__}"


def test_every_option_help_shows_its_default():
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.default is argparse.SUPPRESS:
                continue  # positionals, --help
            option = action.option_strings[-1]
            assert action.help, f"kvsim {name} {option} has no help (argparse would print nothing)"
            assert "default" in formatter._get_help_string(action), f"kvsim {name} {option}: no default shown"
        assert "(default: " in sub.format_help()


@pytest.mark.parametrize("text, value", [("1.0e12", 1.0e12), ("1e12", 1.0e12), ("2.5E-3", 2.5e-3), ("-1e3", -1e3),
                                         (".5e2", 50.0), ("12", 12), ("1.5", 1.5), ("1e", "1e"), ("v1e3", "v1e3")])
def test_yaml_exponent_numbers_are_numbers(text, value):
    got = load_yaml(f"x: {text}")["x"]
    assert got == value and type(got) is type(value)


def test_scenario_reads_exponent_numbers_and_set_overrides(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SMALL).replace("rate: 2.0", "rate: 2e0"))
    assert load_scenario(path, []).spec.workload.synthetic.rate == 2.0
    assert load_scenario(path, ["workload.synthetic.rate=3e0"]).spec.workload.synthetic.rate == 3.0


def test_all_schema_errors_at_once_in_one_line():
    raw = {**SMALL, "modle": "x", "tp": 0, "replicas": -1,
           "engine": {"max_num_seq": 4, "block_size": "big", "preemption": "drop", "swap_space_gib": -1}}
    with pytest.raises(KvsimError) as exc:
        scenario_from_dict(raw, "bad.yaml")
    text = str(exc.value)
    assert "\n" not in text and text.startswith("bad.yaml: 7 problems: ")
    assert text.count("bad.yaml") == 1 and text.endswith("; and 2 more")
    # the first five in pydantic's order (schema fields, then unknown keys), each naming key and value
    for key in ("tp=0", "replicas=-1", "engine.block_size='big'", "engine.preemption='drop'",
                "engine.swap_space_gib=-1"):
        assert key in text
    assert exc.value.field == "tp" and exc.value.value == 0  # the first problem's


def test_one_schema_error_reads_as_before():
    with pytest.raises(KvsimError) as exc:
        scenario_from_dict({**SMALL, "tp": 0}, "bad.yaml")
    assert str(exc.value) == "bad.yaml: tp=0: Input should be greater than 0"


def test_scenario_without_slo_runs_and_says_goodput_is_not_computed():
    result = run_scenario(scenario_from_dict(SMALL, "s.yaml"))
    s = result.summary
    assert s["completed"] == 12 and s["goodput"] is None and s["slo"] is None and s["slo_attainment"] is None
    assert any("no slo:" in n for n in s["notes"])
    assert "goodput not computed" in text_summary(s)
    json.dumps(s)


def _sweep(tmp_path: Path) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "slo": {"ttft_s": 1.0, "tpot_s": 0.1},
                                    "sweep": {"grid": {"engine.max_num_seqs": [8, 16]},
                                              "search": {"rate_max": 4.0, "tolerance": 0.5,
                                                         "min_requests": 10}}}))
    return path


def test_sweep_and_search_show_progress_when_piped_and_quiet_silences_it(tmp_path, capsys):
    path = _sweep(tmp_path)
    main(["sweep", str(path), "--out", str(tmp_path / "a"), "--jobs", "1"])
    err = capsys.readouterr().err  # capsys's stderr is not a terminal
    assert "sweep: 2 to run" in err and "sweep: 2/2 done" in err and "\r" not in err
    main(["sweep", str(path), "--out", str(tmp_path / "b"), "--jobs", "1", "--quiet"])
    assert capsys.readouterr().err == ""
    main(["search", str(path), "--jobs", "1", "--configs", "0", "--json"])
    captured = capsys.readouterr()
    assert "search: 1 to run" in captured.err and "search: 1/1 done" in captured.err
    assert json.loads(captured.out)["configs"]
    main(["search", str(path), "--jobs", "1", "--configs", "0", "--quiet"])
    assert "search:" not in capsys.readouterr().err  # notes about the scenario still show; progress does not


def test_run_progress_is_the_same_helper_and_logs_sparsely_when_piped(monkeypatch, capsys):
    """kvsim run's simulated-time display is kvsim.progress.Progress, like sweep's and search's:
    off a terminal it writes at most one status line per LOG_S, each ending in a newline."""
    from kvsim import progress

    bar = progress.Progress("kvsim run", True)
    clock = iter([1.0, 2.0, progress.LOG_S + 1.5])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    bar.t0 = 0.0
    for sim_s in (1.0, 2.0, 3.0):
        bar.status(f"{sim_s:.1f} s simulated, 10 requests")
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["kvsim run: 1.0 s simulated, 10 requests, 1.0 s wall",
                     f"kvsim run: 3.0 s simulated, 10 requests, {progress.LOG_S + 1.5:.1f} s wall"]
