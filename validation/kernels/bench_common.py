"""Helpers shared by the per-method kernel benchmarks: the attention_decode.csv schema, fresh random
inputs, float64 references, poisoned-output checks and a small launch-config autotune."""
from __future__ import annotations

import math

import torch

from validation.common import bench, guarded, log, params_str, rel_error
from validation.kernels import triton_decode as td

# attention_decode.csv. Columns up to rel_error are the original schema (kvsim calibrate/validate
# read them); kvsim_spec names the kvsim method a row measures ("" for tuning rows), phase is
# decode | prefill | load (work done once per request, not per step), layers is how many decoder
# layers one timed step covers (multi-layer steps: per-layer budgets, cross-layer sharing).
DEC_COLS = ["method", "batch", "q_heads", "kv_heads", "head_dim", "context", "params", "time_s", "bytes_read", "flops",
            "rel_error", "kvsim_spec", "phase", "layers"]
MAX_BYTES = 8 * 2**30  # largest KV one measurement allocates (leaves room for references)
LLAMA3 = (32, 8, 128)  # q heads, kv heads, head dim of Llama-3-8B (HF config.json)


def rand_qkv(B, Hq, Hkv, D, S, dtype=torch.bfloat16, Dv=None):
    q = torch.randn(B, Hq, D, device="cuda", dtype=dtype)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype)
    v = torch.randn(B, Hkv, S, Dv or D, device="cuda", dtype=dtype)
    return q, k, v


def ref_decode(q, k, v, scale, rows=None, idx=None, bias_log2=None):
    """float64 reference on batch rows `rows`: [len(rows), Hq, Dv]. bias_log2 [B,Hkv,S] adds to the
    scores in log2 units (as the kernel's bias)."""
    rows = rows if rows is not None else list(range(q.shape[0]))
    outs = []
    for b in rows:
        qb, kb, vb = q[b].double(), k[b].double(), v[b].double()
        if idx is not None:
            ii = idx[b].long()
            kb = torch.gather(kb, 1, ii[..., None].expand(-1, -1, kb.shape[-1]))
            vb = torch.gather(vb, 1, ii[..., None].expand(-1, -1, vb.shape[-1]))
        Hq, Hkv = qb.shape[0], kb.shape[0]
        G = Hq // Hkv
        s = torch.einsum("hgd,hsd->hgs", qb.view(Hkv, G, -1), kb) * scale
        if bias_log2 is not None:
            s = s + bias_log2[b].double()[:, None, :] / math.log2(math.e)
        p = torch.softmax(s, -1)
        outs.append(torch.einsum("hgs,hsd->hgd", p, vb).reshape(Hq, -1))
    return torch.stack(outs)


def check_rows(B):
    return sorted({0, B - 1})


def checked(fn, out_shape, dtype, ref, rows):
    """Poison the output and split partials (NaN), run, require every element written, return the
    relative error on `rows` (inf when anything is non-finite)."""
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


def points(heads, batches, contexts, bytes_per_token_head, cap=MAX_BYTES):
    for (Hq, Hkv, D) in heads:
        for B in batches:
            for S in contexts:
                if B * Hkv * S * bytes_per_token_head(D) <= cap:
                    yield B, Hq, Hkv, D, S


def kv_bytes(B, Hkv, S, D, elem_bytes, Dv=None):
    return int(B * Hkv * S * (D + (Dv or D)) * elem_bytes)


def cfg_str(c):
    return params_str(**c)


def tune(name, make_fn, configs, csv, base_row, check=None):
    """Time each config (after an optional correctness check) and return the fastest; every tried
    config is written as a `<name>_tune` row so the choice can be audited."""
    best = None
    for c in configs:
        def one(c=c):
            fn = make_fn(c)
            if check is not None:
                err = check(fn)
                if not err < 2e-2:
                    raise RuntimeError(f"config {c} failed the check: rel error {err:.2e}")
            return bench(fn)[0]
        r = guarded(f"tune {name} {c}", one)
        if r is None:  # failed (check or launch): recorded, never dropped silently
            csv.row(**base_row, method=f"{name}_tune", params=cfg_str(c) + ";status=FAIL", time_s="", phase="tune_fail")
            continue
        csv.row(**base_row, method=f"{name}_tune", params=cfg_str(c), time_s=r, phase="tune")
        log(f"  tune {name} {cfg_str(c)} {r*1e6:.1f} us {base_row['bytes_read']/r/1e12:.2f} TB/s")
        if best is None or r < best[0]:
            best = (r, c)
    return best[1] if best else None
