"""Pure-numpy reference of the KIVI-style group quantisation and bit packing used by
validation/kernels (no torch).  Also the byte counts that decode attention must read.

Layout (per batch, kv head):
  keys   : quantised per channel, groups of G tokens along the token axis
           -> codes [S_q, D] (uint, `kbits`), scale/zero [S_q/G, D] fp16
  values : quantised per token, groups of G channels
           -> codes [S_q, D] (uint, `vbits`), scale/zero [S_q, D/G] fp16
  residual: the most recent n_res tokens kept in fp16 (K and V, [n_res, D] each)
Packing (both K and V): along the channel axis, "blocked": with per = 8 // bits and W = D // per,
byte c (0 <= c < W) of a token row holds channel j*W + c at bits [j*bits, (j+1)*bits) for j < per,
so unpacking bit-field j yields the contiguous channel slice [j*W, (j+1)*W) (no shuffles in the kernel).
"""
from __future__ import annotations

import numpy as np


def per_byte(bits: int) -> int:
    assert bits in (1, 2, 4, 8)
    return 8 // bits


def quantize_groups(x: np.ndarray, bits: int, group: int, axis: int):
    """Asymmetric min/max quantisation of x in groups of `group` along `axis`.
    Returns (codes uint8 same shape as x, scale fp16, zero fp16) with scale/zero of
    shape x.shape with axis length divided by group.  Dequant: codes*scale + zero."""
    x = np.asarray(x, dtype=np.float32)
    axis = axis % x.ndim
    n = x.shape[axis]
    assert n % group == 0, (n, group)
    shp = x.shape[:axis] + (n // group, group) + x.shape[axis + 1 :]
    xg = x.reshape(shp)
    mn = xg.min(axis=axis + 1, keepdims=True)
    mx = xg.max(axis=axis + 1, keepdims=True)
    qmax = (1 << bits) - 1
    scale = ((mx - mn) / qmax).astype(np.float16)
    zero = mn.astype(np.float16)
    s32 = np.maximum(scale.astype(np.float32), 1e-8)
    codes = np.clip(np.rint((xg - zero.astype(np.float32)) / s32), 0, qmax).astype(np.uint8)
    return codes.reshape(x.shape), np.squeeze(scale, axis + 1), np.squeeze(zero, axis + 1)


def dequantize_groups(codes, scale, zero, group: int, axis: int):
    axis = axis % codes.ndim
    s = np.repeat(scale.astype(np.float32), group, axis=axis)
    z = np.repeat(zero.astype(np.float32), group, axis=axis)
    return codes.astype(np.float32) * s + z


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint codes along the last axis (blocked): out[..., c] = sum_j codes[..., j*W + c] << (j*bits)."""
    per = per_byte(bits)
    c = np.asarray(codes, dtype=np.uint8)
    assert c.shape[-1] % per == 0
    w = c.shape[-1] // per
    c = c.reshape(c.shape[:-1] + (per, w)).astype(np.uint32)
    out = np.zeros(c.shape[:-2] + (w,), dtype=np.uint32)
    for j in range(per):
        out |= (c[..., j, :] & ((1 << bits) - 1)) << (j * bits)
    return out.astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    per = per_byte(bits)
    p = np.asarray(packed, dtype=np.uint8).astype(np.uint32)
    parts = [((p >> (j * bits)) & ((1 << bits) - 1)) for j in range(per)]
    return np.concatenate(parts, axis=-1).astype(np.uint8)


def split_residual(seq_len: int, group: int = 32, residual: int = 128) -> tuple[int, int]:
    """(quantised tokens, fp16 residual tokens).  Quantised part is a multiple of `group`;
    the residual holds the newest `residual` tokens plus any partial group (KIVI)."""
    if seq_len <= residual:
        return 0, seq_len
    sq = ((seq_len - residual) // group) * group
    return sq, seq_len - sq


def kivi_bytes(batch: int, kv_heads: int, seq_len: int, head_dim: int, kbits: int, vbits: int,
               group: int = 32, residual: int = 128, scale_bytes: int = 2, res_bytes: int = 2) -> dict:
    """Bytes a decode step must read from the KIVI cache (all layers' worth for one layer)."""
    sq, nr = split_residual(seq_len, group, residual)
    bh = batch * kv_heads
    k_codes = bh * sq * head_dim * kbits // 8
    v_codes = bh * sq * head_dim * vbits // 8
    k_meta = bh * (sq // group) * head_dim * 2 * scale_bytes
    v_meta = bh * sq * (head_dim // group) * 2 * scale_bytes
    res = bh * nr * head_dim * 2 * res_bytes
    total = k_codes + v_codes + k_meta + v_meta + res
    return dict(k_codes=k_codes, v_codes=v_codes, k_meta=k_meta, v_meta=v_meta, residual=res,
                total=total, quant_tokens=sq, residual_tokens=nr)


def dense_kv_bytes(batch: int, kv_heads: int, seq_len: int, head_dim: int, elem_bytes: float,
                   v_head_dim: int | None = None) -> int:
    vd = head_dim if v_head_dim is None else v_head_dim
    return int(batch * kv_heads * seq_len * (head_dim + vd) * elem_bytes)
