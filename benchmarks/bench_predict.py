"""Benchmark: `kvsim predict` over a 1,000-point batch x context grid (target: under 1 s).

    .venv/bin/python benchmarks/bench_predict.py

Times the whole command (a fresh process: imports, catalogue loading, pricing, JSON output) as a
user runs it, best of 5, on this machine.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

KVSIM = Path(sys.executable).with_name("kvsim")
BATCHES = ",".join(str(b) for b in range(1, 251, 25))  # 10 batch sizes
# 100 contexts, 512 .. 128k (within every model's context: predict refuses longer ones)
CONTEXTS = ",".join(str(min(int(512 * 256 ** (i / 99)), 131_072)) for i in range(100))


def run(model: str, method: str) -> float:
    cmd = [str(KVSIM), "predict", "--model", model, "--hardware", "h100-sxm", "--method", method,
           "--batch", BATCHES, "--context", CONTEXTS, "--json"]
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    print("kvsim predict, 1,000 points (10 batch sizes x 100 contexts), best of 5, whole command")
    print(f"{'model':<16} {'method':<28} {'wall s':>7}  target < 1 s")
    for model, method in (("llama-3.1-8b", "bf16"), ("llama-3.1-8b", "snapkv:budget=2048+kivi:bits=2"),
                          ("deepseek-v3", "bf16"), ("gpt-oss-120b", "fp8")):
        t = run(model, method)
        print(f"{model:<16} {method:<28} {t:7.3f}  {'ok' if t < 1 else 'MISSED'}")


if __name__ == "__main__":
    main()
