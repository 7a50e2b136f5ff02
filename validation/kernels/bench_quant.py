"""Group-quantized KV decode (quant_decode.py): KIVI, asymmetric K/V bits, per-token INT8/4/2, SKVQ and
PackKV's bit unpacking. Each (layout, bits) pair is autotuned (the default config and the first
entries of quant_decode.quant_grid; tune_quant.py sweeps the whole grid) on one shape that fills the GPU; each
point is checked against a float64 reference over the dequantized cache (kernel error) and
against the unquantized cache (quantization error, reported as qerr in params)."""
from __future__ import annotations

import math

import torch

from validation.common import bench, guarded, log, params_str, rel_error
from validation.kernels import quant_decode as qd
from validation.kernels.bench_common import LLAMA3, MAX_BYTES, check_rows, checked, points, ref_decode, tune


# (method, kvsim spec, QuantCache kwargs). KIVI: G = 32, R = 128 (arXiv 2402.02750 sec. 4); INT-n
# per-token group 64 (kvsim's intkv default); SKVQ: 2-bit keys and values (the paper's 1.5-bit
# values are stored at 2 bits here), group 64, clip 0.95, reordered channels, window 128
# (arXiv 2405.06219 sec. 3); PackKV: the bit-unpacking path at a fixed width per run.
def variants(quick: bool):
    kivi = lambda kb, vb: dict(kbits=kb, vbits=vb, key_mode="channel", k_group=32, v_group=32, residual=128)  # noqa: E731
    tok = lambda b, g=64, r=0, **kw: dict(kbits=b, vbits=b, key_mode="token", k_group=g, v_group=g, residual=r, **kw)  # noqa: E731
    out = [("triton_kivi", "kivi:bits=2,group=32,residual=128", kivi(2, 2)),
           ("triton_intkv", "intkv:bits=8,group=64", tok(8)),
           ("triton_skvq", "skvq:k_bits=2,v_bits=2,group=64,window=128", tok(2, r=128, clip=0.95, perm=True))]
    if not quick:
        out += [("triton_kivi", "kivi:bits=4,group=32,residual=128", kivi(4, 4)),
                ("triton_kivi", "asymkv:k_bits=4,v_bits=2,group=32,residual=128", kivi(4, 2)),
                ("triton_kivi", "asymkv:k_bits=2,v_bits=4,group=32,residual=128", kivi(2, 4)),
                ("triton_intkv", "intkv:bits=4,group=64", tok(4)),
                ("triton_intkv", "intkv:bits=2,group=64", tok(2)),
                ("triton_packkv", "packkv:mean_bits=4,group=64", tok(4)),
                ("triton_packkv", "packkv:mean_bits=2,group=64", tok(2))]
    return out


def build(k, v, kw):
    kw = dict(kw)
    if kw.pop("perm", False):  # SKVQ: channels sorted by their range so similar channels share a group
        rng = (k.float().amax((0, 1, 2)) - k.float().amin((0, 1, 2)))
        kw["perm"] = torch.argsort(rng)
    return qd.QuantCache(k, v, **kw)


def run(args, csv, budget):
    q_ = args.quick
    batches = [4] if q_ else [1, 8, 32, 128]
    contexts = [2048] if q_ else [2048, 8192, 32768, 131072]
    heads = [LLAMA3] if q_ else [LLAMA3, (32, 32, 128)]
    for method, spec, kw in variants(q_):
        if not budget.ok(10):
            log("quant: budget spent")
            return
        grid = qd.quant_grid(kw["kbits"], kw["vbits"], kw["key_mode"])  # [0] register dequant, [1] old tile
        cfg = guarded(f"tune {spec}", tune_one, method, spec, kw, grid[:1] if q_ else grid[:3], csv, q_)
        if cfg is None:
            continue
        for (B, Hq, Hkv, D, S) in points(heads, batches, contexts, lambda d: 4 * d, cap=MAX_BYTES // 2):
            if not budget.ok(5):
                log("quant: budget spent")
                return
            guarded(f"{spec} B{B} S{S}", point, method, spec, kw, B, Hq, Hkv, D, S, cfg, csv)
            torch.cuda.empty_cache()


def tune_one(method, spec, kw, configs, csv, quick):
    B, Hq, Hkv, D, S = (4, 32, 8, 128, 2048) if quick else (32, 32, 8, 128, 32768)
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.float16)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.float16)
    cache = build(k, torch.randn_like(k), kw)
    del k
    rows = check_rows(B)
    kd, vd = cache.dequant(rows)
    ref = ref_decode(q[rows], kd, vd, 1.0 / math.sqrt(D))
    del kd, vd
    base = dict(batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, context=S, bytes_read=cache.nbytes(),
                flops=4 * B * Hq * S * D, kvsim_spec=spec, layers=1)
    check = lambda fn: checked(lambda out: fn(out), (B, Hq, D), torch.float16, ref, rows)  # noqa: E731
    tried = [dict(c, asm=1) for c in configs]

    def make(c):
        return lambda out=None: qd.quant_attention(q, cache, cfg=c, out=out, asm=bool(c["asm"]))
    best = tune(f"{method}_{spec.split(':')[0]}_k{cache.kbits}v{cache.vbits}", make, tried, csv, base, check)
    log(f"{spec}: best cfg {best}")
    return best


def build_checked(q, k, v, kw, scale, rows):
    """The cache of (k, v), the float64 reference over its dequantized values on batch rows `rows`, and
    the quantization error (that reference against attention over the original k, v)."""
    cache = build(k, v, kw)
    kd, vd = cache.dequant(rows)
    ref = ref_decode(q[rows], kd, vd, scale)
    return cache, ref, rel_error(ref, ref_decode(q, k, v, scale, rows))


def point(method, spec, kw, B, Hq, Hkv, D, S, cfg, csv):
    scale = 1.0 / math.sqrt(D)
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.float16)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    rows = check_rows(B)
    cache, ref, qerr = build_checked(q, k, v, kw, scale, rows)
    del k, v
    fn = lambda out=None: qd.quant_attention(q, cache, sm_scale=scale, cfg=cfg, out=out, asm=bool(cfg["asm"]))  # noqa: E731
    err = checked(fn, (B, Hq, D), torch.float16, ref, rows)
    t = bench(fn)[0]
    byts = cache.nbytes()
    csv.row(method=method, batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, context=S, kvsim_spec=spec, phase="decode",
            layers=1, params=params_str(kbits=cache.kbits, vbits=cache.vbits, key_mode=cache.key_mode,
                                        k_group=cache.k_group, v_group=cache.v_group, residual=cache.n_res,
                                        qerr=f"{qerr:.2e}", **cfg),
            time_s=t, bytes_read=byts, flops=4 * B * Hq * S * D, rel_error=err)
    log(f"{spec} B{B} {Hq}/{Hkv}/{D} S{S}: {t*1e6:.1f} us {byts/t/1e12:.2f} TB/s err {err:.2e} qerr {qerr:.2e}")
