"""vLLM's own prefill attention kernel on Hopper: FlashAttention 3, as vLLM's FlashAttention backend runs it.

On compute capability 9.x vLLM runs a dense (non-MLA) model's attention with its FlashAttention backend
(vllm/v1/attention/backends/flash_attn.py, vLLM 0.24.0) in FlashAttention 3
(vllm/v1/attention/backends/fa_utils.py get_flash_attn_version: "Hopper (SM90): prefer FA3"), through
flash_attn_varlen_func (vllm/vllm_flash_attn/flash_attn_interface.py), which for fa_version 3 calls
``torch.ops._vllm_fa3_C.fwd``. A prefill is a varlen query of P tokens (cu_seqlens_q) whose keys and
values were first written to the paged cache (the backend sets forward_includes_kv_cache_update False)
and are read back through the block table and seqused_k, causal, softmax scale 1/sqrt(head_dim), no
sliding window, no softcap, bf16. The backend's metadata builder (FlashAttentionMetadataBuilder.build)
computes the FA3 scheduler metadata once a step (aot_schedule: get_scheduler_metadata) and every layer
reuses it: the timed call passes it precomputed, as flashmla.py does FlashMLA's. num_splits is the
builder's max_num_splits: 0 (FA3's heuristic) unless the step has at most max_cudagraph_capture_size
tokens under a full-CUDA-graph mode, then flash_attn_max_num_splits_for_cuda_graph (32,
vllm/config/attention.py) as an upper bound; vLLM 0.24.0's default cudagraph_mode FULL_AND_PIECEWISE
(vllm/config/vllm.py) has full graphs, and max_cudagraph_capture_size is min(2 x max_num_seqs, 512,
max_num_batched_tokens) without speculative decoding (vllm/config/vllm.py _set_cudagraph_sizes), 512 on
an H100 or H200 (max_num_seqs 1024, max_num_batched_tokens 8192 or 16384: vllm/engine/arg_utils.py, GPUs
of 70 GiB and more). The same call with no metadata and num_splits 0 (FA3 schedules inside the call)
is logged beside it for P <= 2048, not written.

The kernel library is the vLLM 0.24.0 wheel's ``vllm_flash_attn/_vllm_fa3_C.abi3.so`` (built for torch
2.11 and CUDA 13): ``python3 validation/fetch_vllm_kernels.py`` writes it xz-compressed into
validation/vendor/vllm/ (not committed; carry validation/vendor), and this part unpacks it to a
temporary folder and loads it with torch.ops.load_library. Each point with P <= 2048 is checked (output
poisoned first) against a float32 causal SDPA of the same q/k/v (GQA by repeat_interleave); longer ones
on their last 16 query rows; again after the timed calls. A point whose relative error passes 2e-2
is logged and not written. Rows go
to attention_prefill.csv beside torch's SDPA rows (validation/kernels/bench_attention.py run_prefill,
method ``sdpa``) with the same columns, method ``vllm_fa3``, timed as those are (bench, CUDA graph, L2
flushed before each call, rep_ms 50).

  python3 validation/vllm_prefill.py --out OUT --budget-s 200 [--quick]
"""
from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from validation.common import Budget, CsvOut, bench, guarded, load_vllm_library, log, part_args, rel_error  # noqa: E402

# vLLM's default block size (vllm/config/cache.py CacheConfig.DEFAULT_BLOCK_SIZE 16), which the
# FlashAttention backend keeps: it supports MultipleOf(16) (get_supported_kernel_block_sizes), so
# AttentionBackend.get_preferred_block_size (vllm/v1/attention/backend.py) returns the default
BLOCK = 16
SPLITS_FOR_GRAPH = 32  # AttentionConfig.flash_attn_max_num_splits_for_cuda_graph (vllm/config/attention.py)
GRAPH_TOKENS = 512  # max_cudagraph_capture_size on an H100/H200 with vLLM's defaults (see above)
# (q_heads, kv_heads, head_dim) per rank, bench_attention.py's prefill shapes and two more; FA3 in vLLM's
# build has head dims 64, 96, 128, 192, 256 (vllm-project/flash-attention CMakeLists.txt, hdim*_sm90),
# and the backend's supports_head_size takes FA3 up to 256
HEADS = [(32, 8, 128), (64, 8, 128), (32, 32, 128), (28, 4, 128), (8, 1, 256), (16, 16, 64)]
# prompt lengths, in the order they are run (every head shape at each before the next): a short budget
# still spans short and long prompts
PROMPTS = [1024, 16384, 128, 4096, 32768, 512, 2048, 8192, 256]
BATCH = 1
CHECK_MAX = 2048  # prompts up to this are checked whole; longer ones on their last CHECK_ROWS queries
CHECK_ROWS = 16
COLUMNS = ["batch", "q_heads", "kv_heads", "head_dim", "prompt", "causal", "time_s", "flops", "method"]


def load_ops():
    """vLLM's FA3 library, unpacked and loaded (the ops this part calls logged)."""
    return load_vllm_library("_vllm_fa3_C.abi3.so.xz", "_vllm_fa3_C", ("fwd", "get_scheduler_metadata"), "vllm_fa3")


def start(out: str, csv_name: str, columns: list[str], tag: str):
    """An FA3 part's start (this one's and validation/vllm_decode.py's): a compute capability 9.x GPU (FA3 has
    no other), the library loaded, the CSV to append to and a seeded generator."""
    if torch.cuda.get_device_capability()[0] != 9:
        raise SystemExit(f"{tag}: FA3 runs on compute capability 9.x only, not {torch.cuda.get_device_name()}")
    return load_ops(), CsvOut(os.path.join(out, csv_name), columns), torch.Generator(device="cuda").manual_seed(0)


def inputs(B, Hq, Hkv, D, P, gen):
    """The query (B*P, Hq, D), a paged cache as vLLM allocates it (FlashAttentionBackend.get_kv_cache_shape:
    [num_blocks, 2, BLOCK, kv_heads, head_dim], NHD) with the prompts' keys and values in blocks scattered
    over the pool, split into key and value caches as FlashAttentionImpl.forward does (kv_cache.unbind(1)),
    the block table and the prompts' keys and values (B, P, Hkv, D) for the reference."""
    nblk = P // BLOCK
    q = torch.randn(B * P, Hq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, P, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, P, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    kv_cache = torch.empty(B * nblk, 2, BLOCK, Hkv, D, device="cuda", dtype=torch.bfloat16)
    table = torch.randperm(B * nblk, device="cuda", generator=gen).to(torch.int32).view(B, nblk)
    key_cache, value_cache = kv_cache.unbind(1)
    idx = table.long().reshape(-1)
    key_cache[idx] = k.reshape(B * nblk, BLOCK, Hkv, D)
    value_cache[idx] = v.reshape(B * nblk, BLOCK, Hkv, D)
    return q, key_cache, value_cache, table, k, v


def reference(q, k, v, P, rows):
    """float32 causal attention of the first sequence's last ``rows`` queries, (rows, Hq, D). All P rows:
    torch's SDPA with the keys and values repeated per query head (repeat_interleave), as
    bench_attention.py prefill_point checks its rows; fewer: the same product per KV head, its query
    heads grouped (query head h reads KV head h // (Hq / Hkv), as FA3 does)."""
    Hq, Hkv, D = q.shape[1], k.shape[2], q.shape[2]
    G = Hq // Hkv
    if rows == P:
        qq = q[:P].float().transpose(0, 1)[None]  # (1, Hq, P, D)
        kk = k[:1].float().transpose(1, 2).repeat_interleave(G, 1)
        vv = v[:1].float().transpose(1, 2).repeat_interleave(G, 1)
        return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)[0].transpose(0, 1)
    qq = q[P - rows:P].float().view(rows, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * rows, D)
    kk = k[0].float().transpose(0, 1)  # (Hkv, P, D)
    vv = v[0].float().transpose(0, 1)
    s = (qq @ kk.transpose(1, 2)) * (1.0 / math.sqrt(D))  # (Hkv, G * rows, P)
    pos_q = (P - rows + torch.arange(rows, device=q.device)).repeat(G)
    s.masked_fill_(torch.arange(P, device=q.device)[None, :] > pos_q[:, None], float("-inf"))
    o = torch.softmax(s, -1) @ vv  # (Hkv, G * rows, D)
    return o.view(Hkv, G, rows, D).permute(2, 0, 1, 3).reshape(rows, Hq, D)


def point(ops, Hq, Hkv, D, P, csv, gen, budget, B=BATCH):
    q, key_cache, value_cache, table, k, v = inputs(B, Hq, Hkv, D, P, gen)
    cu_seqlens_q = torch.arange(0, (B + 1) * P, P, device="cuda", dtype=torch.int32)  # query_start_loc
    seqused_k = torch.full((B,), P, device="cuda", dtype=torch.int32)  # seq_lens
    out = torch.empty(B * P, Hq, D, device="cuda", dtype=torch.bfloat16)
    scale = 1.0 / math.sqrt(D)  # Attention's default scale, head_size ** -0.5
    # the descales FlashAttentionImpl.forward passes for any cache: layer._q_scale/_k_scale/_v_scale (float32
    # 1.0 tensors, vllm/model_executor/layers/attention/attention.py) expanded to (num_seqs, num_kv_heads);
    # FA3 reads them only for an FP8 query (hopper/flash_api.cpp mha_fwd)
    one = torch.ones((), device="cuda", dtype=torch.float32)
    q_descale = k_descale = v_descale = one.expand(B, Hkv)
    # FlashAttentionMetadataBuilder.build: max_num_splits, then schedule() -> get_scheduler_metadata
    splits = SPLITS_FOR_GRAPH if B * P <= GRAPH_TOKENS else 0
    meta = ops.get_scheduler_metadata(
        B, P, P,  # batch_size (num_reqs), max_seqlen_q (max_query_len), max_seqlen_k (max_seq_len)
        Hq, Hkv, D, D,  # num_heads (num_heads_q x dcp 1), num_heads_k, headdim, headdim_v (= headdim)
        torch.bfloat16,  # qkv_dtype: the cache dtype
        seqused_k,  # seqused_k (cache_seqlens = seq_lens)
        cu_seqlens_q,  # cu_seqlens_q (query_start_loc)
        None, None, None, None,  # cu_seqlens_k, cu_seqlens_k_new, seqused_q, leftpad_k
        BLOCK,  # page_size (the block size)
        0,  # max_seqlen_k_new
        True, -1, -1,  # is_causal, window_size_left/right (aot_sliding_window (-1, -1))
        False,  # has_softcap
        splits,  # num_splits (max_num_splits)
        None, 0)  # pack_gqa, sm_margin

    def fwd(metadata, num_splits):
        # flash_attn_varlen_func's fa_version 3 call, with the arguments FlashAttentionImpl.forward gives it
        return ops.fwd(
            q, key_cache, value_cache,
            None, None,  # k_new, v_new
            None,  # q_v
            out,
            cu_seqlens_q,
            None,  # cu_seqlens_k: None when the keys come through seqused_k and the block table
            None,  # cu_seqlens_k_new
            None, seqused_k,  # seqused_q, seqused_k
            P, P,  # max_seqlen_q, max_seqlen_k
            table,  # page_table (block_table)
            None, None,  # kv_batch_idx, leftpad_k
            None, None, None,  # rotary_cos, rotary_sin, seqlens_rotary
            q_descale, k_descale, v_descale,
            scale,
            True,  # is_causal
            -1, -1,  # window_size_left, window_size_right (sliding_window None -> (-1, -1))
            0.0,  # softcap (logits_soft_cap None -> 0)
            True,  # is_rotary_interleaved (flash_attn_varlen_func passes True)
            metadata,  # scheduler_metadata
            num_splits,
            None,  # pack_gqa
            0,  # sm_margin
            None,  # s_aux (sinks None)
            1, 0, None)[0]  # cp_world_size, cp_rank, cp_tot_seqused_k

    def call():
        return fwd(meta, splits)

    rows = P if P <= CHECK_MAX else CHECK_ROWS
    ref = reference(q, k, v, P, rows)
    label = f"vllm_fa3 {Hq}/{Hkv}/{D} P{P}"

    def check(fn=None):
        out.fill_(float("nan"))  # poisoned: a tile the kernel skips stays NaN
        got = (fn or call)()
        torch.cuda.synchronize()
        return rel_error(got[P - rows:P], ref)

    err = check()
    if not err < 2e-2:
        log(f"[WARN] {label}: rel error {err:.2e} (rows {P - rows}-{P - 1}); not written")
        return
    t = bench(call, rep_ms=50)[0]
    # again after the timed replays: with precomputed metadata the kernel's tile counter (a semaphore in the
    # metadata) must be reset by each call (vllm-project/flash-attention hopper/flash_api.cpp mha_fwd: the
    # split-combine kernel or a memset after the kernel zeroes it), else later calls skip their tiles
    err_after = check()
    if not err_after < 2e-2:
        log(f"[WARN] {label}: rel error {err_after:.2e} after the timed calls (first call {err:.2e}); not written")
        return
    fl = 4 * B * Hq * P * P * D // 2
    csv.row(batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D, prompt=P, causal=1, time_s=t, flops=fl, method="vllm_fa3")
    log(f"{label}: {t*1e3:.3f} ms {fl/t/1e12:.0f} TF/s err {err:.2e} ({'all' if rows == P else rows} rows checked; "
        f"num_splits {splits}, metadata precomputed)")
    if P <= CHECK_MAX and budget.ok(3):  # FA3 scheduling inside the call, for comparison (not written)
        t2 = guarded(f"{label} scheduled in the call", lambda: bench(lambda: fwd(None, 0), rep_ms=50)[0])
        if t2 is not None:
            err2 = check(lambda: fwd(None, 0))
            log(f"  no metadata, num_splits 0: {t2*1e3:.3f} ms {fl/t2/1e12:.0f} TF/s err {err2:.2e} (not written)")


def main():
    ap = part_args(200)
    ap.add_argument("--prompts", help="comma-separated prompt lengths, multiples of 16 (default: all of PROMPTS)")
    args = ap.parse_args()
    budget = Budget(args.budget_s)
    prompts = [int(p) for p in args.prompts.split(",")] if args.prompts else [1024] if args.quick else PROMPTS
    if any(p % BLOCK for p in prompts):
        ap.error(f"--prompts: multiples of {BLOCK} only (whole cache blocks)")
    ops, csv, gen = start(args.out, "attention_prefill.csv", COLUMNS, "vllm_fa3")
    heads = HEADS[:1] if args.quick else HEADS
    for P in prompts:
        for Hq, Hkv, D in heads:
            fl = 4 * BATCH * Hq * P * P * D // 2
            if not budget.ok(3 + 60 * fl / 300e12):  # ~60 calls timed at >= 300 TFLOP/s, and the check
                log(f"vllm_fa3: budget spent before {Hq}/{Hkv}/{D} P{P}")
                continue
            guarded(f"vllm_fa3 {Hq}/{Hkv}/{D} P{P}", point, ops, Hq, Hkv, D, P, csv, gen, budget)
            torch.cuda.empty_cache()
    log(f"vllm_fa3: done, {budget.left():.0f} s of the budget left")


if __name__ == "__main__":
    main()
