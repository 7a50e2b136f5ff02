"""Golden outputs: every scenario in examples/ (each point of its ``sweep:`` block) must reproduce
its summary in examples/golden/<name>.json to 1e-9 relative.

Regenerate after an intended change (a new calibration profile, a model fix) with

    .venv/bin/python tests/test_examples.py --update-golden

Examples reading ../shared/data skip cleanly when it is absent.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from kvsim.scenario import run_scenario, scenario_from_dict
from kvsim.serve.traces import shared_traces_dir
from kvsim.sweep import expand

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
GOLDEN = ROOT / "examples" / "golden"
REL_TOL = 1e-9


def run_example(path: Path) -> dict[str, dict]:
    """Summary of every point of the example's sweep (just the base scenario when it has none), without its
    track record: that is the serving judge's, rewritten by scripts/judged_accuracy.py whenever a judged
    prediction moves, and tests/test_track_record.py checks it, not the example's own simulation."""
    raw = yaml.safe_load(path.read_text())
    out = {}
    for p in expand(raw, str(path)).points:
        summary = run_scenario(scenario_from_dict(dict(p.raw), str(path.relative_to(ROOT)))).summary
        assert "note" in summary.pop("track_record")
        out[p.label()] = summary
    return out


def needs_shared(path: Path) -> bool:
    trace = (yaml.safe_load(path.read_text()).get("workload") or {}).get("trace") or ""
    return trace.startswith("shared:")


def diff(got: object, want: object, where: str = "") -> list[str]:
    """Differences between two JSON values, floats compared to REL_TOL."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{where}.{k}: missing" for k in want.keys() - got.keys()]
        out += [f"{where}.{k}: unexpected" for k in got.keys() - want.keys()]
        for k in want.keys() & got.keys():
            out += diff(got[k], want[k], f"{where}.{k}")
        return out
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        pairs = enumerate(zip(got, want, strict=True))
        return [d for i, (g, w) in pairs for d in diff(g, w, f"{where}[{i}]")]
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        close = math.isclose(got, want, rel_tol=REL_TOL, abs_tol=0.0)
        return [] if close else [f"{where}: {got!r} != {want!r}"]
    return [] if got == want else [f"{where}: {got!r} != {want!r}"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_matches_its_golden_summary(path: Path) -> None:
    if needs_shared(path) and shared_traces_dir() is None:
        pytest.skip("needs ../shared/data/traces (read in place)")
    golden = GOLDEN / f"{path.stem}.json"
    assert golden.is_file(), "no golden output; run: .venv/bin/python tests/test_examples.py --update-golden"
    problems = diff(run_example(path), json.loads(golden.read_text()))
    assert not problems, (f"{path.name} differs from {golden.name} (if intended, regenerate with `.venv/bin/"
                          f"python tests/test_examples.py --update-golden`):\n" + "\n".join(problems[:20]))


def test_every_example_says_what_it_covers() -> None:
    for path in EXAMPLES:
        head = path.read_text().splitlines()[0]
        assert head.startswith("# "), f"{path.name} should open with a comment saying what it covers"
        assert "Covers:" in path.read_text(), path.name


def update_golden() -> None:
    from kvsim.fileio import write_atomic

    for path in EXAMPLES:
        if needs_shared(path) and shared_traces_dir() is None:
            print(f"skipped {path.name}: ../shared/data/traces absent")
            continue
        write_atomic(GOLDEN / f"{path.stem}.json", json.dumps(run_example(path), indent=2) + "\n")
        print(f"wrote examples/golden/{path.stem}.json")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update-golden"]:
        sys.exit("usage: python tests/test_examples.py --update-golden")
    update_golden()
