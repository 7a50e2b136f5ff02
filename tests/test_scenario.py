"""Scenario files: the strict schema, --set overrides, the public API kvsim sweep builds on, the
CLI's errors and output files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from kvsim.cli import main
from kvsim.errors import KvsimError
from kvsim.scenario import apply_override, load_scenario, run_scenario, scenario_from_dict, write_outputs
from kvsim.scenario.run import deployment

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = str(ROOT / "traces" / "synthetic_sessions.csv")
BASE = {"model": "llama-3-8b", "hardware": "h100-sxm",
        "workload": {"trace": FIXTURE, "max_requests": 40},
        "slo": {"ttft_s": 0.5, "tpot_s": 0.05}}


def write(tmp_path: Path, data: dict, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_are_vllm_engine_defaults() -> None:
    """Unset step limits are `vllm serve`'s for the version and GPU (vLLM 0.19 on an H100: 1,024 sequences,
    8,192 tokens; on an L40S 256 and 2,048), reported with their source in the summary."""
    s = scenario_from_dict(BASE, "x.yaml")
    e = s.spec.engine
    assert (e.max_num_seqs, e.max_num_batched_tokens, e.enable_chunked_prefill, e.block_size) == (None, None, None, 16)
    assert e.gpu_memory_utilization == 0.9
    assert e.enable_prefix_caching and e.preemption == "recompute"
    limits = deployment(s).limits
    assert (limits.max_num_batched_tokens, limits.max_num_seqs, limits.enable_chunked_prefill) == (8192, 1024, True)
    assert "vllm_batch_defaults.yaml" in limits.source
    l40s = deployment(scenario_from_dict({**BASE, "hardware": "l40s"}, "x.yaml")).limits
    assert (l40s.max_num_batched_tokens, l40s.max_num_seqs) == (2048, 256)
    given = deployment(scenario_from_dict({**BASE, "engine": {"max_num_seqs": 64}}, "x.yaml")).limits
    assert (given.max_num_batched_tokens, given.max_num_seqs) == (8192, 64) and "given: max_num_seqs" in given.source


def test_a_default_budget_below_the_given_sequences_is_refused(tmp_path: Path) -> None:
    """vLLM refuses a token budget below max_num_seqs, also when the budget is its default (2,048 on an
    L40S): one line naming the field, the value and the file, exit 2."""
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({**BASE, "hardware": "l40s", "engine": {"max_num_seqs": 4096}}))
    with pytest.raises(KvsimError) as err:
        run_scenario(load_scenario(f, []))
    assert (err.value.field, err.value.value, err.value.file) == ("engine.max_num_batched_tokens", 2048, str(f))


def test_async_scheduling_on_an_engine_without_it_names_field_and_file(tmp_path: Path) -> None:
    """engine.async_scheduling on vLLM 0.6.5 (the V0 engine, no --async-scheduling): one line naming the
    field, the value and the file; on 0.12 it runs."""
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({**BASE, "engine": {"vllm_version": "0.6.5", "async_scheduling": True}}))
    with pytest.raises(KvsimError) as err:
        run_scenario(load_scenario(f, []))
    assert (err.value.field, err.value.value, err.value.file) == ("engine.async_scheduling", True, str(f))
    assert deployment(scenario_from_dict({**BASE, "engine": {"vllm_version": "0.12.0", "async_scheduling": True}},
                                         "x.yaml")).cost.execution.host.overlapped


@pytest.mark.parametrize("raw, field", [
    ({**BASE, "modle": "x"}, "modle"),
    ({**BASE, "engine": {"max_num_seq": 4}}, "engine.max_num_seq"),
    ({**BASE, "engine": {"max_num_seqs": 0}}, "engine.max_num_seqs"),
    ({**BASE, "engine": {"preemption": "drop"}}, "engine.preemption"),
    ({**BASE, "engine": {"enable_prefix_caching": "maybe"}}, "engine.enable_prefix_caching"),
    ({**BASE, "router": "random"}, "router"),
    ({**BASE, "slo": {"ttft_s": 1}}, "slo.tpot_s"),
    ({**BASE, "workload": {"trace": FIXTURE, "synthetic": {"rate": 1, "num_requests": 2}}}, "workload"),
    ({**BASE, "workload": {}}, "workload"),
    ({**BASE, "workload": {"synthetic": {"rate": 1, "input": {"kind": "fixed", "tokens": 9},
                                         "output": {"kind": "fixed", "tokens": 9}}}}, "workload.synthetic"),
    ({**BASE, "workload": {"synthetic": {"rate": 1, "num_requests": 3, "input": {"kind": "fixed", "mean": 9},
                                         "output": {"kind": "fixed", "tokens": 9}}}},
     "workload.synthetic.input"),
    ({**BASE, "engine": {"max_num_seqs": 512, "max_num_batched_tokens": 256}},
     "engine.max_num_batched_tokens"),
])
def test_bad_keys_and_values_name_field_and_file(raw: dict, field: str) -> None:
    with pytest.raises(KvsimError) as exc:
        scenario_from_dict(raw, "bad.yaml")
    assert exc.value.field == field
    assert exc.value.file == "bad.yaml"


def test_sweep_block_is_kept_aside() -> None:
    s = scenario_from_dict({**BASE, "sweep": {"grid": {"tp": [1, 2]}}}, "x.yaml")
    assert s.sweep == {"grid": {"tp": [1, 2]}}
    assert "sweep" not in s.raw


def test_apply_override_sets_nested_fields_and_rejects_unknown_paths() -> None:
    raw = apply_override(BASE, "engine.max_num_seqs", 64)
    assert raw["engine"]["max_num_seqs"] == 64 and "engine" not in BASE  # a copy
    raw = apply_override(raw, "workload.synthetic.sessions.think_mean_s", 5.0)
    assert raw["workload"]["synthetic"]["sessions"]["think_mean_s"] == 5.0
    for bad in ("engine.max_seqs", "model.name", "sweep.grid", "slo.ttft"):
        with pytest.raises(KvsimError) as exc:
            apply_override(BASE, bad, 1)
        assert exc.value.field == bad


def test_load_scenario_applies_sets_as_yaml_scalars(tmp_path: Path) -> None:
    path = write(tmp_path, {**BASE, "sweep": {"grid": {"tp": [1]}}})
    s = load_scenario(path, ["engine.max_num_seqs=64", "engine.enable_prefix_caching=false", "method=fp8",
                             "slo.ttft_s=1e-1"])
    e = s.spec.engine
    assert (e.max_num_seqs, e.enable_prefix_caching, s.spec.method) == (64, False, "fp8")
    assert s.spec.slo.ttft_s == 0.1 and s.sweep == {"grid": {"tp": [1]}}
    with pytest.raises(KvsimError, match="key=value"):
        load_scenario(path, ["engine.max_num_seqs"])


def test_run_summary_has_the_documented_keys_and_is_deterministic() -> None:
    s = scenario_from_dict(BASE, "x.yaml")
    a, b = run_scenario(s).summary, run_scenario(s).summary
    assert a == b
    for key in ("completed", "rejected", "duration_s", "num_gpu_blocks", "throughput_output_tokens_per_s",
                "preemptions", "prefix_hit_rate", "goodput", "goodput_requests_per_s", "side_channel"):
        assert key in a
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        assert set(a[key]) == {"mean", "p50", "p90", "p99"}
    assert a["completed"] + a["rejected"]["total"] == a["requests"] == 40
    json.dumps(a)


def test_cli_run_json_out_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write(tmp_path, BASE)
    main(["run", str(path), "--json", "--out", str(tmp_path / "out"), "--set", "engine.max_num_seqs=8"])
    summary = json.loads(capsys.readouterr().out)
    assert summary == json.loads((tmp_path / "out" / "summary.json").read_text())
    with open(tmp_path / "out" / "requests.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 and {r["status"] for r in rows} == {"completed"}
    trace = json.loads((tmp_path / "out" / "trace.json").read_text())
    assert any(e["ph"] == "X" for e in trace["traceEvents"])
    with pytest.raises(SystemExit) as exc:
        main(["run", str(path), "--set", "engine.max_num_sqs=8"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "engine.max_num_sqs" in err and str(path) in err and "Traceback" not in err
    write_outputs  # noqa: B018 - part of the public API


@pytest.mark.parametrize("sets, field", [
    (["workload.trace=/no/such.csv", "workload.format=csv"], "workload.trace"),
    (["workload.trace=/no/such.csv"], "workload.trace"),
    (["calibration=/no/such.yaml"], "calibration"),
    (["model=no-such-model"], "model"),
    (["model=llama-3-70b"], "model"),  # 131 GiB of weights on one 80 GiB GPU
    (["tp=3"], "tp"),
    (["method=snapkv"], "method.snapkv.budget"),
    (["engine.max_model_len=100000"], "engine.max_model_len"),
    (["workload.images_per_request=1"], "workload.images_per_request"),
])
def test_deployment_errors_name_the_scenario_key_and_file(tmp_path: Path, sets: list[str], field: str,
                                                          capsys: pytest.CaptureFixture) -> None:
    path = write(tmp_path, BASE)
    with pytest.raises(KvsimError) as exc:
        run_scenario(load_scenario(path, sets))
    assert exc.value.field == field and exc.value.file == str(path)
    with pytest.raises(SystemExit) as stop:
        main(["run", str(path), *(a for s in sets for a in ("--set", s))])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_yaml_syntax_errors_are_one_line_with_the_position(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: llama-3-8b\nworkload: {trace: x.csv\nslo: 1\n")
    with pytest.raises(KvsimError, match=r"line 3, column 4") as exc:
        load_scenario(path, [])
    assert "\n" not in str(exc.value) and exc.value.file == str(path)


@pytest.mark.parametrize("kind", ["vllm", "sglang", "trtllm"])
def test_a_non_vllm_engine_kind_says_whose_scheduler_it_runs(kind: str) -> None:
    """engine.kind picks a kernel database (and, for SGLang, its prefill-alone batching); a run on SGLang's or
    TensorRT-LLM's kernels says that the rest of the scheduler, the memory planner and step overhead
    around them are still vLLM's."""
    summary = run_scenario(scenario_from_dict({**BASE, "engine": {"kind": kind}}, "x.yaml")).summary
    said = [n for n in summary.get("notes", []) if n.startswith("engine kind")]
    scheduler, unmodelled = {
        "sglang": ("the scheduler (but for SGLang's prefill batches, which run alone unless "
                   "engine.enable_mixed_chunk)", "token reservation for running requests and cache eviction order"),
        "trtllm": ("the scheduler", "admission and batching")}.get(kind, ("", ""))
    assert said == ([] if kind == "vllm" else [f"engine kind {kind}: kernel times from {kind}'s imported profile "
                                                f"where the calibration has them; {scheduler}, memory planner and "
                                                f"time between steps are vLLM's ({kind}'s own {unmodelled} "
                                                f"are not modelled: judged against public {kind} runs, TTFT can be "
                                                f"far off, README 'Accuracy against real vLLM')"])
