"""Figures: capacity curves from the vectorized grid, predicted-vs-measured from validation
results, the CLI plot kinds and their bad-input errors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from kvsim import plots
from kvsim.capacity import capacity_grid
from kvsim.cli import main
from kvsim.errors import KvsimError
from kvsim.spec.hardware import load_hardware
from kvsim.spec.model import load_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture()
def validation_root(calibrated_root: Path) -> Path:
    """The repository's H100 measurements, calibrated and validated in a scratch copy."""
    return calibrated_root


def test_capacity_curves_one_panel_per_model_and_gpu():
    grid = capacity_grid([load_model("llama-3-8b"), load_model("llama-2-7b")], ["bf16", "fp8", "kivi:bits=2"],
                         [load_hardware("h100-sxm"), load_hardware("l40s")], [1024, 8192, 65536])
    fig = plots.capacity_curves(grid, tp=1)
    axes = fig.axes
    assert len(axes) == 4
    assert axes[0].get_ylabel() == "max concurrent sequences"
    assert axes[-1].get_xlabel() == "context length (tokens per sequence)"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["bf16", "fp8", "kivi:bits=2"]
    # the plotted values are the grid's (llama-3-8b, bf16, h100-sxm)
    y = axes[0].lines[0].get_ydata()
    assert np.array_equal(y, grid.max_concurrency[0, 0, 0].astype(float))
    assert plots.render(fig).startswith(PNG_MAGIC)


def test_predicted_measured_reads_validation_csv(validation_root: Path):
    fig = plots.predicted_measured(validation_root / "h100-sxm")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Decode step (reference engine)", "Prefill (reference engine)", "Allocated KV cache",
                      "Decode-attention speed-up per method"]
    assert fig.axes[0].get_xlabel() == "measured decode step (ms)"
    decode_rows = 0
    for path in (validation_root / "h100-sxm").glob("validation*.csv"):  # one series per profile
        with path.open() as f:
            decode_rows += sum(1 for r in csv.DictReader(f) if r["kind"].split()[0] == "decode")
    assert decode_rows > 500
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections if c.get_label() != "within 25%") == decode_rows
    plots.render(fig)


def test_predicted_measured_draws_tensor_parallel_rows_in_their_kinds_panel(validation_root: Path):
    """TP rows (kind ``decode tp=2``) are series of the decode panel, not dropped."""
    folder = validation_root / "h100-sxm-x2"
    with (folder / "validation_from_h100-sxm.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["kind"].split()[0] == "decode"]
    assert any(r["kind"] == "decode tp=2" for r in rows)
    fig = plots.predicted_measured(folder)
    drawn = [c for c in fig.axes[0].collections if c.get_label() != "within 25%"]
    assert sum(len(c.get_offsets()) for c in drawn) == len(rows)
    assert any(c.get_label().endswith("(tp=2)") for c in drawn)


def test_validate_draws_its_figure_with_the_plot_command_function(tmp_path: Path, validation_root: Path,
                                                                    monkeypatch):
    """One predicted-vs-measured figure: ``kvsim validate`` draws its PNG with the same function as
    ``kvsim plot validation``, with the same panels."""
    import shutil

    from kvsim.validate import validate

    for name in ("h100-sxm", "h100-sxm-x2"):  # the donor's profile and the judged runs, in a scratch root
        shutil.copytree(validation_root / name, tmp_path / name)
    drawn = []
    real = plots.predicted_measured_figure

    def spy(profiles, title):
        fig = real(profiles, title)
        drawn.append([ax.get_title() for ax in fig.axes])
        return fig

    monkeypatch.setattr(plots, "predicted_measured_figure", spy)
    validate("h100-sxm-x2", "h100-sxm", tmp_path)
    assert len(drawn) == 1
    assert drawn[0] == [ax.get_title() for ax in plots.predicted_measured(tmp_path / "h100-sxm-x2").axes]
    assert (tmp_path / "h100-sxm-x2" / "predicted_vs_measured_from_h100-sxm.png").read_bytes().startswith(
        PNG_MAGIC)


def test_predicted_measured_without_results_names_the_folder(tmp_path: Path):
    with pytest.raises(KvsimError, match="kvsim validate"):
        plots.predicted_measured(tmp_path)


def test_cli_plot_kinds_write_images(tmp_path: Path, validation_root: Path, capsys):
    out = tmp_path / "grid.png"
    main(["plot", "capacity-grid", "--model", "llama-3-8b,mistral-7b", "--hardware", "h100-sxm,h200-sxm",
          "--methods", "bf16,fp8", "--contexts", "1024,4096,32768", "--out", str(out)])
    assert out.read_bytes().startswith(PNG_MAGIC)
    out = tmp_path / "val.svg"
    main(["plot", "validation", "--gpu", "h100-sxm", "--validation-results", str(validation_root),
          "--out", str(out)])
    assert out.read_text().lstrip().startswith("<?xml")
    out = tmp_path / "cap.png"
    main(["plot", "capacity", "--model", "llama-3-8b", "--hardware", "h100-sxm", "--out", str(out)])
    assert out.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("argv, field", [
    (["plot", "latency", "--out", "x.png"], "--results"),
    (["plot", "capacity-grid", "--hardware", "h100-sxm", "--out", "x.png"], "--model"),
    (["plot", "validation", "--out", "x.png"], "--gpu"),
    (["plot", "goodput", "--results", "no/such/dir", "--out", "x.png"], "results"),
    (["plot", "kv-usage", "--results", "no/such/run", "--out", "x.png"], "--results"),
])
def test_cli_plot_bad_input_exits_2_with_one_line(argv, field, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err
    assert not (tmp_path / "x.png").exists()
