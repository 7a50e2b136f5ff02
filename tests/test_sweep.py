"""Sweep machinery that needs no simulator: the `sweep:` schema errors, result flattening, the
append-only store (resume keys, a line cut off mid-write), Parquet typing and the executors."""

from __future__ import annotations

import json
import operator
from pathlib import Path

import pytest

from kvsim.backends import execute
from kvsim.errors import KvsimError
from kvsim.sweep import Point, ResultStore, SearchConfig, SweepPlan, expand, flatten, point_key, read_results

BASE = {"model": "llama-3-8b", "hardware": "h100-sxm"}


@pytest.mark.parametrize("sweep, field, message", [
    ({"grid": {}}, "sweep.grid", "empty grid"),
    ({"zip": {}}, "sweep.zip", "empty zip"),
    ({"grid": {"method": []}}, "sweep.grid.method", "empty list of values"),
    ({"zip": {"method": ["bf16", "fp8"], "tp": [1]}}, "sweep.zip", "equal lengths"),
    ({"grdi": {"tp": [1, 2]}}, "sweep.grdi", "unknown key"),
    ({"grid": {"tp": 2}}, "sweep.grid.tp", "valid list"),
    ({"variants": []}, "sweep.variants", "empty list of variants"),
    ({"variants": [{"name": "a", "set": {}}, {"name": "a", "set": {}}]}, "sweep.variants", "unique"),
    ({"variants": [{"name": "a", "set": {"tp": 2}, "oops": 1}]}, "sweep.variants.0.oops", "unknown key"),
    ({"grid": {"tp": [1]}, "zip": {"tp": [2]}}, "sweep.zip", "both grid and zip"),
    ({"grid": {"tp": [1, 2]}, "variants": [{"name": "a", "set": {"tp": 4}}]}, "sweep.variants[a].set",
     "already"),
    ({"search": {"min_goodput": 2}}, "sweep.search.min_goodput", "less than or equal to 1"),
    ({"search": {"target_rate": 40, "rate_path": "workload.rate_scale"}}, "sweep.search.target_rate",
     "requests per second"),
    ("method", "sweep", "expected a mapping"),
])
def test_sweep_section_errors_name_path_and_file(sweep, field, message):
    with pytest.raises(KvsimError) as exc:
        expand({**BASE, "sweep": sweep}, "my_sweep.yaml")
    assert exc.value.field == field
    assert exc.value.file == "my_sweep.yaml"
    assert message in str(exc.value)


@pytest.mark.parametrize("sweep, named", [
    ({"grid": {"tp": [1, 1]}}, "sweep.grid.tp=1: listed twice"),
    ({"grid": {"method": ["bf16"], "engine.max_num_seqs": [8, 16, 8]}},
     "sweep.grid.engine.max_num_seqs=8: listed twice"),
    ({"zip": {"method": ["bf16", "fp8", "bf16"], "engine.max_num_seqs": [8, 8, 8]}},
     "sweep.zip={'method': 'bf16', 'engine.max_num_seqs': 8}: the same position is listed twice"),
])
def test_a_value_listed_twice_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, sweep, named):
    """A repeated value ran the same point twice under one key."""
    from sweep_scenario import write_scenario

    from kvsim.cli import main

    path = write_scenario(tmp_path, sweep)
    with pytest.raises(SystemExit) as stop:
        main(["sweep", str(path), "--dry-run"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"{path}: {named}" in err, err


def test_a_repeated_value_of_a_zip_column_is_not_a_repeated_point():
    plan = expand({**BASE, "workload": {"synthetic": {"rate": 1.0, "num_requests": 10, "input": {"kind": "fixed",
                   "tokens": 64}, "output": {"kind": "fixed", "tokens": 8}}},
                   "sweep": {"zip": {"method": ["bf16", "bf16"], "engine.max_num_seqs": [8, 16]}}}, "s.yaml")
    assert len({p.key for p in plan.points}) == 2


def test_flatten_uses_dots_and_keeps_scalars():
    summary = {"completed": 3, "ttft_s": {"p50": 0.1, "p99": 0.4}, "rejected": {"exceeds_kv_cache": 0},
               "slo": {"met": {"ttft": 0.9}}, "hist": [1, 2], "note": None}
    assert flatten(summary) == {"completed": 3, "ttft_s.p50": 0.1, "ttft_s.p99": 0.4,
                                "rejected.exceeds_kv_cache": 0, "slo.met.ttft": 0.9, "hist": "[1, 2]",
                                "note": None}


def test_point_key_ignores_key_order_and_sees_values():
    a = {"model": "m", "engine": {"max_num_seqs": 64, "block_size": 16}}
    b = {"engine": {"block_size": 16, "max_num_seqs": 64}, "model": "m"}
    assert point_key(a) == point_key(b)
    assert point_key(a) != point_key({**a, "engine": {"max_num_seqs": 65, "block_size": 16}})


def _plan(n: int) -> SweepPlan:
    points = tuple(Point(i, {"engine.max_num_seqs": 2 ** i}, None, {"x": i}, point_key({"x": i}))
                   for i in range(n))
    return SweepPlan("s.yaml", ("engine.max_num_seqs",), points, SearchConfig())


def _ok(i: int) -> dict:
    return {"status": "ok", "error": "", "summary": {"completed": i, "ttft_s": {"p50": i / 10}},
            "wall_s": 0.0}


def test_store_resumes_and_drops_a_line_cut_off_mid_write(tmp_path: Path):
    plan = _plan(4)
    store = ResultStore(tmp_path, plan)
    for p in plan.points[:3]:
        store.add(p, _ok(p.index))
    # a run killed while writing point 2's line: the file ends without a newline
    text = (tmp_path / "points.jsonl").read_text()
    whole = text[: text.rfind("\n", 0, len(text) - 1) + 1]
    (tmp_path / "points.jsonl").write_text(whole + '{"key": "abc", "po')
    again = ResultStore(tmp_path, plan)
    assert [again.finished(p) for p in plan.points] == [True, True, False, False]
    assert (tmp_path / "points.jsonl").read_text().endswith("\n")  # the partial record is gone
    again.add(plan.points[2], {"status": "error", "error": "boom", "summary": {}, "wall_s": 0.0})
    third = ResultStore(tmp_path, plan)
    assert third.finished(plan.points[2]) and not third.finished(plan.points[2], retry_errors=True)


@pytest.mark.parametrize("damage, named", [
    ({"status": 5}, "status=5: line 1 is not a finished point of a sweep (Input should be 'ok' or 'error')"),
    ({"summary": None}, "summary: line 1 is not a finished point of a sweep (missing required key)"),
    ({"summary": {}}, "summary={}: line 1 is not a finished point of a sweep (status ok without a run summary)"),
    ({"key": None}, "key: line 1 is not a finished point of a sweep (missing required key)"),
])
def test_a_resumed_sweep_refuses_a_malformed_row(tmp_path: Path, capsys: pytest.CaptureFixture, damage, named):
    """A row with status 5 or no summary counted as a finished point (and results.csv said status 5)."""
    from sweep_scenario import write_scenario

    from kvsim.cli import main

    path, out = write_scenario(tmp_path, None), tmp_path / "out"
    main(["sweep", str(path), "--out", str(out), "--jobs", "1", "--quiet"])
    rec = json.loads((out / "points.jsonl").read_text())
    rec = {k: v for k, v in {**rec, **damage}.items() if v is not None}
    (out / "points.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(SystemExit) as stop:
        main(["sweep", str(path), "--out", str(out), "--jobs", "1", "--quiet"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"kvsim: error: {out / 'points.jsonl'}: {named}"), err
    main(["sweep", str(path), "--out", str(out), "--jobs", "1", "--quiet", "--force"])  # starts over
    assert "1 run now" in capsys.readouterr().out
    assert json.loads((out / "points.jsonl").read_text())["status"] == "ok"


def test_tables_have_point_paths_status_then_metrics(tmp_path: Path):
    plan = _plan(3)
    store = ResultStore(tmp_path, plan)
    store.add(plan.points[1], _ok(1))
    store.add(plan.points[0], {"status": "error", "error": "KvsimError: no", "summary": {}, "wall_s": 0.0})
    assert store.write_tables() == []
    rows = read_results(tmp_path)
    assert list(rows[0])[:7] == ["point", "engine.max_num_seqs", "variant", "status", "error", "key",
                                 "completed"]
    # point order, not finish order
    assert [(r["point"], r["status"]) for r in rows] == [(0, "error"), (1, "ok")]
    assert rows[1]["ttft_s.p50"] == 0.1 and rows[0]["ttft_s.p50"] is None
    pq = pytest.importorskip("pyarrow.parquet")
    table = pq.read_table(tmp_path / "results.parquet")
    assert str(table.schema.field("engine.max_num_seqs").type) == "int64"
    assert str(table.schema.field("ttft_s.p50").type) == "double"
    assert table.column("status").to_pylist() == ["error", "ok"]


def test_plan_is_written_for_reports(tmp_path: Path):
    store = ResultStore(tmp_path, _plan(2))
    store.write_plan()
    doc = json.loads((tmp_path / "sweep.json").read_text())
    assert doc["paths"] == ["engine.max_num_seqs"] and doc["points"][1]["scenario"] == {"x": 1}


@pytest.mark.parametrize("jobs", [1, 2])
def test_local_executor_returns_every_task_once(jobs: int):
    tasks = [(i, i + 1) for i in range(7)]
    got = dict(execute(operator.mul, tasks, "local", jobs))
    assert got == {i: i * (i + 1) for i in range(7)}


def test_executor_rejects_bad_backend_and_jobs():
    with pytest.raises(KvsimError, match="backend"):
        list(execute(operator.mul, [(1, 2)], "dask", 1))  # type: ignore[arg-type]
    with pytest.raises(KvsimError, match="--jobs"):
        list(execute(operator.mul, [(1, 2)], "local", -1))


def test_address_needs_the_ray_backend():
    with pytest.raises(KvsimError, match="--backend ray"):
        list(execute(operator.mul, [(1, 2)], "local", 1, address="head:6379"))
