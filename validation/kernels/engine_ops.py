"""The element-wise and MoE-routing kernels of the reference engine, one Triton kernel each, as
vLLM runs them (vllm/_custom_ops.py, csrc/layernorm_kernels.cu, pos_encoding_kernels.cu,
cache_kernels.cu, activation_kernels.cu, csrc/moe/):

  rms_norm            y = x / rms(x) * w                      (first layer; MLA's latent norm, in place)
  fused_add_rms_norm  r += x; x = r / rms(r) * w, in place     (every other norm)
  rotary_embedding    neox RoPE in place on q and k, cos/sin from a per-position cache
  reshape_and_cache   k and v of each new token into its cache slot (slot < 0: skipped)
  silu_and_mul        silu(gate) * up
  moe_topk_softmax    softmax over experts, top-k, renormalized weights
  moe_align           per-expert counts -> group ends (grouped GEMM offsets) and start cursors
  moe_permute         each (token, choice) row copied to its expert's group (atomic cursor; after align)
  moe_unpermute       out[t] = sum_j w[t, j] * rows[t, j] (+ the shared experts' output)
  fp8_group_quant     FP8 activations with one fp32 scale per 1 x 128 group (vLLM's
                      per_token_group_quant_fp8, before each block-FP8 expert GEMM)

Everything reads and writes through explicit strides (q, k, v are views of the fused QKV output;
MLA's latent and RoPE key are views of one row), so no copies are needed around them. Kernels
compute in fp32 and store in the tensors' dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def _warps(block: int) -> int:
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def _pad(n: int) -> int:
    """Tile extent for n heads or choices: a power of two, at least 2 (no one-row tiles)."""
    return max(2, triton.next_power_of_2(n))


# ----------------------------------------------------------------------------- norms
@triton.jit
def _rms_norm_kernel(X, R, W, Y, sx, sr, sy, H, eps, ADD: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row. ADD: z = x + r (rounded to r's dtype, as vLLM stores it) goes back to
    r and is normalized; else x itself."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < H
    x = tl.load(X + row * sx + offs, mask=m, other=0.0).to(tl.float32)
    if ADD:
        z = (x + tl.load(R + row * sr + offs, mask=m, other=0.0).to(tl.float32)).to(R.dtype.element_ty)
        tl.store(R + row * sr + offs, z, mask=m)
        x = z.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, 0) / H + eps)
    w = tl.load(W + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + row * sy + offs, (x * inv * w).to(Y.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H] (any row stride); out may be x itself (in place)."""
    T, H = x.shape
    y = torch.empty_like(x) if out is None else out
    blk = triton.next_power_of_2(H)
    _rms_norm_kernel[(T,)](x, x, w, y, x.stride(0), 0, y.stride(0), H, eps, ADD=False, BLOCK=blk,
                           num_warps=_warps(blk))
    return y


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """In place: residual += x; x = rmsnorm(residual) * w. Returns x."""
    T, H = x.shape
    blk = triton.next_power_of_2(H)
    _rms_norm_kernel[(T,)](x, residual, w, x, x.stride(0), residual.stride(0), x.stride(0), H, eps, ADD=True,
                           BLOCK=blk, num_warps=_warps(blk))
    return x


# ----------------------------------------------------------------------------- RoPE
def rope_cache(max_pos: int, rot_dim: int, device, base: float = 10000.0) -> torch.Tensor:
    """[max_pos, rot_dim] fp32: cos of each frequency in the first half, sin in the second
    (vLLM's cos_sin_cache; base 10000 as Llama-2, the engine's weights are random anyway)."""
    inv = 1.0 / (base ** (torch.arange(0, rot_dim, 2, device=device, dtype=torch.float64) / rot_dim))
    ang = torch.arange(max_pos, device=device, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([ang.cos(), ang.sin()], -1).float()


@triton.jit
def _rope_heads(P, t, sp_t, sp_h, n_heads, cos, sin, offs, hmask_d, HALF: tl.constexpr, H_PAD: tl.constexpr):
    h = tl.arange(0, H_PAD)
    m = (h < n_heads)[:, None] & hmask_d[None, :]
    p = P + t * sp_t + h[:, None] * sp_h + offs[None, :]
    x1 = tl.load(p, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(p + HALF, mask=m, other=0.0).to(tl.float32)
    tl.store(p, (x1 * cos[None, :] - x2 * sin[None, :]).to(P.dtype.element_ty), mask=m)
    tl.store(p + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(P.dtype.element_ty), mask=m)


@triton.jit
def _rope_kernel(POS, Q, K, CS, sq_t, sq_h, sk_t, sk_h, s_cs, n_q, n_k,
                 HALF: tl.constexpr, HALF_PAD: tl.constexpr, HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr):
    """One program per token: every q head and every k head rotated in place (neox halves)."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    offs = tl.arange(0, HALF_PAD)
    dm = offs < HALF
    cos = tl.load(CS + pos * s_cs + offs, mask=dm, other=0.0)
    sin = tl.load(CS + pos * s_cs + HALF + offs, mask=dm, other=0.0)
    _rope_heads(Q, t, sq_t, sq_h, n_q, cos, sin, offs, dm, HALF, HQ_PAD)
    _rope_heads(K, t, sk_t, sk_h, n_k, cos, sin, offs, dm, HALF, HK_PAD)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """In place. q [T, Hq, R], k [T, Hk, R] (views with any token/head strides, last dim
    contiguous; R = the rotary dim); positions [T] int64; cos_sin = rope_cache(...)."""
    T, n_q, rot = q.shape
    n_k = k.shape[1]
    half = rot // 2
    _rope_kernel[(T,)](positions, q, k, cos_sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
                       n_q, n_k, HALF=half, HALF_PAD=triton.next_power_of_2(half),
                       HQ_PAD=_pad(n_q), HK_PAD=_pad(n_k), num_warps=4)


# ----------------------------------------------------------------------------- KV cache write
@triton.jit
def _cache_kernel(K, V, KC, VC, SLOT, sk, sv, s_slot, W, HAS_V: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOT + t).to(tl.int64)
    for c0 in range(0, W, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        m = (offs < W) & (slot >= 0)
        tl.store(KC + slot * s_slot + offs, tl.load(K + t * sk + offs, mask=m), mask=m)
        if HAS_V:
            tl.store(VC + slot * s_slot + offs, tl.load(V + t * sv + offs, mask=m), mask=m)


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor | None,
                      slot_mapping: torch.Tensor) -> None:
    """k, v [T, W] rows (W = kv heads x head dim, contiguous within the row); caches [slots, ...]
    with W contiguous elements per slot; slot_mapping [T] int64 (negative: skip the token).
    v None: one stream only (MLA's latent + RoPE key row)."""
    T, W = k.shape
    blk = min(4096, triton.next_power_of_2(W))
    _cache_kernel[(T,)](k, v if v is not None else k, k_cache, v_cache if v_cache is not None else k_cache,
                        slot_mapping, k.stride(0), v.stride(0) if v is not None else 0, k_cache.stride(0), W,
                        HAS_V=v is not None, BLOCK=blk, num_warps=_warps(blk))


# ----------------------------------------------------------------------------- activation
@triton.jit
def _silu_mul_kernel(GU, Y, s_gu, s_y, inter, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < inter
    g = tl.load(GU + t * s_gu + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(GU + t * s_gu + inter + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + t * s_y + offs, (g / (1.0 + tl.exp(-g)) * u).to(Y.dtype.element_ty), mask=m)


def silu_and_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu [T, 2I] (gate | up) -> [T, I]."""
    T, two_i = gu.shape
    inter = two_i // 2
    y = torch.empty(T, inter, device=gu.device, dtype=gu.dtype)
    blk = 1024
    _silu_mul_kernel[(T, triton.cdiv(inter, blk))](gu, y, gu.stride(0), y.stride(0), inter, BLOCK=blk, num_warps=4)
    return y


# ----------------------------------------------------------------------------- FP8 activations
FP8_MAX = 448.0  # largest float8_e4m3fn value
QUANT_GROUP = 128  # the block-FP8 checkpoints' activation group (weight_block_size[1])


@triton.jit
def _group_quant_kernel(X, Q, S, s_x, s_q, rows, width, groups, G: tl.constexpr, ROWS: tl.constexpr,
                        FMAX: tl.constexpr):
    # one program per (ROWS rows, one 128-wide group): a tile of whole groups, each scaled by its own max
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    g = tl.program_id(1)
    offs = g * G + tl.arange(0, G)
    m = (r < rows)[:, None] & (offs < width)[None, :]
    r64 = r.to(tl.int64)[:, None]
    x = tl.load(X + r64 * s_x + offs[None, :], mask=m, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 1), 1e-10) / FMAX
    tl.store(Q + r64 * s_q + offs[None, :], tl.clamp(x / scale[:, None], -FMAX, FMAX).to(Q.dtype.element_ty), mask=m)
    tl.store(S + r.to(tl.int64) * groups + g, scale, mask=r < rows)


def fp8_group_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, W] -> (float8_e4m3fn [R, W], fp32 scales [R, ceil(W / 128)]): each 1 x 128 group divided by
    its absolute maximum / 448 (vLLM's per_token_group_quant_fp8)."""
    R, W = x.shape
    groups = triton.cdiv(W, QUANT_GROUP)
    q = torch.empty(R, W, device=x.device, dtype=torch.float8_e4m3fn)
    scales = torch.empty(R, groups, device=x.device, dtype=torch.float32)
    rows = 16 if R >= 16 else _pad(R)
    _group_quant_kernel[(triton.cdiv(R, rows), groups)](x, q, scales, x.stride(0), q.stride(0), R, W, groups,
                                                        G=QUANT_GROUP, ROWS=rows, FMAX=FP8_MAX, num_warps=4)
    return q, scales


# ----------------------------------------------------------------------------- MoE routing
@triton.jit
def _topk_softmax_kernel(LOGITS, WTS, IDS, s_l, T, E, K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                         BLOCK_T: tl.constexpr, RENORM: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rm = rows < T
    e = tl.arange(0, E_PAD)
    x = tl.load(LOGITS + rows[:, None].to(tl.int64) * s_l + e[None, :], mask=rm[:, None] & (e < E)[None, :],
                other=float("-inf")).to(tl.float32)
    x = tl.where(rm[:, None], x, 0.0)  # rows past T: finite, never stored
    p = tl.exp(x - tl.max(x, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    kk = tl.arange(0, K_PAD)
    wt = tl.zeros([BLOCK_T, K_PAD], tl.float32)
    it = tl.zeros([BLOCK_T, K_PAD], tl.int32)
    for j in tl.static_range(K):  # k rounds of arg-max (lowest index on ties), each winner masked out
        best = tl.max(p, 1)
        idx = tl.min(tl.where(p == best[:, None], e[None, :], E_PAD), 1)
        wt = tl.where(kk[None, :] == j, best[:, None], wt)
        it = tl.where(kk[None, :] == j, idx[:, None], it)
        p = tl.where(e[None, :] == idx[:, None], -1.0, p)
    if RENORM:
        wt = wt / tl.sum(wt, 1)[:, None]
    m = rm[:, None] & (kk < K)[None, :]
    off = rows[:, None] * K + kk[None, :]
    tl.store(WTS + off, wt, mask=m)
    tl.store(IDS + off, it, mask=m)


def moe_topk_softmax(logits: torch.Tensor, k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] fp32, expert ids [T, k] int32), best first."""
    T, E = logits.shape
    wts = torch.empty(T, k, device=logits.device, dtype=torch.float32)
    ids = torch.empty(T, k, device=logits.device, dtype=torch.int32)
    e_pad = triton.next_power_of_2(E)
    bt = max(1, min(64, 4096 // e_pad))
    _topk_softmax_kernel[(triton.cdiv(T, bt),)](logits, wts, ids, logits.stride(0), T, E, K=k,
                                                K_PAD=_pad(k), E_PAD=e_pad, BLOCK_T=bt,
                                                RENORM=renormalize, num_warps=4)
    return wts, ids


@triton.jit
def _align_kernel(IDS, ENDS, CURSOR, N, E, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """One program: histogram of the N expert ids, then group ends (inclusive prefix sum) and each
    group's first row (the permute kernel's atomic cursors)."""
    cnt = tl.zeros([E_PAD], tl.int32)
    for c0 in range(0, N, CHUNK):
        i = c0 + tl.arange(0, CHUNK)
        m = i < N
        cnt += tl.histogram(tl.load(IDS + i, mask=m, other=0), E_PAD, mask=m)
    ends = tl.cumsum(cnt, 0)
    e = tl.arange(0, E_PAD)
    tl.store(ENDS + e, ends, mask=e < E)
    tl.store(CURSOR + e, ends - cnt, mask=e < E)


@triton.jit
def _permute_kernel(X, IDS, CURSOR, XS, INV, sx, sxs, N, H, K: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_H: tl.constexpr):
    i = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    m = i < N
    e = tl.load(IDS + i, mask=m, other=0)
    pos = tl.atomic_add(CURSOR + e, 1, mask=m).to(tl.int64)  # this row's place in its expert's group
    tl.store(INV + i, pos.to(tl.int32), mask=m)
    tok = (i // K).to(tl.int64)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        mm = m[:, None] & (hh < H)[None, :]
        tl.store(XS + pos[:, None] * sxs + hh[None, :], tl.load(X + tok[:, None] * sx + hh[None, :], mask=mm), mask=mm)


def moe_align(ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (group ends [E] int32: the grouped GEMM's offsets, cursors [E] int32: each
    group's first row, consumed by the permute kernel)."""
    ends = torch.empty(n_experts, device=ids.device, dtype=torch.int32)
    cursor = torch.empty_like(ends)
    _align_kernel[(1,)](ids, ends, cursor, ids.numel(), n_experts, E_PAD=triton.next_power_of_2(n_experts),
                        CHUNK=4096, num_warps=8)
    return ends, cursor


def moe_permute(x: torch.Tensor, ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], ids [T, k] -> (rows [T*k, H] grouped by expert, group ends [E] int32, inv [T*k]
    int32: where row (t, j) went). Two kernels: align, permute. Rows within a group are in atomic
    order; each row's result does not depend on it."""
    T, H = x.shape
    k = ids.shape[1]
    n = T * k
    ends, cursor = moe_align(ids, n_experts)
    xs = torch.empty(n, H, device=x.device, dtype=x.dtype)
    inv = torch.empty(n, device=x.device, dtype=torch.int32)
    br = 16
    _permute_kernel[(triton.cdiv(n, br),)](x, ids, cursor, xs, inv, x.stride(0), xs.stride(0), n, H, K=k, BLOCK_R=br,
                                           BLOCK_H=256, num_warps=4)
    return xs, ends, inv


@triton.jit
def _unpermute_kernel(ROWS, INV, WTS, SH, OUT, s_rows, s_sh, s_out, H, K: tl.constexpr, K_PAD: tl.constexpr,
                      BLOCK_H: tl.constexpr, HAS_SHARED: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = hh < H
    kk = tl.arange(0, K_PAD)
    km = kk < K
    r = tl.load(INV + t * K + kk, mask=km, other=0).to(tl.int64)
    w = tl.load(WTS + t * K + kk, mask=km, other=0.0)
    v = tl.load(ROWS + r[:, None] * s_rows + hh[None, :], mask=km[:, None] & hm[None, :], other=0.0).to(tl.float32)
    acc = tl.sum(v * w[:, None], 0)
    if HAS_SHARED:
        acc += tl.load(SH + t * s_sh + hh, mask=hm, other=0.0).to(tl.float32)
    tl.store(OUT + t * s_out + hh, acc.to(OUT.dtype.element_ty), mask=hm)


def moe_unpermute(rows: torch.Tensor, inv: torch.Tensor, wts: torch.Tensor,
                  shared: torch.Tensor | None = None) -> torch.Tensor:
    """rows [T*k, H] (expert outputs in group order), inv [T*k], wts [T, k] -> [T, H] weighted
    sum per token, plus `shared` [T, H] (the shared experts' output) when given."""
    T, k = wts.shape
    H = rows.shape[1]
    out = torch.empty(T, H, device=rows.device, dtype=rows.dtype)
    bh = 512
    sh = shared if shared is not None else out
    _unpermute_kernel[(T, triton.cdiv(H, bh))](rows, inv, wts, sh, out, rows.stride(0), sh.stride(0), out.stride(0), H,
                                               K=k, K_PAD=_pad(k), BLOCK_H=bh,
                                               HAS_SHARED=shared is not None, num_warps=4)
    return out
