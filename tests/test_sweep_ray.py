"""The Ray backend on a local two-CPU Ray instance: one Ray task per point, results identical to
the local backend for the same seed. Skips when Ray is not installed (`pip install kvsim[ray]`;
`make test` installs it through the test extra)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sweep_scenario import write_scenario

from kvsim.sweep import expand, load_raw, read_results, run_sweep

ray = pytest.importorskip("ray")


def test_ray_backend_matches_the_local_backend(tmp_path: Path):
    # Llama-2-13B does not fit an RTX 4090: those points fail on both backends alike
    sweep = {"grid": {"method": ["bf16", "fp8", "kivi:bits=2"], "workload.synthetic.rate": [4.0, 16.0]},
             "variants": [{"name": "seed1", "set": {"seed": 1}}, {"name": "seed7", "set": {"seed": 7}},
                          {"name": "too-big", "set": {"model": "llama-2-13b", "hardware": "rtx-4090"}}]}
    path = write_scenario(tmp_path, sweep)
    plan = expand(load_raw(path), str(path))
    run_sweep(plan, tmp_path / "local", jobs=2)
    outcome = run_sweep(plan, tmp_path / "ray", jobs=2, backend="ray")  # starts and stops a 2-CPU instance
    assert (outcome.ran, outcome.failed) == (18, 6)
    assert not ray.is_initialized()
    assert (tmp_path / "ray" / "results.csv").read_text() == (tmp_path / "local" / "results.csv").read_text()
    rows = read_results(tmp_path / "ray")
    assert len({r["ttft_s.p99"] for r in rows if r["status"] == "ok"}) == 12  # the points really differ
    assert all("does not fit" in r["error"] for r in rows if r["variant"] == "too-big")


def test_unreachable_cluster_fails_fast_with_one_line(tmp_path: Path, capsys):
    import socket

    from kvsim.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write_scenario(tmp_path, {"grid": {"method": ["bf16", "fp8"]}})
    with pytest.raises(SystemExit) as stop:
        main(["sweep", str(path), "--out", str(tmp_path / "out"), "--backend", "ray",
              "--address", f"127.0.0.1:{port}"])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("sweep: ")]  # progress
    assert stop.value.code == 2 and len(err) == 1 and "--address" in err[0]
    assert not ray.is_initialized()
