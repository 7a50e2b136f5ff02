"""``kvsim report DIR``: one self-contained HTML page for a sweep folder (figures embedded as
base64 PNG, tables inline, no external files), written atomically to ``DIR/report.html``.

Figures: throughput against TTFT/TPOT percentiles; goodput against offered rate (when a rate is
swept); capacity curves for the sweep's models, methods and GPUs (analytic, kvsim/capacity.py);
KV usage over time of the points run with ``--keep-runs``; predicted against measured for a GPU's
validation results (``--validation GPU``). Tables: every point, failed points, and the capacity
search ranking when ``kvsim search --out DIR`` wrote one.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import kvsim
from kvsim.errors import KvsimError
from kvsim.fileio import read_checked_json, write_atomic
from kvsim.sweep import read_plan, read_results, swept_columns

# Columns shown in the points table (when present), after the swept paths.
HEADLINE_METRICS = ("throughput_output_tokens_per_s", "ttft_s.p50", "ttft_s.p99", "tpot_s.p50", "tpot_s.p99",
                    "goodput", "preemptions", "prefix_hit_rate", "num_gpu_blocks")
MAX_KV_RUNS = 8  # KV-usage lines per figure: more would be unreadable
MAX_CAPACITY_PANELS = 12  # (model, GPU) panels in one capacity figure


@dataclass(frozen=True)
class Figure:
    id: str
    title: str
    caption: str
    png: bytes


def rate_column(paths: Sequence[str]) -> str | None:
    """The swept path that sets the offered load (``...rate`` or ``...rate_scale``), if any."""
    for p in paths:
        if p.rsplit(".", 1)[-1] in ("rate", "rate_scale"):
            return p
    return None


def load_column(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The swept column that moves a point along its curve: the swept rate, else the last swept
    column with numeric values (e.g. engine.max_num_seqs), else none (every point stands alone)."""
    paths = swept_columns(rows)
    rate = rate_column(paths)
    if rate:
        return rate
    numeric = [p for p in paths if all(isinstance(r.get(p), (int, float)) for r in rows)]
    return numeric[-1] if numeric else None


def series_columns(rows: Sequence[Mapping[str, Any]], exclude: str | None) -> list[str]:
    """Columns that tell one series of points from another: swept paths (but the x axis) and the
    variant when there are several."""
    cols = [c for c in swept_columns(rows) if c != exclude]
    if len({r.get("variant") for r in rows}) > 1:
        cols.append("variant")
    return cols


def search_figure(search: Mapping[str, Any]) -> Figure:
    """Goodput against offered rate at every rate the capacity search simulated, per configuration."""
    from kvsim import plots

    rows = [{"config": c["label"], "rate": rate, "goodput": goodput}
            for c in search["configs"] for rate, goodput in c["probes"] if goodput is not None]
    unit = "x trace rate" if str(search.get("rate_path")).endswith("rate_scale") else "requests/s"
    fig = plots.goodput_rate(rows, "rate", ["config"], threshold=search.get("min_goodput"), rate_unit=unit,
                             names=False, legend_title="configuration")
    fig.axes[0].set_xlabel(f"offered load: {search.get('rate_path')} ({unit})")
    fig.axes[0].set_title("Capacity search: goodput at every simulated rate")
    return Figure("search", "Capacity search probes",
                  "Each point is one simulation of the search; a configuration sustains the highest rate "
                  f"whose goodput stays at or above {search.get('min_goodput')}.", plots.render(fig))


def sweep_figures(folder: Path, rows: list[dict], validation: Path | None = None) -> list[Figure]:
    """Every figure the report can draw for this folder (skipping those without data)."""
    from kvsim import plots

    ok = [r for r in rows if r.get("status") == "ok"]
    rate = rate_column(swept_columns(rows))
    figs = []
    if ok and "ttft_s.p50" in ok[0]:
        along = load_column(ok)
        joined = f", joined in order of {along}" if along else ""
        figs.append(Figure("latency", "Throughput against latency percentiles",
                           f"Each colour is one series of sweep points{joined}; solid p50, dashed p90, "
                           "dotted p99.",
                           plots.render(plots.latency_throughput(ok, series_columns(ok, along), along))))
    if ok and rate and isinstance(ok[0].get("goodput"), (int, float)):
        figs.append(Figure("goodput", "Goodput against offered load",
                           "Fraction of requests that met both the TTFT and the TPOT SLO.",
                           plots.render(plots.goodput_rate(ok, rate, series_columns(ok, rate),
                                                           rate_unit="x trace rate" if rate.endswith("scale")
                                                           else "requests/s"))))
    figs += capacity_figures(read_plan(folder))
    runs = kv_runs(folder, rows)
    if runs:
        figs.append(Figure("kv-usage", "KV-cache usage over time",
                           f"Points run with --keep-runs (at most {MAX_KV_RUNS}).",
                           plots.render(plots.kv_usage(runs))))
    if validation is not None:
        figs.append(Figure("validation", f"Predicted against measured: {validation.name}",
                           "From validation*.csv written by `kvsim validate`; none of these points was used "
                           "in fitting.",
                           plots.render(plots.predicted_measured(validation))))
    return figs


def capacity_figures(plan: Mapping[str, Any]) -> list[Figure]:
    """Capacity curves for the models x methods x GPUs the sweep touches, one figure per TP degree."""
    from kvsim import plots
    from kvsim.capacity import capacity_grid
    from kvsim.spec.hardware import load_hardware
    from kvsim.spec.model import load_model

    def catalogue(name: str) -> str:  # a YAML or config.json path is relative to the scenario file
        if ("/" in name or name.endswith((".yaml", ".yml", ".json"))) and not Path(name).is_absolute():
            return str(Path(plan["file"]).parent / name)
        return name

    by_tp: dict[int, dict[str, dict]] = {}
    for p in plan["points"]:
        sc = p["scenario"]
        if not all(isinstance(sc.get(k), str) for k in ("model", "hardware")):
            continue
        d = by_tp.setdefault(int(sc.get("tp", 1) or 1), {"models": {}, "gpus": {}, "methods": {}})
        d["models"][sc["model"]] = None
        d["gpus"][sc["hardware"]] = None
        d["methods"][str(sc.get("method", "bf16"))] = None
    figs = []
    for tp, d in sorted(by_tp.items()):
        models, gpus = list(d["models"]), list(d["gpus"])
        if len(models) * len(gpus) > MAX_CAPACITY_PANELS:
            gpus = gpus[: max(1, MAX_CAPACITY_PANELS // len(models))]
        specs = [load_model(catalogue(m)) for m in models]
        ctx = plots.default_contexts(max(m.max_position_embeddings for m in specs))
        grid = capacity_grid(specs, list(d["methods"]), [load_hardware(catalogue(g)) for g in gpus], ctx, tp)
        figs.append(Figure(f"capacity-tp{tp}", f"Capacity: concurrent sequences against context, TP {tp}",
                           "Analytic (vLLM-style memory plan), for every model, method and GPU of the sweep.",
                           plots.render(plots.capacity_curves(grid, tp))))
    return figs


def kv_runs(folder: Path, rows: Sequence[Mapping[str, Any]]) -> dict[str, Path]:
    """Label -> time-series CSV of the points that kept their run folder (``--keep-runs``)."""
    cols = series_columns(rows, None)
    kept = [(r, folder / "runs" / str(r.get("key")) / "timeseries.csv") for r in rows]
    kept = [(r, path) for r, path in kept if path.is_file()]
    if len(kept) > MAX_KV_RUNS:  # points spread evenly over the sweep, first and last included
        step = (len(kept) - 1) / (MAX_KV_RUNS - 1)
        kept = [kept[round(i * step)] for i in range(MAX_KV_RUNS)]
    return {", ".join(f"{c}={r.get(c)}" for c in cols) or f"point {r['point']}": path for r, path in kept}


# ---------------------------------------------------------------- HTML

_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f2f2f2}td.t{text-align:left}
tr.error td{background:#fff1f0}figure{margin:1.5em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:13px;color:#555}code{background:#f6f6f6}"""


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape("" if v is None else str(v))


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
               row_class: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cls = f' class="{html.escape(str(r.get(row_class)))}"' if row_class else ""
        cells = "".join(f'<td{" class=t" if isinstance(r.get(c), str) else ""}>{_cell(r.get(c))}</td>'
                        for c in columns)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Probed(BaseModel):
    label: str
    probes: list[tuple[float, float | None]]
    # read by kvsim plot search (kvsim.plots.search_costs)
    rank: int | None
    verdict: str
    max_rate: float
    limit: str
    replicas: int | None
    gpus_per_replica: int
    cost_usd_per_hour: float | None
    usd_per_hour_per_rate: float | None
    deployment: str = ""  # written since sweep.search.space
    disaggregated: bool = False


class _SearchFile(BaseModel):
    """The parts of ``search.json`` the report reads (checked so a damaged file is one clear error)."""

    configs: list[_Probed]


def read_search(path: Path) -> dict:
    """A ``kvsim search --out`` folder's ``search.json``."""
    return read_checked_json(path, "a search.json (kvsim search --out)", _SearchFile)


def build_report(folder: Path, validation: Path | None = None) -> str:
    """The HTML text of the report for sweep folder ``folder``."""
    rows = read_results(folder)
    plan = read_plan(folder)
    swept = swept_columns(rows)
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    figs = sweep_figures(folder, rows, validation)
    name = html.escape(folder.name)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>kvsim sweep report: {name}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>kvsim sweep report: {html.escape(folder.name)}</h1>",
             f"<p>Scenario <code>{html.escape(str(plan['file']))}</code>; swept "
             f"{', '.join(f'<code>{html.escape(p)}</code>' for p in swept) or 'nothing'}; "
             f"{len(plan['points'])} points, {len(ok)} ok, {len(failed)} failed, "
             f"{len(plan['points']) - len(rows)} not run. kvsim {kvsim.__version__}, "
             f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC.</p>"]
    search = folder / "search.json"
    if search.is_file():
        ranked = read_search(search)
        figs.insert(0, search_figure(ranked))
        parts.append("<h2>Capacity search</h2>")
        parts.append(html_table(ranked["configs"], ["rank", "label", "gpus_per_replica",
                                                    "price_per_gpu_hour_usd", "max_rate", "replicas",
                                                    "cost_usd_per_hour", "verdict"]))
        knob = html.escape(str(ranked.get("rate_path")))
        parts.append(f"<p>Target rate: {ranked.get('target_rate')}; rate knob <code>{knob}</code>; "
                     f"tolerance {ranked.get('tolerance')}.</p>")
    for f in figs:
        data = base64.b64encode(f.png).decode()
        title = html.escape(f.title)
        parts.append(f"<h2>{title}</h2><figure id='fig-{f.id}'><img alt='{title}' "
                     f"src='data:image/png;base64,{data}'><figcaption>{html.escape(f.caption)}</figcaption>"
                     "</figure>")
    metrics = [m for m in HEADLINE_METRICS if rows and m in rows[0]]
    parts.append("<h2>All points</h2>")
    parts.append(html_table(rows, ["point", *swept, "variant", "status", *metrics], row_class="status"))
    if failed:
        parts.append("<h2>Failed points</h2>")
        parts.append(html_table(failed, ["point", *swept, "variant", "error"]))
    parts.append("<p>Full results: <code>results.csv</code>, <code>results.parquet</code>, "
                 "<code>points.jsonl</code> in the same folder.</p></body></html>")
    return "\n".join(parts)


def write_report(folder: Path, out: Path | None = None, validation: Path | None = None) -> Path:
    """Write the report (default ``folder/report.html``) whole or not at all; returns its path."""
    if not folder.is_dir():
        raise KvsimError("no such sweep folder", field="DIR", value=str(folder))
    target = out or folder / "report.html"
    write_atomic(target, build_report(folder, validation))
    return target
