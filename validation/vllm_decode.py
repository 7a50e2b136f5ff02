"""vLLM's own decode attention kernel for dense (non-MLA) models on Hopper: FlashAttention 3, as vLLM's
FlashAttention backend runs a decode step.

vLLM's FlashAttention backend (vllm/v1/attention/backends/flash_attn.py, vLLM 0.24.0) runs decode through
the same ``torch.ops._vllm_fa3_C.fwd`` call as a prefill (validation/vllm_prefill.py: the library, the
argument list and the precomputed scheduler metadata are that part's): a varlen query of one token per
sequence (cu_seqlens_q 0, 1, ..., B), the keys and values read from the paged cache (16-token blocks
scattered over the pool) through the block table and seqused_k, causal, softmax scale 1/sqrt(head_dim),
bf16. The builder's max_num_splits is 32 when the step has at most max_cudagraph_capture_size (512)
tokens, which every decode batch here has (FULL_AND_PIECEWISE: decode steps run in full CUDA graphs).
Shapes: the dense stand-in kernel's (bench_attention.py's bf16 path, method triton_bf16: 28/4, 32/32,
32/8, 64/8 query/KV heads at head_dim 128, 71/1 at 64, 8/1 at 256) at batches 1-256 and caches of
512-131,072 tokens, up to 8 GiB of cache. Each point is checked against a float32 attention of the first
and last sequence (output poisoned first), before and after the timed calls, and timed in a CUDA graph
with the L2 flushed before each call. Rows go to attention_decode.csv as method ``vllm_fa3`` with
kvsim_spec bf16, phase decode, one layer: ``kvsim calibrate`` fits ``attention_decode`` (the dense
family) from them and keeps the stand-in's rows as ``attention_decode.reference`` for the reference
engine (kvsim.measured.VLLM_DECODE_KERNELS).

  python3 validation/vllm_decode.py --out OUT --budget-s 200 [--quick]
"""
from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from validation.common import Budget, bench, guarded, log, params_str, part_args, rel_error  # noqa: E402
from validation.kernels.bench_common import MAX_BYTES  # noqa: E402
from validation.kernels.engine_ops import FP8_MAX  # noqa: E402
from validation.vllm_prefill import BLOCK, GRAPH_TOKENS, SPLITS_FOR_GRAPH, start  # noqa: E402

HEADS = [(32, 8, 128), (64, 8, 128), (28, 4, 128), (32, 32, 128), (8, 1, 256), (71, 1, 64)]
BATCHES = [1, 16, 256, 4, 64]  # in the order they are run: a short budget still spans small and large
CONTEXTS = [2048, 32768, 512, 8192, 131072]
COLUMNS = ["method", "batch", "q_heads", "kv_heads", "head_dim", "context", "params", "time_s", "bytes_read",
           "flops", "rel_error", "kvsim_spec", "phase", "layers"]


def inputs(B, Hkv, Hq, D, S, gen):
    """One query token per sequence (B, Hq, D), a paged cache [blocks, 2, BLOCK, Hkv, D] (FlashAttention
    backend's NHD layout) holding S tokens per sequence in blocks scattered over the pool, split into key and
    value caches (kv_cache.unbind(1)), and the block table."""
    nblk = S // BLOCK
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    kv_cache = torch.randn(B * nblk, 2, BLOCK, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    table = torch.randperm(B * nblk, device="cuda", generator=gen).to(torch.int32).view(B, nblk)
    key_cache, value_cache = kv_cache.unbind(1)
    return q, key_cache, value_cache, table


def reference(q, key_cache, value_cache, table, S, b, scales=(1.0, 1.0, 1.0)):
    """float32 attention of sequence ``b``'s query over its S cached tokens, (Hq, D); ``scales`` dequantize
    an FP8 query, keys and values."""
    Hq, D = q.shape[1], q.shape[2]
    Hkv = key_cache.shape[2]
    sq, sk, sv = scales
    k = key_cache[table[b].long()].reshape(-1, Hkv, D)[:S].float().repeat_interleave(Hq // Hkv, 1) * sk  # (S, Hq, D)
    v = value_cache[table[b].long()].reshape(-1, Hkv, D)[:S].float().repeat_interleave(Hq // Hkv, 1) * sv
    s = torch.einsum("hd,shd->hs", q[b].float() * sq, k) / math.sqrt(D)
    return torch.einsum("hs,shd->hd", torch.softmax(s, -1), v)


def point(ops, B, Hq, Hkv, D, S, fp8, csv, gen):
    q, key_cache, value_cache, table = inputs(B, Hkv, Hq, D, S, gen)
    cu_seqlens_q = torch.arange(0, B + 1, device="cuda", dtype=torch.int32)  # one query token per sequence
    seqused_k = torch.full((B,), S, device="cuda", dtype=torch.int32)
    out = torch.empty(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    splits = SPLITS_FOR_GRAPH if B <= GRAPH_TOKENS else 0
    if fp8:
        # an FP8 cache (--kv-cache-dtype fp8): the cache viewed as float8_e4m3fn, the query quantized in the
        # attention layer (supports_quant_query_input), per-tensor scales layer._q_scale/_k_scale/_v_scale passed
        # as descales expanded to (num_seqs, num_kv_heads) (flash_attn.py FlashAttentionImpl.forward)
        # (the FP8 key and value caches here are two tensors, not views of one [blocks, 2, ...] allocation)
        scales = [float(x.abs().amax()) / FP8_MAX for x in (q, key_cache, value_cache)]
        q, key_cache, value_cache = ((x.float() / sc).to(torch.float8_e4m3fn)
                                     for x, sc in zip((q, key_cache, value_cache), scales, strict=True))
        q_d, k_d, v_d = (torch.full((1,), sc, device="cuda", dtype=torch.float32).expand(B, Hkv) for sc in scales)
    else:
        one = torch.ones((), device="cuda", dtype=torch.float32)  # layer scales of a bf16 cache: 1.0
        q_d = k_d = v_d = one.expand(B, Hkv)
        scales = [1.0, 1.0, 1.0]
    meta = ops.get_scheduler_metadata(B, 1, S, Hq, Hkv, D, D, key_cache.dtype, seqused_k, cu_seqlens_q,
                                      None, None, None, None, BLOCK, 0, True, -1, -1, False, splits, None, 0)

    def call():
        return ops.fwd(q, key_cache, value_cache, None, None, None, out, cu_seqlens_q, None, None, None, seqused_k,
                       1, S, table, None, None, None, None, None, q_d, k_d, v_d, 1.0 / math.sqrt(D),
                       True, -1, -1, 0.0, True, meta, splits, None, 0, None, 1, 0, None)[0]

    rows = sorted({0, B - 1})
    ref = torch.stack([reference(q, key_cache, value_cache, table, S, b, scales) for b in rows])

    def check():
        out.fill_(float("nan"))
        got = call()
        torch.cuda.synchronize()
        return rel_error(got[rows], ref) if torch.isfinite(got.float()).all() else float("inf")

    method = "vllm_fa3_fp8" if fp8 else "vllm_fa3"
    label = f"{method} decode B{B} {Hq}/{Hkv}/{D} S{S}"
    # FA3's FP8 path also rounds the softmax probabilities to FP8 before the PV product (2.0-2.7e-2 against
    # the dequantized inputs' float32 attention in run h100-call29, every shape alike), hence a wider bound
    tol = 5e-2 if fp8 else 2e-2
    err = check()
    if not err < tol:
        log(f"[WARN] {label}: rel error {err:.2e}; not written")
        return
    t = bench(call)[0]
    err_after = check()
    if not err_after < tol:
        log(f"[WARN] {label}: rel error {err_after:.2e} after the timed calls; not written")
        return
    nbytes = 2 * B * S * Hkv * D * (1 if fp8 else 2)
    csv.row(method=method, batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, context=S,
            params=params_str(block=BLOCK, num_splits=splits, vllm="0.24.0"), time_s=t, bytes_read=nbytes,
            flops=4 * B * Hq * S * D, rel_error=err, kvsim_spec="fp8" if fp8 else "bf16", phase="decode", layers=1)
    log(f"{label}: {t*1e6:.1f} us {nbytes/t/1e12:.2f} TB/s err {err:.2e}")


def main():
    ap = part_args(200)
    ap.add_argument("--kv", default="bf16,fp8", help="cache dtypes to time: bf16, fp8 or both (default: both)")
    args = ap.parse_args()
    kv_dtypes = [{"bf16": False, "fp8": True}[k] for k in args.kv.split(",")]
    budget = Budget(args.budget_s)
    ops, csv, gen = start(args.out, "attention_decode.csv", COLUMNS, "vllm_fa3_decode")
    heads = HEADS[:1] if args.quick else HEADS
    batches = [1, 16] if args.quick else BATCHES
    contexts = [2048] if args.quick else CONTEXTS
    # every head shape at each (context, batch) before the next, so a short budget still spans the shapes
    for S in contexts:
        for B in batches:
            for Hq, Hkv, D in heads:
                if 2 * B * S * Hkv * D * 2 > MAX_BYTES:
                    continue
                for fp8 in kv_dtypes:
                    if not budget.ok(3):
                        log("vllm_fa3_decode: budget spent")
                        return
                    guarded(f"vllm_fa3 decode B{B} {Hq}/{Hkv}/{D} S{S} fp8={fp8}", point, ops, B, Hq, Hkv, D, S, fp8,
                            csv, gen)
            torch.cuda.empty_cache()
    log(f"vllm_fa3_decode: done, {budget.left():.0f} s of the budget left")


if __name__ == "__main__":
    main()
