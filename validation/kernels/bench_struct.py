"""Structure-changing methods: MLA absorbed decode over the latent cache (DeepSeek-V2/V3 and V2-Lite
head counts), MTLA's time-strided latent, LRKV's shared head + low-rank residuals, and — as
multi-layer steps from kvsim's own layout — cross-layer sharing (CLA, MLKV, LCKV, YOCO, xlayer),
LoRC's absorbed low-rank latents and KV-Latent's smaller head dims."""
from __future__ import annotations

import math

import torch

from validation.common import bench, guarded, log, params_str
from validation.kernels import triton_decode as td
from validation.kernels.bench_common import LLAMA3, MAX_BYTES, check_rows, checked, kv_bytes, ref_decode
from validation.kernels.bench_evict import layout_grid

MLA_CONFIGS = [dict(BLOCK_H=16, BLOCK_N=32, num_warps=4, num_stages=2), dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=2),
               dict(BLOCK_H=16, BLOCK_N=64, num_warps=4, num_stages=2), dict(BLOCK_H=32, BLOCK_N=32, num_warps=4, num_stages=2),
               dict(BLOCK_H=32, BLOCK_N=64, num_warps=8, num_stages=2), dict(BLOCK_H=64, BLOCK_N=32, num_warps=8, num_stages=2),
               dict(BLOCK_H=16, BLOCK_N=64, num_warps=4, num_stages=3)]
MLA_RANK, MLA_ROPE = 512, 64  # kv_lora_rank, qk_rope_head_dim (DeepSeek-V2/V3 config.json)
MLA_SCALE = 1.0 / math.sqrt(192)  # qk_nope 128 + rope 64


def run(args, csv, budget):
    q_ = args.quick
    for H in ([16] if q_ else [128, 16]):  # DeepSeek-V3 and V2-Lite query heads
        guarded(f"mla H{H}", run_mla, H, q_, csv, budget)
    sharing = ["bf16", "cla:factor=2", "cla:factor=4", "mlkv:kv_layers=2,kv_heads=2", "lckv:warmup=2",
               "yoco:window=1024", "xlayer:kv_layers=2,target=bottom", "kv-latent:qk_dim=64,vo_dim=64",
               "lorc:ratio=0.5,progressive=False"]
    layout_grid(sharing[:2] + sharing[-1:] if q_ else sharing, [(2, 4096)] if q_ else [(4, 16384), (16, 8192)],
                4 if q_ else 8, csv, budget)
    Hq, Hkv, D = LLAMA3
    for B, S in ([(2, 2048)] if q_ else [(1, 32768), (16, 8192), (64, 4096)]):
        if budget.ok(5):
            guarded(f"lrkv B{B} S{S}", lrkv_point, B, Hq, Hkv, D, S, 32, csv)


def mla_inputs(B, H, S):
    d = dict(device="cuda", dtype=torch.bfloat16)
    return (torch.randn(B, H, MLA_RANK, **d), torch.randn(B, H, MLA_ROPE, **d), torch.randn(B, S, MLA_RANK, **d),
            torch.randn(B, S, MLA_ROPE, **d))


def mla_ref(ql, qr, c, kr, scale, rows):
    out = []
    for b in rows:
        s = (ql[b].double() @ c[b].double().T + qr[b].double() @ kr[b].double().T) * scale
        out.append(torch.softmax(s, -1) @ c[b].double())
    return torch.stack(out)


def run_mla(H, quick, csv, budget):
    B, S = (2, 1024) if quick else (16, 32768)
    ql, qr, c, kr = mla_inputs(B, H, S)
    byts = B * S * (MLA_RANK + MLA_ROPE) * 2
    base = dict(batch=B, q_heads=H, kv_heads=1, head_dim=MLA_RANK + MLA_ROPE, context=S, bytes_read=byts,
                flops=2 * B * H * S * (2 * MLA_RANK + MLA_ROPE), kvsim_spec="", layers=1, phase="tune")
    best = None
    for cf in (MLA_CONFIGS[:1] if quick else MLA_CONFIGS):
        if cf["BLOCK_H"] > max(16, H):
            continue
        r = guarded(f"mla tune {cf}", lambda cf=cf: bench(lambda: td.mla_attention(ql, qr, c, kr, MLA_SCALE, cfg=cf))[0])
        if r is None:
            continue
        csv.row(**base, method="triton_mla_tune", params=params_str(**cf), time_s=r)
        log(f"  mla tune H{H} {cf}: {r*1e6:.1f} us {byts/r/1e12:.2f} TB/s")
        if best is None or r < best[0]:
            best = (r, cf)
    cfg = best[1] if best else td.MLA_DEFAULT
    del ql, qr, c, kr
    for B in ([2] if quick else [1, 8, 32, 128]):
        for S in ([2048] if quick else [2048, 8192, 32768, 131072]):
            if B * S * (MLA_RANK + MLA_ROPE) * 2 > MAX_BYTES or not budget.ok(5):
                continue
            for stride in (1, 2):  # stride 2: MTLA merges the latent over time (arXiv 2505.13544)
                guarded(f"mla B{B} H{H} S{S} s{stride}", mla_point, B, H, S, stride, cfg, csv)
            torch.cuda.empty_cache()


def mla_point(B, H, S, stride, cfg, csv):
    n = -(-S // stride)
    ql, qr, c, kr = mla_inputs(B, H, n)
    rows = check_rows(B)
    ref = mla_ref(ql, qr, c, kr, MLA_SCALE, rows)
    fn = lambda out=None: td.mla_attention(ql, qr, c, kr, MLA_SCALE, cfg=cfg, out=out)  # noqa: E731
    err = checked(fn, (B, H, MLA_RANK), torch.bfloat16, ref, rows)
    t = bench(fn)[0]
    byts = B * n * (MLA_RANK + MLA_ROPE) * 2
    csv.row(method="triton_mla_absorbed" if stride == 1 else "triton_mtla_absorbed", batch=B, q_heads=H, kv_heads=1,
            head_dim=MLA_RANK + MLA_ROPE, context=S, kvsim_spec="bf16" if stride == 1 else f"mtla:stride={stride}",
            phase="decode", layers=1, params=params_str(kv_lora_rank=MLA_RANK, rope=MLA_ROPE, stride=stride, **cfg),
            time_s=t, bytes_read=byts, flops=2 * B * H * n * (2 * MLA_RANK + MLA_ROPE), rel_error=err)
    log(f"mla B{B} H{H} S{S} stride {stride}: {t*1e6:.1f} us {byts/t/1e12:.2f} TB/s err {err:.2e}")


def lrkv_point(B, Hq, Hkv, D, S, r, csv):
    """LRKV (arXiv 2601.11471): one shared full-rank K/V head plus per-KV-head rank-r residuals.
    Per step the per-head K/V are rebuilt (shared + coefficients @ basis) and attended; the cache
    read is the shared head and the coefficients (kvsim's reconstruct_rank)."""
    d = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(B, Hq, D, **d)
    ks, vs = torch.randn(B, 1, S, D, **d), torch.randn(B, 1, S, D, **d)
    kc, vc = torch.randn(B, Hkv, S, r, **d), torch.randn(B, Hkv, S, r, **d)
    kb, vb = torch.randn(Hkv, r, D, **d) / math.sqrt(r), torch.randn(Hkv, r, D, **d) / math.sqrt(r)
    scale = 1.0 / math.sqrt(D)

    def step(out=None):
        k = torch.matmul(kc, kb) + ks  # [B, Hkv, S, D]
        v = torch.matmul(vc, vb) + vs
        return td.decode_attention(q, k, v, sm_scale=scale, out=out)

    rows = check_rows(B)
    kf = (kc[rows].double() @ kb.double() + ks[rows].double())
    vf = (vc[rows].double() @ vb.double() + vs[rows].double())
    err = checked(step, (B, Hq, D), torch.bfloat16, ref_decode(q[rows], kf, vf, scale), rows)
    t = bench(step)[0]
    byts = kv_bytes(B, 1, S, D, 2) + kv_bytes(B, Hkv, S, r, 2)
    csv.row(method="lrkv_rebuild_attend", batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, context=S,
            kvsim_spec=f"lrkv:rank={r}", phase="decode", layers=1, params=params_str(rank=r, impl="torch+triton"),
            time_s=t, bytes_read=byts, flops=4 * B * Hq * S * D + 4 * B * Hkv * S * r * D, rel_error=err)
    log(f"lrkv B{B} S{S} r{r}: {t*1e6:.1f} us {byts/t/1e12:.2f} TB/s err {err:.2e}")
