"""W4A16 GEMM as vLLM runs 4-bit weights on Hopper: each weight tile is loaded packed (two 4-bit values a
byte), dequantized in registers with its group's bf16 scale and fed to a bf16 tensor-core MMA. That is the
design of Marlin and Machete (GPTQ/AWQ checkpoints) and of triton_kernels' matmul_ogs (gpt-oss's MXFP4
experts on Hopper); none of them can run here without vLLM, so this Triton kernel stands in for them.
torch._weight_int4pack_mm (tinygemm, gemm.csv's dtype w4a16) is a decode kernel that levels off near
30 TFLOP/s and is not fitted (kvsim/calibrate.py).

Layout: y[M, N] = x[M, K] @ W[K, N] with W = (q - 8) * scale, q in 0..15, one bf16 scale per GROUP rows of
K per column (symmetric, as GPTQ's and MXFP4's scales are). Within each GROUP-row tile, byte [j, n] holds
rows j (low nibble) and j + GROUP/2 (high nibble), so a tile dequantizes into two GROUP/2-deep MMAs
without shuffling nibbles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

GROUP = 128  # weights per scale along K (GPTQ's group size; MXFP4's is 32 with a shared exponent)
HALF = GROUP // 2
# (BLOCK_N, warps, stages, split_k): tried per (M, N, K), the fastest kept; BLOCK_M follows M. Split-K
# (each program one K slice, fp32 partials summed after) keeps the SMs busy when few rows leave few
# output tiles, as vLLM's small-batch 4-bit kernels do (Marlin's and matmul_ogs's split-K).
TILINGS_N = [(64, 4, 3, 1), (128, 4, 3, 1), (128, 8, 4, 1), (256, 8, 3, 1), (64, 4, 4, 4), (64, 4, 4, 8),
             (128, 4, 4, 16)]
SPLIT_MAX_M = 64  # split-K tilings are tried only up to this many rows


def block_m(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128


@triton.jit
def _w4a16(a_ptr, b_ptr, s_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_sg, stride_cm, stride_cs,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HALF_K: tl.constexpr, GROUP_M: tl.constexpr,
           SPLIT_K: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n  # grouped launch order: neighbouring programs share weight tiles in L2
    first_m = (pid // width) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rh = tl.arange(0, HALF_K)
    m_ok = rm[:, None] < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    groups = K // (2 * HALF_K)
    for g in range(split * groups // SPLIT_K, (split + 1) * groups // SPLIT_K):
        k0 = g * 2 * HALF_K
        a_lo = tl.load(a_ptr + rm[:, None] * stride_am + (k0 + rh)[None, :], mask=m_ok, other=0.0)
        a_hi = tl.load(a_ptr + rm[:, None] * stride_am + (k0 + HALF_K + rh)[None, :], mask=m_ok, other=0.0)
        p = tl.load(b_ptr + (g * HALF_K + rh)[:, None] * stride_bk + rn[None, :], mask=n_ok[None, :], other=0)
        s = tl.load(s_ptr + g * stride_sg + rn, mask=n_ok, other=0.0).to(tl.float32)
        # dequantized to the activations' type (bf16 on the GPU; fp32 under the CPU interpreter, whose
        # numpy has no bf16)
        w_lo = (((p & 15).to(tl.float32) - 8.0) * s[None, :]).to(a_ptr.dtype.element_ty)
        w_hi = (((p >> 4).to(tl.float32) - 8.0) * s[None, :]).to(a_ptr.dtype.element_ty)
        acc = tl.dot(a_lo, w_lo, acc)
        acc = tl.dot(a_hi, w_hi, acc)
    # split-K: slice `split`'s fp32 partial sums (stride_cs apart); else the result in the output's type
    tl.store(c_ptr + split * stride_cs + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=m_ok & n_ok[None, :])


def make_weights(n: int, k: int, device: str = "cuda", generator: torch.Generator | None = None):
    """Random 4-bit weights for W[K, N]: (packed uint8 [K/2, N], bf16 scales [K/GROUP, N], float32 W)."""
    q = torch.randint(0, 16, (k, n), dtype=torch.uint8, device=device, generator=generator)
    packed = pack(q)
    scales = (torch.rand(k // GROUP, n, device=device, generator=generator) * 0.02 + 0.005).to(torch.bfloat16)
    return packed, scales, (q.float() - 8.0) * scales.float().repeat_interleave(GROUP, dim=0)


def pack(q: torch.Tensor) -> torch.Tensor:
    """4-bit values q [K, N] (0..15) in the kernel's layout: per GROUP rows, row j low, row j + HALF high."""
    k, n = q.shape
    tiles = q.view(k // GROUP, 2, HALF, n)
    return (tiles[:, 0] | (tiles[:, 1] << 4)).reshape(k // 2, n).contiguous()


def matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, tiling: tuple[int, int, int, int],
           out: torch.Tensor | None = None) -> torch.Tensor:
    m, k = x.shape
    n = packed.shape[1]
    bn, warps, stages, split = tiling
    bm = block_m(m)
    c = out if out is not None else torch.empty(m, n, device=x.device, dtype=x.dtype)
    dst = c if split == 1 else torch.empty(split, m, n, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
    _w4a16[grid](x, packed, scales, dst, m, n, k, x.stride(0), packed.stride(0), scales.stride(0), dst.stride(-2),
                 dst.stride(0) if split > 1 else 0, BLOCK_M=bm, BLOCK_N=bn, HALF_K=HALF, GROUP_M=8, SPLIT_K=split,
                 num_warps=warps, num_stages=stages)
    if split > 1:
        torch.sum(dst, dim=0, out=c) if c.dtype == torch.float32 else c.copy_(dst.sum(dim=0))
    return c
