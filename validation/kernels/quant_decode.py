"""Fused dequantize-and-attend decode for group-quantized KV, one query token per sequence.

One kernel serves KIVI (keys per channel in 32-token groups, values per token; arXiv 2402.02750),
asymmetric key/value bits (arXiv 2502.15075), per-token INT8/INT4/INT2 (LMDeploy/TensorRT-LLM
style), SKVQ (clipped, channel-reordered groups + full-precision window; arXiv 2405.06219) and
PackKV's in-kernel bit unpacking (arXiv 2512.24449). Layout per (batch, kv head):

  codes  int16 words [S_q, D*bits/16], "blocked": bit field j (bits [j*b, (j+1)*b)) of word c holds
         channel j*W + c (W = words per token), so field j of a tile is a contiguous channel slice
  keys   per channel (KIVI): scale/zero fp16 [S_q/32, D]
  keys   per token: scale/zero stored [D/GK, S_q]; values [D/GV, S_q] (tokens contiguous)
  fp16 residual / window [n_res, D] (the newest tokens) attended by the dense kernel into the last
  split slot, then one reduce over splits.

How it works (why, with instruction counts: validation/kernels/NOTES-quant.md): a program owns
(batch, kv head, split) and the whole query group, loads BN tokens of code words per iteration as
16-byte vectors (pipelined by Triton with cp.async), and dequantizes each bit field to fp16 in
registers without I2F: OR-ing a code into the mantissa of fp16 1024.0 (0x6400) gives 1024 + code
exactly, two codes per 32-bit LOP3 (the FasterTransformer/Marlin trick), then sub.f16x2 and one
fma.rn.f16x2 apply the scale and zero point. The fields are joined into one [BN, D] tile, so K and
V are one tensor-core dot each with the bf16 kernel's online softmax around them.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from validation.kernels.triton_decode import (
    LOG2E,
    _g_pad,
    alloc_partials,
    attend_residual,
    pick_splits,
    reduce_partials,
)
from validation.kivi_ref import code_ptx, dequant_ptx

TG = 32  # tokens per slab: the KIVI key group, and the middle dim of every 3-D tile

# tl.constexpr: a @triton.jit function may read a module global only when it is a constexpr
DQ_LO, DQ_HI = (tl.constexpr(dequant_ptx(h)) for h in (False, True))
# register-dequant kernel: field j of int16 words -> fp16 exact code, per bit width (unused j: "")
CODE2, CODE4, CODE8 = (tl.constexpr(tuple(code_ptx(b, j) if j < 16 // b else "" for j in range(8))) for b in (2, 4, 8))
USE_ASM = os.environ.get("TRITON_INTERPRET", "0") != "1"  # the interpreter cannot run PTX


@triton.jit
def _dq(x, s, z, J: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    """int16 words [NG, TG, W] -> fp16 code_J * s + z, s already times 2**-off_J (off_J: the field's
    bit offset in its byte), s and z broadcast against x. ASM: kivi_ref.dequant_ptx, four
    instructions per two values; otherwise the same arithmetic in Triton (the interpreter's path)."""
    F: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = ((1 << BITS) - 1) << (BITS * (J % F))
    if ASM:
        m = tl.full([1, 1, 1], MASK, tl.int16)  # a register operand: one asm string serves every field
        if J >= F:
            out = tl.inline_asm_elementwise(DQ_HI, "=r,r,r,r,r", [x, s, z, m], dtype=tl.float16, is_pure=True, pack=2)
        else:
            out = tl.inline_asm_elementwise(DQ_LO, "=r,r,r,r,r", [x, s, z, m], dtype=tl.float16, is_pure=True, pack=2)
    else:
        SH: tl.constexpr = 8 * (J // F)
        f = ((((x.to(tl.int32) & 0xFFFF) >> SH) & MASK) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        out = tl.fma(f - 1024.0, s, z)
    return out


@triton.jit
def _tok_scale(sb, zb, CG: tl.constexpr, ssr, s0, end, NG: tl.constexpr):
    """Per-token scale and zero of channel group CG for the BN tokens from s0, as [NG, TG, 1]; the
    layout [.., groups, tokens] makes this one contiguous load (at BN <= 128 threads it is still
    2 bytes a thread, below the 4 Triton pipelines: NOTES-quant.md)."""
    tok = s0 + tl.arange(0, NG * 32)
    s = tl.load(sb + CG * ssr + tok, mask=tok < end, other=0.0)
    z = tl.load(zb + CG * ssr + tok, mask=tok < end, other=0.0)
    return tl.reshape(s, (NG, 32))[:, :, None], tl.reshape(z, (NG, 32))[:, :, None]


@triton.jit
def _k_field(kw, ksb, kzb, ks, kz, ssr, s0, end, grp3, gm3,
             J: tl.constexpr, NF: tl.constexpr, W: tl.constexpr, BITS: tl.constexpr, PER_TOKEN: tl.constexpr,
             GK: tl.constexpr, NG: tl.constexpr, ASM: tl.constexpr):
    """Dequantized key field J, fp16 [NG, TG, W] (a placeholder when J >= NF); ks/kz carry a
    per-token group's scales between the fields of that group (loaded once, at its first field)."""
    k = kw.to(tl.float16)
    if J < NF:
        INV: tl.constexpr = 1.0 / (1 << (BITS * (J % (8 // BITS))))
        if PER_TOKEN:
            if (J * W) % GK == 0:
                ks, kz = _tok_scale(ksb, kzb, (J * W) // GK, ssr, s0, end, NG)
            s = ks
            z = kz
        else:  # per (32-token group, channel): [NG, 1, W], contiguous channels
            offs = J * W + tl.arange(0, W)
            s = tl.load(ksb + grp3 * ssr + offs[None, None, :], mask=gm3, other=0.0)
            z = tl.load(kzb + grp3 * ssr + offs[None, None, :], mask=gm3, other=0.0)
        k = _dq(kw, (s.to(tl.float32) * INV).to(tl.float16), z, J, BITS, ASM)
    return k, ks, kz


@triton.jit
def _v_field(vw, vsb, vzb, vs, vz, ssr, s0, end,
             J: tl.constexpr, NF: tl.constexpr, W: tl.constexpr, BITS: tl.constexpr, GV: tl.constexpr,
             NG: tl.constexpr, ASM: tl.constexpr):
    """Dequantized value field J (per-token scales, carried as for keys)."""
    v = vw.to(tl.float16)
    if J < NF:
        INV: tl.constexpr = 1.0 / (1 << (BITS * (J % (8 // BITS))))
        if (J * W) % GV == 0:
            vs, vz = _tok_scale(vsb, vzb, (J * W) // GV, ssr, s0, end, NG)
        v = _dq(vw, (vs.to(tl.float32) * INV).to(tl.float16), vz, J, BITS, ASM)
    return v, vs, vz


@triton.jit
def _tile(f0, f1, f2, f3, f4, f5, f6, f7, NF: tl.constexpr, NG: tl.constexpr, W: tl.constexpr, D: tl.constexpr):
    """The NF fields [NG, TG, W] as one [BN, D] tile for a single dot (per-field dots would be N = W
    = 16 wide at 2 bits, too narrow to spread over the warps). Each field is split into word pairs
    (the two halves of one asm output register) and tl.join nests the fields inside the pair index,
    which is then moved innermost again: every 32-bit register keeps its pair, so the join costs no
    data movement. Tile column t then holds channel _tile_channels(t), a fixed permutation the query
    and the output follow."""
    H: tl.constexpr = W // 2
    g0 = tl.reshape(f0, (NG, 32, H, 2))
    g1 = tl.reshape(f1, (NG, 32, H, 2))
    if NF == 2:
        t = tl.permute(tl.join(g0, g1), (0, 1, 2, 4, 3))
    elif NF == 4:
        t = tl.join(tl.join(g0, g1), tl.join(tl.reshape(f2, (NG, 32, H, 2)), tl.reshape(f3, (NG, 32, H, 2))))
        t = tl.permute(t, (0, 1, 2, 4, 5, 3))
    else:
        t = tl.join(tl.join(tl.join(g0, g1), tl.join(tl.reshape(f2, (NG, 32, H, 2)), tl.reshape(f3, (NG, 32, H, 2)))),
                    tl.join(tl.join(tl.reshape(f4, (NG, 32, H, 2)), tl.reshape(f5, (NG, 32, H, 2))),
                            tl.join(tl.reshape(f6, (NG, 32, H, 2)), tl.reshape(f7, (NG, 32, H, 2)))))
        t = tl.permute(t, (0, 1, 2, 4, 5, 6, 3))
    return tl.reshape(t, (NG * 32, D))


@triton.jit
def _tile_channels(NF: tl.constexpr, D: tl.constexpr):
    """Channel of each tile column t = ((pair * NF) + r) * 2 + half: field j = bit-reversed r (the
    join nesting), word 2 * pair + half."""
    t = tl.arange(0, D)
    r = (t // 2) % NF
    if NF == 8:
        j = ((r & 1) << 2) | (r & 2) | (r >> 2)
    elif NF == 4:
        j = ((r & 1) << 1) | (r >> 1)
    else:
        j = r
    return j * (D // NF) + (t // (2 * NF)) * 2 + t % 2


@triton.jit
def _qdecode_kernel(Q, KW, KS, KZ, VW, VS, VZ, OP, LP,
                    sqb, sqh, skwb, skwh, sksb, sksh, sksr, svwb, svwh, svsb, svsh, svsr,
                    sob, soh, sos, slb, slh,
                    seq_q, tps, qk_scale,
                    GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                    KBITS: tl.constexpr, VBITS: tl.constexpr, K_PER_TOKEN: tl.constexpr,
                    GK: tl.constexpr, GV: tl.constexpr, ASM: tl.constexpr):
    """One program per (batch, kv head, split), the whole query group as the rows of every dot.
    Each iteration loads BN tokens of K and V words as [NG, TG, W] tiles (16-byte vectors, pipelined
    by Triton into shared memory), dequantizes them field by field to fp16 in registers (KIVI key
    scales broadcast over each 32-token slab, per-token scales over the channels), joins the fields
    into [BN, D] tiles and runs the bf16 kernel's online softmax on two plain dots."""
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
    q = tl.load(Q + b * sqb + hq[:, None] * sqh + _tile_channels(NFK, D)[None, :], mask=gmask[:, None], other=0.0)
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
    offs_n = tl.arange(0, BN)
    start = sp * tps
    end = tl.minimum(start + tps, seq_q)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for s in range(start, end, BN):
        tok3 = s + offs_ng[:, None, None] * 32 + offs_t[None, :, None]  # [NG, TG, 1]
        tm3 = tok3 < end
        grp3 = s // 32 + offs_ng[:, None, None]
        gm3 = grp3 * 32 < end
        kw = tl.load(kwb + tok3 * WK + offs_wk[None, None, :], mask=tm3, other=0)
        vw = tl.load(vwb + tok3 * WV + offs_wv[None, None, :], mask=tm3, other=0)
        ks = tl.zeros([NG, 32, 1], tl.float16)
        kz = ks
        k0, ks, kz = _k_field(kw, ksb, kzb, ks, kz, sksr, s, end, grp3, gm3, 0, NFK, WK, KBITS, K_PER_TOKEN, GK, NG, ASM)
        k1, ks, kz = _k_field(kw, ksb, kzb, ks, kz, sksr, s, end, grp3, gm3, 1, NFK, WK, KBITS, K_PER_TOKEN, GK, NG, ASM)
        k2, ks, kz = _k_field(kw, ksb, kzb, ks, kz, sksr, s, end, grp3, gm3, 2, NFK, WK, KBITS, K_PER_TOKEN, GK, NG, ASM)
        k3, ks, kz = _k_field(kw, ksb, kzb, ks, kz, sksr, s, end, grp3, gm3, 3, NFK, WK, KBITS, K_PER_TOKEN, GK, NG, ASM)
        k4, ks, kz = _k_field(kw, ksb, kzb, ks, kz, sksr, s, end, grp3, gm3, 4, NFK, WK, KBITS, K_PER_TOKEN, GK, NG, ASM)
        k5, ks, kz = _k_field(kw, ksb, kzb, ks, kz, sksr, s, end, grp3, gm3, 5, NFK, WK, KBITS, K_PER_TOKEN, GK, NG, ASM)
        k6, ks, kz = _k_field(kw, ksb, kzb, ks, kz, sksr, s, end, grp3, gm3, 6, NFK, WK, KBITS, K_PER_TOKEN, GK, NG, ASM)
        k7, ks, kz = _k_field(kw, ksb, kzb, ks, kz, sksr, s, end, grp3, gm3, 7, NFK, WK, KBITS, K_PER_TOKEN, GK, NG, ASM)
        kt = _tile(k0, k1, k2, k3, k4, k5, k6, k7, NFK, NG, WK, D)
        sc = tl.dot(q, tl.trans(kt)) * qk_scale
        sc = tl.where((s + offs_n < end)[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vs = tl.zeros([NG, 32, 1], tl.float16)
        vz = vs
        v0, vs, vz = _v_field(vw, vsb, vzb, vs, vz, svsr, s, end, 0, NFV, WV, VBITS, GV, NG, ASM)
        v1, vs, vz = _v_field(vw, vsb, vzb, vs, vz, svsr, s, end, 1, NFV, WV, VBITS, GV, NG, ASM)
        v2, vs, vz = _v_field(vw, vsb, vzb, vs, vz, svsr, s, end, 2, NFV, WV, VBITS, GV, NG, ASM)
        v3, vs, vz = _v_field(vw, vsb, vzb, vs, vz, svsr, s, end, 3, NFV, WV, VBITS, GV, NG, ASM)
        v4, vs, vz = _v_field(vw, vsb, vzb, vs, vz, svsr, s, end, 4, NFV, WV, VBITS, GV, NG, ASM)
        v5, vs, vz = _v_field(vw, vsb, vzb, vs, vz, svsr, s, end, 5, NFV, WV, VBITS, GV, NG, ASM)
        v6, vs, vz = _v_field(vw, vsb, vzb, vs, vz, svsr, s, end, 6, NFV, WV, VBITS, GV, NG, ASM)
        v7, vs, vz = _v_field(vw, vsb, vzb, vs, vz, svsr, s, end, 7, NFV, WV, VBITS, GV, NG, ASM)
        vt = _tile(v0, v1, v2, v3, v4, v5, v6, v7, NFV, NG, WV, D)
        acc = tl.dot(p.to(tl.float16), vt, acc * alpha[:, None])
        m_i = m_new
    l_tot = tl.where(l_i > 0, l_i, 1.0)
    ob = OP + b * sob + hq[:, None] * soh + sp * sos
    tl.store(ob + _tile_channels(NFV, D)[None, :], acc / l_tot[:, None], mask=gmask[:, None])
    tl.store(LP + b * slb + hq * slh + sp, m_i + tl.log2(l_tot), mask=gmask)


# ----------------------------------------------------------------------------- register-dequant kernel
@triton.jit
def _code(x, J: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    """int16 words (any shape, any layout) -> fp16 exact code of bit field J. Elementwise and unary,
    so Triton's dot-operand hoisting keeps the words (not fp16 values) on the shared-memory path and
    applies this in the dot-operand registers (kivi_ref.code_ptx: 2 instructions per 2 values)."""
    if ASM:
        if BITS == 2:
            out = tl.inline_asm_elementwise(CODE2[J], "=r,r", [x], dtype=tl.float16, is_pure=True, pack=2)
        elif BITS == 4:
            out = tl.inline_asm_elementwise(CODE4[J], "=r,r", [x], dtype=tl.float16, is_pure=True, pack=2)
        else:
            out = tl.inline_asm_elementwise(CODE8[J], "=r,r", [x], dtype=tl.float16, is_pure=True, pack=2)
    else:
        F: tl.constexpr = 8 // BITS
        SH: tl.constexpr = 8 * (J // F) + BITS * (J % F)
        f = ((((x.to(tl.int32) & 0xFFFF) >> SH) & ((1 << BITS) - 1)) | 0x6400).to(tl.int16)
        out = f.to(tl.float16, bitcast=True) - 1024.0
    return out


@triton.jit
def _rd_qk_tok(sc, raw, qb, gmask, kwT, ksb, kzb, ssr, tok, tmask, qk_scale, J: tl.constexpr, NF: tl.constexpr,
               W: tl.constexpr, BITS: tl.constexpr, GK: tl.constexpr, ASM: tl.constexpr):
    """Per-token keys: raw += q_J . code_J (one dot, K = W channels); at the last field of a scale group
    the group's per-token scale and zero apply to the [G, BN] scores: sc += raw * s + sum(q_group) * z."""
    if J < NF:
        offs_w = tl.arange(0, W)
        qj = tl.load(qb + J * W + offs_w[None, :], mask=gmask[:, None], other=0.0)
        raw = tl.dot(qj, _code(kwT, J, BITS, ASM), raw)
        if ((J + 1) * W) % GK == 0:
            CG: tl.constexpr = (J * W) // GK
            ks = tl.load(ksb + CG * ssr + tok, mask=tmask, other=0.0).to(tl.float32) * qk_scale
            kz = tl.load(kzb + CG * ssr + tok, mask=tmask, other=0.0).to(tl.float32) * qk_scale
            qg = tl.load(qb + CG * GK + tl.arange(0, GK)[None, :], mask=gmask[:, None], other=0.0)
            sc = tl.fma(raw, ks[None, :], tl.fma(tl.sum(qg.to(tl.float32), 1)[:, None], kz[None, :], sc))
            raw = tl.zeros_like(raw)
    return sc, raw


@triton.jit
def _rd_qk_ch(sc, bacc, qb, gmask, kwT, ksb, kzb, srow, J: tl.constexpr, NF: tl.constexpr, W: tl.constexpr,
              BITS: tl.constexpr, G_PAD: tl.constexpr, ASM: tl.constexpr):
    """Per-channel keys (KIVI, one 32-token group per iteration): the group's channel scales fold into
    the query (q_J * s_J in fp16, one rounding), its zero points into one bias per query row."""
    if J < NF:
        offs_w = tl.arange(0, W)
        qj = tl.load(qb + J * W + offs_w[None, :], mask=gmask[:, None], other=0.0)
        off = srow + J * W + offs_w[None, :] + 0 * tl.arange(0, G_PAD)[:, None]  # [G, W]: 8-16 B a thread, pipelined
        ksj = tl.load(ksb + off)
        kzj = tl.load(kzb + off)
        # fp16 x fp16 rounded to fp16 == the exact product rounded once; keeps q in fp16 registers
        sc = tl.dot(qj * ksj, _code(kwT, J, BITS, ASM), sc)
        bacc = tl.fma(qj.to(tl.float32), kzj.to(tl.float32), bacc)
    return sc, bacc


@triton.jit
def _rd_pv(acc, alpha, p, ps, pz, vw, vsb, vzb, ssr, tok, tmask, J: tl.constexpr, NF: tl.constexpr,
           W: tl.constexpr, BITS: tl.constexpr, GV: tl.constexpr, ASM: tl.constexpr):
    """acc_J [G, W] = acc_J * alpha + (p * s) . code_J + sum(p * z): the per-token value scale folds
    into the probabilities (once per scale group: ps / pz carry between its fields), the zero point
    into one [G] term."""
    if J < NF:
        if (J * W) % GV == 0:
            CG: tl.constexpr = (J * W) // GV
            vs = tl.load(vsb + CG * ssr + tok, mask=tmask, other=0.0).to(tl.float32)
            vz = tl.load(vzb + CG * ssr + tok, mask=tmask, other=0.0).to(tl.float32)
            ps = (p * vs[None, :]).to(tl.float16)
            pz = tl.sum(p * vz[None, :], 1)
        acc = tl.dot(ps, _code(vw, J, BITS, ASM), acc * alpha[:, None]) + pz[:, None]
    return acc, ps, pz


@triton.jit
def _rd_store(ob, acc, l_tot, gmask, J: tl.constexpr, NF: tl.constexpr, W: tl.constexpr):
    if J < NF:
        tl.store(ob + J * W + tl.arange(0, W)[None, :], acc / l_tot[:, None], mask=gmask[:, None])


@triton.jit
def _qdecode_rd_kernel(Q, KW, KS, KZ, VW, VS, VZ, OP, LP,
                       sqb, sqh, skwb, skwh, sksb, sksh, sksr, svwb, svwh, svsb, svsh, svsr,
                       sob, soh, sos, slb, slh,
                       seq_q, tps, qk_scale,
                       GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                       KBITS: tl.constexpr, VBITS: tl.constexpr, K_PER_TOKEN: tl.constexpr,
                       GK: tl.constexpr, GV: tl.constexpr, ASM: tl.constexpr):
    """Register dequantization: the same cache layout and grid as _qdecode_kernel, but no fp16 tile is
    ever built. Each bit field J is its own dot: keys q_J [G, W] x code_J^T [W, BN], values
    (p * s) [G, BN] x code_J [BN, W] into acc_J [G, W]; the codes enter the dot as exact small fp16
    integers made from the int16 words in the dot-operand registers (_code), scales and zero points
    are applied to q / scores / p instead. Shared memory carries only the packed words (cp.async),
    read once into the dot-operand layout: bits/16 of the old kernel's dequantized-tile traffic, and
    none of its bank conflicts (NOTES-quant.md)."""
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
    kwb = KW + b * skwb + hk * skwh
    ksb = KS + b * sksb + hk * sksh
    kzb = KZ + b * sksb + hk * sksh
    vwb = VW + b * svwb + hk * svwh
    vsb = VS + b * svsb + hk * svsh
    vzb = VZ + b * svsb + hk * svsh
    offs_wk = tl.arange(0, WK)
    offs_wv = tl.arange(0, WV)
    offs_n = tl.arange(0, BN)
    start = sp * tps
    end = tl.minimum(start + tps, seq_q)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    a0 = tl.zeros([G_PAD, WV], tl.float32)
    a1 = a0
    a2 = a0
    a3 = a0
    a4 = a0
    a5 = a0
    a6 = a0
    a7 = a0
    for s in range(start, end, BN):
        tok = s + offs_n
        tmask = tok < end
        kwT = tl.load(kwb + tok[None, :] * WK + offs_wk[:, None], mask=tmask[None, :], other=0)  # [WK, BN]
        vw = tl.load(vwb + tok[:, None] * WV + offs_wv[None, :], mask=tmask[:, None], other=0)  # [BN, WV]
        sc = tl.zeros([G_PAD, BN], tl.float32)
        if K_PER_TOKEN:
            raw = tl.zeros([G_PAD, BN], tl.float32)
            sc, raw = _rd_qk_tok(sc, raw, qb, gmask, kwT, ksb, kzb, sksr, tok, tmask, qk_scale, 0, NFK, WK, KBITS, GK, ASM)
            sc, raw = _rd_qk_tok(sc, raw, qb, gmask, kwT, ksb, kzb, sksr, tok, tmask, qk_scale, 1, NFK, WK, KBITS, GK, ASM)
            sc, raw = _rd_qk_tok(sc, raw, qb, gmask, kwT, ksb, kzb, sksr, tok, tmask, qk_scale, 2, NFK, WK, KBITS, GK, ASM)
            sc, raw = _rd_qk_tok(sc, raw, qb, gmask, kwT, ksb, kzb, sksr, tok, tmask, qk_scale, 3, NFK, WK, KBITS, GK, ASM)
            sc, raw = _rd_qk_tok(sc, raw, qb, gmask, kwT, ksb, kzb, sksr, tok, tmask, qk_scale, 4, NFK, WK, KBITS, GK, ASM)
            sc, raw = _rd_qk_tok(sc, raw, qb, gmask, kwT, ksb, kzb, sksr, tok, tmask, qk_scale, 5, NFK, WK, KBITS, GK, ASM)
            sc, raw = _rd_qk_tok(sc, raw, qb, gmask, kwT, ksb, kzb, sksr, tok, tmask, qk_scale, 6, NFK, WK, KBITS, GK, ASM)
            sc, raw = _rd_qk_tok(sc, raw, qb, gmask, kwT, ksb, kzb, sksr, tok, tmask, qk_scale, 7, NFK, WK, KBITS, GK, ASM)
        else:  # KIVI: BN == 32, the iteration is one key group
            tl.static_assert(BN == 32)
            srow = (s // 32) * sksr
            bacc = tl.zeros([G_PAD, WK], tl.float32)
            sc, bacc = _rd_qk_ch(sc, bacc, qb, gmask, kwT, ksb, kzb, srow, 0, NFK, WK, KBITS, G_PAD, ASM)
            sc, bacc = _rd_qk_ch(sc, bacc, qb, gmask, kwT, ksb, kzb, srow, 1, NFK, WK, KBITS, G_PAD, ASM)
            sc, bacc = _rd_qk_ch(sc, bacc, qb, gmask, kwT, ksb, kzb, srow, 2, NFK, WK, KBITS, G_PAD, ASM)
            sc, bacc = _rd_qk_ch(sc, bacc, qb, gmask, kwT, ksb, kzb, srow, 3, NFK, WK, KBITS, G_PAD, ASM)
            sc, bacc = _rd_qk_ch(sc, bacc, qb, gmask, kwT, ksb, kzb, srow, 4, NFK, WK, KBITS, G_PAD, ASM)
            sc, bacc = _rd_qk_ch(sc, bacc, qb, gmask, kwT, ksb, kzb, srow, 5, NFK, WK, KBITS, G_PAD, ASM)
            sc, bacc = _rd_qk_ch(sc, bacc, qb, gmask, kwT, ksb, kzb, srow, 6, NFK, WK, KBITS, G_PAD, ASM)
            sc, bacc = _rd_qk_ch(sc, bacc, qb, gmask, kwT, ksb, kzb, srow, 7, NFK, WK, KBITS, G_PAD, ASM)
            sc = (sc + tl.sum(bacc, 1)[:, None]) * qk_scale
        sc = tl.where(tmask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        ps = tl.zeros([G_PAD, BN], tl.float16)
        pz = tl.zeros([G_PAD], tl.float32)
        a0, ps, pz = _rd_pv(a0, alpha, p, ps, pz, vw, vsb, vzb, svsr, tok, tmask, 0, NFV, WV, VBITS, GV, ASM)
        a1, ps, pz = _rd_pv(a1, alpha, p, ps, pz, vw, vsb, vzb, svsr, tok, tmask, 1, NFV, WV, VBITS, GV, ASM)
        a2, ps, pz = _rd_pv(a2, alpha, p, ps, pz, vw, vsb, vzb, svsr, tok, tmask, 2, NFV, WV, VBITS, GV, ASM)
        a3, ps, pz = _rd_pv(a3, alpha, p, ps, pz, vw, vsb, vzb, svsr, tok, tmask, 3, NFV, WV, VBITS, GV, ASM)
        a4, ps, pz = _rd_pv(a4, alpha, p, ps, pz, vw, vsb, vzb, svsr, tok, tmask, 4, NFV, WV, VBITS, GV, ASM)
        a5, ps, pz = _rd_pv(a5, alpha, p, ps, pz, vw, vsb, vzb, svsr, tok, tmask, 5, NFV, WV, VBITS, GV, ASM)
        a6, ps, pz = _rd_pv(a6, alpha, p, ps, pz, vw, vsb, vzb, svsr, tok, tmask, 6, NFV, WV, VBITS, GV, ASM)
        a7, ps, pz = _rd_pv(a7, alpha, p, ps, pz, vw, vsb, vzb, svsr, tok, tmask, 7, NFV, WV, VBITS, GV, ASM)
        m_i = m_new
    l_tot = tl.where(l_i > 0, l_i, 1.0)
    ob = OP + b * sob + hq[:, None] * soh + sp * sos
    _rd_store(ob, a0, l_tot, gmask, 0, NFV, WV)
    _rd_store(ob, a1, l_tot, gmask, 1, NFV, WV)
    _rd_store(ob, a2, l_tot, gmask, 2, NFV, WV)
    _rd_store(ob, a3, l_tot, gmask, 3, NFV, WV)
    _rd_store(ob, a4, l_tot, gmask, 4, NFV, WV)
    _rd_store(ob, a5, l_tot, gmask, 5, NFV, WV)
    _rd_store(ob, a6, l_tot, gmask, 6, NFV, WV)
    _rd_store(ob, a7, l_tot, gmask, 7, NFV, WV)
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
    channels per token); values are always per token in groups of ``v_group`` channels. Per-token
    scales and zero points are stored [B, H, D/group, S_q] (tokens contiguous) so the kernel reads a
    group's BN scales as one 16-byte-vector load that Triton can pipeline; per-channel key scales are
    [B, H, S_q/32, D] (channels contiguous, the same reason).
    ``perm`` (SKVQ) reorders channels before grouping: the query is permuted the same way and the
    output permuted back."""

    def __init__(self, k, v, kbits, vbits, key_mode="channel", k_group=32, v_group=32, residual=128, clip=1.0,
                 perm: torch.Tensor | None = None):
        B, H, S, D = k.shape
        # a field (D * bits / 16 channels) is one dot operand (>= 16 wide) inside one scale group
        assert D % 32 == 0 and min(D * kbits, D * vbits) // 16 >= 16 and D * vbits // 16 <= v_group, (D, kbits, vbits)
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
        tmaj = lambda t: t.transpose(-1, -2).contiguous()  # noqa: E731  [.., S_q, groups] -> [.., groups, S_q]
        self.k_scale, self.k_zero = (ks.contiguous(), kz.contiguous()) if key_mode == "channel" else (tmaj(ks), tmaj(kz))
        self.v_scale, self.v_zero = tmaj(vs), tmaj(vz)
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
        tmaj = lambda t: sel(t).transpose(-1, -2)  # noqa: E731  back to [.., S_q, groups]
        ks, kz = (sel(self.k_scale), sel(self.k_zero)) if self.key_mode == "channel" else (tmaj(self.k_scale), tmaj(self.k_zero))
        kd = dequantize_groups(unpack16(sel(self.k_words), self.kbits), ks, kz, kgs, kd_)
        vd = dequantize_groups(unpack16(sel(self.v_words), self.vbits), tmaj(self.v_scale), tmaj(self.v_zero),
                               self.v_group, 3)
        k = torch.cat([kd, sel(self.k_res).float()], 2)
        v = torch.cat([vd, sel(self.v_res).float()], 2)
        if self.perm is not None:
            k, v = k[..., self.inv_perm], v[..., self.inv_perm]
        return k, v


def tile_config(kbits: int, vbits: int) -> dict:
    """The joined-tile kernel's (_qdecode_kernel) config: BN = 128 tokens per iteration (64 at 8 bits),
    4 warps, 3 cp.async stages, waves=8 programs per SM. On the H200 it ran at 7 % (2 bits) to 57 %
    (8 bits) of the read rate: its dequantized [BN, 128] fp16 tiles go to shared memory 8-way (2 bits),
    4-way (4) or 2-way (8) bank-conflicted (NOTES-quant.md). Kept so tuning compares both kernels."""
    return dict(kern="tile", BN=64 if min(kbits, vbits) >= 8 else 128, num_warps=4, num_stages=3, waves=8.0)


def rd_config(kbits: int, vbits: int, key_mode: str = "channel") -> dict:
    """The register-dequant kernel's (_qdecode_rd_kernel) config: one warp a program (its per-field
    value dots are [16, D*bits/16] wide: at 2 bits 16 columns, which more warps would only replicate),
    BN 64 tokens (32 for KIVI keys: one key group per iteration), 3 cp.async stages; about 250
    registers, 8 programs per SM (ptxas sm_90, Triton 3.6), waves=16 so each SM sees two rounds."""
    return dict(kern="rd", BN=32 if key_mode == "channel" else 64, num_warps=1, num_stages=3, waves=16.0)


def quant_config(kbits: int, vbits: int, key_mode: str = "channel") -> dict:
    """Default launch config: the register-dequant kernel (tune_quant.py compares it with the tile one)."""
    return rd_config(kbits, vbits, key_mode)


def quant_grid(kbits: int, vbits: int, key_mode: str = "channel") -> list[dict]:
    """Variants to tune, most promising first: the register-dequant default, the old tile default
    (both always run in tune_quant.py), then one knob at a time: splits (waves), cp.async depth,
    tokens per iteration, warps; then the tile kernel's knobs and the pure-Triton dequantization."""
    r = rd_config(kbits, vbits, key_mode)
    d = tile_config(kbits, vbits)
    grid = [r, d, dict(r, waves=8.0), dict(r, num_stages=4), dict(r, waves=32.0)]
    if key_mode == "token":
        grid += [dict(r, BN=32), dict(r, BN=32, num_stages=5)]
    grid += [dict(r, num_warps=2), dict(r, asm=0),
             dict(d, waves=16.0), dict(d, num_stages=4), dict(d, BN=d["BN"] // 2), dict(d, num_warps=8), dict(d, asm=0)]
    out = []
    for c in grid:
        if c not in out and c["BN"] >= 32:
            out.append(c)
    return out


def quant_attention(q, cache: QuantCache, sm_scale=None, cfg=None, out=None, asm=None):
    """q [B, Hq, D] -> out [B, Hq, D] fp16: fused dequantized attention + fp16 residual + reduce."""
    cfg = cfg or quant_config(cache.kbits, cache.vbits, cache.key_mode)
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
    nq, tps = pick_splits(B * Hkv, sq, bn, waves=cfg["waves"]) if sq else (0, bn)
    n_tot = nq + (1 if cache.n_res else 0)
    op, lp = alloc_partials(B, Hq, n_tot, D, q.device)
    c = cache
    rd = cfg.get("kern", "tile") == "rd"
    assert not rd or c.key_mode == "token" or bn == TG, "register-dequant KIVI keys: one 32-token group per iteration"
    if nq:
        (_qdecode_rd_kernel if rd else _qdecode_kernel)[(B, Hkv, nq)](
            q, c.k_words, c.k_scale, c.k_zero, c.v_words, c.v_scale, c.v_zero, op, lp,
            q.stride(0), q.stride(1), c.k_words.stride(0), c.k_words.stride(1), c.k_scale.stride(0),
            c.k_scale.stride(1), c.k_scale.stride(2), c.v_words.stride(0), c.v_words.stride(1), c.v_scale.stride(0),
            c.v_scale.stride(1), c.v_scale.stride(2),
            op.stride(0), op.stride(1), op.stride(2), lp.stride(0), lp.stride(1),
            sq, tps, sm_scale * LOG2E,
            GROUP=group, G_PAD=_g_pad(group), D=D, BN=bn, KBITS=c.kbits, VBITS=c.vbits,
            K_PER_TOKEN=c.key_mode == "token", GK=c.k_group, GV=c.v_group, ASM=asm,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if c.n_res:
        attend_residual(q, c.k_res, c.v_res, op, lp, c.n_res, nq, sm_scale, group)
    o, _ = reduce_partials(op, lp, n_tot, torch.float16, out=None if cache.perm is not None else out)
    if cache.perm is not None:
        o = o[..., cache.inv_perm]
        if out is not None:
            out.copy_(o)
            return out
    return o
