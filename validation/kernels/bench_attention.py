"""Decode-attention kernels per KV method: correctness against a float64 reference on fresh random
inputs (outputs poisoned first), then timing over grids, appended to attention_decode.csv and
attention_prefill.csv in --out. Each --path runs in its own process (run_all does that) so a CUDA
fault in one path does not lose the others.

  bf16, fp8   dense paths (+ torch SDPA baselines)     quant     KIVI, asymmetric, INT-n, SKVQ, PackKV
  evict       eviction/merging/per-layer budgets      struct    MLA, MTLA, low-rank, cross-layer sharing
  offload     ShadowKV, TTKV, MKA, MatKV              prefill   causal SDPA over prompt lengths
  methods     KVQuant (2-8 bits), MiniKV, KIVI and INT-n at 1/3/5/6/7 bits (bit-plane kernel)
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from validation.common import Budget, CsvOut, bench, guarded, log, params_str, rel_error  # noqa: E402
from validation.kernels import triton_decode as td  # noqa: E402
from validation.kernels.bench_common import DEC_COLS, check_rows, checked, kv_bytes, points, rand_qkv, ref_decode, tune  # noqa: E402

PRE_COLS = ["batch", "q_heads", "kv_heads", "head_dim", "prompt", "causal", "time_s", "flops", "method"]

HEADS = [(32, 8, 128), (32, 32, 128), (28, 4, 128), (64, 8, 128), (8, 1, 256), (71, 1, 64)]
CONFIGS = [dict(BLOCK_N=64, num_warps=4, num_stages=2), dict(BLOCK_N=64, num_warps=4, num_stages=3),
           dict(BLOCK_N=128, num_warps=4, num_stages=2), dict(BLOCK_N=128, num_warps=8, num_stages=3),
           dict(BLOCK_N=32, num_warps=4, num_stages=4), dict(BLOCK_N=64, num_warps=8, num_stages=4),
           dict(BLOCK_N=128, num_warps=4, num_stages=3), dict(BLOCK_N=128, num_warps=8, num_stages=4)]


# ----------------------------------------------------------------------------- bf16 / fp8
def run_dense(args, csv, budget, fp8=False):
    q_ = args.quick
    batches = [4] if q_ else [1, 4, 16, 64, 256]
    contexts = [4096] if q_ else [512, 2048, 8192, 32768, 131072]
    heads = HEADS[:1] if q_ else (HEADS if not fp8 else HEADS[:4])
    name = "triton_fp8" if fp8 else "triton_bf16"
    eb = 1 if fp8 else 2
    # tune on one shape that fills the GPU (Llama-3-8B heads, 2 GiB of bf16 KV)
    B, Hq, Hkv, D, S = (4, 32, 8, 128, 2048) if q_ else (16, 32, 8, 128, 32768)
    q, k, v = rand_qkv(B, Hq, Hkv, D, S)
    if fp8:
        k, v = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    base = dict(batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, context=S, bytes_read=kv_bytes(B, Hkv, S, D, eb),
                flops=4 * B * Hq * S * D, kvsim_spec="", layers=1)
    cfg = tune(name, lambda c: (lambda: td.decode_attention(q, k, v, cfg=c)), CONFIGS[:2] if q_ else CONFIGS, csv,
               base) or td.DEFAULT_CFG
    log(f"{name}: best cfg {cfg}")
    del q, k, v
    # every head shape at each (batch, context) before the next, so a short budget still spans the shapes
    grid = sorted(points(heads, batches, contexts, lambda d: 2 * d * eb), key=lambda p: (p[0], p[4]))
    for (B, Hq, Hkv, D, S) in grid:
        if not budget.ok(5):
            log(f"{name}: budget spent")
            break
        guarded(f"{name} B{B} {Hq}/{Hkv}/{D} S{S}", dense_point, B, Hq, Hkv, D, S, cfg, csv, fp8, name)
    torch.cuda.empty_cache()


def dense_point(B, Hq, Hkv, D, S, cfg, csv, fp8, name):
    scale = 1.0 / math.sqrt(D)
    q, k, v = rand_qkv(B, Hq, Hkv, D, S)
    rows = check_rows(B)
    common = dict(batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, context=S, flops=4 * B * Hq * S * D, phase="decode",
                  layers=1)
    if fp8:  # per-tensor scales (vLLM's fp8 KV); reference on the dequantized fp8 values
        ks = (k.abs().amax().float() / 448.0).item()  # 448 = largest e4m3 value
        vs = (v.abs().amax().float() / 448.0).item()
        k8 = (k.float() / ks).to(torch.float8_e4m3fn)
        v8 = (v.float() / vs).to(torch.float8_e4m3fn)
        ref = ref_decode(q[rows], torch.stack([k8[b].float() * ks for b in rows]),
                         torch.stack([v8[b].float() * vs for b in rows]), scale)
        qerr = rel_error(ref, ref_decode(q, k, v, scale, rows))
        del k, v
        fn = lambda out=None: td.decode_attention(q, k8, v8, sm_scale=scale, k_scale=ks, v_scale=vs, cfg=cfg, out=out)  # noqa: E731
        err = checked(fn, (B, Hq, D), torch.bfloat16, ref, rows)
        t = bench(fn)[0]
        byts = kv_bytes(B, Hkv, S, D, 1)
        csv.row(**common, method=name, params=params_str(scale="tensor", qerr=f"{qerr:.2e}", **cfg), time_s=t,
                bytes_read=byts, rel_error=err, kvsim_spec="fp8")
        log(f"{name} B{B} {Hq}/{Hkv}/{D} S{S}: {t*1e6:.1f} us  {byts/t/1e12:.2f} TB/s err {err:.2e}")
        return
    ref = ref_decode(q, k, v, scale, rows)
    byts = kv_bytes(B, Hkv, S, D, 2)
    fn = lambda out=None: td.decode_attention(q, k, v, sm_scale=scale, cfg=cfg, out=out)  # noqa: E731
    err = checked(fn, (B, Hq, D), torch.bfloat16, ref, rows)
    t = bench(fn)[0]
    csv.row(**common, method=name, params=params_str(**cfg), time_s=t, bytes_read=byts, rel_error=err,
            kvsim_spec="bf16")
    log(f"{name} B{B} {Hq}/{Hkv}/{D} S{S}: {t*1e6:.1f} us  {byts/t/1e12:.2f} TB/s err {err:.2e}")
    if (Hq, Hkv, D) != HEADS[0]:
        return  # SDPA alternatives on the Llama-3 shape only (the engine decodes with the Triton kernel)
    G = Hq // Hkv
    q4, qf = q.view(B, Hq, 1, D), q.view(B, Hkv, G, D)
    sdpa = {"sdpa_gqa": lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True, scale=scale),
            "sdpa_fold": lambda: F.scaled_dot_product_attention(qf, k, v, scale=scale)}  # GQA folded into q
    for mname, f in sdpa.items():
        def one(f=f, mname=mname):
            e = rel_error(f().reshape(B, Hq, D)[rows], ref)
            tt = bench(f)[0]
            csv.row(**common, method=mname, params="", time_s=tt, bytes_read=byts, rel_error=e, kvsim_spec="bf16")
            log(f"  {mname}: {tt*1e6:.1f} us {byts/tt/1e12:.2f} TB/s err {e:.2e}")
        guarded(mname, one)


# ----------------------------------------------------------------------------- prefill
def run_prefill(args, out_dir, budget):
    csv = CsvOut(os.path.join(out_dir, "attention_prefill.csv"), PRE_COLS)
    prompts = [1024] if args.quick else [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
    heads = [(32, 8, 128)] if args.quick else [(32, 8, 128), (32, 32, 128), (28, 4, 128), (8, 1, 256)]
    for (Hq, Hkv, D) in heads:
        for P in prompts:
            if not budget.ok(3):
                return
            guarded(f"prefill {Hq}/{Hkv}/{D} P{P}", prefill_point, Hq, Hkv, D, P, csv)


def prefill_point(Hq, Hkv, D, P, csv, B=1):
    q = torch.randn(B, Hq, P, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, P, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    if P <= 2048:
        o = fn()
        G = Hq // Hkv
        kk = k[:1].float().repeat_interleave(G, 1)
        vv = v[:1].float().repeat_interleave(G, 1)
        ref = F.scaled_dot_product_attention(q[:1].float(), kk, vv, is_causal=True)
        err = rel_error(o[:1], ref)
        if err > 2e-2:
            log(f"[WARN] prefill rel error {err:.2e}")
    t = bench(fn, rep_ms=50)[0]
    fl = 4 * B * Hq * P * P * D // 2
    csv.row(batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, prompt=P, causal=1, time_s=t, flops=fl, method="sdpa")
    log(f"prefill {Hq}/{Hkv}/{D} P{P}: {t*1e3:.3f} ms {fl/t/1e12:.0f} TF/s")


PATHS = ("bf16", "fp8", "quant", "evict", "struct", "offload", "methods", "prefill")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=120)
    ap.add_argument("--path", default="bf16", choices=PATHS)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    budget = Budget(a.budget_s)
    torch.manual_seed(0)
    if a.path == "prefill":
        run_prefill(a, a.out, budget)
        return
    csv = CsvOut(os.path.join(a.out, "attention_decode.csv"), DEC_COLS)
    if a.path in ("bf16", "fp8"):
        run_dense(a, csv, budget, fp8=a.path == "fp8")
    elif a.path == "quant":
        from validation.kernels import bench_quant
        bench_quant.run(a, csv, budget)
    elif a.path == "evict":
        from validation.kernels import bench_evict
        bench_evict.run(a, csv, budget)
    elif a.path == "struct":
        from validation.kernels import bench_struct
        bench_struct.run(a, csv, budget)
    elif a.path == "methods":
        from validation.kernels import bench_methods
        bench_methods.run(a, csv, budget)
    else:
        from validation.kernels import bench_offload
        bench_offload.run(a, csv, budget)


if __name__ == "__main__":
    main()
