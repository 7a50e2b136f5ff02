"""Benchmark: what-if sweeps at scale (issue #6).

    .venv/bin/python benchmarks/bench_sweep.py [--points-only] [--ray] [--repeat N]

(a) the analytic capacity sweep, every catalogue model x 20 methods x every GPU x 64 contexts
    (benchmarks/bench_capacity.py, target <= 2 s);
(b) a 200-point simulation sweep (benchmarks/sweep_200.yaml) with --jobs 1 and --jobs N (N = the
    cores given to this process): points/s and CPU utilisation = CPU seconds of this process and
    of the workers on points / (wall seconds x jobs). Also checks that both runs wrote identical
    results. ``--ray`` adds the same sweep on a local Ray instance of N CPUs. Each timing is the
    best of ``--repeat`` runs, and prints how busy the whole machine was (other programs share it).
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCENARIO = HERE / "sweep_200.yaml"


def own_cpu_s() -> float:
    """CPU seconds (user + system) of this process (the sweep's driver)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def worker_cpu_s(folder: Path) -> float:
    """CPU seconds the workers spent on points (each point records its own in points.jsonl; pool and
    Ray workers are not children this process can account for)."""
    return sum(json.loads(line)["cpu_s"] for line in (folder / "points.jsonl").read_text().splitlines())


def system_busy() -> tuple[float, float] | None:
    """(busy, total) CPU jiffies of the whole machine from /proc/stat (Linux), to tell whether
    other programs shared the cores during a timing."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def metric_rows(folder: Path) -> list[dict]:
    with (folder / "results.csv").open(newline="") as f:
        return [{k: v for k, v in r.items()} for r in csv.DictReader(f)]


def sweep(jobs: int, backend: str) -> tuple[float, float, float | None, list[dict]]:
    """Wall seconds, CPU seconds of this process and its workers, the machine's busy fraction
    (all programs) and the result rows of one 200-point sweep."""
    from kvsim.sweep import expand, load_raw, run_sweep

    plan = expand(load_raw(SCENARIO), str(SCENARIO))
    with tempfile.TemporaryDirectory() as tmp:
        s0, c0, t0 = system_busy(), own_cpu_s(), time.perf_counter()
        outcome = run_sweep(plan, Path(tmp), jobs=jobs, backend=backend)  # type: ignore[arg-type]
        wall, s1 = time.perf_counter() - t0, system_busy()
        assert outcome.total == 200 and outcome.ran == 200, outcome
        # with one job the points ran in this process: count them once
        cpu = own_cpu_s() - c0 + (worker_cpu_s(Path(tmp)) if jobs > 1 or backend != "local" else 0.0)
        rows = metric_rows(Path(tmp))
    busy = (s1[0] - s0[0]) / (s1[1] - s0[1]) if s0 and s1 else None
    return wall, cpu, busy, rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points-only", action="store_true", help="skip the analytic capacity benchmark")
    parser.add_argument("--ray", action="store_true", help="also time the Ray backend")
    parser.add_argument("--repeat", type=int, default=2, help="timings per configuration (best is kept)")
    args = parser.parse_args()
    if not args.points_only:
        sys.path.insert(0, str(HERE))
        import bench_capacity

        bench_capacity.main()

    from kvsim.backends import available_cores

    cores = available_cores()
    runs = [(1, "local"), (cores, "local")] + ([(cores, "ray")] if args.ray else [])
    results = {}
    for jobs, backend in runs:
        # best of --repeat: other programs on a shared machine only ever slow a run down
        wall, cpu, busy, rows = min((sweep(jobs, backend) for _ in range(args.repeat)), key=lambda r: r[0])
        results[(jobs, backend)] = rows
        failed = sum(r["status"] != "ok" for r in rows)
        print(f"simulation sweep, 200 points, --backend {backend} --jobs {jobs}: {wall:.1f} s, "
              f"{200 / wall:.2f} points/s, CPU utilisation {cpu / (wall * jobs):.0%} of {jobs} core(s)"
              + (f" (machine {busy:.0%} busy, all programs)" if busy is not None else "")
              + (f", {failed} failed points" if failed else ""))
    base = results[(1, "local")]
    for key, rows in results.items():
        assert rows == base, f"{key} results differ from --jobs 1"
    print(f"identical results.csv across {', '.join(f'{b} x{j}' for j, b in results)}; {cores} cores given")


if __name__ == "__main__":
    main()
