"""One command for a multi-GPU machine (issue 7): metadata and ceilings (GPU 0 fully, every GPU's
copy and GEMM), the all-reduce sweep (1 KiB..256 MiB, bf16, eager and graph-captured) for each TP
degree the machine allows, the tensor-parallel engine grids, and the same points at tp=1 on this
machine as the baseline. NVLink multicast stays off in every process (tp_engine.NVLS_OFF).

  python3 validation/run_tp.py --out DIR --budget-s 500 [--quick]

Writes into DIR: meta.json, ceilings.json, ceilings_per_gpu.json, allreduce.csv, engine_decode.csv
and engine_prefill.csv (a `tp` column; tp=1 rows are the baseline, on the same points: engine.py's
TP grid, contiguous and paged caches). The lead commits DIR as
validation/results/<gpu>-x<N>/.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from validation.run_all import record_run, run_parts  # noqa: E402
from validation.tp_engine import NVLS_OFF, QUICK_TP_MODELS, TP_MODELS  # noqa: E402


def degrees(n_gpus: int) -> list[int]:
    return [t for t in (2, 4, 8) if t <= n_gpus]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=500)
    ap.add_argument("--degrees", default="", help="TP degrees to run, e.g. 4 (default: 2, 4, 8 as the GPUs allow)")
    ap.add_argument("--only-tp", action="store_true",
                    help="just the all-reduce sweeps and TP engine grids (no ceilings, no tp=1 baseline): a second "
                         "call on a machine whose first call measured those")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    import torch

    tps = degrees(torch.cuda.device_count())
    if a.degrees:
        tps = [t for t in tps if str(t) in a.degrees.split(",")]
    models = ",".join(QUICK_TP_MODELS if a.quick else TP_MODELS)
    parts = [("ceilings", 25, ["validation/ceilings.py"]),
             ("gpus", 10 * len(tps), ["validation/tp_engine.py", "--task", "gpus"])]
    parts += [(f"allreduce_tp{t}", 12, ["validation/tp_engine.py", "--task", "allreduce", "--tp", str(t)]) for t in tps]
    parts += [(f"engine_tp{t}", 90, ["validation/tp_engine.py", "--task", "engine", "--tp", str(t), "--models", models])
              for t in tps]
    parts += [("engine_tp1", 70, ["validation/engine.py", "--models", models, "--grid", "tp"]),
              ("ceilings_end", 4, ["validation/ceilings.py", "--end"])]
    if a.only_tp:
        parts = [p for p in parts if p[0].startswith(("allreduce_tp", "engine_tp")) and p[0] != "engine_tp1"]
    status, total = run_parts(a.out, a.budget_s, a.quick, parts, env_extra=NVLS_OFF)
    record_run(a.out, "run_tp", a.quick, status, total)
    summary(a.out)


def summary(out):
    """All-reduce bus bandwidth at a few sizes and TP decode speed-ups over tp=1 (printed last)."""
    import csv

    p = os.path.join(out, "allreduce.csv")
    if os.path.exists(p):
        with open(p) as f:
            for r in csv.DictReader(f):
                if r["mode"] == "graph" and int(r["bytes"]) in (1024, 2**20, 2**24, 2**28):
                    print(f"allreduce tp{r['tp']} {int(r['bytes']):>10d} B: {float(r['time_s'])*1e6:9.1f} us "
                          f"bus {float(r['busbw_Bps'])/1e9:6.1f} GB/s check={r['check']}")
    p = os.path.join(out, "engine_decode.csv")
    if not os.path.exists(p):
        return
    with open(p) as f:
        rows = [r for r in csv.DictReader(f) if r.get("cache", "contiguous") == "contiguous"]
    base = {(r["model"], r["batch"], r["context"], r["layers"]): float(r["time_s"]) for r in rows if r["tp"] == "1"}
    for r in rows:
        k = (r["model"], r["batch"], r["context"], r["layers"])
        if r["tp"] != "1" and k in base and r["batch"] in ("1", "64") and r["context"] in ("2048", "32768"):
            print(f"{r['model']:18s} tp{r['tp']} B{r['batch']:>4s} S{r['context']:>6s}: {float(r['time_s'])*1e3:8.3f} ms "
                  f"(tp1 {base[k]*1e3:8.3f} ms, x{base[k]/float(r['time_s']):.2f})")


if __name__ == "__main__":
    main()
