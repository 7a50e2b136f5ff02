"""Benchmark: analytic capacity over every catalogue model x 20 methods x every GPU x 64 contexts
(target: at most 2 s on this machine, issue #6).

    .venv/bin/python benchmarks/bench_capacity.py

Times `capacity_grid` in-process (catalogue loading included), best of 3, and checks a sample of
points against the scalar memory planner.
"""

from __future__ import annotations

import time

import numpy as np

from kvsim.capacity import capacity_grid
from kvsim.kv import layout_for
from kvsim.memory import plan_memory
from kvsim.spec.hardware import hardware_names, load_hardware
from kvsim.spec.model import load_model, model_names

METHODS = ["bf16", "fp8", "kivi:bits=2", "kivi:bits=4", "asymkv", "intkv:bits=4", "skvq", "kvquant",
           "snapkv:budget=2048", "h2o:budget=2048", "streamingllm:window=2044", "pyramidkv:budget=2048",
           "minikv:budget=2048", "cla:factor=2", "mlkv:kv_layers=8,kv_heads=4", "kv-latent:qk_dim=64,vo_dim=64",
           "lrkv:rank=32", "lorc", "shadowkv", "snapkv:budget=2048+kivi:bits=2"]
CONTEXTS = np.unique(np.geomspace(256, 1 << 20, 64).astype(np.int64))


def main() -> None:
    best, grid = float("inf"), None
    for _ in range(3):
        t0 = time.perf_counter()
        models = [load_model(n) for n in model_names()]
        gpus = [load_hardware(n) for n in hardware_names()]
        grid = capacity_grid(models, METHODS, gpus, CONTEXTS)
        best = min(best, time.perf_counter() - t0)
    points = grid.max_concurrency.size
    print(f"capacity sweep: {len(grid.models)} models x {len(METHODS)} methods x {len(grid.gpus)} GPUs x "
          f"{len(CONTEXTS)} contexts = {points:,} points in {best:.3f} s (best of 3; target <= 2 s)")
    rng = np.random.default_rng(0)
    for _ in range(20):  # spot-check against the scalar planner
        i, j, g, c = (int(rng.integers(n)) for n in grid.max_concurrency.shape)
        if grid.max_concurrency[i, j, g, c] < 0:
            continue
        m, hw = load_model(grid.models[i]), load_hardware(grid.gpus[g])
        plan = plan_memory(m, hw, layout_for(m, METHODS[j]))
        assert plan.max_concurrency(int(CONTEXTS[c]))[0] == grid.max_concurrency[i, j, g, c]
    print("spot checks against kvsim.memory.plan_memory: 20/20 equal")


if __name__ == "__main__":
    main()
