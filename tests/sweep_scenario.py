"""Helpers shared by the sweep, search, report and plot tests: a tiny real scenario (Llama-3-8B on
an H100, fixed lengths, so one run takes tens of milliseconds) and a calibrated copy of the
repository's H100 validation results."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "model": "llama-3-8b",
    "hardware": "h100-sxm",
    "workload": {"synthetic": {"rate": 8.0, "num_requests": 60, "input": {"kind": "fixed", "tokens": 512},
                               "output": {"kind": "fixed", "tokens": 64}}},
    "slo": {"ttft_s": 0.5, "tpot_s": 0.05},
    "seed": 1,
}


def write_scenario(folder: Path, sweep: dict | None, name: str = "sweep.yaml", **fields: object) -> Path:
    """TINY with ``fields`` replaced and a ``sweep:`` section, written as YAML into ``folder``."""
    raw = {**TINY, **fields}
    if sweep is not None:
        raw["sweep"] = sweep
    path = folder / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
