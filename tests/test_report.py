"""`kvsim report`: one self-contained HTML page holding every figure (as base64 PNG) and the
tables of a sweep folder, and the sweep figures drawn from real sweep results."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from sweep_scenario import write_scenario

from kvsim import plots
from kvsim.cli import main
from kvsim.report import load_column, rate_column, series_columns
from kvsim.sweep import expand, load_raw, read_results, run_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SWEEP = {"grid": {"method": ["bf16", "fp8"], "workload.synthetic.rate": [2.0, 16.0, 64.0]},
         "zip": {"hardware": ["h100-sxm", "l40s"]}}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A real 12-point sweep (2 methods x 3 rates x 2 GPUs) with run folders kept,
    and a capacity search over its configurations."""
    folder = tmp_path_factory.mktemp("sweep")
    sweep = {**SWEEP, "variants": [{"name": "v", "set": {}}]}
    path = write_scenario(folder, sweep)
    run_sweep(expand(load_raw(path), str(path)), folder / "out", jobs=2, keep_runs=True)
    main(["search", str(path), "--jobs", "2", "--target-rate", "20", "--out", str(folder / "out")])
    return folder / "out"


def figures_in(html: str) -> dict[str, bytes]:
    pattern = r"<figure id='fig-([\w-]+)'><img alt='[^']*' src='data:image/png;base64,([^']+)'"
    found = re.findall(pattern, html)
    return {fid: base64.b64decode(data) for fid, data in found}


def test_report_holds_every_figure_and_table(sweep_dir: Path, calibrated_root: Path, capsys):
    root = calibrated_root
    main(["report", str(sweep_dir), "--validation", "h100-sxm", "--validation-results", str(root)])
    assert f"wrote {sweep_dir / 'report.html'}" in capsys.readouterr().out
    html = (sweep_dir / "report.html").read_text()
    figs = figures_in(html)
    assert set(figs) == {"search", "latency", "goodput", "capacity-tp1", "kv-usage", "validation"}
    assert all(png.startswith(PNG_MAGIC) and len(png) > 10_000 for png in figs.values())
    assert "<h2>Capacity search</h2>" in html and "cheapest" in html
    assert "<h2>All points</h2>" in html and html.count("<tr class=\"ok\">") == 12
    assert "src='http" not in html and "<script" not in html  # self-contained


def test_report_without_validation(sweep_dir: Path, tmp_path: Path):
    out = tmp_path / "r.html"
    main(["report", str(sweep_dir), "--out", str(out)])
    assert set(figures_in(out.read_text())) == {"search", "latency", "goodput", "capacity-tp1", "kv-usage"}


def test_report_of_a_folder_that_is_not_a_sweep(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["report", str(tmp_path)])
    assert stop.value.code == 2 and "results.csv" in capsys.readouterr().err


def test_series_and_axes_come_from_the_swept_paths(sweep_dir: Path):
    rows = read_results(sweep_dir)
    assert rate_column(["method", "workload.synthetic.rate"]) == "workload.synthetic.rate"
    assert rate_column(["method", "workload.rate_scale"]) == "workload.rate_scale"
    assert load_column(rows) == "workload.synthetic.rate"
    assert series_columns(rows, "workload.synthetic.rate") == ["method", "hardware"]
    fig = plots.goodput_rate(rows, "workload.synthetic.rate", ["method", "hardware"])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "offered load: workload.synthetic.rate (requests/s)"
    assert len(ax.lines) == 4 and all(len(line.get_xdata()) == 3 for line in ax.lines)
    goodput = {(r["method"], r["hardware"], r["workload.synthetic.rate"]): r["goodput"] for r in rows}
    assert goodput[("bf16", "h100-sxm", 2.0)] >= goodput[("bf16", "h100-sxm", 64.0)]
    fig = plots.latency_throughput(rows, ["method", "hardware"], "workload.synthetic.rate")
    ax_ttft, ax_tpot = fig.axes
    assert ax_ttft.get_ylabel() == "time to first token (ms)"
    assert ax_tpot.get_ylabel() == "time per output token (ms)"
    assert len(ax_ttft.lines) == 4 * 3  # 4 series x p50/p90/p99
    assert [t.get_text() for t in fig.legends[0].get_texts()][0] == "method=bf16, hardware=h100-sxm"


def test_cli_plots_from_the_sweep_and_a_run_folder(sweep_dir: Path, tmp_path: Path):
    for kind in ("latency", "goodput"):
        out = tmp_path / f"{kind}.png"
        main(["plot", kind, "--results", str(sweep_dir), "--out", str(out)])
        assert out.read_bytes().startswith(PNG_MAGIC)
    runs = sorted((sweep_dir / "runs").iterdir())[:2]
    out = tmp_path / "kv.png"
    main(["plot", "kv-usage", "--results", ",".join(map(str, runs)), "--out", str(out)])
    assert out.read_bytes().startswith(PNG_MAGIC)
