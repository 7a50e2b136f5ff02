"""Sustained against short-burst GPU rates: does a minute of back-to-back prefill GEMMs (or of
streaming memory) run at the rate a short timed burst measures, which is how every kernel kvsim
calibrates on is timed (validation/common.py `bench`: ~30 ms of CUDA-graph replays)?

Why: GPUStack's public vLLM runs on one H100 (validation/reference/public_vllm_serving.md) are minutes
of prefill-bound work and came out 41-75% slower than kvsim, where the same models on A100s and on
eight H100s agree within about 25%. Clocks that sag under sustained power or heat would do that and
would be invisible to short-burst calibration; this measures it on the lent card.

    python3 validation/sustained.py --out DIR --budget-s 100 [--seconds-gemm 60 --seconds-copy 20]

Writes sustained.csv (one row per ~0.5 s window): kind, window, t_s (window end, seconds since the
kind started), seconds, rate (FLOP/s for gemm, read+write B/s for copy), burst_rate (the same work
timed by `bench`, as calibration times it), sm_mhz, mem_mhz, power_w, temp_c (read from NVML while
the window's work runs), events (NVML clock-event reasons, hex: 0x4 software power cap, 0x20 software
thermal slowdown, 0x40 hardware thermal slowdown, 0x80 hardware power brake).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from validation.common import bench, log  # noqa: E402

# Qwen3-14B's four GEMMs of one decoder layer at TP 1 (models/qwen3-14b.yaml): QKV (40 + 2 x 8 heads
# of 128), O, gate+up (2 x 17,408) and down; 8,192 rows, vLLM's default step budget on an H100.
ROWS = 8192
GEMMS = ((7168, 5120), (5120, 5120), (34816, 5120), (5120, 17408))  # (n, k)
COPY_BYTES = 4 << 30
WINDOW_S = 0.5


def nvml_reader():
    """A function returning (sm MHz, mem MHz, power W, temp C, clock-event reasons) for GPU 0."""
    import pynvml

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)

    def read() -> tuple[int, int, float, int, int]:
        return (pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
                pynvml.nvmlDeviceGetPowerUsage(h) / 1e3,
                pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
                pynvml.nvmlDeviceGetCurrentClocksEventReasons(h))
    return read


def workloads():
    """kind -> (body, work per call: FLOPs or bytes)."""
    import torch

    x = {k: torch.randn(ROWS, k, device="cuda", dtype=torch.bfloat16) for _, k in GEMMS}
    w = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for n, k in GEMMS]
    out = [torch.empty(ROWS, n, device="cuda", dtype=torch.bfloat16) for n, _ in GEMMS]

    def gemm():
        for (_, k), wi, oi in zip(GEMMS, w, out, strict=True):
            torch.mm(x[k], wi, out=oi)

    src = torch.empty(COPY_BYTES // 2, device="cuda", dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)

    return {"gemm": (gemm, sum(2 * ROWS * n * k for n, k in GEMMS)), "copy": (copy, 2 * COPY_BYTES)}


def sustain(kind: str, body, work: float, seconds: float, read, writer) -> None:
    import torch

    burst_s = bench(body)[0]  # as calibration times a kernel: short CUDA-graph replays, L2 flushed
    burst_rate = work / burst_s
    per_window = max(1, round(WINDOW_S / burst_s))
    log(f"{kind}: burst {burst_rate / 1e12:.1f} T/s ({burst_s * 1e3:.2f} ms a call), {per_window} calls a window")
    t0 = time.perf_counter()
    prev = torch.cuda.Event(enable_timing=True)
    prev.record()
    pending: list = []
    window = 0

    def drain_one() -> None:
        nonlocal window
        a, b, sample = pending.pop(0)
        b.synchronize()
        s = a.elapsed_time(b) * 1e-3
        writer.writerow(dict(kind=kind, window=window, t_s=round(time.perf_counter() - t0, 3), seconds=round(s, 5),
                             rate=work * per_window / s, burst_rate=burst_rate, sm_mhz=sample[0], mem_mhz=sample[1],
                             power_w=sample[2], temp_c=sample[3], events=hex(sample[4])))
        window += 1

    while time.perf_counter() - t0 < seconds:
        for _ in range(per_window):
            body()
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        pending.append((prev, end, read()))  # read while this window's work runs
        prev = end
        if len(pending) > 1:
            drain_one()
    while pending:
        drain_one()


def summarize(path: str) -> None:
    import statistics

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    print(f"{'kind':5} {'burst':>8} {'first':>8} {'2nd half':>8} {'min':>8} {'2nd/burst':>9} {'sm MHz (min/med)':>16} "
          f"{'power W':>8} {'temp C':>7}  events")
    for kind in dict.fromkeys(r["kind"] for r in rows):
        rs = [r for r in rows if r["kind"] == kind]
        rate = [float(r["rate"]) / 1e12 for r in rs]
        late = rate[len(rate) // 2:]
        burst = float(rs[0]["burst_rate"]) / 1e12
        sm = [int(r["sm_mhz"]) for r in rs]
        print(f"{kind:5} {burst:8.1f} {rate[0]:8.1f} {statistics.median(late):8.1f} {min(rate):8.1f} "
              f"{statistics.median(late) / burst:9.3f} {min(sm):7d}/{statistics.median(sm):<8.0f} "
              f"{statistics.median(float(r['power_w']) for r in rs):8.0f} {max(int(r['temp_c']) for r in rs):7d}  "
              f"{sorted(set(r['events'] for r in rs))}")
    print("(rates in TFLOP/s for gemm, TB/s read+write for copy)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=100)
    ap.add_argument("--seconds-gemm", type=float, default=60)
    ap.add_argument("--seconds-copy", type=float, default=20)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    scale = min(1.0, (args.budget_s - 15) / (args.seconds_gemm + args.seconds_copy))
    if args.quick:
        scale = 2 / (args.seconds_gemm + args.seconds_copy)
    read = nvml_reader()
    path = os.path.join(args.out, "sustained.csv")
    fields = ["kind", "window", "t_s", "seconds", "rate", "burst_rate", "sm_mhz", "mem_mhz", "power_w", "temp_c",
              "events"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for kind, (body, work) in workloads().items():
            seconds = {"gemm": args.seconds_gemm, "copy": args.seconds_copy}[kind] * scale
            sustain(kind, body, work, seconds, read, writer)
            f.flush()
    summarize(path)


if __name__ == "__main__":
    main()
