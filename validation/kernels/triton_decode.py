"""Split-K flash-decoding kernels in Triton for one query token per sequence.

decode_attention : bf16/fp16 or fp8(e4m3, per-tensor scale) KV, GQA, optional gathered indices,
                   per-token bias, paged (block table) caches, separate value head dim
mla_attention    : MLA absorbed decode over a latent cache (rank 512 + rope 64)
(group-quantized KV: quant_decode.py)
h2o_scores       : adds this step's attention probabilities into a per-token score (H2O)
All write per-split partial outputs (fp32) + log2-sum-exp, combined by _reduce_kernel.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_NUM_SMS = None


def num_sms():
    global _NUM_SMS
    if _NUM_SMS is None:  # 132 = H100/H200 SXM, used only by CPU tests under the Triton interpreter
        _NUM_SMS = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
    return _NUM_SMS


@triton.jit
def _decode_kernel(Q, K, V, IDX, BIAS, TBL, OP, LP,
                   sqb, sqh, skb, skh, skt, svb, svh, svt, sib, sih, sbb, sbh, stb,
                   sob, soh, sos, slb, slh,
                   seq_len, tps, qk_scale, split_base,
                   GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                   BLOCK_N: tl.constexpr, HAS_IDX: tl.constexpr, FP8: tl.constexpr, HAS_BIAS: tl.constexpr,
                   PAGE: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr):
    """One program per (batch, kv head, split) with the whole query group. Token t of the sequence
    is row IDX[t] (gathered: eviction), or TBL[t // PAGE] * PAGE + t % PAGE (paged, vLLM block
    table; K/V then have no batch stride), or t. BIAS adds a per-token log2 weight (KeepKV counts).
    FP8 K/V convert to fp16 (one cvt per two e4m3 values on Hopper). D_PAD, DV_PAD: the head dims
    rounded up to a power of two (tile widths; head dim 96 masks a 128-wide tile)."""
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    dmask = offs_d < D
    dvmask = offs_dv < DV
    offs_n = tl.arange(0, BLOCK_N)
    gmask = offs_g < GROUP
    hq = hk * GROUP + offs_g
    q = tl.load(Q + b * sqb + hq[:, None] * sqh + offs_d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    if FP8:
        q = q.to(tl.float16)
    start = sp * tps
    end = tl.minimum(start + tps, seq_len)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, DV_PAD], tl.float32)
    kb = K + b * skb + hk * skh
    vb = V + b * svb + hk * svh
    for s in range(start, end, BLOCK_N):
        tok = s + offs_n
        nmask = tok < end
        if HAS_IDX:
            t_idx = tl.load(IDX + b * sib + hk * sih + tok, mask=nmask, other=0).to(tl.int64)
        elif PAGE > 0:
            page = tl.load(TBL + b * stb + tok // PAGE, mask=nmask, other=0).to(tl.int64)
            t_idx = page * PAGE + tok % PAGE
        else:
            t_idx = tok.to(tl.int64)
        k = tl.load(kb + t_idx[:, None] * skt + offs_d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
        if FP8:
            k = k.to(tl.float16)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        if HAS_BIAS:
            qk += tl.load(BIAS + b * sbb + hk * sbh + tok, mask=nmask, other=0.0)[None, :]
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vb + t_idx[:, None] * svt + offs_dv[None, :], mask=nmask[:, None] & dvmask[None, :], other=0.0)
        if FP8:
            v = v.to(tl.float16)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    sidx = split_base + sp
    tl.store(OP + b * sob + hq[:, None] * soh + sidx * sos + offs_dv[None, :], acc, mask=gmask[:, None] & dvmask[None, :])
    tl.store(LP + b * slb + hq * slh + sidx, m_i + tl.log2(l_i), mask=gmask)


@triton.jit
def _reduce_kernel(OP, LP, O, LSE, sob, soh, sos, slb, slh, s_ob, s_oh, n_splits, out_scale,
                   S_PAD: tl.constexpr, D: tl.constexpr, CH: tl.constexpr, D_PAD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    smask = offs_s < n_splits
    lse = tl.load(LP + b * slb + h * slh + offs_s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    tot = tl.sum(tl.where(smask, tl.exp2(lse - m), 0.0), 0)
    acc = tl.zeros([D_PAD], tl.float32)
    offs_c = tl.arange(0, CH)
    for s0 in range(0, n_splits, CH):
        cs = s0 + offs_c
        cm = cs < n_splits
        l = tl.load(LP + b * slb + h * slh + cs, mask=cm, other=float("-inf"))
        w = tl.where(cm, tl.exp2(l - m), 0.0)
        part = tl.load(OP + b * sob + h * soh + cs[:, None] * sos + offs_d[None, :], mask=cm[:, None] & dmask[None, :],
                       other=0.0)
        acc += tl.sum(part * w[:, None], 0)
    o = acc / tot * out_scale
    tl.store(O + b * s_ob + h * s_oh + offs_d, o.to(O.dtype.element_ty), mask=dmask)
    tl.store(LSE + b * tl.num_programs(1) + h, m + tl.log2(tot))


def pick_splits(batch_heads: int, seq_len: int, block_n: int, min_tokens: int = 256, waves: float = 2.0):
    """Split the context so about ``waves`` programs per SM run (flash-decoding); each split is a
    whole number of ``block_n`` tokens and at least ``min_tokens`` long."""
    target = max(1, int(waves * num_sms() // max(batch_heads, 1)))
    max_splits = max(1, triton.cdiv(seq_len, max(block_n, min_tokens)))
    splits = max(1, min(target, max_splits))
    tps = triton.cdiv(triton.cdiv(seq_len, splits), block_n) * block_n
    splits = triton.cdiv(seq_len, tps)
    return splits, tps


DEFAULT_CFG = dict(BLOCK_N=64, num_warps=4, num_stages=3)


def _g_pad(group):
    return max(16, triton.next_power_of_2(group))


POISON = False  # set by correctness checks: partial buffers start as NaN


def alloc_partials(B, Hq, splits, D, device):
    op = torch.empty(B, Hq, splits, D, device=device, dtype=torch.float32)
    lp = torch.empty(B, Hq, splits, device=device, dtype=torch.float32)
    if POISON:
        op.fill_(float("nan"))
        lp.fill_(float("nan"))
    return op, lp


def attend_residual(q, kr, vr, op, lp, n_res, slot, sm_scale, group):
    """The full-precision residual window of a quantized cache ([B, Hkv, n_res, D] fp16, the newest
    tokens) attended by the dense kernel into split slot ``slot`` of the partials, so one reduce
    merges it with the quantized splits (quant_decode.py, plane_decode.py)."""
    B, Hkv, D = kr.shape[0], kr.shape[1], kr.shape[-1]
    _decode_kernel[(B, Hkv, 1)](
        q, kr, vr, q, q, q, op, lp,
        q.stride(0), q.stride(1), kr.stride(0), kr.stride(1), kr.stride(2), vr.stride(0), vr.stride(1), vr.stride(2),
        0, 0, 0, 0, 0,
        op.stride(0), op.stride(1), op.stride(2), lp.stride(0), lp.stride(1),
        n_res, n_res + 64, sm_scale * LOG2E, slot,
        GROUP=group, G_PAD=_g_pad(group), D=D, DV=D, BLOCK_N=64, HAS_IDX=False, FP8=False, HAS_BIAS=False,
        PAGE=0, D_PAD=D, DV_PAD=D, num_warps=4, num_stages=2)


def reduce_partials(op, lp, n_splits, out_dtype, out_scale=1.0, out=None):
    B, Hq, S, D = op.shape
    o = out if out is not None else torch.empty(B, Hq, D, device=op.device, dtype=out_dtype)
    lse = torch.empty(B, Hq, device=op.device, dtype=torch.float32)
    _reduce_kernel[(B, Hq)](op, lp, o, lse, op.stride(0), op.stride(1), op.stride(2), lp.stride(0), lp.stride(1),
                            o.stride(0), o.stride(1), n_splits, out_scale,
                            S_PAD=max(2, triton.next_power_of_2(n_splits)), D=D, CH=8 if D >= 512 else 16,
                            D_PAD=triton.next_power_of_2(D), num_warps=4)
    return o, lse


def decode_attention(q, k, v, sm_scale=None, k_scale=1.0, v_scale=1.0, idx=None, cfg=None, splits=None,
                     return_lse=False, out_dtype=torch.bfloat16, out=None, bias=None, block_table=None, page=16,
                     seq_len=None):
    """q [B,Hq,D]; k,v [B,Hkv,S,D] (last dim contiguous; bf16/fp16/fp8; v may have its own head dim);
    idx [B,Hkv,n] int32 (attend only those rows); bias [B,Hkv,S] fp32 added to the log2 scores;
    block_table [B, pages] int32 with k,v [num_pages*page, Hkv, D] (paged, seq_len tokens each)."""
    cfg = cfg or DEFAULT_CFG
    B, Hq, D = q.shape
    DV = v.shape[-1]
    paged = block_table is not None
    Hkv = k.shape[1]
    S = idx.shape[-1] if idx is not None else (seq_len if paged else k.shape[2])
    group = Hq // Hkv
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    bn = cfg["BLOCK_N"]
    if splits is None:  # cfg "waves": programs per SM the split count aims at (tune_quant.py sweeps it)
        n_splits, tps = pick_splits(B * Hkv, S, bn, waves=cfg.get("waves", 2.0))
    else:
        tps = triton.cdiv(triton.cdiv(S, splits), bn) * bn
        n_splits = triton.cdiv(S, tps)
    op, lp = alloc_partials(B, Hq, n_splits, DV, q.device)
    fp8 = k.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    # paged: [slots, Hkv, D] has no batch stride; token stride is stride(0), head stride stride(1)
    skb, skh, skt = (0, k.stride(1), k.stride(0)) if paged else (k.stride(0), k.stride(1), k.stride(2))
    svb, svh, svt = (0, v.stride(1), v.stride(0)) if paged else (v.stride(0), v.stride(1), v.stride(2))
    ib = idx if idx is not None else q
    bb = bias if bias is not None else q
    tb = block_table if paged else q
    _decode_kernel[(B, Hkv, n_splits)](
        q, k, v, ib, bb, tb, op, lp,
        q.stride(0), q.stride(1), skb, skh, skt, svb, svh, svt,
        ib.stride(0) if idx is not None else 0, ib.stride(1) if idx is not None else 0,
        bb.stride(0) if bias is not None else 0, bb.stride(1) if bias is not None else 0,
        tb.stride(0) if paged else 0,
        op.stride(0), op.stride(1), op.stride(2), lp.stride(0), lp.stride(1),
        S, tps, sm_scale * LOG2E * k_scale, 0,
        GROUP=group, G_PAD=_g_pad(group), D=D, DV=DV, BLOCK_N=bn, HAS_IDX=idx is not None, FP8=fp8,
        HAS_BIAS=bias is not None, PAGE=page if paged else 0, D_PAD=triton.next_power_of_2(D),
        DV_PAD=triton.next_power_of_2(DV), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    o, lse = reduce_partials(op, lp, n_splits, out_dtype, v_scale, out=out)
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------- MLA
@triton.jit
def _mla_kernel(QL, QR, C, KR, OP, LP,
                sqb, sqh, sqrb, sqrh, scb, sct, skrb, skrt,
                sob, soh, sos, slb, slh,
                seq_len, tps, qk_scale, H,
                BLOCK_H: tl.constexpr, DL: tl.constexpr, DR: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    sp = tl.program_id(2)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    offs_l = tl.arange(0, DL)
    offs_r = tl.arange(0, DR)
    offs_n = tl.arange(0, BLOCK_N)
    ql = tl.load(QL + b * sqb + offs_h[:, None] * sqh + offs_l[None, :], mask=hmask[:, None], other=0.0)
    qr = tl.load(QR + b * sqrb + offs_h[:, None] * sqrh + offs_r[None, :], mask=hmask[:, None], other=0.0)
    start = sp * tps
    end = tl.minimum(start + tps, seq_len)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, DL], tl.float32)
    for s in range(start, end, BLOCK_N):
        tok = s + offs_n
        nmask = tok < end
        c = tl.load(C + b * scb + tok[:, None] * sct + offs_l[None, :], mask=nmask[:, None], other=0.0)
        kr = tl.load(KR + b * skrb + tok[:, None] * skrt + offs_r[None, :], mask=nmask[:, None], other=0.0)
        qk = (tl.dot(ql, tl.trans(c)) + tl.dot(qr, tl.trans(kr))) * qk_scale
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(OP + b * sob + offs_h[:, None] * soh + sp * sos + offs_l[None, :], acc, mask=hmask[:, None])
    tl.store(LP + b * slb + offs_h * slh + sp, m_i + tl.log2(l_i), mask=hmask)


MLA_DEFAULT = dict(BLOCK_H=16, BLOCK_N=32, num_warps=4, num_stages=2)


def mla_attention(q_lat, q_rope, c_lat, k_rope, sm_scale, cfg=None, out=None):
    """q_lat [B,H,512], q_rope [B,H,64], c_lat [B,S,512], k_rope [B,S,64] -> out latent [B,H,512]."""
    cfg = cfg or MLA_DEFAULT
    B, H, DL = q_lat.shape
    DR = q_rope.shape[-1]
    S = c_lat.shape[1]
    bh = cfg["BLOCK_H"]
    nhb = triton.cdiv(H, bh)
    n_splits, tps = pick_splits(B * nhb, S, cfg["BLOCK_N"])
    op, lp = alloc_partials(B, H, n_splits, DL, q_lat.device)
    _mla_kernel[(B, nhb, n_splits)](
        q_lat, q_rope, c_lat, k_rope, op, lp,
        q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1), c_lat.stride(0), c_lat.stride(1),
        k_rope.stride(0), k_rope.stride(1), op.stride(0), op.stride(1), op.stride(2), lp.stride(0), lp.stride(1),
        S, tps, sm_scale * LOG2E, H,
        BLOCK_H=bh, DL=DL, DR=DR, BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    o, _ = reduce_partials(op, lp, n_splits, q_lat.dtype, out=out)
    return o


# ----------------------------------------------------------------------------- H2O
@triton.jit
def _h2o_kernel(Q, K, LSE, SC, sqb, sqh, skb, skh, skt, ssb, ssh, seq_len, qk_scale,
                GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    blk = tl.program_id(2)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    tok = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = tok < seq_len
    gmask = offs_g < GROUP
    hq = hk * GROUP + offs_g
    q = tl.load(Q + b * sqb + hq[:, None] * sqh + offs_d[None, :], mask=gmask[:, None], other=0.0)
    k = tl.load(K + b * skb + hk * skh + tok[:, None].to(tl.int64) * skt + offs_d[None, :], mask=nmask[:, None], other=0.0)
    qk = tl.dot(q, tl.trans(k)) * qk_scale
    lse = tl.load(LSE + b * tl.num_programs(1) * GROUP + hq, mask=gmask, other=0.0)
    p = tl.exp2(qk - lse[:, None])
    p = tl.where(gmask[:, None] & nmask[None, :], p, 0.0)
    s = tl.sum(p, 0)
    ptr = SC + b * ssb + hk * ssh + tok
    old = tl.load(ptr, mask=nmask, other=0.0)
    tl.store(ptr, old + s, mask=nmask)


def h2o_step(q, k, v, scores, sm_scale=None, cfg=None):
    """One H2O decode step: attention output + scores[b,hkv,t] += sum_g softmax prob."""
    B, Hq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    o, lse = decode_attention(q, k, v, sm_scale=sm_scale, cfg=cfg, return_lse=True)
    bn = 128
    _h2o_kernel[(B, Hkv, triton.cdiv(S, bn))](q, k, lse, scores, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                               k.stride(2), scores.stride(0), scores.stride(1), S, sm_scale * LOG2E,
                                               GROUP=group, G_PAD=_g_pad(group), D=D, BLOCK_N=bn, num_warps=4)
    return o
