"""Routed-expert GEMMs the way vLLM's Triton fused-MoE path runs them on Hopper (the kernel NVIDIA
aiconfigurator's database records for vLLM 0.19's bf16, FP8 and block-FP8 MoE layers on H200,
kernel_source vllm_fused_moe; for 0.24 it also records a FlashInfer CUTLASS path): the (token, expert)
pairs sorted by expert and each expert's pairs padded to a multiple of BLOCK_M (vLLM's
moe_align_block_size), then one Triton program per (BLOCK_M rows of one expert, BLOCK_N output
columns) over weights stored [E, N, K]. Written for kvsim from the algorithm's description in vLLM
(model_executor/layers/fused_moe/fused_moe.py: the grid, the early exit past the padded length, the
small-batch cap on the grid); no vLLM code is copied.

Precisions (``mode``):
  bf16       bf16 activations and weights;
  fp8        FP8 W8A8, per-tensor scales (one activation scale, one weight scale per expert), applied
             once after the K loop;
  fp8_block  FP8 W8A8 with 128x128 weight blocks and 1x128 activation groups (the scales of DeepSeek-V3
             and Qwen3-FP8 checkpoints), applied at every K step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MODES = ("bf16", "fp8", "fp8_block")
GROUP = 128  # block-scale group along N and K (the checkpoints' weight_block_size)
FP8_MAX = 448.0  # largest float8_e4m3fn value


@triton.jit
def _moe_gemm(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, sorted_ptr, expert_ptr, padded_ptr,
              N, K, EM, n_pairs, stride_am, stride_be, stride_bn, stride_cm,
              stride_asm, stride_bse, stride_bsn,
              TOP_K: tl.constexpr, MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              GROUP_M: tl.constexpr, G: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(EM, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n  # grouped ordering: GROUP_M row blocks share each column block in L2
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    if pid_m * BM >= tl.load(padded_ptr):
        return  # past the last expert's padded rows
    pair = tl.load(sorted_ptr + pid_m * BM + tl.arange(0, BM).to(tl.int64))
    valid = pair < n_pairs  # padding slots hold n_pairs
    expert = tl.load(expert_ptr + pid_m).to(tl.int64)
    offs_n = (pid_n * BN + tl.arange(0, BN).to(tl.int64)) % N
    offs_k = tl.arange(0, BK)
    a_rows = a_ptr + (pair // TOP_K)[:, None] * stride_am
    b_cols = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BK)):
        k = kb * BK + offs_k
        a = tl.load(a_rows + k[None, :], mask=valid[:, None] & (k[None, :] < K), other=0.0)
        b = tl.load(b_cols + k[:, None], mask=k[:, None] < K, other=0.0)
        if MODE == 2:  # block scales: activation group of this K step, weight block of (N block, K block)
            sa = tl.load(as_ptr + (pair // TOP_K) * stride_asm + (kb * BK) // G, mask=valid, other=0.0)
            sb = tl.load(bs_ptr + expert * stride_bse + (offs_n // G) * stride_bsn + (kb * BK) // G)
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        else:
            acc = tl.dot(a, b, acc=acc)
    if MODE == 1:
        acc = acc * tl.load(as_ptr) * tl.load(bs_ptr + expert)
    out_n = pid_n * BN + tl.arange(0, BN)
    tl.store(c_ptr + pair[:, None] * stride_cm + out_n[None, :], acc.to(tl.bfloat16),
             mask=valid[:, None] & (out_n[None, :] < N))


def align(topk_ids: torch.Tensor, experts: int, block_m: int):
    """(sorted pair ids padded per expert to a multiple of block_m, expert of each row block, padded
    length) as vLLM's moe_align_block_size lays them out; the id buffer is sized for the worst case
    (pairs + experts x (block_m - 1)), padding slots hold the pair count."""
    flat = topk_ids.flatten().to(torch.int64)
    n = flat.numel()
    counts = torch.bincount(flat, minlength=experts)
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    order = torch.argsort(flat, stable=True)
    rank = torch.arange(n, device=flat.device) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    ids = torch.full((n + experts * (block_m - 1),), n, dtype=torch.int32, device=flat.device)
    ids[starts[flat[order]] + rank] = order.to(torch.int32)
    blocks = torch.repeat_interleave(torch.arange(experts, device=flat.device, dtype=torch.int32), padded // block_m)
    expert_ids = torch.zeros(ids.numel() // block_m + 1, dtype=torch.int32, device=flat.device)
    expert_ids[:blocks.numel()] = blocks
    return ids, expert_ids, padded.sum().reshape(1).to(torch.int32)


def quantize_weights(w: torch.Tensor, mode: str):
    """(weights, scales) of one precision [E, N, K]: absmax scales per expert (fp8) or per 128x128 block
    (fp8_block, [E, N/128, K/128]); None for bf16."""
    if mode == "bf16":
        return w, None
    if mode == "fp8":
        sb = w.abs().amax(dim=(1, 2)).float() / FP8_MAX
        return (w.float() / sb[:, None, None]).to(torch.float8_e4m3fn), sb
    E, N, K = w.shape
    kg, ng = triton.cdiv(K, GROUP), triton.cdiv(N, GROUP)
    wp = torch.nn.functional.pad(w.float(), (0, kg * GROUP - K, 0, ng * GROUP - N)).view(E, ng, GROUP, kg, GROUP)
    sb = wp.abs().amax(dim=(2, 4)).clamp_min(1e-12) / FP8_MAX
    wq = (wp / sb[:, :, None, :, None]).view(E, ng * GROUP, kg * GROUP)[:, :N, :K].to(torch.float8_e4m3fn)
    return wq.contiguous(), sb.contiguous()


def quantize_acts(x: torch.Tensor, mode: str):
    """(activations, scales) [M, K]: one absmax scale (fp8) or one per 1x128 group (fp8_block, [M, K/128])."""
    if mode == "bf16":
        return x, None
    if mode == "fp8":
        sa = (x.abs().amax().float() / FP8_MAX).reshape(1)
        return (x.float() / sa).to(torch.float8_e4m3fn), sa
    M, K = x.shape
    kg = triton.cdiv(K, GROUP)
    xp = torch.nn.functional.pad(x.float(), (0, kg * GROUP - K)).view(M, kg, GROUP)
    sa = xp.abs().amax(-1).clamp_min(1e-12) / FP8_MAX
    return (xp / sa[..., None]).view(M, -1)[:, :K].to(torch.float8_e4m3fn), sa.contiguous()


def dequantized_weights(wq, sb, mode: str) -> torch.Tensor:
    """float32 weights the kernel multiplies by (the reference's)."""
    if mode == "bf16":
        return wq.float()
    if mode == "fp8":
        return wq.float() * sb[:, None, None]
    _, N, K = wq.shape
    return wq.float() * sb.repeat_interleave(GROUP, 1).repeat_interleave(GROUP, 2)[:, :N, :K]


def dequantized_acts(xq, sa, mode: str) -> torch.Tensor:
    """float32 activations the kernel multiplies by."""
    if mode == "bf16":
        return xq.float()
    if mode == "fp8":
        return xq.float() * sa
    return xq.float() * sa.repeat_interleave(GROUP, 1)[:, :xq.shape[1]]


def moe_gemm(xq, wq, sa, sb, topk_ids, mode: str, cfg: dict):
    """A closure launching the GEMM out[pair] = x[pair // top_k] @ w[expert of pair]^T (bf16
    [tokens x top_k, N]) on routing aligned once, outside it: vLLM aligns once per layer for both
    GEMMs (elementwise.csv times that step as moe_align), so a timed CUDA graph replays the GEMM alone."""
    M, K = xq.shape
    E, N, _ = wq.shape
    top_k = topk_ids.shape[1]
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    if mode == "fp8_block" and bk != GROUP:
        raise ValueError(f"fp8_block needs BK = {GROUP} (one scale per K step), got {bk}")
    ids, experts, padded = align(topk_ids, E, bm)
    em = ids.numel() if M >= bm else min(ids.numel(), M * top_k * bm)  # vLLM's small-batch grid cap
    c = torch.empty(M * top_k, N, device=xq.device, dtype=torch.bfloat16)
    dummy = torch.zeros(1, device=xq.device, dtype=torch.float32)
    a_s = sa if sa is not None else dummy
    b_s = sb if sb is not None else dummy
    grid = (triton.cdiv(em, bm) * triton.cdiv(N, bn),)
    block = mode == "fp8_block"
    stride_asm = a_s.stride(0) if block else 0
    stride_bse, stride_bsn = (b_s.stride(0), b_s.stride(1)) if block else (0, 0)

    def launch():
        _moe_gemm[grid](xq, wq, c, a_s, b_s, ids, experts, padded, N, K, em, M * top_k,
                        xq.stride(0), wq.stride(0), wq.stride(1), c.stride(0), stride_asm, stride_bse, stride_bsn,
                        TOP_K=top_k, MODE=MODES.index(mode), BM=bm, BN=bn, BK=bk, GROUP_M=cfg["GROUP_M"], G=GROUP,
                        num_warps=cfg["warps"], num_stages=cfg["stages"])
        return c

    return launch


def reference(x: torch.Tensor, w: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """float32 [tokens x top_k, N]: each pair's row times its expert's weights."""
    top_k = topk_ids.shape[1]
    flat = topk_ids.flatten()
    out = torch.empty(flat.numel(), w.shape[1], device=x.device, dtype=torch.float32)
    for e in flat.unique().tolist():
        rows = (flat == e).nonzero().flatten()
        out[rows] = x[rows // top_k] @ w[e].t()
    return out
