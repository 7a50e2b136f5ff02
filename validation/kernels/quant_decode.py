"""Fused dequantize-and-attend decode for group-quantized KV, one query token per sequence.

One kernel serves KIVI (keys per channel in 32-token groups, values per token; arXiv 2402.02750),
asymmetric key/value bits (arXiv 2502.15075), per-token INT8/INT4/INT2 (LMDeploy/TensorRT-LLM
style), SKVQ (clipped, channel-reordered groups + full-precision window; arXiv 2405.06219) and
PackKV's in-kernel bit unpacking (arXiv 2512.24449). Layout per (batch, kv head):

  codes  int16 words [S_q, D*bits/16], "blocked": bit field j (bits [j*b, (j+1)*b)) of word c holds
         channel j*W + c (W = words per token), so field j of a tile is a contiguous channel slice
  keys   per channel: scale/zero fp16 [S_q/32, D]     per token: scale/zero fp16 [S_q, D/GK]
  values per token:   scale/zero fp16 [S_q, D/GV]
  fp16 residual / window [n_res, D] (the newest tokens) attended by the dense kernel into the last
  split slot, then one reduce over splits.

Why it is fast (the old KIVI kernel read 8-12% of the copy ceiling): a program owns (batch, kv
head, split) and the whole query group, reads BN tokens per iteration as 16-byte loads of packed
words, never converts integers with I2F: OR-ing a code into the mantissa of fp16 1024.0 (0x6400)
gives 1024 + code exactly, two codes per 32-bit LOP3 (the FasterTransformer/Marlin trick). The
fp16 codes go straight into the tensor-core dot; scales are folded into the query (keys, per
channel) or the probabilities (values, per token), and the 1024 offset and zero points become
per-row corrections computed from the same fp16-rounded operands, so they cancel exactly.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from validation.kernels.triton_decode import LOG2E, _decode_kernel, _g_pad, alloc_partials, pick_splits, reduce_partials
from validation.kivi_ref import unpack_ptx

TG = 32  # tokens per slab: the KIVI key group, and the leading dim of every 3-D tile

# tl.constexpr: a @triton.jit function may read a module global only when it is a constexpr
ASM2, ASM4, ASM8 = (tl.constexpr(unpack_ptx(b)) for b in (2, 4, 8))
USE_ASM = os.environ.get("TRITON_INTERPRET", "0") != "1"  # the interpreter cannot run PTX


@triton.jit
def _field(xi, J: tl.constexpr, BITS: tl.constexpr):
    """Pure-Triton twin of the asm: fp16 (1024 + code_J * 2**(BITS * (J % (8 // BITS))))."""
    F: tl.constexpr = 8 // BITS
    SH: tl.constexpr = 8 * (J // F)
    MASK: tl.constexpr = ((1 << BITS) - 1) << (BITS * (J % F))
    return (((xi >> SH) & MASK) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _unpack(x, BITS: tl.constexpr, ASM: tl.constexpr):
    """int16 words -> 8 fp16 field tensors (only the first 16 // BITS are meaningful)."""
    if ASM:
        if BITS == 2:
            f0, f1, f2, f3, f4, f5, f6, f7 = tl.inline_asm_elementwise(
                ASM2, "=r,=r,=r,=r,=r,=r,=r,=r,r", [x], dtype=(tl.float16,) * 8, is_pure=True, pack=2)
        elif BITS == 4:
            f0, f1, f2, f3 = tl.inline_asm_elementwise(ASM4, "=r,=r,=r,=r,r", [x], dtype=(tl.float16,) * 4,
                                                       is_pure=True, pack=2)
            f4, f5, f6, f7 = f0, f0, f0, f0
        else:
            f0, f1 = tl.inline_asm_elementwise(ASM8, "=r,=r,r", [x], dtype=(tl.float16,) * 2, is_pure=True, pack=2)
            f2, f3, f4, f5, f6, f7 = f0, f0, f0, f0, f0, f0
    else:
        xi = x.to(tl.int32) & 0xFFFF
        f0 = _field(xi, 0, BITS)
        f1 = _field(xi, 1, BITS)
        f2, f3, f4, f5, f6, f7 = f0, f0, f0, f0, f0, f0
        if BITS <= 4:
            f2 = _field(xi, 2, BITS)
            f3 = _field(xi, 3, BITS)
        if BITS == 2:
            f4 = _field(xi, 4, BITS)
            f5 = _field(xi, 5, BITS)
            f6 = _field(xi, 6, BITS)
            f7 = _field(xi, 7, BITS)
    return f0, f1, f2, f3, f4, f5, f6, f7


@triton.jit
def _k_field(sc, zb, qj, mj, ksb, kzb, tok, tmask, grp, gm,
             J: tl.constexpr, NF: tl.constexpr, W: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
             PER_TOKEN: tl.constexpr, GK: tl.constexpr, NG: tl.constexpr, G_PAD: tl.constexpr):
    """Add key field J's scores to sc [NG, G_PAD, TG] (zb: per-row corrections, [NG, G_PAD, TG])."""
    if J < NF:
        INV: tl.constexpr = 1.0 / (1 << (BITS * (J % (8 // BITS))))
        mt = tl.permute(mj, (0, 2, 1))  # [NG, W, TG]
        if PER_TOKEN:  # scale per (token, channel group): applied to the dot's columns
            CG: tl.constexpr = (J * W) // GK
            ks = tl.load(ksb + tok * (D // GK) + CG, mask=tmask, other=0.0).to(tl.float32)  # [NG, TG]
            kz = tl.load(kzb + tok * (D // GK) + CG, mask=tmask, other=0.0).to(tl.float32)
            q16 = qj.to(tl.float16)
            d = tl.dot(tl.broadcast_to(q16[None, :, :], (NG, G_PAD, W)), mt)
            qoff = 1024.0 * tl.sum(q16.to(tl.float32), 1)  # [G_PAD]
            qsum = tl.sum(qj, 1)
            sc += (d - qoff[None, :, None]) * (ks * INV)[:, None, :] + qsum[None, :, None] * kz[:, None, :]
        else:  # scale per (32-token group, channel): folded into the query
            offs = J * W + tl.arange(0, W)
            ks = tl.load(ksb + grp[:, None] * D + offs[None, :], mask=gm[:, None], other=0.0).to(tl.float32)
            kz = tl.load(kzb + grp[:, None] * D + offs[None, :], mask=gm[:, None], other=0.0).to(tl.float32)
            qs = (qj[None, :, :] * (ks * INV)[:, None, :]).to(tl.float16)  # [NG, G_PAD, W]
            sc = tl.dot(qs, mt, sc)
            corr = tl.sum(qj[None, :, :] * kz[:, None, :], 2) - 1024.0 * tl.sum(qs.to(tl.float32), 2)
            zb += corr[:, :, None]
    return sc, zb


@triton.jit
def _v_field(acc, alpha, p, mj, vsb, vzb, tok, tmask,
             J: tl.constexpr, NF: tl.constexpr, W: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
             GV: tl.constexpr):
    """acc [NG, G_PAD, W] <- acc * alpha + P @ dequant(V field J); per-token scale folded into P."""
    if J < NF:
        INV: tl.constexpr = 1.0 / (1 << (BITS * (J % (8 // BITS))))
        CG: tl.constexpr = (J * W) // GV
        vs = tl.load(vsb + tok * (D // GV) + CG, mask=tmask, other=0.0).to(tl.float32)  # [NG, TG]
        vz = tl.load(vzb + tok * (D // GV) + CG, mask=tmask, other=0.0).to(tl.float32)
        ps = (p * vs[:, None, :]).to(tl.float16)  # [NG, G_PAD, TG]
        d = tl.dot(ps, mj)  # [NG, G_PAD, W]
        corr = -1024.0 * tl.sum(ps.to(tl.float32), 2)
        zt = tl.sum(p * vz[:, None, :], 2)
        acc = acc * alpha[None, :, None] + (d + corr[:, :, None]) * INV + zt[:, :, None]
    return acc


@triton.jit
def _q_field(qb, gmask, J: tl.constexpr, NF: tl.constexpr, W: tl.constexpr):
    offs = (J % NF) * W + tl.arange(0, W)
    return tl.load(qb + offs[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)


@triton.jit
def _store_field(acc, l_i, ob, gmask, J: tl.constexpr, NF: tl.constexpr, W: tl.constexpr):
    if J < NF:
        o = tl.sum(acc, 0) / l_i[:, None]
        tl.store(ob + (J * W + tl.arange(0, W))[None, :], o, mask=gmask[:, None])


@triton.jit
def _qdecode_kernel(Q, KW, KS, KZ, VW, VS, VZ, OP, LP,
                    sqb, sqh, skwb, skwh, sksb, sksh, svwb, svwh, svsb, svsh,
                    sob, soh, sos, slb, slh,
                    seq_q, tps, qk_scale,
                    GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                    KBITS: tl.constexpr, VBITS: tl.constexpr, K_PER_TOKEN: tl.constexpr,
                    GK: tl.constexpr, GV: tl.constexpr, ASM: tl.constexpr):
    NG: tl.constexpr = BN // 32
    NFK: tl.constexpr = 16 // KBITS
    NFV: tl.constexpr = 16 // VBITS
    WK: tl.constexpr = D // NFK
    WV: tl.constexpr = D // NFV
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    offs_g = tl.arange(0, G_PAD)
    gmask = offs_g < GROUP
    hq = hk * GROUP + offs_g
    qb = Q + b * sqb + hq[:, None] * sqh
    q0 = _q_field(qb, gmask, 0, NFK, WK)
    q1 = _q_field(qb, gmask, 1, NFK, WK)
    q2 = _q_field(qb, gmask, 2, NFK, WK)
    q3 = _q_field(qb, gmask, 3, NFK, WK)
    q4 = _q_field(qb, gmask, 4, NFK, WK)
    q5 = _q_field(qb, gmask, 5, NFK, WK)
    q6 = _q_field(qb, gmask, 6, NFK, WK)
    q7 = _q_field(qb, gmask, 7, NFK, WK)
    kwb = KW + b * skwb + hk * skwh
    ksb = KS + b * sksb + hk * sksh
    kzb = KZ + b * sksb + hk * sksh
    vwb = VW + b * svwb + hk * svwh
    vsb = VS + b * svsb + hk * svsh
    vzb = VZ + b * svsb + hk * svsh
    offs_ng = tl.arange(0, NG)
    offs_t = tl.arange(0, 32)
    offs_wk = tl.arange(0, WK)
    offs_wv = tl.arange(0, WV)
    start = sp * tps
    end = tl.minimum(start + tps, seq_q)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    a0 = tl.zeros([NG, G_PAD, WV], tl.float32)
    a1 = a0
    a2 = a0
    a3 = a0
    a4 = a0
    a5 = a0
    a6 = a0
    a7 = a0
    for s in range(start, end, BN):
        tok = s + offs_ng[:, None] * 32 + offs_t[None, :]  # [NG, 32]
        tmask = tok < end
        grp = s // 32 + offs_ng
        gm = grp * 32 < end
        kw = tl.load(kwb + tok[:, :, None] * WK + offs_wk[None, None, :], mask=tmask[:, :, None], other=0)
        vw = tl.load(vwb + tok[:, :, None] * WV + offs_wv[None, None, :], mask=tmask[:, :, None], other=0)
        m0, m1, m2, m3, m4, m5, m6, m7 = _unpack(kw, KBITS, ASM)
        sc = tl.zeros([NG, G_PAD, 32], tl.float32)
        zb = tl.zeros([NG, G_PAD, 32], tl.float32)
        sc, zb = _k_field(sc, zb, q0, m0, ksb, kzb, tok, tmask, grp, gm, 0, NFK, WK, D, KBITS, K_PER_TOKEN, GK, NG, G_PAD)
        sc, zb = _k_field(sc, zb, q1, m1, ksb, kzb, tok, tmask, grp, gm, 1, NFK, WK, D, KBITS, K_PER_TOKEN, GK, NG, G_PAD)
        sc, zb = _k_field(sc, zb, q2, m2, ksb, kzb, tok, tmask, grp, gm, 2, NFK, WK, D, KBITS, K_PER_TOKEN, GK, NG, G_PAD)
        sc, zb = _k_field(sc, zb, q3, m3, ksb, kzb, tok, tmask, grp, gm, 3, NFK, WK, D, KBITS, K_PER_TOKEN, GK, NG, G_PAD)
        sc, zb = _k_field(sc, zb, q4, m4, ksb, kzb, tok, tmask, grp, gm, 4, NFK, WK, D, KBITS, K_PER_TOKEN, GK, NG, G_PAD)
        sc, zb = _k_field(sc, zb, q5, m5, ksb, kzb, tok, tmask, grp, gm, 5, NFK, WK, D, KBITS, K_PER_TOKEN, GK, NG, G_PAD)
        sc, zb = _k_field(sc, zb, q6, m6, ksb, kzb, tok, tmask, grp, gm, 6, NFK, WK, D, KBITS, K_PER_TOKEN, GK, NG, G_PAD)
        sc, zb = _k_field(sc, zb, q7, m7, ksb, kzb, tok, tmask, grp, gm, 7, NFK, WK, D, KBITS, K_PER_TOKEN, GK, NG, G_PAD)
        sc = tl.where(tmask[:, None, :], (sc + zb) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(tl.max(sc, 2), 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[None, :, None])
        l_i = l_i * alpha + tl.sum(tl.sum(p, 2), 0)
        n0, n1, n2, n3, n4, n5, n6, n7 = _unpack(vw, VBITS, ASM)
        a0 = _v_field(a0, alpha, p, n0, vsb, vzb, tok, tmask, 0, NFV, WV, D, VBITS, GV)
        a1 = _v_field(a1, alpha, p, n1, vsb, vzb, tok, tmask, 1, NFV, WV, D, VBITS, GV)
        a2 = _v_field(a2, alpha, p, n2, vsb, vzb, tok, tmask, 2, NFV, WV, D, VBITS, GV)
        a3 = _v_field(a3, alpha, p, n3, vsb, vzb, tok, tmask, 3, NFV, WV, D, VBITS, GV)
        a4 = _v_field(a4, alpha, p, n4, vsb, vzb, tok, tmask, 4, NFV, WV, D, VBITS, GV)
        a5 = _v_field(a5, alpha, p, n5, vsb, vzb, tok, tmask, 5, NFV, WV, D, VBITS, GV)
        a6 = _v_field(a6, alpha, p, n6, vsb, vzb, tok, tmask, 6, NFV, WV, D, VBITS, GV)
        a7 = _v_field(a7, alpha, p, n7, vsb, vzb, tok, tmask, 7, NFV, WV, D, VBITS, GV)
        m_i = m_new
    l_tot = tl.where(l_i > 0, l_i, 1.0)
    ob = OP + b * sob + hq[:, None] * soh + sp * sos
    _store_field(a0, l_tot, ob, gmask, 0, NFV, WV)
    _store_field(a1, l_tot, ob, gmask, 1, NFV, WV)
    _store_field(a2, l_tot, ob, gmask, 2, NFV, WV)
    _store_field(a3, l_tot, ob, gmask, 3, NFV, WV)
    _store_field(a4, l_tot, ob, gmask, 4, NFV, WV)
    _store_field(a5, l_tot, ob, gmask, 5, NFV, WV)
    _store_field(a6, l_tot, ob, gmask, 6, NFV, WV)
    _store_field(a7, l_tot, ob, gmask, 7, NFV, WV)
    tl.store(LP + b * slb + hq * slh + sp, m_i + tl.log2(l_tot), mask=gmask)


# ----------------------------------------------------------------------------- host side
def pack16(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] -> int16 words [..., D*bits/16], blocked (see module doc)."""
    per = 16 // bits
    w = codes.shape[-1] // per
    c = codes.reshape(*codes.shape[:-1], per, w).to(torch.int32)
    out = torch.zeros(c.shape[:-2] + (w,), dtype=torch.int32, device=codes.device)
    for j in range(per):
        out |= (c[..., j, :] & ((1 << bits) - 1)) << (j * bits)
    return out.to(torch.int16)  # values >= 2**15 wrap to negative: same bits


def unpack16(words: torch.Tensor, bits: int) -> torch.Tensor:
    per = 16 // bits
    wi = words.to(torch.int32) & 0xFFFF
    return torch.cat([(wi >> (j * bits)) & ((1 << bits) - 1) for j in range(per)], -1).to(torch.uint8)


def quantize_groups(x: torch.Tensor, bits: int, group: int, dim: int, clip: float = 1.0):
    """Asymmetric min/max group quantization along ``dim`` (groups of ``group``), fp16 scale and
    zero point; ``clip`` < 1 shrinks the range (SKVQ's clipped dynamic quantization)."""
    dim = dim % x.ndim
    n = x.shape[dim]
    shp = x.shape[:dim] + (n // group, group) + x.shape[dim + 1:]
    xg = x.float().reshape(shp)
    mn = xg.amin(dim + 1, keepdim=True) * clip
    mx = xg.amax(dim + 1, keepdim=True) * clip
    qmax = (1 << bits) - 1
    scale = ((mx - mn) / qmax).half()
    zero = mn.half()
    codes = torch.clamp(torch.round((xg - zero.float()) / scale.float().clamp_min(1e-8)), 0, qmax).to(torch.uint8)
    return codes.reshape(x.shape), scale.squeeze(dim + 1), zero.squeeze(dim + 1)


def dequantize_groups(codes, scale, zero, group: int, dim: int):
    dim = dim % codes.ndim
    return codes.float() * scale.float().repeat_interleave(group, dim=dim) + zero.float().repeat_interleave(group, dim=dim)


def split_residual(seq_len: int, residual: int) -> tuple[int, int]:
    """(quantized tokens, full-precision tokens): the quantized part is whole 32-token groups; the
    newest ``residual`` tokens and any partial group stay in fp16 (KIVI's R, SKVQ's window)."""
    if seq_len <= residual:
        return 0, seq_len
    sq = ((seq_len - residual) // TG) * TG
    return sq, seq_len - sq


class QuantCache:
    """A quantized KV cache built from K/V [B, H, S, D] (fp16/bf16).

    key_mode "channel" (KIVI: groups of 32 tokens per channel) or "token" (groups of ``k_group``
    channels per token); values are always per token in groups of ``v_group`` channels.
    ``perm`` (SKVQ) reorders channels before grouping: the query is permuted the same way and the
    output permuted back."""

    def __init__(self, k, v, kbits, vbits, key_mode="channel", k_group=32, v_group=32, residual=128, clip=1.0,
                 perm: torch.Tensor | None = None):
        B, H, S, D = k.shape
        assert D % 32 == 0 and D * kbits // 16 >= 16 and D * vbits // 16 <= v_group, (D, kbits, vbits, v_group)
        assert key_mode == "channel" or D * kbits // 16 <= k_group
        self.kbits, self.vbits, self.key_mode = kbits, vbits, key_mode
        self.k_group, self.v_group, self.clip, self.perm = k_group, v_group, clip, perm
        if perm is not None:
            k, v = k[..., perm], v[..., perm]
        sq, nr = split_residual(S, residual)
        self.seq_q, self.n_res, self.head_dim = sq, nr, D
        kd = 2 if key_mode == "channel" else 3
        kgs = TG if key_mode == "channel" else k_group
        kc, ks, kz = quantize_groups(k[:, :, :sq], kbits, kgs, kd, clip)
        vc, vs, vz = quantize_groups(v[:, :, :sq], vbits, v_group, 3, clip)
        self.k_words, self.v_words = pack16(kc, kbits).contiguous(), pack16(vc, vbits).contiguous()
        self.k_scale, self.k_zero = ks.contiguous(), kz.contiguous()
        self.v_scale, self.v_zero = vs.contiguous(), vz.contiguous()
        self.inv_perm = torch.argsort(perm) if perm is not None else None
        self.k_res = k[:, :, sq:].half().contiguous()
        self.v_res = v[:, :, sq:].half().contiguous()

    def nbytes(self) -> int:
        """Bytes one decode step reads: codes, scales and zero points, residual, permutation."""
        ts = (self.k_words, self.v_words, self.k_scale, self.k_zero, self.v_scale, self.v_zero, self.k_res, self.v_res)
        n = sum(t.numel() * t.element_size() for t in ts)
        return n + (self.perm.numel() * self.perm.element_size() if self.perm is not None else 0)

    def dequant(self, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 K/V [len(rows), H, S, D] in the ORIGINAL channel order (reference path)."""
        sel = (lambda t: t) if rows is None else (lambda t: t[rows])
        kd_ = 2 if self.key_mode == "channel" else 3
        kgs = TG if self.key_mode == "channel" else self.k_group
        kd = dequantize_groups(unpack16(sel(self.k_words), self.kbits), sel(self.k_scale), sel(self.k_zero), kgs, kd_)
        vd = dequantize_groups(unpack16(sel(self.v_words), self.vbits), sel(self.v_scale), sel(self.v_zero),
                               self.v_group, 3)
        k = torch.cat([kd, sel(self.k_res).float()], 2)
        v = torch.cat([vd, sel(self.v_res).float()], 2)
        if self.perm is not None:
            k, v = k[..., self.inv_perm], v[..., self.inv_perm]
        return k, v


QUANT_CONFIGS = [dict(BN=64, num_warps=4, num_stages=2, waves=4), dict(BN=128, num_warps=4, num_stages=2, waves=4),
                 dict(BN=128, num_warps=8, num_stages=2, waves=4), dict(BN=128, num_warps=4, num_stages=3, waves=8),
                 dict(BN=256, num_warps=8, num_stages=2, waves=4), dict(BN=64, num_warps=4, num_stages=3, waves=8),
                 dict(BN=32, num_warps=4, num_stages=3, waves=8), dict(BN=128, num_warps=8, num_stages=1, waves=8)]
QUANT_DEFAULT = QUANT_CONFIGS[1]


def quant_attention(q, cache: QuantCache, sm_scale=None, cfg=None, out=None, asm=None):
    """q [B, Hq, D] -> out [B, Hq, D] fp16: fused dequantized attention + fp16 residual + reduce."""
    cfg = cfg or QUANT_DEFAULT
    asm = USE_ASM if asm is None else asm
    B, Hq, D = q.shape
    Hkv = cache.k_words.shape[1]
    group = Hq // Hkv
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    if cache.perm is not None:
        q = q[..., cache.perm]
    q = q.half().contiguous() if q.dtype != torch.float16 else q
    bn = cfg["BN"]
    sq = cache.seq_q
    nq, tps = pick_splits(B * Hkv, sq, bn, waves=cfg.get("waves", 2.0)) if sq else (0, bn)
    n_tot = nq + (1 if cache.n_res else 0)
    op, lp = alloc_partials(B, Hq, n_tot, D, q.device)
    c = cache
    if nq:
        _qdecode_kernel[(B, Hkv, nq)](
            q, c.k_words, c.k_scale, c.k_zero, c.v_words, c.v_scale, c.v_zero, op, lp,
            q.stride(0), q.stride(1), c.k_words.stride(0), c.k_words.stride(1), c.k_scale.stride(0),
            c.k_scale.stride(1), c.v_words.stride(0), c.v_words.stride(1), c.v_scale.stride(0), c.v_scale.stride(1),
            op.stride(0), op.stride(1), op.stride(2), lp.stride(0), lp.stride(1),
            sq, tps, sm_scale * LOG2E,
            GROUP=group, G_PAD=_g_pad(group), D=D, BN=bn, KBITS=c.kbits, VBITS=c.vbits,
            K_PER_TOKEN=c.key_mode == "token", GK=c.k_group, GV=c.v_group, ASM=asm,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if c.n_res:
        kr, vr = c.k_res, c.v_res
        _decode_kernel[(B, Hkv, 1)](
            q, kr, vr, q, q, q, op, lp,
            q.stride(0), q.stride(1), kr.stride(0), kr.stride(1), kr.stride(2), vr.stride(0), vr.stride(1), vr.stride(2),
            0, 0, 0, 0, 0,
            op.stride(0), op.stride(1), op.stride(2), lp.stride(0), lp.stride(1),
            c.n_res, c.n_res + 64, sm_scale * LOG2E, nq,
            GROUP=group, G_PAD=_g_pad(group), D=D, DV=D, BLOCK_N=64, HAS_IDX=False, FP8=False, HAS_BIAS=False,
            PAGE=0, D_PAD=D, DV_PAD=D, num_warps=4, num_stages=2)
    o, _ = reduce_partials(op, lp, n_tot, torch.float16, out=None if cache.perm is not None else out)
    if cache.perm is not None:
        o = o[..., cache.inv_perm]
        if out is not None:
            out.copy_(o)
            return out
    return o
