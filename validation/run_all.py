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
    "methods": (80, ["validation/kernels/bench_attention.py", "--path", "methods"]),  # ~60 s of a 500 s run
    "prefill": (15, ["validation/kernels/bench_attention.py", "--path", "prefill"]),
    "gemm": (80, ["validation/gemm.py", "--part", "gemm"]),  # bf16, fp8 (W8A8) and W4A16 over 31 layer shapes
    "w4a16": (40, ["validation/gemm.py", "--part", "w4a16"]),  # W4A16 dequantized in registers (kernels/w4a16.py)
    # W4A16 in IST-DASLab's Marlin, compiled on the device (validation/fetch_marlin.py; carry validation/vendor)
    "marlin": (30, ["validation/gemm.py", "--part", "marlin"]),
    "grouped": (25, ["validation/gemm.py", "--part", "grouped"]),  # routed-expert grouped GEMMs, 6 shapes x 14
    # vLLM-style Triton fused-MoE GEMMs, bf16 / FP8 / FP8 blocks, 12 shapes x 14 token counts x 13 tilings
    "fused_moe": (60, ["validation/gemm.py", "--part", "fused_moe"]),
    "elementwise": (30, ["validation/gemm.py", "--part", "elementwise"]),  # ~280 points of 9 engine kernels
    "fp32_router": (5, ["validation/gemm.py", "--part", "fp32_router"]),  # fp32 gates (MiniMax-M2), 4 x 28 points
    # vLLM's MXFP4 MoE on Hopper: OpenAI's Triton matmul_ogs (needs validation/vendor: fetch_triton_kernels.py)
    "oai_moe": (20, ["validation/oai_moe.py"]),
    # vLLM's own FlashMLA decode kernels from its 0.24.0 wheel (needs validation/vendor: fetch_vllm_kernels.py)
    "flashmla": (30, ["validation/flashmla.py"]),
    "vllm_gemm": (60, ["validation/vllm_gemm.py"]),  # vLLM's CUTLASS FP8 and Machete W4A16 GEMMs (its _C library)
    "vllm_fa3_decode": (40, ["validation/vllm_decode.py"]),  # vLLM's FlashAttention 3 decode (dense models)
    # vLLM's FlashAttention-3 prefill kernel (its _vllm_fa3_C library, paged cache), beside SDPA's prefill rows
    "vllm_fa3": (30, ["validation/vllm_prefill.py"]),
    # gpt-oss-120b's decode layers in one CUDA graph with vLLM's kernels, beside each kernel alone (TP 8/4/2 shards)
    "vllm_layer": (60, ["validation/vllm_layer.py"]),
    # decode steps launched kernel by kernel beside their CUDA graph (--enforce-eager's cost; not fitted)
    "eager": (10, ["validation/eager.py"]),
    "sustained": (15, ["validation/sustained.py"]),  # a minute of prefill GEMMs against their short-burst rate
    "sampler": (3, ["validation/sampler_peak.py"]),  # memory peak of vLLM 0.10.2-0.16's native top-k/top-p sampler
    "engine": (230, ["validation/engine.py"]),  # 10 models: 5 prompts + ~45 decode points each, ~20 s a model
    "ceilings_end": (6, ["validation/ceilings.py", "--end"]),
}


def run_parts(out: str, budget_s: float, quick: bool, parts: list[tuple[str, float, list[str]]], env_extra=None):
    """Run each part as `python3 argv --out OUT --budget-s SHARE [--quick]` in its own process; a
    part's share is its weight's fraction of what is left, so time a part leaves unused flows to
    the next. A failing or hung part (killed at its share + 25 s) does not stop the others."""
    t0 = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **(env_extra or {}))
    # the device call's id on every CSV row (validation/common.py CsvOut): a UTC start time
    env.setdefault("KVSIM_RUN_ID", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t0)))
    status = []
    for i, (name, weight, argv) in enumerate(parts):
        left = budget_s - (time.time() - t0)
        share = left * weight / sum(w for _, w, _ in parts[i:])
        if share < 5:
            status.append(dict(part=name, skipped="no budget left"))
            print(f"### skip {name}: no budget", flush=True)
            continue
        inner = max(5.0, share - 8)  # start-up and teardown
        cmd = [sys.executable] + argv + ["--out", out, "--budget-s", f"{inner:.0f}"] + (["--quick"] if quick else [])
        print(f"### {name}: budget {inner:.0f}s  ({time.time()-t0:.0f}s elapsed)", flush=True)
        ts = time.time()
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, timeout=share + 25).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        status.append(dict(part=name, rc=rc, seconds=round(time.time() - ts, 1), budget=round(inner)))
        print(f"### {name}: rc={rc} in {time.time()-ts:.0f}s", flush=True)
    return status, round(time.time() - t0, 1)


def record_run(out: str, key: str, quick: bool, status, total_s):
    """Run status and the command line into meta.json (keeps the file count low), atomically."""
    mp = os.path.join(out, "meta.json")
    meta = {}
    if os.path.exists(mp):
        with open(mp) as f:
            meta = json.load(f)
    meta[key] = dict(argv=sys.argv[1:], quick=quick, parts=status, total_s=total_s)
    if "gpu_name" not in meta:  # the ceilings part describes the machine; a run without it must too
        sys.path.insert(0, REPO)
        try:
            from validation.ceilings import metadata

            meta.update(metadata())
        except Exception as e:  # noqa: BLE001 - no GPU or no torch: say so rather than fail the record
            meta["gpu_name"] = f"unknown ({type(e).__name__}: {e})"
    meta["command"] = " ".join(["python3"] + sys.argv)
    with open(mp + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(mp + ".tmp", mp)
    print(json.dumps(status), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=500)
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--weights", default="", help="override part weights, e.g. engine=400,gemm=50")
    ap.add_argument("--part-args", action="append", default=[], metavar="PART=ARGS",
                    help="extra arguments for one part, e.g. 'fused_moe=--layers mixtral-8x7b.w13'")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    names = [p for p in a.parts.split(",") if p]
    w = {p: PARTS[p][0] for p in names}
    for kv in filter(None, a.weights.split(",")):
        k, v = kv.split("=")
        w[k] = float(v)
    extra: dict[str, list[str]] = {}
    for pa in a.part_args:
        k, _, v = pa.partition("=")
        if k not in names:
            ap.error(f"--part-args: part {k!r} is not among --parts")
        extra[k] = extra.get(k, []) + v.split()
    status, total = run_parts(a.out, a.budget_s, a.quick,
                              [(p, w[p], PARTS[p][1] + extra.get(p, [])) for p in names])
    record_run(a.out, "run_all", a.quick, status, total)
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
        rds = [x["bw_Bps"] for x in (c.get("read"), c.get("read_end")) if x]
        rd = max(rds) if rds else float("nan")
        print("read " + " / ".join(f"{x/1e12:.3f}" for x in rds) + " TB/s (start / end)  write "
              f"{(c.get('write') or {}).get('bw_Bps', float('nan'))/1e12:.3f} TB/s")
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
    print(f"{'method kvsim_spec':60s} {'best TB/s':>9s} {'% read':>7s} {'% copy':>7s} {'max rel err':>11s}")
    for k, v in sorted(best.items()):
        print(f"{k:60s} {v/1e12:9.3f} {100*v/rd:6.1f}% {100*v/cp:6.1f}% {errs.get(k, float('nan')):11.2e}")


if __name__ == "__main__":
    main()
