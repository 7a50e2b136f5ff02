"""Decode-attention paths: correctness against a float32 reference, then timing over grids.
Appends to attention_decode.csv / attention_prefill.csv in --out.  Each --path group can run in
its own process (run_all does that) so a CUDA fault in one path does not lose the others."""
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
from validation.kivi_ref import dense_kv_bytes, kivi_bytes  # noqa: E402

DEC_COLS = ["method", "batch", "q_heads", "kv_heads", "head_dim", "context", "params", "time_s", "bytes_read", "flops",
            "rel_error"]
PRE_COLS = ["batch", "q_heads", "kv_heads", "head_dim", "prompt", "causal", "time_s", "flops", "method"]

HEADS = [(32, 8, 128), (32, 32, 128), (28, 4, 128), (64, 8, 128), (8, 1, 256), (71, 1, 64)]
CONFIGS = [dict(BLOCK_N=64, num_warps=4, num_stages=2), dict(BLOCK_N=64, num_warps=4, num_stages=3),
           dict(BLOCK_N=128, num_warps=4, num_stages=2), dict(BLOCK_N=128, num_warps=8, num_stages=3),
           dict(BLOCK_N=32, num_warps=4, num_stages=4), dict(BLOCK_N=64, num_warps=8, num_stages=4),
           dict(BLOCK_N=128, num_warps=4, num_stages=3)]
MAX_BYTES = 8 * 2**30
CHECK_ROWS = 2


def cfg_str(c):
    return f"bn={c['BLOCK_N']};w={c['num_warps']};st={c['num_stages']}"


def rand_qkv(B, Hq, Hkv, D, S, dtype=torch.bfloat16, Dv=None):
    q = torch.randn(B, Hq, D, device="cuda", dtype=dtype)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype)
    v = torch.randn(B, Hkv, S, Dv or D, device="cuda", dtype=dtype)
    return q, k, v


def ref_decode(q, k, v, scale, rows=None, idx=None):
    """float32 reference on selected batch rows: returns [len(rows), Hq, Dv]."""
    rows = rows if rows is not None else list(range(q.shape[0]))
    outs = []
    for b in rows:
        qb = q[b].float()
        kb = k[b].float()
        vb = v[b].float()
        if idx is not None:
            ii = idx[b].long()
            kb = torch.gather(kb, 1, ii[..., None].expand(-1, -1, kb.shape[-1]))
            vb = torch.gather(vb, 1, ii[..., None].expand(-1, -1, vb.shape[-1]))
        Hq, Hkv = qb.shape[0], kb.shape[0]
        G = Hq // Hkv
        qg = qb.view(Hkv, G, -1)
        s = torch.einsum("hgd,hsd->hgs", qg, kb) * scale
        p = torch.softmax(s, -1)
        outs.append(torch.einsum("hgs,hsd->hgd", p, vb).reshape(Hq, -1))
    return torch.stack(outs)


def check_rows(B):
    return sorted({0, B - 1})


def checked(fn, out_shape, dtype, ref, rows):
    """Poison output + partials, run, verify all written, return rel error on `rows`."""
    td.POISON = True
    try:
        out = torch.full(out_shape, float("nan"), device="cuda", dtype=dtype)
        fn(out)
        torch.cuda.synchronize()
    finally:
        td.POISON = False
    if not torch.isfinite(out.float()).all():
        return float("inf")
    return rel_error(out[rows], ref)


def points(heads, batches, contexts, elem_bytes=2.0, cap=MAX_BYTES):
    for (Hq, Hkv, D) in heads:
        for B in batches:
            for S in contexts:
                if dense_kv_bytes(B, Hkv, S, D, elem_bytes) <= cap:
                    yield B, Hq, Hkv, D, S


def tune(name, make_fn, configs, csv, base_row):
    best = None
    for c in configs:
        r = guarded(f"tune {name} {c}", lambda: bench(make_fn(c))[0])
        if r is None:
            continue
        csv.row(**base_row, method=f"{name}_tune", params=cfg_str(c), time_s=r)
        log(f"  tune {name} {cfg_str(c)} {r*1e6:.1f} us")
        if best is None or r < best[0]:
            best = (r, c)
    return best[1] if best else td.DEFAULT_CFG


# ----------------------------------------------------------------------------- bf16 / fp8
def run_dense(args, csv, budget, fp8=False):
    q_ = args.quick
    batches = [1, 8] if q_ else [1, 4, 16, 64, 256]
    contexts = [512, 4096] if q_ else [512, 2048, 8192, 32768, 131072]
    heads = HEADS[:2] if q_ else (HEADS if not fp8 else HEADS[:4])
    name = "triton_fp8" if fp8 else "triton_bf16"
    # tune on one representative shape
    B, Hq, Hkv, D, S = (4, 32, 8, 128, 2048) if q_ else (16, 32, 8, 128, 8192)
    q, k, v = rand_qkv(B, Hq, Hkv, D, S)
    if fp8:
        k, v = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    base = dict(batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, context=S,
                bytes_read=dense_kv_bytes(B, Hkv, S, D, 1 if fp8 else 2), flops=4 * B * Hq * S * D)
    cfg = tune(name, lambda c: (lambda: td.decode_attention(q, k, v, cfg=c)), CONFIGS[:3] if q_ else CONFIGS, csv,
               base)
    log(f"{name}: best cfg {cfg}")
    del q, k, v
    for (B, Hq, Hkv, D, S) in points(heads, batches, contexts, 1 if fp8 else 2):
        if not budget.ok(5):
            log(f"{name}: budget spent")
            break
        guarded(f"{name} B{B} {Hq}/{Hkv}/{D} S{S}", dense_point, B, Hq, Hkv, D, S, cfg, csv, fp8, name)
    torch.cuda.empty_cache()


def dense_point(B, Hq, Hkv, D, S, cfg, csv, fp8, name):
    scale = 1.0 / math.sqrt(D)
    q, k, v = rand_qkv(B, Hq, Hkv, D, S)
    rows = check_rows(B)
    flops = 4 * B * Hq * S * D
    common = dict(batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, context=S, flops=flops)
    if fp8:
        ks = (k.abs().amax().float() / 448.0).item()
        vs = (v.abs().amax().float() / 448.0).item()
        k8 = (k.float() / ks).to(torch.float8_e4m3fn)
        v8 = (v.float() / vs).to(torch.float8_e4m3fn)
        # reference on dequantised fp8 values (kernel correctness) + quantisation error vs bf16
        kd = torch.stack([k8[b].float() * ks for b in rows])
        vd = torch.stack([v8[b].float() * vs for b in rows])
        ref = ref_decode(q[rows], kd, vd, scale)
        ref_bf = ref_decode(q[rows], torch.stack([k[b] for b in rows]), torch.stack([v[b] for b in rows]), scale)
        qerr = rel_error(ref, ref_bf)
        del k, v
        fn = lambda out=None: td.decode_attention(q, k8, v8, sm_scale=scale, k_scale=ks, v_scale=vs, cfg=cfg, out=out)  # noqa: E731
        err = checked(fn, (B, Hq, D), torch.bfloat16, ref, rows)
        t = bench(fn)[0]
        csv.row(**common, method=name, params=params_str(scale="tensor", qerr=f"{qerr:.2e}", **_c(cfg)), time_s=t,
                bytes_read=dense_kv_bytes(B, Hkv, S, D, 1), rel_error=err)
        log(f"{name} B{B} {Hq}/{Hkv}/{D} S{S}: {t*1e6:.1f} us  {dense_kv_bytes(B, Hkv, S, D, 1)/t/1e12:.2f} TB/s err {err:.2e}")
        return
    ref = ref_decode(q, k, v, scale, rows)
    byts = dense_kv_bytes(B, Hkv, S, D, 2)
    fn = lambda out=None: td.decode_attention(q, k, v, sm_scale=scale, cfg=cfg, out=out)  # noqa: E731
    err = checked(fn, (B, Hq, D), torch.bfloat16, ref, rows)
    t = bench(fn)[0]
    csv.row(**common, method=name, params=params_str(**_c(cfg)), time_s=t, bytes_read=byts, rel_error=err)
    log(f"{name} B{B} {Hq}/{Hkv}/{D} S{S}: {t*1e6:.1f} us  {byts/t/1e12:.2f} TB/s err {err:.2e}")
    # torch SDPA baselines
    G = Hq // Hkv
    q4 = q.view(B, Hq, 1, D)

    def sdpa_gqa():
        return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True, scale=scale)

    qf = q.view(B, Hkv, G, D)

    def sdpa_fold():
        return F.scaled_dot_product_attention(qf, k, v, scale=scale)

    for mname, f in (("sdpa_gqa", sdpa_gqa), ("sdpa_fold", sdpa_fold)):
        def one(f=f, mname=mname):
            o = f().reshape(B, Hq, D)
            e = rel_error(o[rows], ref)
            tt = bench(f)[0]
            csv.row(**common, method=mname, params="", time_s=tt, bytes_read=byts, rel_error=e)
            log(f"  {mname}: {tt*1e6:.1f} us {byts/tt/1e12:.2f} TB/s err {e:.2e}")
        guarded(mname, one)


def _c(cfg):
    return dict(bn=cfg["BLOCK_N"], w=cfg["num_warps"], st=cfg["num_stages"])


# ----------------------------------------------------------------------------- KIVI
def run_kivi(args, csv, budget):
    q_ = args.quick
    bits = [(4, 4), (2, 2)] if q_ else [(4, 4), (2, 2), (4, 2), (8, 8), (2, 4)]
    batches = [1, 8] if q_ else [1, 8, 32, 128]
    contexts = [1024, 4096] if q_ else [2048, 8192, 32768, 131072]
    heads = [HEADS[0]] if q_ else [HEADS[0], HEADS[1], HEADS[3]]
    # tune launch config once (K4V4, representative shape), reuse for every bit pair
    B, Hq, Hkv, D, S = (4, 32, 8, 128, 2048) if q_ else (16, 32, 8, 128, 8192)
    q, k, v = rand_qkv(B, Hq, Hkv, D, S, torch.float16)
    cache = td.KiviCache(k, v, 4, 4)
    del k, v
    kbts = kivi_bytes(B, Hkv, S, D, 4, 4)["total"]
    base = dict(batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, context=S, bytes_read=kbts, flops=4 * B * Hq * S * D)
    best = tune("kivi_k4v4", lambda c: (lambda: td.kivi_attention(q, cache, cfg=c)),
                td.KIVI_CONFIGS[:2] if q_ else td.KIVI_CONFIGS, csv, base)
    cfgs = {kv: best for kv in bits}
    del cache, q
    torch.cuda.empty_cache()
    for (B, Hq, Hkv, D, S) in points(heads, batches, contexts, 2, cap=4 * MAX_BYTES):
        for kb, vb in bits:
            if kivi_bytes(B, Hkv, S, D, kb, vb)["total"] > MAX_BYTES:
                continue
            if not budget.ok(5):
                log("kivi: budget spent")
                return
            guarded(f"kivi k{kb}v{vb} B{B} S{S}", kivi_point, B, Hq, Hkv, D, S, kb, vb, cfgs[(kb, vb)], csv)
        torch.cuda.empty_cache()


def kivi_point(B, Hq, Hkv, D, S, kb, vb, cfg, csv):
    scale = 1.0 / math.sqrt(D)
    q, k, v = rand_qkv(B, Hq, Hkv, D, S, torch.float16)
    rows = check_rows(B)
    cache = td.KiviCache(k, v, kb, vb)
    ref_orig = ref_decode(q, k, v, scale, rows)
    del k, v
    kd, vd = cache.dequant() if B <= 2 else _dequant_rows(cache, rows)
    ref = ref_decode(q[rows], kd, vd, scale)
    del kd, vd
    qerr = rel_error(ref, ref_orig)
    fn = lambda out=None: td.kivi_attention(q, cache, sm_scale=scale, cfg=cfg, out=out)  # noqa: E731
    err = checked(fn, (B, Hq, D), torch.float16, ref, rows)
    t = bench(fn)[0]
    kbts = kivi_bytes(B, Hkv, S, D, kb, vb)
    csv.row(method="triton_kivi", batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, context=S,
            params=params_str(kbits=kb, vbits=vb, group=32, residual=128, qerr=f"{qerr:.2e}", **_c(cfg)), time_s=t,
            bytes_read=kbts["total"], flops=4 * B * Hq * S * D, rel_error=err)
    log(f"kivi K{kb}V{vb} B{B} {Hq}/{Hkv}/{D} S{S}: {t*1e6:.1f} us {kbts['total']/t/1e12:.2f} TB/s err {err:.2e} qerr {qerr:.2e}")


def _dequant_rows(cache, rows):
    class Sub:
        pass

    s = Sub()
    s.kbits, s.vbits, s.group = cache.kbits, cache.vbits, cache.group
    for n in ("k_packed", "v_packed", "k_scale", "k_zero", "v_scale", "v_zero", "k_res", "v_res"):
        setattr(s, n, getattr(cache, n)[rows])
    return td.KiviCache.dequant(s)


# ----------------------------------------------------------------------------- eviction
def run_evict(args, csv, budget):
    q_ = args.quick
    batches = [1, 8] if q_ else [1, 8, 32, 128]
    contexts = [2048, 8192] if q_ else [8192, 32768, 131072]
    heads = [HEADS[0]]
    cfg = td.DEFAULT_CFG
    for (B, Hq, Hkv, D, S) in points(heads, batches, contexts):
        for frac in (0.25, 0.0625):
            if not budget.ok(5):
                return
            guarded(f"evict B{B} S{S}", evict_point, B, Hq, Hkv, D, S, frac, cfg, csv)
        if budget.ok(5):
            guarded(f"h2o B{B} S{S}", h2o_point, B, Hq, Hkv, D, S, cfg, csv)
    for B in ([1] if q_ else [1, 4]):
        for S in ([2048] if q_ else [4096, 16384, 32768]):
            if budget.ok(5):
                guarded(f"snapkv B{B} S{S}", snapkv_point, B, 32, 8, 128, S, csv)
    torch.cuda.empty_cache()


def evict_point(B, Hq, Hkv, D, S, frac, cfg, csv):
    scale = 1.0 / math.sqrt(D)
    q, k, v = rand_qkv(B, Hq, Hkv, D, S)
    budget_tok = max(64, int(S * frac))
    idx = torch.rand(B, Hkv, S, device="cuda").topk(budget_tok, -1).indices.sort(-1).values.to(torch.int32).contiguous()
    rows = check_rows(B)
    ref = ref_decode(q[rows], k[rows], v[rows], scale, idx=idx[rows])
    fn = lambda out=None: td.decode_attention(q, k, v, sm_scale=scale, idx=idx, cfg=cfg, out=out)  # noqa: E731
    err = checked(fn, (B, Hq, D), torch.bfloat16, ref, rows)
    t = bench(fn)[0]
    byts = dense_kv_bytes(B, Hkv, budget_tok, D, 2) + idx.numel() * 4
    csv.row(method="triton_evict_gather", batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, context=S,
            params=params_str(budget=budget_tok, **_c(cfg)), time_s=t, bytes_read=byts,
            flops=4 * B * Hq * budget_tok * D, rel_error=err)
    log(f"evict B{B} S{S} budget {budget_tok}: {t*1e6:.1f} us {byts/t/1e12:.2f} TB/s err {err:.2e}")


def h2o_point(B, Hq, Hkv, D, S, cfg, csv):
    scale = 1.0 / math.sqrt(D)
    q, k, v = rand_qkv(B, Hq, Hkv, D, S)
    scores = torch.rand(B, Hkv, S, device="cuda", dtype=torch.float32)
    rows = check_rows(B)
    s0 = scores.clone()
    o = td.h2o_step(q, k, v, scores, sm_scale=scale, cfg=cfg)
    torch.cuda.synchronize()
    ref = ref_decode(q, k, v, scale, rows)
    err_o = rel_error(o[rows], ref)
    # reference score update
    G = Hq // Hkv
    sref = []
    for b in rows:
        s = torch.einsum("hgd,hsd->hgs", q[b].float().view(Hkv, G, D), k[b].float()) * scale
        sref.append(s0[b] + torch.softmax(s, -1).sum(1))
    err_s = rel_error(scores[rows], torch.stack(sref))
    t = bench(lambda: td.h2o_step(q, k, v, scores, sm_scale=scale, cfg=cfg))[0]
    byts = dense_kv_bytes(B, Hkv, S, D, 2) + B * Hkv * S * D * 2 + B * Hkv * S * 8
    csv.row(method="triton_h2o_step", batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, context=S,
            params=params_str(err_out=f"{err_o:.2e}", err_score=f"{err_s:.2e}"), time_s=t, bytes_read=byts,
            flops=6 * B * Hq * S * D, rel_error=max(err_o, err_s))
    log(f"h2o B{B} S{S}: {t*1e6:.1f} us {byts/t/1e12:.2f} TB/s err {err_o:.2e}/{err_s:.2e}")


def snapkv_select(q_obs, k, budget_tok, scale, window=32, pool=7):
    B, Hq, W, D = q_obs.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qo = q_obs.reshape(B, Hkv, G * W, D)
    att = torch.matmul(qo, k.transpose(-1, -2)).float() * scale  # [B,Hkv,G*W,S]
    pos_q = (S - W + torch.arange(W, device=k.device)).repeat(G)
    mask = torch.arange(S, device=k.device)[None, :] > pos_q[:, None]
    att = att.masked_fill(mask, float("-inf"))
    p = torch.softmax(att, -1)
    score = p[..., : S - W].sum(-2)
    score = F.avg_pool1d(score.view(B * Hkv, 1, -1), pool, 1, pool // 2).view(B, Hkv, -1)
    idx = score.topk(budget_tok - W, -1).indices
    return score, idx


def snapkv_point(B, Hq, Hkv, D, S, csv):
    scale = 1.0 / math.sqrt(D)
    W = 32
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
    q_obs = torch.randn(B, Hq, W, D, device="cuda", dtype=torch.bfloat16)
    bud = S // 4
    score, idx = snapkv_select(q_obs, k, bud, scale)
    s64, _ = snapkv_select(q_obs.double(), k.double(), bud, scale)
    err = rel_error(score, s64)
    t = bench(lambda: snapkv_select(q_obs, k, bud, scale))[0]
    byts = B * Hkv * S * D * 2 + B * Hkv * W * (Hq // Hkv) * S * 4 * 3
    csv.row(method="snapkv_prefill_score", batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, context=S,
            params=params_str(window=W, pool=7, budget=bud, impl="torch"), time_s=t, bytes_read=byts,
            flops=2 * B * Hq * W * S * D, rel_error=err)
    log(f"snapkv B{B} S{S}: {t*1e6:.1f} us err {err:.2e}")


# ----------------------------------------------------------------------------- MLA & friends
MLA_CONFIGS = [dict(BLOCK_H=16, BLOCK_N=32, num_warps=4, num_stages=2), dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=2),
               dict(BLOCK_H=128, BLOCK_N=32, num_warps=16, num_stages=2), dict(BLOCK_H=128, BLOCK_N=64, num_warps=16, num_stages=2),
               dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=3), dict(BLOCK_H=64, BLOCK_N=128, num_warps=8, num_stages=2),
               dict(BLOCK_H=16, BLOCK_N=64, num_warps=4, num_stages=2), dict(BLOCK_H=16, BLOCK_N=64, num_warps=4, num_stages=3)]


def mla_inputs(B, H, S):
    ql = torch.randn(B, H, 512, device="cuda", dtype=torch.bfloat16)
    qr = torch.randn(B, H, 64, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(B, S, 512, device="cuda", dtype=torch.bfloat16)
    kr = torch.randn(B, S, 64, device="cuda", dtype=torch.bfloat16)
    return ql, qr, c, kr


def mla_ref(ql, qr, c, kr, scale, rows):
    out = []
    for b in rows:
        s = (ql[b].float() @ c[b].float().T + qr[b].float() @ kr[b].float().T) * scale
        out.append(torch.softmax(s, -1) @ c[b].float())
    return torch.stack(out)


def run_mla(args, csv, budget):
    q_ = args.quick
    scale = 1.0 / math.sqrt(192)
    for H in ([128] if q_ else [128, 16]):
        B, S = (2, 1024) if q_ else (16, 8192)
        ql, qr, c, kr = mla_inputs(B, H, S)
        byts = B * S * 576 * 2
        base = dict(batch=B, q_heads=H, kv_heads=1, head_dim=576, context=S, bytes_read=byts,
                    flops=2 * B * H * S * (576 + 512))
        best = None
        for cf in (MLA_CONFIGS[:2] if q_ else MLA_CONFIGS):
            if cf["BLOCK_H"] > H:
                continue
            r = guarded(f"mla tune {cf}", lambda: bench(lambda: td.mla_attention(ql, qr, c, kr, scale, cfg=cf))[0])
            if r is None:
                continue
            csv.row(**base, method="triton_mla_tune", params=params_str(**cf), time_s=r)
            log(f"  mla tune H{H} {cf}: {r*1e6:.1f} us {byts/r/1e12:.2f} TB/s")
            if best is None or r < best[0]:
                best = (r, cf)
        cfg = best[1] if best else td.MLA_DEFAULT
        del ql, qr, c, kr
        for B in ([1, 4] if q_ else [1, 8, 32, 128]):
            for S in ([1024, 4096] if q_ else [2048, 8192, 32768, 131072]):
                if B * S * 576 * 2 > MAX_BYTES or not budget.ok(5):
                    continue
                guarded(f"mla B{B} H{H} S{S}", mla_point, B, H, S, scale, cfg, csv)
    torch.cuda.empty_cache()


def mla_point(B, H, S, scale, cfg, csv):
    ql, qr, c, kr = mla_inputs(B, H, S)
    rows = check_rows(B)
    ref = mla_ref(ql, qr, c, kr, scale, rows)
    fn = lambda out=None: td.mla_attention(ql, qr, c, kr, scale, cfg=cfg, out=out)  # noqa: E731
    err = checked(fn, (B, H, 512), torch.bfloat16, ref, rows)
    t = bench(fn)[0]
    byts = B * S * 576 * 2
    csv.row(method="triton_mla_absorbed", batch=B, q_heads=H, kv_heads=1, head_dim=576, context=S,
            params=params_str(kv_lora_rank=512, rope=64, **cfg), time_s=t, bytes_read=byts,
            flops=2 * B * H * S * (576 + 512), rel_error=err)
    log(f"mla B{B} H{H} S{S}: {t*1e6:.1f} us {byts/t/1e12:.2f} TB/s err {err:.2e}")


def run_misc(args, csv, budget):
    """Cross-layer sharing (repeated reads of one KV), low-rank K reconstruction (GEMM then attend),
    LightKV-style adjacent-token merging, KeepKV-style merge step."""
    q_ = args.quick
    Hq, Hkv, D = 32, 8, 128
    scale = 1.0 / math.sqrt(D)
    cfg = td.DEFAULT_CFG
    for B, S in ([(4, 2048)] if q_ else [(1, 32768), (16, 8192), (64, 8192)]):
        for L in (1, 2, 4):
            if budget.ok(5):
                guarded("cla", cla_point, B, Hq, Hkv, D, S, L, scale, cfg, csv)
        for r in (128, 256, 512):
            if budget.ok(5):
                guarded("lowrank", lowrank_point, B, Hq, Hkv, D, S, r, scale, cfg, csv)
        if budget.ok(5):
            guarded("lightkv", merge_point, B, Hq, Hkv, D, S, csv, "lightkv_merge")
        if budget.ok(5):
            guarded("keepkv", merge_point, B, Hq, Hkv, D, S, csv, "keepkv_merge")
    torch.cuda.empty_cache()


def cla_point(B, Hq, Hkv, D, S, L, scale, cfg, csv):
    q = torch.randn(L, B, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    rows = check_rows(B)
    ref = ref_decode(q[L - 1], k, v, scale, rows)

    def fn():
        o = None
        for i in range(L):
            o = td.decode_attention(q[i], k, v, sm_scale=scale, cfg=cfg)
        return o

    err = rel_error(fn()[rows], ref)
    t = bench(fn)[0]
    byts = L * dense_kv_bytes(B, Hkv, S, D, 2)
    csv.row(method="cla_shared_kv", batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, context=S,
            params=params_str(layers=L, shared=1), time_s=t, bytes_read=byts, flops=L * 4 * B * Hq * S * D,
            rel_error=err)
    log(f"cla L{L} B{B} S{S}: {t*1e6:.1f} us (bytes counted = L reads) {byts/t/1e12:.2f} TB/s")


def lowrank_point(B, Hq, Hkv, D, S, r, scale, cfg, csv):
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    lat = torch.randn(B, S, r, device="cuda", dtype=torch.bfloat16)
    w_up = torch.randn(r, Hkv * D, device="cuda", dtype=torch.bfloat16) / math.sqrt(r)
    v = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
    rows = check_rows(B)

    def fn():
        kk = torch.matmul(lat, w_up).view(B, S, Hkv, D).transpose(1, 2)  # strided view, last dim contiguous
        return td.decode_attention(q, kk, v, sm_scale=scale, cfg=cfg)

    kref = (lat[rows].float() @ w_up.float()).view(len(rows), S, Hkv, D).transpose(1, 2)
    ref = ref_decode(q[rows], kref, v[rows], scale)
    err = rel_error(fn()[rows], ref)
    t = bench(fn)[0]
    byts = B * S * r * 2 + dense_kv_bytes(B, Hkv, S, D, 2) // 2
    csv.row(method="lowrank_k_gemm_then_attend", batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, context=S,
            params=params_str(rank=r, v="bf16"), time_s=t, bytes_read=byts,
            flops=4 * B * Hq * S * D + 2 * B * S * r * Hkv * D, rel_error=err)
    log(f"lowrank r{r} B{B} S{S}: {t*1e6:.1f} us")


def merge_step(k, v, n_merge, kind):
    """LightKV-like: merge the n_merge most similar adjacent (even, odd) token pairs by averaging.
    KeepKV-like: same pairs, merged with weights from per-token scores (electoral votes) and
    the merged count kept, so attention mass is preserved."""
    B, H, S, D = k.shape
    ke, ko = k[:, :, 0::2].float(), k[:, :, 1::2].float()
    sim = F.cosine_similarity(ke, ko, dim=-1)  # [B,H,S/2]
    top = sim.topk(n_merge, -1).indices
    gi = top[..., None].expand(-1, -1, -1, D)
    if kind == "lightkv_merge":
        km = (torch.gather(ke, 2, gi) + torch.gather(ko, 2, gi)) * 0.5
        vm = (torch.gather(v[:, :, 0::2].float(), 2, gi) + torch.gather(v[:, :, 1::2].float(), 2, gi)) * 0.5
    else:
        we = ke.norm(dim=-1, keepdim=True)
        wo = ko.norm(dim=-1, keepdim=True)
        a = torch.gather(we, 2, top[..., None]) / (torch.gather(we, 2, top[..., None]) + torch.gather(wo, 2, top[..., None]))
        km = a * torch.gather(ke, 2, gi) + (1 - a) * torch.gather(ko, 2, gi)
        vm = a * torch.gather(v[:, :, 0::2].float(), 2, gi) + (1 - a) * torch.gather(v[:, :, 1::2].float(), 2, gi)
    return km.to(k.dtype), vm.to(k.dtype)


def merge_point(B, Hq, Hkv, D, S, csv, kind):
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    n = S // 8
    km, vm = merge_step(k, v, n, kind)
    kr, vr = merge_step(k.double(), v.double(), n, kind)
    err = max(rel_error(km, kr), rel_error(vm, vr))
    t = bench(lambda: merge_step(k, v, n, kind))[0]
    byts = dense_kv_bytes(B, Hkv, S, D, 2) + 2 * B * Hkv * n * D * 2
    csv.row(method=kind, batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, context=S,
            params=params_str(merged_pairs=n, impl="torch"), time_s=t, bytes_read=byts, flops=0, rel_error=err)
    log(f"{kind} B{B} S{S}: {t*1e6:.1f} us err {err:.2e}")


# ----------------------------------------------------------------------------- prefill
def run_prefill(args, out_dir, budget):
    csv = CsvOut(os.path.join(out_dir, "attention_prefill.csv"), PRE_COLS)
    prompts = [128, 1024] if args.quick else [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=120)
    ap.add_argument("--path", default="bf16", choices=["bf16", "fp8", "kivi", "evict", "mla", "misc", "prefill"])
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    budget = Budget(a.budget_s)
    torch.manual_seed(0)
    if a.path == "prefill":
        run_prefill(a, a.out, budget)
        return
    csv = CsvOut(os.path.join(a.out, "attention_decode.csv"), DEC_COLS)
    dict(bf16=lambda: run_dense(a, csv, budget), fp8=lambda: run_dense(a, csv, budget, fp8=True),
         kivi=lambda: run_kivi(a, csv, budget), evict=lambda: run_evict(a, csv, budget),
         mla=lambda: run_mla(a, csv, budget), misc=lambda: run_misc(a, csv, budget))[a.path]()


if __name__ == "__main__":
    main()
