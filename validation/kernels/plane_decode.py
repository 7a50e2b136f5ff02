"""Decode attention over KV codes of any width 1-8 bits, stored as bit planes, dequantized through a
per-channel lookup table (KVQuant) or a scale and zero point (KIVI-style groups), plus KVQuant's
sparse fp16 outliers, one query token per sequence.

The fused kernel of quant_decode.py packs 2, 4 or 8-bit codes in 16-bit words; 3, 5, 6 and 7 bits do
not divide a word. Here a b-bit code is split into planes of 4, 2 and 1 bits (3 = 2+1, 5 = 4+1,
6 = 4+2, 7 = 4+2+1; the bit-plane split of mixed-width weight kernels such as FLUTE, arXiv
2407.10960 sec. 3, which stores 3-bit codes as a 2-bit and a 1-bit plane), each plane packed in
int32 words: channel c of a p-bit plane is field c % (32/p) of word c // (32/p). Every token's
codes take exactly D*b/8 bytes.

Layout per (batch, kv head), S_q quantized tokens (a multiple of 16):

  codes  int32 [S_q, D*b/32]: the planes' words one after the other, most significant plane first
  keys   "lut":     fp16 table [D, 2**b] per KV head and layer (KVQuant's per-channel non-uniform
                    datatype, arXiv 2401.18079 sec. 3.3, fitted offline: not per token)
         "channel": fp16 scale/zero per (KG-token group, channel) (KIVI, arXiv 2402.02750 sec. 3.2)
         "token":   fp16 scale/zero per (token, GK-channel group)
  values "lut":     one fp16 table [2**b] per KV head and layer
         "token":   fp16 scale/zero per (token, GV-channel group)
  outliers (KVQuant's dense-and-sparse split, sec. 3.5): NNZ entries per 16-token row block, each
         an fp16 value and a 16-bit position (token in the block * D + channel), so no row pointers
         are stored; the value is what the dense code misses (x - dense(x)), added to the scores
         (keys) and to the output (values) in the same tile loop as the dense part
  fp16 residual [n_res, D]: the newest tokens (KIVI's R), attended by triton_decode's dense kernel
         into the last split slot, then one reduce over splits

KVQuant applies RoPE to the dequantized pre-RoPE keys inside its kernel (sec. 3.2); keys here are
attended as stored (RoPE is a few element-wise FLOPs per key element).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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

RB = 16  # tokens per outlier row block (and the granularity of the quantized length)
MODES = {"lut": 0, "channel": 1, "token": 2}


def planes(bits: int) -> tuple[int, ...]:
    """Plane widths of a b-bit code, most significant first: 7 -> (4, 2, 1)."""
    assert 1 <= bits <= 8, bits
    return (8,) if bits == 8 else tuple(p for p in (4, 2, 1) if bits & p)


@triton.jit
def _plane(code, base, tok, tmask, offs_d, off: tl.constexpr, P: tl.constexpr, NW: tl.constexpr):
    """code <- (code << P) | this plane's field of each (token, channel)."""
    if P > 0:
        PER: tl.constexpr = 32 // P
        w = tl.load(base + tok[:, None] * NW + off + (offs_d // PER)[None, :], mask=tmask[:, None], other=0)
        code = (code << P) | ((w >> ((offs_d % PER) * P)[None, :]) & ((1 << P) - 1))
    return code


@triton.jit
def _codes(base, tok, tmask, offs_d, D: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr):
    """int32 codes [BN, D] of tokens ``tok`` from their planes."""
    NW: tl.constexpr = D * (P0 + P1 + P2) // 32
    code = tl.zeros([tok.shape[0], D], tl.int32)
    code = _plane(code, base, tok, tmask, offs_d, 0, P0, NW)
    code = _plane(code, base, tok, tmask, offs_d, D * P0 // 32, P1, NW)
    code = _plane(code, base, tok, tmask, offs_d, D * (P0 + P1) // 32, P2, NW)
    return code


@triton.jit
def _dequant(code, lut, sb, zb, tok, tmask, offs_d, MODE: tl.constexpr, PER_CH_LUT: tl.constexpr,
             NL: tl.constexpr, D: tl.constexpr, G: tl.constexpr):
    """fp16 [BN, D] from codes: a table lookup (MODE 0) or code * scale + zero (1: per G-token group
    and channel, 2: per token and G-channel group)."""
    if MODE == 0:
        if PER_CH_LUT:
            x = tl.load(lut + offs_d[None, :] * NL + code)
        else:
            x = tl.load(lut + code)
    else:
        if MODE == 1:
            idx = (tok // G)[:, None] * D + offs_d[None, :]
        else:
            idx = tok[:, None] * (D // G) + (offs_d // G)[None, :]
        s = tl.load(sb + idx, mask=tmask[:, None], other=0.0).to(tl.float32)
        z = tl.load(zb + idx, mask=tmask[:, None], other=0.0).to(tl.float32)
        x = (code.to(tl.float32) * s + z).to(tl.float16)
    return x


@triton.jit
def _outliers(ob, end, tok0, NNZ: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr, D: tl.constexpr):
    """The outliers of the BN tokens from ``tok0`` (whole 16-token row blocks, those before ``end``):
    token offset in the tile, channel and fp16 value, NS entries (padding: value 0)."""
    e = tl.arange(0, NS)
    em = (e < (BN // 16) * NNZ) & (tok0 + (e // NNZ) * 16 < end)
    base = (tok0 // 16) * NNZ
    pos = tl.load(ob + 2 * (base + e) + 1, mask=em, other=0).to(tl.int32) & 0xFFFF
    val = tl.load(ob + 2 * (base + e), mask=em, other=0).to(tl.float16, bitcast=True)
    return (e // NNZ) * 16 + pos // D, pos % D, tl.where(em, val, 0.0)


@triton.jit
def _plane_kernel(Q, KC, KL, KS, KZ, VC, VL, VS, VZ, KO, VO, OP, LP,
                  sqb, sqh, skcb, skch, sklh, sksb, sksh, svcb, svch, svlh, svsb, svsh, sob_, soh_, sob, soh, sos,
                  slb, slh, seq_q, tps, qk_scale,
                  GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                  K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, V0: tl.constexpr, V1: tl.constexpr,
                  V2: tl.constexpr, KMODE: tl.constexpr, VMODE: tl.constexpr, KG: tl.constexpr, VG: tl.constexpr,
                  NNZ: tl.constexpr, NS: tl.constexpr):
    KNL: tl.constexpr = 1 << (K0 + K1 + K2)
    VNL: tl.constexpr = 1 << (V0 + V1 + V2)
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    offs_g = tl.arange(0, G_PAD)
    gmask = offs_g < GROUP
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BN)
    hq = hk * GROUP + offs_g
    qb = Q + b * sqb + hq[:, None] * sqh
    q = tl.load(qb + offs_d[None, :], mask=gmask[:, None], other=0.0).to(tl.float16)
    kcb = KC + b * skcb + hk * skch
    vcb = VC + b * svcb + hk * svch
    klb = KL + hk * sklh
    vlb = VL + hk * svlh
    ksb = KS + b * sksb + hk * sksh
    kzb = KZ + b * sksb + hk * sksh
    vsb = VS + b * svsb + hk * svsh
    vzb = VZ + b * svsb + hk * svsh
    kob = KO + b * sob_ + hk * soh_
    vob = VO + b * sob_ + hk * soh_
    start = sp * tps
    end = tl.minimum(start + tps, seq_q)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for s in range(start, end, BN):
        tok = s + offs_n
        tmask = tok < end
        k = _dequant(_codes(kcb, tok, tmask, offs_d, D, K0, K1, K2), klb, ksb, kzb, tok, tmask, offs_d, KMODE, True,
                     KNL, D, KG)
        sc = tl.dot(q, tl.trans(k))
        if NNZ > 0:  # the key outliers' share of the scores: q[:, ch] * value, scattered to their tokens
            t_e, c_e, x_e = _outliers(kob, end, s, NNZ, BN, NS, D)
            qg = tl.load(qb + c_e[None, :], mask=gmask[:, None], other=0.0).to(tl.float16)  # [G_PAD, NS]
            onehot = tl.where(t_e[:, None] == offs_n[None, :], x_e[:, None], 0.0).to(tl.float16)  # [NS, BN]
            sc = tl.dot(qg, onehot, sc)
        sc = tl.where(tmask[None, :], sc * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p16 = p.to(tl.float16)
        v = _dequant(_codes(vcb, tok, tmask, offs_d, D, V0, V1, V2), vlb, vsb, vzb, tok, tmask, offs_d, VMODE, False,
                     VNL, D, VG)
        acc = tl.dot(p16, v, acc * alpha[:, None])
        if NNZ > 0:  # the value outliers: each one's probability times its value, into its channel
            t_e, c_e, x_e = _outliers(vob, end, s, NNZ, BN, NS, D)
            pick = tl.where(offs_n[:, None] == t_e[None, :], 1.0, 0.0).to(tl.float16)  # [BN, NS]
            p_e = tl.dot(p16, pick).to(tl.float16)  # [G_PAD, NS]: one probability each, exact
            scatter = tl.where(c_e[:, None] == offs_d[None, :], x_e[:, None], 0.0).to(tl.float16)  # [NS, D]
            acc = tl.dot(p_e, scatter, acc)
        m_i = m_new
    l_tot = tl.where(l_i > 0, l_i, 1.0)
    ob = OP + b * sob + hq[:, None] * soh + sp * sos
    tl.store(ob + offs_d[None, :], acc / l_tot[:, None], mask=gmask[:, None])
    tl.store(LP + b * slb + hq * slh + sp, m_i + tl.log2(l_tot), mask=gmask)


# ----------------------------------------------------------------------------- host side
def pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] -> int32 words [..., D*bits/32] (module doc)."""
    words, shift = [], bits
    c = codes.to(torch.int64)
    for p in planes(bits):
        shift -= p
        field = (c >> shift) & ((1 << p) - 1)
        per = 32 // p
        f = field.reshape(*c.shape[:-1], c.shape[-1] // per, per) << (torch.arange(per, device=c.device) * p)
        words.append(f.sum(-1))
    w = torch.cat(words, -1)
    return torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)


def unpack_planes(words: torch.Tensor, bits: int, D: int) -> torch.Tensor:
    w = words.to(torch.int64) & 0xFFFFFFFF
    code, off = torch.zeros(*w.shape[:-1], D, dtype=torch.int64, device=w.device), 0
    for p in planes(bits):
        per = 32 // p
        ch = torch.arange(D, device=w.device)
        field = (w[..., off + ch // per] >> ((ch % per) * p)) & ((1 << p) - 1)
        code, off = (code << p) | field, off + D * p // 32
    return code.to(torch.uint8)


def nuq_table(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Non-uniform levels: the equal-mass quantiles of ``x`` reduced over every dim but ``dim``
    (KVQuant fits its nuqX levels by sensitivity-weighted k-means on calibration data, sec. 3.3;
    the kernel reads any table alike). [x.shape[dim], 2**bits] fp16, sorted."""
    n = 1 << bits
    flat = x.float().movedim(dim, 0).reshape(x.shape[dim], -1)
    if flat.shape[1] > 1 << 16:  # quantiles of a strided sample (torch.quantile caps its input size)
        flat = flat[:, :: flat.shape[1] // (1 << 16) + 1]
    probs = (torch.arange(n, device=x.device, dtype=torch.float32) + 0.5) / n
    return torch.quantile(flat, probs, dim=1).T.contiguous().half()


def nearest_code(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of ``table`` [H, D, L] (keys: per channel) or [H, L] (values) for
    x [B, H, S, D]."""
    t = table.float()
    mid = ((t[..., 1:] + t[..., :-1]) / 2).contiguous()
    B, H, S, D = x.shape
    if t.ndim == 3:
        xs = x.float().permute(1, 3, 0, 2).reshape(H, D, B * S).contiguous()
        return torch.searchsorted(mid, xs).to(torch.uint8).reshape(H, D, B, S).permute(2, 0, 3, 1)
    xs = x.float().transpose(0, 1).reshape(H, -1).contiguous()
    return torch.searchsorted(mid, xs).to(torch.uint8).reshape(H, B, S, D).transpose(0, 1)


def split_outliers(x: torch.Tensor, dense: torch.Tensor, nnz: int) -> torch.Tensor:
    """Per (batch, head) and 16-token row block, the ``nnz`` entries the dense codes miss most:
    int16 [B, H, S/16*nnz, 2] (fp16 bits of x - dense, position token_in_block*D + channel),
    sorted by position."""
    B, H, S, D = x.shape
    err = (x.float() - dense.float()).reshape(B, H, S // RB, RB * D)
    pos = err.abs().topk(nnz, -1).indices.sort(-1).values
    val = torch.gather(err, -1, pos).half()
    return torch.stack([val.view(torch.int16), pos.to(torch.int16)], -1).reshape(B, H, -1, 2).contiguous()


def outlier_dense(out: torch.Tensor, S: int, D: int) -> torch.Tensor:
    """The sparse outliers [B, H, S/16*nnz, 2] as a dense float32 [B, H, S, D] (reference path)."""
    B, H = out.shape[:2]
    val = out[..., 0].view(torch.float16).float().reshape(B, H, S // RB, -1)
    pos = out[..., 1].to(torch.int64).reshape(B, H, S // RB, -1) & 0xFFFF
    dense = torch.zeros(B, H, S // RB, RB * D, device=out.device)
    return dense.scatter_add_(-1, pos, val).reshape(B, H, S, D)


@dataclass
class Side:
    """One of K or V: codes and how to dequantize them."""

    bits: int
    mode: str  # lut | channel | token
    group: int  # tokens per group (channel) or channels per group (token); unused for lut
    words: torch.Tensor
    table: torch.Tensor  # lut: [H, D, L] (keys) or [H, L] (values); else empty
    scale: torch.Tensor  # channel: [B, H, S_q/group, D]; token: [B, H, S_q, D/group]; lut: empty
    zero: torch.Tensor
    outliers: torch.Tensor  # [B, H, S_q/16*nnz, 2] int16, or empty

    def dense(self, D: int, rows: list[int]) -> torch.Tensor:
        """float32 dequantized codes [len(rows), H, S_q, D] of batch rows ``rows`` (no outliers)."""
        code = unpack_planes(self.words[rows], self.bits, D).long()
        if self.mode == "lut":
            t = self.table.float()
            if t.ndim == 3:  # per channel: [H, D, L]
                idx = code.permute(1, 3, 0, 2).reshape(t.shape[0], D, -1)
                return torch.gather(t, 2, idx).reshape(t.shape[0], D, len(rows), -1).permute(2, 0, 3, 1)
            return torch.stack([t[h][code[:, h]] for h in range(t.shape[0])], 1)
        dim = 2 if self.mode == "channel" else 3
        rep = lambda a: a[rows].float().repeat_interleave(self.group, dim)  # noqa: E731
        return code.float() * rep(self.scale) + rep(self.zero)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.table, self.scale, self.zero, self.outliers))


def quantize(x: torch.Tensor, bits: int, mode: str, group: int, nnz: int, key: bool) -> Side:
    """Quantize x [B, H, S_q, D] (S_q a multiple of 16 and of a channel group)."""
    B, H, S, D = x.shape
    empty = x.new_zeros(0, dtype=torch.float16)
    if mode == "lut":  # keys: a table per (head, channel); values: one per head
        table = nuq_table(x, bits, 1) if not key else torch.stack([nuq_table(x[:, h], bits, 2) for h in range(H)])
        code = nearest_code(x, table)
        side = Side(bits, mode, 0, pack_planes(code, bits), table, empty, empty, empty)
    else:
        dim = 2 if mode == "channel" else 3
        shp = x.shape[:dim] + (x.shape[dim] // group, group) + x.shape[dim + 1:]
        xg = x.float().reshape(shp)
        mn, mx = xg.amin(dim + 1), xg.amax(dim + 1)
        scale = ((mx - mn) / ((1 << bits) - 1)).half()
        zero = mn.half()
        code = torch.round((xg - zero.float().unsqueeze(dim + 1)) / scale.float().clamp_min(1e-8).unsqueeze(dim + 1))
        code = code.clamp(0, (1 << bits) - 1).to(torch.uint8).reshape(x.shape)
        side = Side(bits, mode, group, pack_planes(code, bits), empty, scale.contiguous(), zero.contiguous(), empty)
    if nnz:  # one batch row at a time: the float32 dense copy of a whole batch need not fit
        side.outliers = torch.cat([split_outliers(x[b:b + 1], side.dense(D, [b]), nnz) for b in range(B)])
    return side


class PlaneCache:
    """K/V [B, H, S, D] stored as bit-plane codes (+ outliers, + the newest ``residual`` tokens and
    any partial 16-token block in fp16)."""

    def __init__(self, k, v, k_bits, v_bits, k_mode, v_mode, k_group=0, v_group=0, residual=0, outliers=0):
        B, H, S, D = k.shape
        step = math.lcm(RB, k_group if k_mode == "channel" else 1)
        self.seq_q = max(0, (S - residual) // step * step)
        self.n_res, self.head_dim, self.nnz = S - self.seq_q, D, outliers
        sq = self.seq_q
        self.k = quantize(k[:, :, :sq], k_bits, k_mode, k_group, outliers, True)
        self.v = quantize(v[:, :, :sq], v_bits, v_mode, v_group, outliers, False)
        self.k_res = k[:, :, sq:].half().contiguous()
        self.v_res = v[:, :, sq:].half().contiguous()

    def nbytes(self) -> int:
        """Bytes one decode step reads (codes, tables, scales, outliers, the fp16 residual)."""
        return self.k.nbytes() + self.v.nbytes() + sum(t.numel() * 2 for t in (self.k_res, self.v_res))

    def dequant(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 K/V [len(rows), H, S, D]: dense codes + outliers, then the residual (reference)."""
        D, sq = self.head_dim, self.seq_q

        def side(s: Side, res: torch.Tensor) -> torch.Tensor:
            x = s.dense(D, rows) if sq else res.new_zeros(len(rows), res.shape[1], 0, D).float()
            if self.nnz and sq:
                x = x + outlier_dense(s.outliers[rows], sq, D)
            return torch.cat([x, res[rows].float()], 2)
        return side(self.k, self.k_res), side(self.v, self.v_res)


CONFIGS = [dict(BN=64, num_warps=4, num_stages=2, waves=4), dict(BN=32, num_warps=4, num_stages=2, waves=4),
           dict(BN=64, num_warps=8, num_stages=3, waves=8), dict(BN=128, num_warps=8, num_stages=2, waves=4)]


def plane_attention(q, cache: PlaneCache, sm_scale=None, cfg=None, out=None):
    """q [B, Hq, D] -> out [B, Hq, D] fp16: the plane kernel over the quantized tokens, the dense
    kernel over the fp16 residual, one reduce."""
    cfg = cfg or CONFIGS[0]
    B, Hq, D = q.shape
    k, v = cache.k, cache.v
    Hkv = k.words.shape[1]
    group = Hq // Hkv
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    q = q.half().contiguous()
    bn = cfg["BN"]
    sq = cache.seq_q
    nq, tps = pick_splits(B * Hkv, sq, bn, waves=cfg["waves"]) if sq else (0, bn)
    n_tot = nq + (1 if cache.n_res else 0)
    op, lp = alloc_partials(B, Hq, n_tot, D, q.device)
    if nq:
        kp, vp = ((planes(s.bits) + (0, 0))[:3] for s in (k, v))
        arg = lambda t: t if t.numel() else q  # noqa: E731 - q stands in for a tensor the mode does not read
        st = lambda t, i: t.stride(i) if t.numel() else 0  # noqa: E731
        ko, vo = arg(k.outliers), arg(v.outliers)
        _plane_kernel[(B, Hkv, nq)](
            q, k.words, arg(k.table), arg(k.scale), arg(k.zero), v.words, arg(v.table), arg(v.scale), arg(v.zero),
            ko, vo, op, lp,
            q.stride(0), q.stride(1), k.words.stride(0), k.words.stride(1), st(k.table, 0), st(k.scale, 0),
            st(k.scale, 1), v.words.stride(0), v.words.stride(1), st(v.table, 0), st(v.scale, 0), st(v.scale, 1),
            st(k.outliers, 0), st(k.outliers, 1),
            op.stride(0), op.stride(1), op.stride(2), lp.stride(0), lp.stride(1),
            sq, tps, sm_scale * LOG2E,
            GROUP=group, G_PAD=_g_pad(group), D=D, BN=bn, K0=kp[0], K1=kp[1], K2=kp[2], V0=vp[0], V1=vp[1], V2=vp[2],
            KMODE=MODES[k.mode], VMODE=MODES[v.mode], KG=max(k.group, 1), VG=max(v.group, 1), NNZ=cache.nnz,
            NS=max(16, triton.next_power_of_2(bn // RB * cache.nnz)), num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])
    if cache.n_res:
        attend_residual(q, cache.k_res, cache.v_res, op, lp, cache.n_res, nq, sm_scale, group)
    return reduce_partials(op, lp, n_tot, torch.float16, out=out)[0]
