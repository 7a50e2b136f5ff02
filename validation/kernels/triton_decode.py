"""Split-K flash-decoding kernels in Triton for one query token per sequence.

decode_attention : bf16/fp16 or fp8(e4m3, per-tensor scale) KV, GQA, optional gathered indices
kivi_attention   : KIVI group-quantised K/V (int8/int4/int2, asymmetric bits) + fp16 residual
mla_attention    : MLA absorbed decode over a latent cache (rank 512 + rope 64)
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
    if _NUM_SMS is None:
        _NUM_SMS = torch.cuda.get_device_properties(0).multi_processor_count
    return _NUM_SMS


@triton.jit
def _decode_kernel(Q, K, V, IDX, OP, LP,
                   sqb, sqh, skb, skh, skt, svb, svh, svt, sib, sih,
                   sob, soh, sos, slb, slh,
                   seq_len, tps, qk_scale, split_base,
                   GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_IDX: tl.constexpr, FP8: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    gmask = offs_g < GROUP
    hq = hk * GROUP + offs_g
    q = tl.load(Q + b * sqb + hq[:, None] * sqh + offs_d[None, :], mask=gmask[:, None], other=0.0)
    if FP8:
        q = q.to(tl.bfloat16)
    start = sp * tps
    end = tl.minimum(start + tps, seq_len)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    kb = K + b * skb + hk * skh
    vb = V + b * svb + hk * svh
    for s in range(start, end, BLOCK_N):
        tok = s + offs_n
        nmask = tok < end
        if HAS_IDX:
            t_idx = tl.load(IDX + b * sib + hk * sih + tok, mask=nmask, other=0).to(tl.int64)
        else:
            t_idx = tok.to(tl.int64)
        k = tl.load(kb + t_idx[:, None] * skt + offs_d[None, :], mask=nmask[:, None], other=0.0)
        if FP8:
            k = k.to(tl.bfloat16)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vb + t_idx[:, None] * svt + offs_d[None, :], mask=nmask[:, None], other=0.0)
        if FP8:
            v = v.to(tl.bfloat16)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    sidx = split_base + sp
    tl.store(OP + b * sob + hq[:, None] * soh + sidx * sos + offs_d[None, :], acc, mask=gmask[:, None])
    tl.store(LP + b * slb + hq * slh + sidx, m_i + tl.log2(l_i), mask=gmask)


@triton.jit
def _reduce_kernel(OP, LP, O, LSE, sob, soh, sos, slb, slh, s_ob, s_oh, n_splits, out_scale,
                   S_PAD: tl.constexpr, D: tl.constexpr, CH: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D)
    smask = offs_s < n_splits
    lse = tl.load(LP + b * slb + h * slh + offs_s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    tot = tl.sum(tl.where(smask, tl.exp2(lse - m), 0.0), 0)
    acc = tl.zeros([D], tl.float32)
    offs_c = tl.arange(0, CH)
    for s0 in range(0, n_splits, CH):
        cs = s0 + offs_c
        cm = cs < n_splits
        l = tl.load(LP + b * slb + h * slh + cs, mask=cm, other=float("-inf"))
        w = tl.where(cm, tl.exp2(l - m), 0.0)
        part = tl.load(OP + b * sob + h * soh + cs[:, None] * sos + offs_d[None, :], mask=cm[:, None], other=0.0)
        acc += tl.sum(part * w[:, None], 0)
    o = acc / tot * out_scale
    tl.store(O + b * s_ob + h * s_oh + offs_d, o.to(O.dtype.element_ty))
    tl.store(LSE + b * tl.num_programs(1) + h, m + tl.log2(tot))


def pick_splits(batch_heads: int, seq_len: int, block_n: int, min_tokens: int = 256, waves: float = 2.0):
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


def reduce_partials(op, lp, n_splits, out_dtype, out_scale=1.0, out=None):
    B, Hq, S, D = op.shape
    o = out if out is not None else torch.empty(B, Hq, D, device=op.device, dtype=out_dtype)
    lse = torch.empty(B, Hq, device=op.device, dtype=torch.float32)
    _reduce_kernel[(B, Hq)](op, lp, o, lse, op.stride(0), op.stride(1), op.stride(2), lp.stride(0), lp.stride(1),
                            o.stride(0), o.stride(1), n_splits, out_scale,
                            S_PAD=max(2, triton.next_power_of_2(n_splits)), D=D, CH=8 if D >= 512 else 16, num_warps=4)
    return o, lse


def decode_attention(q, k, v, sm_scale=None, k_scale=1.0, v_scale=1.0, idx=None, cfg=None, splits=None,
                     return_lse=False, out_dtype=torch.bfloat16, out=None):
    """q [B,Hq,D]; k,v [B,Hkv,S,D] (last dim contiguous; bf16/fp16/fp8); idx [B,Hkv,n] int32 or None."""
    cfg = cfg or DEFAULT_CFG
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    S = idx.shape[-1] if idx is not None else k.shape[2]
    group = Hq // Hkv
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    bn = cfg["BLOCK_N"]
    if splits is None:
        n_splits, tps = pick_splits(B * Hkv, S, bn)
    else:
        tps = triton.cdiv(triton.cdiv(S, splits), bn) * bn
        n_splits = triton.cdiv(S, tps)
    op, lp = alloc_partials(B, Hq, n_splits, D, q.device)
    fp8 = k.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    ib = idx if idx is not None else q
    _decode_kernel[(B, Hkv, n_splits)](
        q, k, v, ib, op, lp,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        ib.stride(0) if idx is not None else 0, ib.stride(1) if idx is not None else 0,
        op.stride(0), op.stride(1), op.stride(2), lp.stride(0), lp.stride(1),
        S, tps, sm_scale * LOG2E * k_scale, 0,
        GROUP=group, G_PAD=_g_pad(group), D=D, BLOCK_N=bn, HAS_IDX=idx is not None, FP8=fp8,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    o, lse = reduce_partials(op, lp, n_splits, out_dtype, v_scale, out=out)
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------- KIVI
@triton.jit
def _piece(p, J: tl.constexpr, BITS: tl.constexpr):
    """Bit-field J of packed bytes -> float32 codes (blocked layout: channels [J*W, (J+1)*W))."""
    return ((p >> (J * BITS)) & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _k_piece(qj, kp, ksb, kzb, g, J: tl.constexpr, KBITS: tl.constexpr, KW: tl.constexpr, D: tl.constexpr):
    """Scores of one key bit-field J for one 32-token group: the per-channel scale is folded into
    the query (q*s) and the zero point becomes a per-row bias (q.z), so codes go straight to the MMA."""
    offs = J * KW + tl.arange(0, KW)
    ks = tl.load(ksb + g * D + offs).to(tl.float32)
    kz = tl.load(kzb + g * D + offs).to(tl.float32)
    kq = ((kp >> (J * KBITS)) & ((1 << KBITS) - 1)).to(tl.float16)
    s = tl.dot((qj * ks[None, :]).to(tl.float16), tl.trans(kq))
    return s, tl.sum(qj * kz[None, :], 1)


@triton.jit
def _v_group(p, alpha, acc, vpb, vsb, vzb, tok, CG: tl.constexpr, VBITS: tl.constexpr, VW: tl.constexpr,
             D: tl.constexpr, GS: tl.constexpr):
    """acc <- acc*alpha + P @ dequant(V[:, CG*32:(CG+1)*32]); per-token scale folded into P."""
    J: tl.constexpr = CG // (VW // GS)
    col0: tl.constexpr = (CG % (VW // GS)) * GS
    offs_c = tl.arange(0, GS)
    vp = tl.load(vpb + tok[:, None] * VW + col0 + offs_c[None, :])
    vs = tl.load(vsb + tok * (D // GS) + CG).to(tl.float32)
    vz = tl.load(vzb + tok * (D // GS) + CG).to(tl.float32)
    vq = ((vp >> (J * VBITS)) & ((1 << VBITS) - 1)).to(tl.float16)
    pv = tl.dot((p * vs[None, :]).to(tl.float16), vq)
    return acc * alpha[:, None] + pv + tl.sum(p * vz[None, :], 1)[:, None]


@triton.jit
def _kivi_kernel(Q, KP, KS, KZ, VP, VS, VZ, OP, LP,
                 sqb, sqh, skpb, skph, sksb, sksh, svpb, svph, svsb, svsh,
                 sob, soh, sos, slb, slh,
                 seq_q, tps, qk_scale,
                 GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                 KBITS: tl.constexpr, VBITS: tl.constexpr, GS: tl.constexpr):
    # one iteration = one 32-token key group (BLOCK_N == GS == 32); D == 128 (4 value channel groups)
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    sp = tl.program_id(2)
    KPER: tl.constexpr = 8 // KBITS
    VPER: tl.constexpr = 8 // VBITS
    KW: tl.constexpr = D // KPER
    VW: tl.constexpr = D // VPER
    offs_g = tl.arange(0, G_PAD)
    offs_kw = tl.arange(0, KW)
    offs_n = tl.arange(0, GS)
    gmask = offs_g < GROUP
    hq = hk * GROUP + offs_g
    qb = Q + b * sqb + hq[:, None] * sqh
    q0 = tl.load(qb + offs_kw[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
    q1 = q0
    q2 = q0
    q3 = q0
    if KPER >= 2:
        q1 = tl.load(qb + KW + offs_kw[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
    if KPER >= 4:
        q2 = tl.load(qb + 2 * KW + offs_kw[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
        q3 = tl.load(qb + 3 * KW + offs_kw[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
    start = sp * tps
    end = tl.minimum(start + tps, seq_q)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc0 = tl.zeros([G_PAD, GS], tl.float32)
    acc1 = tl.zeros([G_PAD, GS], tl.float32)
    acc2 = tl.zeros([G_PAD, GS], tl.float32)
    acc3 = tl.zeros([G_PAD, GS], tl.float32)
    kpb = KP + b * skpb + hk * skph
    ksb = KS + b * sksb + hk * sksh
    kzb = KZ + b * sksb + hk * sksh
    vpb = VP + b * svpb + hk * svph
    vsb = VS + b * svsb + hk * svsh
    vzb = VZ + b * svsb + hk * svsh
    for s in range(start, end, GS):
        tok = s + offs_n
        g = s // GS
        kp = tl.load(kpb + tok[:, None] * KW + offs_kw[None, :])
        qk, qz = _k_piece(q0, kp, ksb, kzb, g, 0, KBITS, KW, D)
        if KPER >= 2:
            s1, z1 = _k_piece(q1, kp, ksb, kzb, g, 1, KBITS, KW, D)
            qk += s1
            qz += z1
        if KPER >= 4:
            s2, z2 = _k_piece(q2, kp, ksb, kzb, g, 2, KBITS, KW, D)
            s3, z3 = _k_piece(q3, kp, ksb, kzb, g, 3, KBITS, KW, D)
            qk += s2 + s3
            qz += z2 + z3
        qk = (qk + qz[:, None]) * qk_scale
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc0 = _v_group(p, alpha, acc0, vpb, vsb, vzb, tok, 0, VBITS, VW, D, GS)
        acc1 = _v_group(p, alpha, acc1, vpb, vsb, vzb, tok, 1, VBITS, VW, D, GS)
        acc2 = _v_group(p, alpha, acc2, vpb, vsb, vzb, tok, 2, VBITS, VW, D, GS)
        acc3 = _v_group(p, alpha, acc3, vpb, vsb, vzb, tok, 3, VBITS, VW, D, GS)
        m_i = m_new
    ob = OP + b * sob + hq[:, None] * soh + sp * sos
    om = gmask[:, None]
    offs_c = tl.arange(0, GS)
    tl.store(ob + offs_c[None, :], acc0 / l_i[:, None], mask=om)
    tl.store(ob + (GS + offs_c)[None, :], acc1 / l_i[:, None], mask=om)
    tl.store(ob + (2 * GS + offs_c)[None, :], acc2 / l_i[:, None], mask=om)
    tl.store(ob + (3 * GS + offs_c)[None, :], acc3 / l_i[:, None], mask=om)
    tl.store(LP + b * slb + hq * slh + sp, m_i + tl.log2(l_i), mask=gmask)


KIVI_CONFIGS = [dict(BLOCK_N=32, num_warps=4, num_stages=2), dict(BLOCK_N=32, num_warps=4, num_stages=3),
                dict(BLOCK_N=32, num_warps=4, num_stages=4), dict(BLOCK_N=32, num_warps=2, num_stages=3),
                dict(BLOCK_N=32, num_warps=8, num_stages=3)]


def torch_pack(codes, bits):
    """Same (blocked) packing as kivi_ref.pack_bits, on the GPU (codes uint8 [..., D])."""
    per = 8 // bits
    w = codes.shape[-1] // per
    c = codes.reshape(*codes.shape[:-1], per, w).to(torch.int32)
    out = torch.zeros(c.shape[:-2] + (w,), dtype=torch.int32, device=codes.device)
    for j in range(per):
        out |= c[..., j, :] << (j * bits)
    return out.to(torch.uint8)


def torch_unpack(p, bits):
    per = 8 // bits
    pi = p.to(torch.int32)
    parts = [(pi >> (j * bits)) & ((1 << bits) - 1) for j in range(per)]
    return torch.cat(parts, -1).to(torch.uint8)


def quantize_groups(x, bits, group, dim):
    """Torch twin of kivi_ref.quantize_groups (min/max asymmetric, fp16 scale/zero)."""
    dim = dim % x.ndim
    n = x.shape[dim]
    shp = x.shape[:dim] + (n // group, group) + x.shape[dim + 1:]
    xg = x.float().reshape(shp)
    mn = xg.amin(dim + 1, keepdim=True)
    mx = xg.amax(dim + 1, keepdim=True)
    qmax = (1 << bits) - 1
    scale = ((mx - mn) / qmax).half()
    zero = mn.half()
    codes = torch.clamp(torch.round((xg - zero.float()) / scale.float().clamp_min(1e-8)), 0, qmax).to(torch.uint8)
    return codes.reshape(x.shape), scale.squeeze(dim + 1), zero.squeeze(dim + 1)


def dequantize_groups(codes, scale, zero, group, dim):
    dim = dim % codes.ndim
    s = scale.float().repeat_interleave(group, dim=dim)
    z = zero.float().repeat_interleave(group, dim=dim)
    return codes.float() * s + z


class KiviCache:
    """Build a KIVI cache from fp16 K/V [B,H,S,D]."""

    def __init__(self, k, v, kbits, vbits, group=32, residual=128):
        from validation.kivi_ref import split_residual

        B, H, S, D = k.shape
        self.kbits, self.vbits, self.group = kbits, vbits, group
        sq, nr = split_residual(S, group, residual)
        self.seq_q, self.n_res = sq, nr
        kc, self.k_scale, self.k_zero = quantize_groups(k[:, :, :sq], kbits, group, 2)  # per channel, token groups
        vc, self.v_scale, self.v_zero = quantize_groups(v[:, :, :sq], vbits, group, 3)  # per token, channel groups
        self.k_packed = torch_pack(kc, kbits).contiguous()
        self.v_packed = torch_pack(vc, vbits).contiguous()
        self.k_scale, self.k_zero = self.k_scale.contiguous(), self.k_zero.contiguous()
        self.v_scale, self.v_zero = self.v_scale.contiguous(), self.v_zero.contiguous()
        self.k_res = k[:, :, sq:].contiguous().half()
        self.v_res = v[:, :, sq:].contiguous().half()

    def dequant(self):
        kd = dequantize_groups(torch_unpack(self.k_packed, self.kbits), self.k_scale, self.k_zero, self.group, 2)
        vd = dequantize_groups(torch_unpack(self.v_packed, self.vbits), self.v_scale, self.v_zero, self.group, 3)
        return torch.cat([kd, self.k_res.float()], 2), torch.cat([vd, self.v_res.float()], 2)


def kivi_attention(q, cache: KiviCache, sm_scale=None, cfg=None, out=None):
    cfg = cfg or DEFAULT_CFG
    B, Hq, D = q.shape
    Hkv = cache.k_packed.shape[1]
    group = Hq // Hkv
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    assert D == 128 and cache.group == 32, "KIVI kernel is written for head_dim 128, group 32"
    bn = 32
    sq = cache.seq_q
    if sq > 0:
        nq, tps = pick_splits(B * Hkv, sq, bn)
    else:
        nq, tps = 0, bn
    n_tot = nq + (1 if cache.n_res > 0 else 0)
    op, lp = alloc_partials(B, Hq, n_tot, D, q.device)
    if nq:
        c = cache
        _kivi_kernel[(B, Hkv, nq)](
            q, c.k_packed, c.k_scale, c.k_zero, c.v_packed, c.v_scale, c.v_zero, op, lp,
            q.stride(0), q.stride(1), c.k_packed.stride(0), c.k_packed.stride(1), c.k_scale.stride(0),
            c.k_scale.stride(1), c.v_packed.stride(0), c.v_packed.stride(1), c.v_scale.stride(0), c.v_scale.stride(1),
            op.stride(0), op.stride(1), op.stride(2), lp.stride(0), lp.stride(1),
            sq, tps, sm_scale * LOG2E,
            GROUP=group, G_PAD=_g_pad(group), D=D, BLOCK_N=32, KBITS=cache.kbits, VBITS=cache.vbits,
            GS=cache.group, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cache.n_res:
        kr, vr = cache.k_res, cache.v_res
        _decode_kernel[(B, Hkv, 1)](
            q, kr, vr, q, op, lp,
            q.stride(0), q.stride(1), kr.stride(0), kr.stride(1), kr.stride(2), vr.stride(0), vr.stride(1), vr.stride(2),
            0, 0, op.stride(0), op.stride(1), op.stride(2), lp.stride(0), lp.stride(1),
            cache.n_res, cache.n_res + 64, sm_scale * LOG2E, nq,
            GROUP=group, G_PAD=_g_pad(group), D=D, BLOCK_N=64, HAS_IDX=False, FP8=False,
            num_warps=4, num_stages=2)
    o, _ = reduce_partials(op, lp, n_tot, torch.float16, out=out)
    return o


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
