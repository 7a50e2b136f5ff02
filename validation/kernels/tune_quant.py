"""Issue 15 item 2 in one GPU call: the read ceiling, then every decode kernel variant on shapes that
fill the GPU, each checked against a float64 reference and timed, reported as % of the read ceiling.

  python3 validation/kernels/tune_quant.py --out DIR --budget-s 240 [--quick]

1. Read ceiling: validation/ceilings.py stream_bw (the read-only streaming kernel of stream.py over
   launch shapes, torch.sum as a second opinion), best median over 1 and 4 GiB.
2. Specs: bf16 and fp8 (triton_decode.decode_attention) and the fused quantized kernel
   (quant_decode.quant_attention) for int8/int4/int2 per token (intkv), KIVI 2 and 4 bit, SKVQ
   2 bit and PackKV 4 and 2 bit (the same per-token layout as intkv at a fixed width; its kernel
   compiles once and is timed again). Shape: Llama-3-8B heads (32 q / 8 kv, GQA 4, head dim 128),
   batch 32, context 32768 (4 GiB of bf16 KV: far above the 60 MB L2); at the end the best variant
   of each spec is timed again at GQA 8 (64 q heads), batch 64, context 16384.
3. Each variant: outputs and split partials poisoned (NaN), run on fresh random inputs, relative
   error against float64 attention over the dequantized cache on two batch rows (must be below
   the spec's threshold), then validation/common.py bench (CUDA-graph replays, L2 flushed).
   A failing variant is recorded (status column) and the sweep goes on.
4. Budget: each spec gets an equal share of what is left; its first variant (the default) always
   runs, the others only while the share lasts. CSV rows go to DIR/tune_quant.csv as they come;
   the last lines printed are the best variant per spec and its % of the read ceiling.

--quick: tiny shapes, two variants per spec; without CUDA (TRITON_INTERPRET=1 on CPU) it checks
correctness only (no ceiling, no timing): the CPU test of this script's plumbing.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch  # noqa: E402

from validation.common import CsvOut, bench, log, rel_error  # noqa: E402
from validation.kernels import quant_decode as qd  # noqa: E402
from validation.kernels import triton_decode as td  # noqa: E402
from validation.kernels.bench_common import ref_decode  # noqa: E402
from validation.kernels.bench_quant import build_checked  # noqa: E402

COLS = ["variant", "spec", "batch", "q_heads", "kv_heads", "head_dim", "context", "time_s", "bytes_read",
        "read_ceiling_Bps", "pct_of_read_ceiling", "rel_error", "qerr", "status"]
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

kivi = lambda b: dict(kbits=b, vbits=b, key_mode="channel", k_group=32, v_group=32, residual=128)  # noqa: E731
tok = lambda b, r=0, **kw: dict(kbits=b, vbits=b, key_mode="token", k_group=64, v_group=64, residual=r, **kw)  # noqa: E731
# (spec, QuantCache kwargs or the dense dtype); settings as bench_quant.variants (papers cited there)
SPECS = [("bf16", "bf16"), ("fp8", "fp8"),
         ("intkv:bits=8,group=64", tok(8)), ("intkv:bits=4,group=64", tok(4)), ("intkv:bits=2,group=64", tok(2)),
         ("kivi:bits=2,group=32,residual=128", kivi(2)), ("kivi:bits=4,group=32,residual=128", kivi(4)),
         ("skvq:k_bits=2,v_bits=2,group=64,window=128", tok(2, r=128, clip=0.95, perm=True)),
         ("packkv:mean_bits=4,group=64", tok(4)), ("packkv:mean_bits=2,group=64", tok(2))]
# Kernel error against float64 over the dequantized cache: bf16 output rounding (2**-8 relative per
# element) for bf16/fp8; fp16 dequantized K/V and P (2**-11) for the quantized kernel.
THRESH = {"bf16": 1e-2, "fp8": 1e-2}
QTHRESH = 5e-3


def dense_variants(quick):
    """BLOCK_N x warps x stages, the old default first; then split counts (waves: programs per SM)."""
    base = [dict(BLOCK_N=64, num_warps=4, num_stages=2), dict(BLOCK_N=64, num_warps=4, num_stages=3),
            dict(BLOCK_N=128, num_warps=4, num_stages=3), dict(BLOCK_N=128, num_warps=8, num_stages=3),
            dict(BLOCK_N=64, num_warps=4, num_stages=4), dict(BLOCK_N=128, num_warps=8, num_stages=4),
            dict(BLOCK_N=32, num_warps=4, num_stages=4)]
    out = [dict(c, waves=w) for w in (2.0, 4.0, 8.0) for c in base[:2]] + [dict(c, waves=4.0) for c in base[2:]]
    return out[:2] if quick else out


def quant_variants(kind, quick):
    """quant_decode.quant_grid: the register-dequant default, then the old tile default (both always
    run: MUST_RUN), then the knobs while the spec's share lasts."""
    g = qd.quant_grid(kind["kbits"], kind["vbits"], kind["key_mode"])
    return [dict(g[0], asm=0), dict(g[1], BN=32, asm=0)] if quick else g


MUST_RUN = 2  # variants of a spec that run whatever its share: the new default and the old one


def read_ceiling(quick):
    from validation.ceilings import stream_bw

    st = stream_bw((0.25,) if quick else (1.0, 4.0))
    r = st["read"]
    log(f"read ceiling {r['bw_Bps']/1e12:.3f} TB/s ({r['impl']})")
    return r["bw_Bps"]


def make_inputs(spec, kind, B, Hq, Hkv, D, S):
    """(fn(cfg, out), reference rows, reference, bytes read, quantization error, output dtype)."""
    scale = 1.0 / math.sqrt(D)
    rows = sorted({0, B - 1})
    dt = torch.bfloat16 if kind in ("bf16", "fp8") else torch.float16
    q = torch.randn(B, Hq, D, device=DEV, dtype=dt)
    k = torch.randn(B, Hkv, S, D, device=DEV, dtype=dt)
    v = torch.randn(B, Hkv, S, D, device=DEV, dtype=dt)
    if kind == "bf16":
        ref = ref_decode(q, k, v, scale, rows)
        return (lambda c, out: td.decode_attention(q, k, v, sm_scale=scale, cfg=c, out=out)), rows, ref, \
            2 * k.numel() * 2, 0.0, torch.bfloat16
    if kind == "fp8":  # per-tensor scales (vLLM's fp8 KV), reference over the dequantized fp8 values
        ks = (k.abs().amax().float() / 448.0).item()  # 448: largest e4m3 value
        vs = (v.abs().amax().float() / 448.0).item()
        k8, v8 = (k.float() / ks).to(torch.float8_e4m3fn), (v.float() / vs).to(torch.float8_e4m3fn)
        ref = ref_decode(q[rows], torch.stack([k8[b].float() * ks for b in rows]),
                         torch.stack([v8[b].float() * vs for b in rows]), scale)
        qerr = rel_error(ref, ref_decode(q, k, v, scale, rows))
        del k, v
        return (lambda c, out: td.decode_attention(q, k8, v8, sm_scale=scale, k_scale=ks, v_scale=vs, cfg=c, out=out)), \
            rows, ref, 2 * k8.numel(), qerr, torch.bfloat16
    cache, ref, qerr = build_checked(q, k, v, kind, scale, rows)
    del k, v
    fn = lambda c, out: qd.quant_attention(q, cache, sm_scale=scale, cfg=c, out=out, asm=bool(c.get("asm", qd.USE_ASM)))  # noqa: E731
    return fn, rows, ref, cache.nbytes(), qerr, torch.float16


def run_variant(fn, c, shape, rows, ref, thresh, out_dtype):
    """(rel error, seconds or None): poisoned outputs, checked, then timed (CUDA only)."""
    B, Hq, D = shape
    td.POISON = True
    try:
        out = torch.full((B, Hq, D), float("nan"), device=DEV, dtype=out_dtype)
        fn(c, out)
        if CUDA:
            torch.cuda.synchronize()
    finally:
        td.POISON = False
    err = rel_error(out[rows], ref) if torch.isfinite(out.float()).all() else float("inf")
    if not err < thresh:
        raise RuntimeError(f"rel error {err:.2e} >= {thresh:.0e}")
    return err, (bench(lambda: fn(c, out))[0] if CUDA else None)


def cfg_name(c):
    return ";".join(f"{k}={v}" for k, v in c.items())


def sweep(spec, kind, shape, variants, csv, ceil, deadline, results):
    B, Hq, Hkv, D, S = shape
    t0 = time.time()
    fn, rows, ref, nbytes, qerr, odt = make_inputs(spec, kind, B, Hq, Hkv, D, S)
    log(f"{spec} B{B} {Hq}/{Hkv}/{D} S{S}: {nbytes/2**30:.2f} GiB, inputs {time.time()-t0:.1f} s")
    thresh = THRESH[kind] if isinstance(kind, str) else QTHRESH
    for i, c in enumerate(variants):
        if i >= (1 if isinstance(kind, str) else MUST_RUN) and time.time() > deadline:
            log(f"  {spec}: share spent after {i} variants")
            break
        row = dict(variant=cfg_name(c), spec=spec, batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, context=S,
                   bytes_read=nbytes, read_ceiling_Bps=ceil or "", qerr=f"{qerr:.2e}")
        t1 = time.time()
        try:
            err, t = run_variant(fn, c, (B, Hq, D), rows, ref, thresh, odt)
            pct = 100.0 * nbytes / t / ceil if (t and ceil) else None
            row.update(time_s=t or "", rel_error=err, pct_of_read_ceiling=f"{pct:.1f}" if pct else "", status="ok")
            if t and (spec not in results or t < results[spec][1]):
                results[spec] = (c, t, pct, shape)
            log(f"  {cfg_name(c)}: err {err:.2e}" + (f" {t*1e6:.1f} us {nbytes/t/1e12:.3f} TB/s {pct:.1f}%" if t else "")
                + f" ({time.time()-t1:.1f} s)")
        except Exception as e:  # noqa: BLE001  record, go on with the next variant
            row.update(status=f"FAIL {type(e).__name__}: {str(e)[:200]}".replace(",", ";").replace("\n", " "))
            log(f"  {cfg_name(c)}: {row['status']}")
            traceback.print_exc(limit=2, file=sys.stdout)
        csv.row(**row)
    del fn, ref
    if CUDA:
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    t_start = time.time()
    end = t_start + a.budget_s
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh inputs every run
    csv = CsvOut(os.path.join(a.out, "tune_quant.csv"), COLS)
    ceil = None
    if CUDA:
        try:
            ceil = read_ceiling(a.quick)
        except Exception as e:  # noqa: BLE001
            log(f"[FAIL] read ceiling: {type(e).__name__}: {e}")
    shape = (2, 8, 2, 128, 512) if a.quick else (32, 32, 8, 128, 32768)
    shape2 = (2, 16, 2, 128, 384) if a.quick else (64, 64, 8, 128, 16384)
    specs = SPECS
    reserve = 0.12 * a.budget_s  # the GQA-8 re-check of the winners
    results = {}
    for i, (spec, kind) in enumerate(specs):
        left = end - reserve - time.time()
        if left <= 0:
            log(f"budget spent before {spec}")
            break
        share = left / (len(specs) - i)
        if kind in ("bf16", "fp8"):
            variants = dense_variants(a.quick)
        else:
            variants = quant_variants(kind, a.quick)
        try:
            sweep(spec, kind, shape, variants, csv, ceil, time.time() + share, results)
        except Exception as e:  # noqa: BLE001  (input construction failed: the next spec still runs)
            log(f"[FAIL] {spec}: {type(e).__name__}: {str(e)[:300]}")
            if CUDA:
                torch.cuda.empty_cache()
    second = {}
    for spec, kind in specs:
        if spec in results and time.time() < end - 3:
            try:
                sweep(spec, kind, shape2, [results[spec][0]], csv, ceil, end, second)
            except Exception as e:  # noqa: BLE001
                log(f"[FAIL] {spec} GQA 8: {type(e).__name__}: {str(e)[:300]}")
    log(f"\ntune_quant: {time.time()-t_start:.0f} s; read ceiling "
        + (f"{ceil/1e12:.3f} TB/s" if ceil else "not measured"))
    log(f"{'spec':44s} {'best variant':56s} {'us':>8s} {'%ceil':>6s} {'GQA8 %':>7s}")
    for spec, _ in specs:
        if spec not in results:
            log(f"{spec:44s} {'(no timed variant)':56s}")
            continue
        c, t, pct, _ = results[spec]
        p2 = second.get(spec, (None, None, None))[2]
        log(f"{spec:44s} {cfg_name(c):56s} {t*1e6:8.1f} {pct or 0:6.1f} " + (f"{p2:7.1f}" if p2 else "      -"))


if __name__ == "__main__":
    main()
