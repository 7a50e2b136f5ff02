"""Sweeps over the real simulator: expansion counts and values, validation before anything runs
(bad path, wrong type, empty grid, unknown GPU) naming path and file, resume after a cut-off run,
a failing point recorded with its error, and the same results for one or two workers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from sweep_scenario import TINY, write_scenario

from kvsim.cli import main
from kvsim.errors import KvsimError
from kvsim.scenario import run_scenario, scenario_from_dict
from kvsim.sweep import expand, load_raw, read_results, run_sweep

GRID = {"grid": {"method": ["bf16", "fp8", "kivi:bits=2"], "engine.max_num_seqs": [64, 256]}}


def plan_of(tmp_path: Path, sweep: dict, **fields):
    path = write_scenario(tmp_path, sweep, **fields)
    return expand(load_raw(path), str(path))


def test_the_issue_example_expands_to_the_cartesian_product(tmp_path: Path):
    plan = plan_of(tmp_path, GRID)
    assert plan.paths == ("method", "engine.max_num_seqs")
    assert [(p.values["method"], p.values["engine.max_num_seqs"]) for p in plan.points] == [
        ("bf16", 64), ("bf16", 256), ("fp8", 64), ("fp8", 256), ("kivi:bits=2", 64), ("kivi:bits=2", 256)]
    p = plan.points[3]
    assert p.raw["method"] == "fp8" and p.raw["engine"] == {"max_num_seqs": 256}
    assert p.raw["workload"] == TINY["workload"] and "sweep" not in p.raw
    assert len({p.key for p in plan.points}) == 6


def test_zip_and_variants_cross_the_grid(tmp_path: Path):
    sweep = {"grid": {"method": ["bf16", "fp8"]},
             "zip": {"hardware": ["h100-sxm", "h200-sxm", "a100-sxm-80gb"], "tp": [1, 1, 2]},
             "variants": [{"name": "short", "set": {"workload.synthetic.output.tokens": 16}},
                          {"name": "chunked-off", "set": {"engine.enable_chunked_prefill": False}}]}
    plan = plan_of(tmp_path, sweep)
    assert len(plan.points) == 2 * 2 * 3
    assert plan.paths == ("method", "hardware", "tp")
    first = plan.points[0]
    assert first.variant == "short" and first.raw["workload"]["synthetic"]["output"]["tokens"] == 16
    assert first.raw["workload"]["synthetic"]["input"]["tokens"] == 512  # siblings kept
    zipped = {(p.raw["hardware"], p.raw.get("tp")) for p in plan.points}
    assert zipped == {("h100-sxm", 1), ("h200-sxm", 1), ("a100-sxm-80gb", 2)}  # zip pairs, not a product
    assert sum(p.variant == "chunked-off" and p.raw["engine"]["enable_chunked_prefill"] is False
               for p in plan.points) == 6


def test_no_sweep_section_is_one_point(tmp_path: Path):
    plan = plan_of(tmp_path, None)
    assert len(plan.points) == 1 and plan.paths == () and plan.points[0].label() == "base scenario"


@pytest.mark.parametrize("sweep, field, words", [
    ({"grid": {"engine.max_num_sqs": [1, 2]}}, "sweep.grid.engine.max_num_sqs", "names no scenario field"),
    ({"grid": {"engine.max_num_seqs": [64, "many"]}}, "sweep.grid.engine.max_num_seqs", "valid integer"),
    ({"grid": {"engine.enable_prefix_caching": [True, "maybe"]}}, "sweep.grid.engine.enable_prefix_caching",
     "valid boolean"),
    ({"grid": {}}, "sweep.grid", "empty grid"),
    ({"grid": {"hardware": ["h100-sxm", "h100-sxn"]}}, "sweep.grid.hardware", "unknown GPU"),
    ({"grid": {"method": ["bf16", "kivi:bitz=2"]}}, "sweep.grid.method", "unknown parameter"),
    ({"zip": {"tp": [1, 3]}}, "sweep.zip.tp", "divide"),
    ({"variants": [{"name": "v", "set": {"slo.ttft_s": -1}}]}, "sweep.variants[v].set.slo.ttft_s",
     "greater than"),
])
def test_bad_points_stop_the_sweep_before_it_starts(tmp_path: Path, capsys, sweep, field, words):
    path = write_scenario(tmp_path, sweep)
    with pytest.raises(KvsimError) as exc:
        expand(load_raw(path), str(path))
    assert exc.value.field == field and exc.value.file == str(path) and words in str(exc.value)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(["sweep", str(path), "--out", str(out), "--jobs", "1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err and str(path) in err
    assert not out.exists()  # nothing ran, nothing written


def test_sweep_writes_one_row_per_point_with_flattened_metrics(tmp_path: Path, capsys):
    path = write_scenario(tmp_path, GRID)
    out = tmp_path / "out"
    main(["sweep", str(path), "--out", str(out), "--jobs", "1"])
    assert "6 points: 6 run now, 0 already done, 0 failed" in capsys.readouterr().out
    rows = read_results(out)
    assert [r["point"] for r in rows] == list(range(6))
    cols = list(rows[0])
    assert cols[:7] == ["point", "method", "engine.max_num_seqs", "variant", "status", "error", "key"]
    for c in ("ttft_s.p50", "tpot_s.p99", "throughput_output_tokens_per_s", "goodput", "slo_attainment.ttft"):
        assert c in cols
    # a row is exactly what `kvsim run` gives for that point
    raw = dict(expand(load_raw(path), str(path)).points[4].raw)
    summary = run_scenario(scenario_from_dict(raw, str(path))).summary
    assert rows[4]["ttft_s.p99"] == pytest.approx(summary["ttft_s"]["p99"], rel=1e-12)
    assert rows[4]["num_gpu_blocks"] == summary["num_gpu_blocks"]
    # fp8 halves the bytes of a block: about twice the blocks of bf16 in the same memory
    blocks = {(r["method"], r["engine.max_num_seqs"]): r["num_gpu_blocks"] for r in rows}
    assert blocks[("fp8", 64)] == pytest.approx(2 * blocks[("bf16", 64)], abs=2)
    lines = (out / "points.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(x)["status"] == "ok" for x in lines)


def test_cut_off_sweep_resumes_without_redoing_finished_points(tmp_path: Path):
    path = write_scenario(tmp_path, GRID)
    plan = expand(load_raw(path), str(path))
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_sweep(plan, full, jobs=1)
    # the cut-off run: three points finished, the fourth was being written when it died
    lines = (full / "points.jsonl").read_text().splitlines(keepends=True)
    cut.mkdir()
    (cut / "points.jsonl").write_text("".join(lines[:3]) + lines[3][:40])
    outcome = run_sweep(plan, cut, jobs=1)
    assert (outcome.skipped, outcome.ran) == (3, 3)
    again = run_sweep(plan, cut, jobs=1)
    assert (again.skipped, again.ran) == (6, 0)
    assert (cut / "results.csv").read_text() == (full / "results.csv").read_text()
    # finished points are identified by content: a reordered grid redoes nothing
    reordered = write_scenario(tmp_path, {"grid": {"engine.max_num_seqs": [256, 64],
                                                   "method": ["kivi:bits=2", "fp8", "bf16"]}}, name="r.yaml")
    assert run_sweep(expand(load_raw(reordered), str(reordered)), cut, jobs=1).ran == 0


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path: Path):
    # Llama-2-13B's bf16 weights (24.2 GiB) do not fit a 24 GiB RTX 4090: a result, not an input error
    path = write_scenario(tmp_path, {"grid": {"hardware": ["h100-sxm", "rtx-4090"]}}, model="llama-2-13b")
    out = tmp_path / "out"
    outcome = run_sweep(expand(load_raw(path), str(path)), out, jobs=1)
    assert (outcome.ran, outcome.failed) == (2, 1)
    ok, bad = read_results(out)
    assert ok["status"] == "ok" and ok["error"] is None and ok["completed"] == 60
    assert bad["status"] == "error" and "does not fit" in bad["error"] and bad["completed"] is None
    # a retry redoes only the failed point
    assert run_sweep(expand(load_raw(path), str(path)), out, jobs=1, retry_errors=True).ran == 1


def test_two_workers_give_the_same_table_as_one(tmp_path: Path):
    path = write_scenario(tmp_path, GRID)
    plan = expand(load_raw(path), str(path))
    run_sweep(plan, tmp_path / "one", jobs=1)
    run_sweep(plan, tmp_path / "two", jobs=2)
    assert (tmp_path / "one" / "results.csv").read_text() == (tmp_path / "two" / "results.csv").read_text()


def test_keep_runs_writes_each_points_run_folder(tmp_path: Path):
    path = write_scenario(tmp_path, {"grid": {"method": ["bf16", "fp8"]}})
    plan = expand(load_raw(path), str(path))
    run_sweep(plan, tmp_path / "out", jobs=1, keep_runs=True)
    for p in plan.points:
        with (tmp_path / "out" / "runs" / p.key / "timeseries.csv").open() as f:
            assert {"time_s", "blocks_used", "running", "waiting"} <= set(next(csv.reader(f)))


def test_set_overrides_the_base_and_dry_run_lists_points(tmp_path: Path, capsys):
    path = write_scenario(tmp_path, GRID)
    main(["sweep", str(path), "--dry-run", "--set", "engine.block_size=32"])
    out = capsys.readouterr().out
    assert "6 points, all valid" in out and "method='fp8'" not in out and "method=fp8" in out
    raw = load_raw(path, ["engine.block_size=32"])
    assert raw["engine"]["block_size"] == 32 and yaml.safe_load(path.read_text())["sweep"] == GRID
