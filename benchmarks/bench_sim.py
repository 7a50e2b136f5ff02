"""Benchmark: the serving simulator on the whole Azure LLM inference trace 2023 (conversation,
19,366 requests, one hour) for Llama-3-8B on one H100 SXM (examples/azure-conv.yaml without its
2,000-request limit). Targets: at most 3 s wall time and 500 MB peak memory on this machine
(Vidur needs 33-54 s for 10,000 requests on a machine like it).

    .venv/bin/python benchmarks/bench_sim.py

1. The whole `kvsim run` command as a user runs it (a fresh process: imports, trace reading,
   simulation, summary), best of 3: wall time, peak RSS, simulated seconds per wall second.
2. In one process: where the time goes (the cost model's step pricing vs the engine), and the
   same simulation driven by the heap event loop and by SimPy processes (identical results).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KVSIM = Path(sys.executable).with_name("kvsim")
SCENARIO = ROOT / "examples" / "azure-conv.yaml"
WHOLE_TRACE = ["--set", "workload.max_requests=null"]


def whole_command() -> tuple[float, float, dict]:
    """Best wall time of 3 runs, the peak RSS of the largest, and the summary."""
    best, rss, summary = float("inf"), 0.0, {}
    for _ in range(3):
        t0 = time.perf_counter()
        out = subprocess.run([str(KVSIM), "run", str(SCENARIO), *WHOLE_TRACE, "--json"], check=True,
                             capture_output=True, text=True).stdout
        best = min(best, time.perf_counter() - t0)
        rss = max(rss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)  # KiB -> MiB
        summary = json.loads(out)
    return best, rss, summary


def in_process() -> None:
    """Engine vs pricing: run once recording every step price, then again replaying them (the same
    schedule, no pricing work); and the heap loop against SimPy processes."""
    from kvsim.cost.model import CostModel
    from kvsim.scenario import load_scenario
    from kvsim.scenario.run import simulation, workload
    from kvsim.serve.workload import ReadStats

    scenario = load_scenario(SCENARIO, ["workload.max_requests=null"])

    def run(loop: str = "heap") -> tuple[float, np.ndarray, int]:
        sim = simulation(scenario, record_steps=False)
        stream = workload(scenario, sim.dep, False, ReadStats())[0]
        t0 = time.perf_counter()
        sim.run(stream) if loop == "heap" else sim.run_simpy(stream)
        return time.perf_counter() - t0, sim.recorder.arrays()["finish_s"], sim.steps

    priced: list = []
    originals = {name: getattr(CostModel, name) for name in ("step_time_s", "decode_times_s")}
    for name, fn in originals.items():
        setattr(CostModel, name, lambda self, *a, _fn=fn: priced.append(_fn(self, *a)) or priced[-1])
    full, finish, steps = run()
    engine = {}
    for loop in ("heap", "simpy"):
        replay = iter(priced)
        for name in originals:
            setattr(CostModel, name, lambda self, *a, _replay=replay: next(_replay))
        engine[loop], replayed, _ = run(loop)
        assert np.array_equal(finish, replayed), loop
    for name, fn in originals.items():
        setattr(CostModel, name, fn)
    pricing = full - engine["heap"]
    print(f"  simulation {full:.2f} s = engine {engine['heap']:.2f} s (trace reading, scheduling, blocks, "
          f"events) + cost-model pricing {pricing:.2f} s ({len(priced):,} priced steps or runs, "
          f"{pricing / len(priced) * 1e6:.0f} us each); {steps:,} engine steps")
    print(f"  engine with the heap event loop {engine['heap']:.2f} s, with SimPy processes "
          f"{engine['simpy']:.2f} s (identical finish times)")


def main() -> None:
    print("kvsim run examples/azure-conv.yaml --set workload.max_requests=null (19,366 requests), best of 3")
    wall, rss, s = whole_command()
    print(f"  wall {wall:.2f} s (target <= 3 s {'ok' if wall <= 3 else 'MISSED'}); peak RSS {rss:.0f} MB "
          f"(target <= 500 MB {'ok' if rss <= 500 else 'MISSED'})")
    rate = s["duration_s"] / wall
    print(f"  simulated {s['duration_s']:,.0f} s in {wall:.2f} s: {rate:,.0f} simulated s per wall s; "
          f"{s['completed']:,} completed, {s['engine_steps']:,} engine steps")
    print("in one process:")
    in_process()


if __name__ == "__main__":
    main()
