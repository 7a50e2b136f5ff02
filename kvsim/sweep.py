"""Sweeps: a scenario YAML's ``sweep:`` section expanded into points, every point validated before
anything runs, then run on a local process pool or on Ray, with results written as they finish.

```yaml
sweep:
  grid:                       # cartesian product
    method: [bf16, fp8, "kivi:bits=2"]
    engine.max_num_seqs: [64, 256]
  zip:                        # parallel lists of equal length (one point per position)
    hardware: [h100-sxm, h200-sxm]
    tp: [2, 1]
  variants:                   # named sets of overrides, crossed with grid x zip
    - {name: small-batch, set: {engine.max_num_batched_tokens: 2048}}
    - {name: default, set: {}}
```

Points = variants x grid x zip (each part counts 1 when absent). A point's identity is the hash of
its resolved scenario (the YAML with every override applied), so a sweep that was cut off resumes
without redoing finished points, and reordering the grid changes nothing.

Outputs in the sweep folder: ``points.jsonl`` (one line per finished point, appended and flushed as
it finishes) and ``results.csv`` / ``results.parquet`` (rewritten whole from it, atomically).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

import kvsim
from kvsim.backends import Backend, execute
from kvsim.errors import DoesNotFit, KvsimError, schema_error
from kvsim.fileio import check_writable, read_checked_json, read_csv_rows, write_atomic
from kvsim.progress import Progress
from kvsim.scenario.schema import LinkSpec

SWEEP_KEY = "sweep"
# Leading columns of the results table; the swept paths follow `point`, the metrics follow `key`.
STATUS_COLUMNS = ("variant", "status", "error", "key")


# ---------------------------------------------------------------- the `sweep:` schema

_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)
# The request rates of each kind of workload (kvsim.scenario.schema.WorkloadSpec), the only fields
# `kvsim search` may vary (sweep.search.rate_path): any other field is not a rate, and the result
# would be reported in requests per second all the same. A synthetic stream's workload.rate_scale
# is left out: it multiplies workload.synthetic.rate, which is the knob to search. A closed loop has
# none: its concurrency caps the load, so a search of workload.closed_loop.request_rate reports rates
# never offered (4 clients "met the SLOs up to rate_max=1024 req/s").
RATE_PATHS: dict[str, tuple[str, ...]] = {
    "synthetic": ("workload.synthetic.rate",),
    "trace": ("workload.rate", "workload.rate_scale"),
}


def _repeated(values: Sequence[Any]) -> list[Any]:
    """The values equal to an earlier one (compared with ==, so mappings and lists work too): a
    value listed twice in a sweep would run the same point twice under one key."""
    return [v for i, v in enumerate(values) if v in values[:i]]


class _Variant(BaseModel):
    model_config = _STRICT
    name: str = Field(min_length=1)
    set: dict[str, Any]


class SearchSpace(BaseModel):
    """``sweep.search.space``: the deployments ``kvsim search`` tries for every configuration of the
    sweep (docs/sweep.md). A candidate is one copy of a deployment; the search finds the rate one
    copy sustains and serves a target rate with whole copies. Aggregated: one replica of each ``tp``.
    Disaggregated: ``prefill_replicas`` x ``prefill_tp`` prefill instances and ``decode_replicas`` x
    ``decode_tp`` decode instances, every combination whose instance counts are coprime (2P:2D is two
    copies of 1P:1D) and whose GPUs fit in ``max_gpus``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tp: list[int] = Field(default_factory=list)  # aggregated candidates' TP degrees (none: no aggregated one)
    prefill_tp: list[int] = Field(default_factory=list)  # disaggregated: each side's TP degrees
    decode_tp: list[int] = Field(default_factory=list)
    prefill_replicas: list[int] = Field(default_factory=lambda: [1])
    decode_replicas: list[int] = Field(default_factory=lambda: [1])
    link: LinkSpec | None = None  # default: the scenario's disaggregation.link
    max_gpus: int = Field(default=16, gt=0)  # GPUs of one copy at most

    @field_validator("tp", "prefill_tp", "decode_tp", "prefill_replicas", "decode_replicas")
    @classmethod
    def _positive_once(cls, values: list[int]) -> list[int]:
        if any(v <= 0 for v in values):
            raise ValueError(f"every value must be a positive integer (got {values})")
        twice = _repeated(values)
        if twice:
            raise ValueError(f"lists {twice[0]} twice (each value is one candidate, searched once)")
        return values

    @model_validator(mode="after")
    def _some_candidate(self) -> SearchSpace:
        if not self.tp and not (self.prefill_tp and self.decode_tp):
            raise ValueError("give tp (aggregated candidates) and/or both prefill_tp and decode_tp "
                             "(disaggregated candidates)")
        return self


class SearchConfig(BaseModel):
    """``sweep.search``: how ``kvsim search`` bisects the request rate (documented in docs/sweep.md)."""

    # strict and finite: `true` or `.inf` as a rate or a price would be ranked as a number (an
    # infinite rate_max never stops doubling)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
    # one of RATE_PATHS; default: workload.synthetic.rate, else workload.rate (a trace's req/s)
    rate_path: str | None = None
    rate_min: float = Field(default=0.05, gt=0)  # below this a configuration counts as serving nothing
    rate_max: float = Field(default=1024.0, gt=0)  # the search never offers more than this
    # first rate tried; default: the scenario's own (after rate_min and rate_max, which bound it)
    rate_start: float | None = Field(default=None, gt=0)
    tolerance: float = Field(default=0.05, gt=0, lt=1)  # stop when (fail - ok) / ok <= tolerance
    min_goodput: float = Field(default=0.9, gt=0, le=1)  # fraction of requests within both SLOs
    # A synthetic stream with duration_s is stretched so every probe simulates at least this many
    # requests: at low rates a short stream is a handful of requests, and one long prompt decides.
    min_requests: int = Field(default=200, gt=0)
    target_rate: float | None = Field(default=None, gt=0)
    # USD per GPU-hour by catalogue GPU name, replacing the catalogue's price (kvsim search --price)
    prices: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    space: SearchSpace | None = None  # None: each sweep point is one configuration, as written

    @field_validator("rate_path")
    @classmethod
    def _a_request_rate(cls, path: str | None) -> str | None:
        allowed = [p for paths in RATE_PATHS.values() for p in paths]
        if path is not None and path not in allowed:
            raise ValueError(f"not a request rate a search can vary; give one of {', '.join(allowed)}")
        return path

    @field_validator("rate_max")
    @classmethod
    def _above_rate_min(cls, rate_max: float, info: ValidationInfo) -> float:
        rate_min = info.data.get("rate_min")  # absent when it was itself invalid
        if rate_min is not None and rate_max <= rate_min:
            raise ValueError(f"must be above rate_min={rate_min:g}")
        return rate_max

    @field_validator("rate_start")
    @classmethod
    def _within_bounds(cls, rate_start: float | None, info: ValidationInfo) -> float | None:
        low, high = info.data.get("rate_min"), info.data.get("rate_max")
        if rate_start is not None and low is not None and high is not None and not low <= rate_start <= high:
            raise ValueError(f"must lie within rate_min={low:g} and rate_max={high:g}")
        return rate_start

    @field_validator("target_rate")
    @classmethod
    def _requests_per_s(cls, target: float | None, info: ValidationInfo) -> float | None:
        if target is not None and info.data.get("rate_path") == "workload.rate_scale":
            raise ValueError("is requests per second, but rate_path is workload.rate_scale (a multiple of the "
                             "trace's rate): search workload.rate instead")
        return target


class _PlanPoint(BaseModel):
    scenario: dict[str, Any]


class _PlanFile(BaseModel):
    """The parts of ``sweep.json`` that reports read (checked so a damaged file is one clear error)."""

    file: str
    paths: list[str]
    points: list[_PlanPoint]


class _Sweep(BaseModel):
    model_config = _STRICT
    grid: dict[str, list[Any]] | None = None
    zip: dict[str, list[Any]] | None = None
    variants: list[_Variant] | None = None
    search: SearchConfig | None = None


@dataclass(frozen=True)
class Point:
    """One resolved scenario of a sweep."""

    index: int
    values: Mapping[str, Any]  # swept path -> value (grid and zip)
    variant: str | None
    raw: Mapping[str, Any]  # the scenario dict with every override applied, without `sweep:`
    key: str  # hash of `raw` and the kvsim version: the resume key

    def label(self, exclude: str | None = None) -> str:
        parts = [f"{k}={v}" for k, v in self.values.items() if k != exclude]
        return ", ".join(([f"variant={self.variant}"] if self.variant else []) + parts) or "base scenario"


@dataclass(frozen=True)
class SweepPlan:
    """Every point of a sweep, validated; ``paths`` are the swept paths in column order."""

    file: str
    paths: tuple[str, ...]
    points: tuple[Point, ...]
    search: SearchConfig


def point_key(raw: Mapping[str, Any]) -> str:
    """Stable hash of a resolved scenario (key order does not matter) and of the kvsim version."""
    text = json.dumps({"kvsim": kvsim.__version__, "scenario": raw}, sort_keys=True, default=str,
                      separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_raw(path: str | Path, sets: Sequence[str] = ()) -> dict:
    """The scenario file as a dict, with ``--set KEY=VALUE`` overrides applied (kvsim run's rules)."""
    from kvsim.scenario.load import load_raw as scenario_raw

    return scenario_raw(path, sets)


def _parse_sweep(section: object, file: str) -> _Sweep:
    if not isinstance(section, dict):
        raise KvsimError("expected a mapping with grid, zip, variants or search", field=SWEEP_KEY,
                         value=section, file=file)
    try:
        sweep = _Sweep.model_validate(section)
    except ValidationError as err:
        raise schema_error(err, file, (SWEEP_KEY,), " (expected grid, zip, variants or search)") from None
    for part in ("grid", "zip"):
        for path, values in (getattr(sweep, part) or {}).items():
            if not values:
                raise KvsimError("empty list of values: a sweep axis needs at least one value",
                                 field=f"{SWEEP_KEY}.{part}.{path}", value=values, file=file)
    for path, values in (sweep.grid or {}).items():
        twice = _repeated(values)
        if twice:
            raise KvsimError("listed twice: the same point would run twice", field=f"{SWEEP_KEY}.grid.{path}",
                             value=twice[0], file=file)
    if sweep.grid is not None and not sweep.grid:
        raise KvsimError("empty grid: name at least one path with a list of values",
                         field=f"{SWEEP_KEY}.grid", value={}, file=file)
    if sweep.zip is not None and not sweep.zip:
        raise KvsimError("empty zip: name at least one path with a list of values", field=f"{SWEEP_KEY}.zip",
                         value={}, file=file)
    if sweep.zip:
        lengths = {path: len(v) for path, v in sweep.zip.items()}
        if len(set(lengths.values())) > 1:
            raise KvsimError("zip lists must have equal lengths", field=f"{SWEEP_KEY}.zip", value=lengths,
                             file=file)
        # one value may repeat in a zip list (a model on two GPUs); a whole position may not
        twice = _repeated([dict(zip(sweep.zip, row, strict=True)) for row in zip(*sweep.zip.values(), strict=True)])
        if twice:
            raise KvsimError("the same position is listed twice: the same point would run twice",
                             field=f"{SWEEP_KEY}.zip", value=twice[0], file=file)
    if sweep.variants is not None and not sweep.variants:
        raise KvsimError("empty list of variants", field=f"{SWEEP_KEY}.variants", value=[], file=file)
    names = [v.name for v in sweep.variants or []]
    if len(set(names)) != len(names):
        raise KvsimError("variant names must be unique", field=f"{SWEEP_KEY}.variants", value=names,
                         file=file)
    both = set(sweep.grid or {}) & set(sweep.zip or {})
    if both:
        raise KvsimError("a path is swept by both grid and zip", field=f"{SWEEP_KEY}.zip", value=sorted(both),
                         file=file)
    for v in sweep.variants or []:
        clash = set(v.set) & (set(sweep.grid or {}) | set(sweep.zip or {}))
        if clash:
            raise KvsimError("a variant sets a path the grid or zip already sweeps",
                             field=f"{SWEEP_KEY}.variants[{v.name}].set", value=sorted(clash), file=file)
    return sweep


def _blame(err: KvsimError, assigned: Mapping[str, tuple[str, Any]]) -> tuple[str, Any] | None:
    """The (sweep field, value) whose override a scenario error is about, if one can be named."""
    for path, where in assigned.items():
        if err.field is None:
            if f"{path}=" in str(err):  # a catalogue error names the key in its text only
                return where
        elif err.field == path or err.field.startswith(path + ".") or path.startswith(err.field + "."):
            return where
    return None


def _bare(err: KvsimError, path: str | None = None, value: Any = None) -> str:
    """The message of a KvsimError without its "file: field=value: " prefix (re-raised with ours)."""
    text = str(err)
    if err.file and text.startswith(f"{err.file}: "):
        text = text[len(err.file) + 2:]
    named = f"{err.field}: " if err.value is None else f"{err.field}={err.value!r}: "  # as KvsimError names it
    for prefix in ([named] if err.field is not None else []) + \
            ([f"{path}={value!r}: "] if path else []):
        text = text.removeprefix(prefix)
    return text


# Scenario keys that, with an instance's GPU and TP degree, decide whether it can be built (catalogue
# names, method spec, engine memory arguments); each distinct combination is built once (a build
# reads calibration tables: a search space of 34 deployments built 64 instances, 8 of them distinct).
_DEPLOYMENT_KEYS = ("model", "weights", "method", "engine", "calibration")


def _resolve(base: dict, assigned: Mapping[str, tuple[str, Any]], label: str, file: str,
             checked: dict[str, None]) -> dict:
    """Apply every override of one point and check the result (:func:`check_point`)."""
    from kvsim.scenario import apply_override

    raw = base
    for path, (field, value) in assigned.items():
        try:
            raw = apply_override(raw, path, value)
        except KvsimError as err:
            raise KvsimError(f"the path names no scenario field ({_bare(err)})", field=field, value=value,
                             file=file) from None
    check_point(raw, assigned, label, file, checked)
    return raw


def check_point(raw: dict, assigned: Mapping[str, tuple[str, Any]], label: str, file: str,
                checked: dict[str, None]) -> None:
    """Validate a resolved scenario with the scenario schema and build its deployment (catalogue
    names, method spec, TP; each side of a disaggregation) so a typo stops a sweep or a search
    before anything runs. ``assigned`` maps the scenario paths the sweep set to the (sweep field,
    value) an error is blamed on; ``checked`` holds the deployments already built. A deployment that
    does not fit in memory is a result of that point, not an input error."""
    from kvsim.scenario import scenario_from_dict
    from kvsim.scenario.run import deployment

    try:
        scenario = scenario_from_dict(raw, file)
        spec = scenario.spec
        # a disaggregated scenario runs only its two sides (kvsim.scenario.run.simulation), each with
        # its own GPU and TP degree, and refuses data parallelism on them
        for side in ("prefill", "decode") if spec.disaggregation else (None,):
            gpu, tp = spec.hardware, spec.tp
            if side is not None:
                own = getattr(spec.disaggregation, side)
                gpu, tp = own.hardware or gpu, own.tp or tp
            combo = json.dumps({**{k: raw.get(k) for k in _DEPLOYMENT_KEYS}, "hardware": gpu, "tp": tp,
                                "disaggregated": side is not None}, sort_keys=True, default=str)
            if combo in checked:
                continue
            checked[combo] = None
            try:
                deployment(scenario, side)
            except DoesNotFit:
                pass  # a result of that point, not an input error
    except KvsimError as err:
        where = _blame(err, assigned)
        if where is None:
            raise KvsimError(f"sweep point ({label}) is not a valid scenario: {err}", field=SWEEP_KEY,
                             file=file) from None
        path = next(p for p, w in assigned.items() if w == where)
        raise KvsimError(f"{_bare(err, path, where[1])} (sweep point {label})", field=where[0],
                         value=where[1], file=file) from None


def expand(raw: Mapping[str, Any], file: str) -> SweepPlan:
    """All points of a scenario dict's ``sweep:`` section (one point when there is none), each one
    validated (schema and deployment, see :func:`_resolve`). Raises one KvsimError naming the
    swept path, its value and the file."""
    base = {k: v for k, v in raw.items() if k != SWEEP_KEY}
    sweep = _parse_sweep(raw[SWEEP_KEY], file) if SWEEP_KEY in raw else _Sweep()
    grid, zipped = sweep.grid or {}, sweep.zip or {}
    paths = tuple(grid) + tuple(zipped)
    grid_rows = list(itertools.product(*grid.values())) if grid else [()]
    zip_rows = list(zip(*zipped.values(), strict=True)) if zipped else [()]
    variants: list[_Variant | None] = list(sweep.variants) if sweep.variants else [None]
    points: list[Point] = []
    checked: dict[str, None] = {}
    for variant, g, z in itertools.product(variants, grid_rows, zip_rows):
        values = dict(zip(paths, g + z, strict=True))
        assigned: dict[str, tuple[str, Any]] = {}
        if variant is not None:
            where = f"{SWEEP_KEY}.variants[{variant.name}].set"
            assigned.update({p: (f"{where}.{p}", v) for p, v in variant.set.items()})
        assigned.update({p: (f"{SWEEP_KEY}.grid.{p}", v) for p, v in zip(grid, g, strict=True)})
        assigned.update({p: (f"{SWEEP_KEY}.zip.{p}", v) for p, v in zip(zipped, z, strict=True)})
        name = variant.name if variant else None
        label = ", ".join(([f"variant={name}"] if name else []) + [f"{k}={v!r}" for k, v in values.items()])
        resolved = _resolve(base, assigned, label or "base scenario", file, checked)
        points.append(Point(len(points), values, name, resolved, point_key(resolved)))
    return SweepPlan(file, paths, tuple(points), sweep.search or SearchConfig())


# ---------------------------------------------------------------- running points

def run_point(raw: Mapping[str, Any], file: str, run_dir: str | None = None) -> dict:
    """Simulate one resolved scenario. Never raises: a failure is recorded as the point's result.

    Runs in a worker process (local pool or Ray task), so it takes and returns plain data.
    """
    from kvsim.scenario import run_scenario, scenario_from_dict

    t0, c0 = time.perf_counter(), time.process_time()
    try:
        result = run_scenario(scenario_from_dict(dict(raw), file))
        if run_dir:
            from kvsim.scenario import write_outputs

            write_outputs(result, Path(run_dir))
        out = {"status": "ok", "error": "", "summary": result.summary}
    except Exception as err:  # noqa: BLE001 - any failure of one point is data, the sweep goes on
        text = str(err) if isinstance(err, KvsimError) else f"{type(err).__name__}: {err}"
        out = {"status": "error", "error": text, "summary": {}}
    # wall and CPU seconds of the point in its worker (points.jsonl only; the tables stay deterministic)
    return {**out, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


# ---------------------------------------------------------------- results on disk

def flatten(summary: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"ttft_s": {"p50": x}}`` -> ``{"ttft_s.p50": x}``; lists become JSON text."""
    out: dict[str, Any] = {}
    for k, v in summary.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, name + "."))
        elif isinstance(v, (list, tuple)):
            out[name] = json.dumps(v)
        else:
            out[name] = v
    return out


class _PointRecord(BaseModel):
    """What a resumed sweep reads of a ``points.jsonl`` line (written by :meth:`ResultStore.add`): a
    line that says otherwise would be taken as a finished point and copied into the tables."""

    model_config = ConfigDict(strict=True, frozen=True)
    key: str = Field(min_length=1)
    status: Literal["ok", "error"]
    error: str
    summary: dict[str, Any]

    @field_validator("summary")
    @classmethod
    def _ok_has_a_summary(cls, summary: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if info.data.get("status") == "ok" and not summary:
            raise ValueError("status ok without a run summary")
        return summary


class ResultStore:
    """``points.jsonl`` (append-only, one line per finished point) and the tables rebuilt from it."""

    def __init__(self, folder: Path, plan: SweepPlan) -> None:
        self.folder, self.plan = folder, plan
        self.jsonl = folder / "points.jsonl"
        self.records: dict[str, dict] = {}
        folder.mkdir(parents=True, exist_ok=True)
        self._load()

    def _load(self) -> None:
        if not self.jsonl.is_file():
            return
        # A damaged byte spoils its line only: that point is redone.
        text = self.jsonl.read_text(encoding="utf-8", errors="replace")
        if text and not text.endswith("\n"):  # cut off mid-line: drop the partial record
            text = text[: text.rfind("\n") + 1]
            write_atomic(self.jsonl, text)
        for n, line in enumerate(text.splitlines(), 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a damaged line is a point to redo, not a reason to stop
            try:
                _PointRecord.model_validate(rec)
            except ValidationError as err:  # JSON, but not a finished point: trusting it would skip the point
                bad = schema_error(err, None)
                raise KvsimError(f"line {n} is not a finished point of a sweep ({_bare(bad)}); fix or delete "
                                 "the line (its point is then redone), or add --force to start over",
                                 field=bad.field, value=bad.value, file=str(self.jsonl)) from None
            self.records[rec["key"]] = rec

    def finished(self, point: Point, retry_errors: bool = False) -> bool:
        rec = self.records.get(point.key)
        return rec is not None and not (retry_errors and rec.get("status") != "ok")

    def add(self, point: Point, result: Mapping[str, Any]) -> None:
        rec = {"key": point.key, "point": point.index, "values": dict(point.values), "variant": point.variant,
               **result}
        with self.jsonl.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[point.key] = rec

    def write_plan(self) -> None:
        """``sweep.json``: the scenario file, swept paths and every point's resolved scenario, so
        reports and plots can read what each point was (model, GPU, method) without the YAML."""
        points = [{"point": p.index, "key": p.key, "variant": p.variant, "values": dict(p.values),
                   "scenario": dict(p.raw)} for p in self.plan.points]
        doc = {"file": self.plan.file, "paths": list(self.plan.paths), "points": points}
        write_atomic(self.folder / "sweep.json", json.dumps(doc, indent=1, default=str))

    def rows(self) -> list[dict]:
        """One row per point of the plan that has finished, in point order."""
        rows = []
        for p in self.plan.points:
            rec = self.records.get(p.key)
            if rec is None:
                continue
            row: dict[str, Any] = {"point": p.index, **{path: p.values[path] for path in self.plan.paths},
                                   "variant": p.variant or "", "status": rec["status"],
                                   "error": rec["error"], "key": p.key}  # fields _PointRecord checked
            row.update(flatten(rec["summary"]))
            rows.append(row)
        return rows

    def write_tables(self) -> list[str]:
        """Rewrite results.csv (and results.parquet when pyarrow is present); returns notes to print."""
        rows = self.rows()
        columns = list(dict.fromkeys(c for r in rows for c in r)) or \
            ["point", *self.plan.paths, *STATUS_COLUMNS]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: _csv_cell(r.get(c)) for c in columns})
        write_atomic(self.folder / "results.csv", buf.getvalue())
        try:
            data = _parquet_bytes(rows, columns)
        except ImportError:
            return ["results.parquet not written: pyarrow is not installed (pip install 'kvsim[parquet]')"]
        write_atomic(self.folder / "results.parquet", data)
        return []


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return v


def _parquet_bytes(rows: list[dict], columns: list[str]) -> bytes:
    """A Parquet file of the rows: a column of numbers stays numeric, any other column is text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for c in columns:
        values = [r.get(c) for r in rows]
        present = [v for v in values if v is not None]
        if present and all(isinstance(v, bool) for v in present):
            arrays[c] = pa.array(values, type=pa.bool_())
        elif present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
            arrays[c] = pa.array(values, type=pa.int64())
        elif present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
            arrays[c] = pa.array([None if v is None else float(v) for v in values], type=pa.float64())
        else:
            arrays[c] = pa.array([None if v is None else str(_csv_cell(v)) for v in values], type=pa.string())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(arrays), sink)
    return sink.getvalue().to_pybytes()


def read_results(folder: Path) -> list[dict]:
    """The rows of a sweep folder's results.csv, numbers parsed back to int/float."""
    path = folder / "results.csv"
    if not path.is_file():
        raise KvsimError("no results.csv: not a sweep folder (run `kvsim sweep ... --out DIR`)",
                         field="results", value=str(folder), file=str(path))
    rows = read_csv_rows(path, "a sweep's results.csv", ("point", "variant", *STATUS_COLUMNS))
    return [{k: _number(v) for k, v in row.items()} for row in rows]


def read_plan(folder: Path) -> dict:
    """A sweep folder's ``sweep.json`` (see :meth:`ResultStore.write_plan`)."""
    path = folder / "sweep.json"
    if not path.is_file():
        raise KvsimError("no sweep.json: not a sweep folder (run `kvsim sweep ... --out DIR`)",
                         field="results", value=str(folder), file=str(path))
    return read_checked_json(path, "a sweep's sweep.json", _PlanFile)


def swept_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The swept-path columns of a results table: those between ``point`` and ``variant``."""
    if not rows:
        return []
    cols = list(rows[0])
    return cols[cols.index("point") + 1: cols.index("variant")]


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return None if text == "" else text


# ---------------------------------------------------------------- the sweep

@dataclass(frozen=True)
class SweepOutcome:
    total: int
    skipped: int  # finished in an earlier run (resume)
    ran: int
    failed: int  # points whose status is error, this run or earlier
    notes: tuple[str, ...]


SWEEP_FILES = ("points.jsonl", "sweep.json", "results.csv", "results.parquet")


def _check_discardable(out: Path) -> None:
    """What --force deletes must be a sweep's own output: its files are plain files, and runs/ holds only
    --keep-runs folders of `kvsim run` files (a user's folder under one of those names is never deleted)."""
    from kvsim.scenario.outputs import RUN_FILES

    foreign = [name for name in SWEEP_FILES if (out / name).exists() and not (out / name).is_file()]
    runs = out / "runs"
    if runs.exists():
        if not runs.is_dir():
            foreign.append("runs")
        else:
            foreign += [f"runs/{d.name}" for d in runs.iterdir()
                        if not d.is_dir() or any(f.name not in RUN_FILES or not f.is_file() for f in d.iterdir())]
    if foreign:
        raise KvsimError(f"--force would delete what is not a sweep's output ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); give a new folder", field="--out", value=str(out))


def prepare_folder(plan: SweepPlan, out: Path, force: bool) -> None:
    """Before a sweep: ``out`` must be writable and new, empty, or this sweep's own folder (then the
    sweep resumes). A `kvsim run` folder, or finished points of another sweep (another scenario or
    kvsim version), are refused, since their rows would be mixed in or silently dropped; ``force``
    discards the earlier sweep's files and starts over."""
    from kvsim.scenario.outputs import RUN_FILES

    check_writable(out, "--out", folder=True)
    if not out.is_dir():
        return
    if any((out / name).exists() for name in RUN_FILES):
        raise KvsimError("holds a `kvsim run` output, not a sweep; give a new or empty folder", field="--out",
                         value=str(out))
    if force:  # discarded unread: a damaged points.jsonl must not stop the way to start over
        _check_discardable(out)
        for name in SWEEP_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "runs", ignore_errors=True)
        return
    keys = {p.key for p in plan.points}
    other = [k for k in ResultStore(out, plan).records if k not in keys]
    if other:
        raise KvsimError(f"holds {len(other)} finished points of another sweep (another scenario, or another "
                         "kvsim version); give a new folder, or add --force to discard them", field="--out",
                         value=str(out))


def run_sweep(plan: SweepPlan, out: Path, jobs: int | None = None, backend: Backend = "local",
              address: str | None = None, retry_errors: bool = False, keep_runs: bool = False,
              progress: bool = False, table_interval_s: float = 1.0) -> SweepOutcome:
    """Run every point of ``plan`` not already finished in ``out`` and write the result tables.

    Each finished point is appended to ``points.jsonl`` at once; the tables are rewritten at most
    every ``table_interval_s`` and at the end. ``keep_runs`` also writes each point's own run
    folder (``runs/<key>/``: summary, per-request CSV, time series) for plots of one point.
    """
    store = ResultStore(out, plan)
    store.write_plan()
    todo = [p for p in plan.points if not store.finished(p, retry_errors)]
    tasks = [(dict(p.raw), plan.file, str(out / "runs" / p.key) if keep_runs else None) for p in todo]
    bar = Progress("sweep", progress, total=len(plan.points))
    done = len(plan.points) - len(todo)
    bar.update(done, 0)
    last_write = time.perf_counter()
    try:
        for i, result in execute(run_point, tasks, backend, jobs, address):
            store.add(todo[i], result)
            done += 1
            bar.update(done, sum(r.get("status") != "ok" for r in store.records.values()))
            if time.perf_counter() - last_write >= table_interval_s:
                store.write_tables()
                last_write = time.perf_counter()
    finally:
        bar.close()
        notes = store.write_tables()
    failed = sum(1 for p in plan.points if store.records.get(p.key, {}).get("status") == "error")
    return SweepOutcome(len(plan.points), len(plan.points) - len(todo), len(todo), failed, tuple(notes))
