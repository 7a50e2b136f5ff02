"""One entry point: runs every part in its own process (a CUDA fault in one part cannot take the
others down), each under its own share of the wall budget, writing into --out.

  python3 validation/run_all.py --out $OUT --budget-s 500            # everything
  python3 validation/run_all.py --out $OUT --quick --budget-s 90     # every code path, tiny sizes
  python3 validation/run_all.py --out $OUT --parts ceilings,engine   # a subset
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# part -> (relative weight of the budget, argv after python3). The copy is measured again at the end
# (ceilings_end): the run records both, and the summary divides by the better one.
PARTS = {
    "ceilings": (30, ["validation/ceilings.py"]),
    "bf16": (40, ["validation/kernels/bench_attention.py", "--path", "bf16"]),
    "fp8": (25, ["validation/kernels/bench_attention.py", "--path", "fp8"]),
    "quant": (90, ["validation/kernels/bench_attention.py", "--path", "quant"]),
    "evict": (35, ["validation/kernels/bench_attention.py", "--path", "evict"]),
    "struct": (40, ["validation/kernels/bench_attention.py", "--path", "struct"]),
    "offload": (20, ["validation/kernels/bench_attention.py", "--path", "offload"]),
    "prefill": (15, ["validation/kernels/bench_attention.py", "--path", "prefill"]),
    "gemm": (60, ["validation/gemm.py", "--part", "gemm"]),
    "elementwise": (15, ["validation/gemm.py", "--part", "elementwise"]),
    "engine": (170, ["validation/engine.py"]),
    "ceilings_end": (6, ["validation/ceilings.py", "--end"]),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--weights", default="", help="override part weights, e.g. engine=400,gemm=50")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    parts = [p for p in a.parts.split(",") if p]
    w = {p: PARTS[p][0] for p in parts}
    for kv in filter(None, a.weights.split(",")):
        k, v = kv.split("=")
        w[k] = float(v)
    t0 = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    status = []
    for i, p in enumerate(parts):
        left = a.budget_s - (time.time() - t0)
        share = left * w[p] / sum(w[q] for q in parts[i:])
        if share < 5:
            status.append(dict(part=p, skipped="no budget left"))
            print(f"### skip {p}: no budget", flush=True)
            continue
        inner = max(5.0, share - 8)  # leave room for start-up / teardown
        cmd = [sys.executable] + PARTS[p][1] + ["--out", a.out, "--budget-s", f"{inner:.0f}"] + (["--quick"] if a.quick else [])
        print(f"### {p}: budget {inner:.0f}s  ({time.time()-t0:.0f}s elapsed)", flush=True)
        ts = time.time()
        try:
            r = subprocess.run(cmd, cwd=REPO, env=env, timeout=share + 25)
            rc = r.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        status.append(dict(part=p, rc=rc, seconds=round(time.time() - ts, 1), budget=round(inner)))
        print(f"### {p}: rc={rc} in {time.time()-ts:.0f}s", flush=True)
    # record run status inside meta.json (keeps the file count low)
    mp = os.path.join(a.out, "meta.json")
    meta = {}
    if os.path.exists(mp):
        with open(mp) as f:
            meta = json.load(f)
    meta["run_all"] = dict(argv=sys.argv[1:], quick=a.quick, parts=status, total_s=round(time.time() - t0, 1))
    meta["command"] = " ".join(["python3"] + sys.argv)
    with open(mp + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(mp + ".tmp", mp)
    print(json.dumps(status), flush=True)
    summary(a.out)


def summary(out):
    """Decode kernels vs the copy ceiling (printed last so the reply's tail has it): per method and
    kvsim spec, the best achieved bandwidth on the bytes the kernel must read, and the worst error."""
    import csv

    try:
        with open(os.path.join(out, "ceilings.json")) as f:
            c = json.load(f)
        cps = [x["bw_Bps"] for x in (c.get("copy"), c.get("copy_end")) if x]
        cp = max(cps)
        print("copy " + " / ".join(f"{x/1e12:.3f}" for x in cps) + " TB/s (start / end)  "
              f"bf16 {c['gemm_bf16']['rate_flops']/1e12:.0f} TF/s  fp8 {c['gemm_fp8']['rate_flops']/1e12:.0f} TF/s  "
              f"h2d {c['host']['h2d_pinned_Bps']/1e9:.1f} GB/s")
    except Exception as e:  # noqa: BLE001
        print("no ceilings", e)
        return
    p = os.path.join(out, "attention_decode.csv")
    if not os.path.exists(p):
        return
    best, errs = {}, {}
    with open(p) as f:
        for r in csv.DictReader(f):
            if r.get("phase") not in ("decode", None) or not r["time_s"] or r["method"].endswith("_tune"):
                continue
            key = f"{r['method']} {r.get('kvsim_spec', '')}"
            best[key] = max(best.get(key, 0), float(r["bytes_read"]) / float(r["time_s"]))
            try:
                errs[key] = max(errs.get(key, 0), float(r["rel_error"]))
            except ValueError:
                pass
    print(f"{'method kvsim_spec':60s} {'best TB/s':>9s} {'% copy':>7s} {'max rel err':>11s}")
    for k, v in sorted(best.items()):
        print(f"{k:60s} {v/1e12:9.3f} {100*v/cp:6.1f}% {errs.get(k, float('nan')):11.2e}")


if __name__ == "__main__":
    main()
