"""vLLM's own MLA decode kernel on Hopper: FlashMLA, as vLLM's FlashMLA backend runs it.

On compute capability 9.x vLLM decodes an MLA model (DeepSeek-V2/V3/R1, Kimi-K2) with its FlashMLA
backend (vllm/v1/attention/backends/mla/flashmla.py, FlashMLAImpl.forward_mqa, vLLM 0.24.0): the
absorbed query (the 512-wide latent part and the 64-wide RoPE part concatenated: 576) of every query
head attends one shared latent cache entry per token (576 values: kv_lora_rank 512 + qk_rope_head_dim
64), paged in blocks of 64 tokens, causal, and returns the 512-wide latent output per head. A bf16
cache runs ``torch.ops._flashmla_C.dense_decode_fwd``; an FP8 cache ``torch.ops._flashmla_extension_C.
fwd_kvcache_mla_fp8`` with per-tensor descales, after ``get_mla_decoding_metadata_dense_fp8``. The
scheduling metadata is computed once a step (the first layer's call, or the metadata builder) and
reused by every other layer: the fitted rows time a call with it precomputed; the same points with the
metadata computed inside the call carry params ``src=with-metadata`` (not fitted).

The kernels are the compiled libraries of the vLLM 0.24.0 wheel (built for torch 2.11 and CUDA 13):
``python3 validation/fetch_vllm_kernels.py`` unpacks them into validation/vendor/vllm/ (not committed;
the device call carries it). Each point is checked against a float64 reference on the first and last
sequence (outputs poisoned first), then timed in a CUDA graph with the L2 flushed before each call (a
layer reads a cache the previous layer did not). Rows go to attention_decode.csv as methods
``vllm_flashmla`` (bf16 cache) and ``vllm_flashmla_fp8`` (FP8 cache and FP8 query, per-tensor scales, as
vLLM quantizes the query for an FP8 cache): query heads per rank 16, 32, 64
and 128 (DeepSeek-V3's 128 heads at TP 8, 4, 2, 1), one latent head, head_dim 576.
"""
from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from validation.common import Budget, CsvOut, bench, guarded, log, params_str, part_args, rel_error  # noqa: E402
from validation.kernels.bench_common import MAX_BYTES  # noqa: E402 - largest cache one point allocates
from validation.kernels.engine_ops import FP8_MAX  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VENDOR = os.path.join(HERE, "vendor", "vllm")
LATENT, ROPE = 512, 64  # kv_lora_rank, qk_rope_head_dim (DeepSeek-V2/V3 config.json)
HEAD = LATENT + ROPE
SCALE = 1.0 / math.sqrt(128 + ROPE)  # qk_nope_head_dim 128 + RoPE: the softmax scale vLLM passes (self.scale)
BLOCK = 64  # FlashMLA's page size (FlashMLABackend.get_supported_kernel_block_sizes)
HEADS = [16, 128, 32, 64]  # query heads per rank: DeepSeek-V3 at TP 8, 1, 4, 2
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
# KV lengths, in the order they are run: a short budget still spans small and large caches
CONTEXTS = [2048, 32768, 512, 8192, 131072]


def load_ops():
    import torch

    for name in ("_flashmla_C.abi3.so", "_flashmla_extension_C.abi3.so"):
        path = os.path.join(VENDOR, name)
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: missing; run python3 validation/fetch_vllm_kernels.py and carry validation/vendor")
        torch.ops.load_library(path)
    with open(os.path.join(VENDOR, "SOURCE")) as f:
        log("flashmla: " + f.read().strip().replace("\n", "; "))
    log(f"flashmla: {torch.ops._flashmla_C.dense_decode_fwd.default._schema}")
    log(f"flashmla: {torch.ops._flashmla_extension_C.fwd_kvcache_mla_fp8.default._schema}")
    return torch.ops._flashmla_C, torch.ops._flashmla_extension_C


def inputs(B, H, S, gen):
    """Query (B, 1, H, 576), a paged cache (blocks, 64, 1, 576) whose blocks are scattered as a serving
    engine's are, its block table and the sequence lengths."""
    import torch

    nblk = -(-S // BLOCK)
    q = torch.randn(B, 1, H, HEAD, device="cuda", dtype=torch.bfloat16, generator=gen)
    cache = torch.randn(B * nblk, BLOCK, 1, HEAD, device="cuda", dtype=torch.bfloat16, generator=gen)
    table = torch.randperm(B * nblk, device="cuda", generator=gen).to(torch.int32).view(B, nblk)
    lens = torch.full((B,), S, device="cuda", dtype=torch.int32)
    return q, cache, table, lens


def reference(q, cache, table, S, rows, k_scale=1.0):
    """float64 attention of the checked sequences: keys are the 576-wide entries, values their first 512."""
    import torch

    out = []
    for b in rows:
        kv = cache[table[b].long()].reshape(-1, HEAD)[:S].double() * k_scale
        s = (q[b, 0].double() @ kv.T) * SCALE
        out.append(torch.softmax(s, -1) @ kv[:, :LATENT])
    return torch.stack(out)


def point(ops, B, H, S, fp8, csv, gen):
    import torch

    dense, ext = ops
    q, cache, table, lens = inputs(B, H, S, gen)
    rows = sorted({0, B - 1})
    out = torch.empty(B, 1, H, LATENT, device="cuda", dtype=torch.bfloat16)
    if fp8:  # per-tensor scales, as vLLM's FP8 KV cache (layer._k_scale) and query (layer._q_scale)
        ks = float(cache.abs().amax()) / FP8_MAX
        cache = (cache / ks).to(torch.float8_e4m3fn)
        qs = float(q.abs().amax()) / FP8_MAX
        q8 = (q.float() / qs).to(torch.float8_e4m3fn)
        ref = reference(q8.float() * qs, cache.float(), table, S, rows, ks)
        q_desc = torch.full((1,), qs, device="cuda", dtype=torch.float32)
        k_desc = torch.full((1,), ks, device="cuda", dtype=torch.float32)
        meta, splits = ext.get_mla_decoding_metadata_dense_fp8(lens, H, 1)

        def call(meta=meta, splits=splits):
            return ext.fwd_kvcache_mla_fp8(q8, cache, LATENT, lens, table, SCALE, True, meta, splits, q_desc,
                                           k_desc)[0]

        try:
            call()
        except RuntimeError as err:  # the cache as vLLM allocates it (uint8, viewed per backend)
            log(f"flashmla fp8: float8_e4m3fn cache refused ({str(err)[:120]}); passing it as uint8")
            cache = cache.view(torch.uint8)

        def with_metadata():
            m, s = ext.get_mla_decoding_metadata_dense_fp8(lens, H, 1)
            return call(m, s)
    else:
        ref = reference(q, cache, table, S, rows)
        _, _, meta, splits = dense.dense_decode_fwd(q, cache, LATENT, lens, table, SCALE, True, None, None, out)

        def call():
            return dense.dense_decode_fwd(q, cache, LATENT, lens, table, SCALE, True, meta, splits, out)[0]

        def with_metadata():
            return dense.dense_decode_fwd(q, cache, LATENT, lens, table, SCALE, True, None, None, out)[0]
    out.fill_(float("nan"))
    got = call()
    torch.cuda.synchronize()
    err = rel_error(got[rows, 0], ref) if torch.isfinite(got.float()).all() else float("inf")
    if not err < 2e-2:
        log(f"flashmla B{B} H{H} S{S} fp8={fp8}: check failed, rel error {err:.2e}")
        return
    t = bench(call)[0]
    nbytes = B * S * HEAD * (1 if fp8 else 2)
    common = dict(batch=B, q_heads=H, kv_heads=1, head_dim=HEAD, context=S, bytes_read=nbytes,
                  flops=2 * B * H * S * (HEAD + LATENT), rel_error=err, kvsim_spec="fp8" if fp8 else "bf16",
                  phase="decode", layers=1)
    method = "vllm_flashmla_fp8" if fp8 else "vllm_flashmla"
    kw = dict(kv_lora_rank=LATENT, rope=ROPE, block=BLOCK, vllm="0.24.0")
    csv.row(**common, method=method, params=params_str(**kw), time_s=t)
    log(f"{method} B{B} H{H} S{S}: {t*1e6:.1f} us {nbytes/t/1e12:.2f} TB/s err {err:.2e}")
    tm = guarded(f"{method} B{B} H{H} S{S} with metadata", lambda: bench(with_metadata)[0])
    if tm is not None:
        csv.row(**common, method=method, params=params_str(src="with-metadata", **kw), time_s=tm)
        log(f"  with the metadata computed in the call: {tm*1e6:.1f} us")


def run(args, out_dir, budget):
    import torch

    ops = load_ops()
    csv = CsvOut(os.path.join(out_dir, "attention_decode.csv"),
                 ["method", "batch", "q_heads", "kv_heads", "head_dim", "context", "params", "time_s", "bytes_read",
                  "flops", "rel_error", "kvsim_spec", "phase", "layers"])
    gen = torch.Generator(device="cuda").manual_seed(0)
    heads = [int(h) for h in args.heads.split(",")] if args.heads else HEADS[:1] if args.quick else HEADS
    batches = [int(b) for b in args.batches.split(",")] if args.batches else [1, 4] if args.quick else BATCHES
    contexts = [2048] if args.quick else CONTEXTS
    # every head count at each (context, batch) before the next, bf16 then FP8, so a short budget still
    # spans the shapes
    for S in contexts:
        for B in batches:
            if B * S * HEAD * 2 > MAX_BYTES:
                continue
            for H in heads:
                for fp8 in (False, True):
                    if not budget.ok(3):
                        log("flashmla: budget spent")
                        return
                    guarded(f"flashmla B{B} H{H} S{S} fp8={fp8}", point, ops, B, H, S, fp8, csv, gen)
            torch.cuda.empty_cache()


def main():
    ap = part_args(120)
    ap.add_argument("--heads", help="comma-separated query heads per rank (default: all of HEADS)")
    ap.add_argument("--batches", help="comma-separated batch sizes (default: all of BATCHES)")
    args = ap.parse_args()
    run(args, args.out, Budget(args.budget_s))


if __name__ == "__main__":
    main()
