"""vLLM's MXFP4 routed experts on Hopper: OpenAI's Triton ``matmul_ogs`` kernels, as vLLM runs them.

On compute capability 9.x vLLM serves an MXFP4 MoE (gpt-oss) with ``Mxfp4Backend.TRITON`` wherever the
``triton_kernels`` package imports (vllm/model_executor/layers/quantization/mxfp4.py, get_mxfp4_backend,
vLLM 0.11-0.18; Marlin is the fallback). It pads the expert width to a multiple of 64, swizzles the
packed weights and their e8m0 scales into the Hopper layouts (quantization/utils/mxfp4_utils.py,
_swizzle_mxfp4: HopperMXValueLayout / HopperMXScaleLayout, 8 warps, split_k 1) and runs two grouped
GEMMs per layer (fused_moe/gpt_oss_triton_kernels_moe.py, triton_kernel_fused_experts): gate/up with
the gathered rows, fp32 bias and the SwiGLU (alpha 1.702, limit 7) fused in, then down with the
router weights applied and the rows scattered back. This part times each of the two GEMMs with bf16
activations at the per-rank shards of gpt-oss-120b and gpt-oss-20b (config.json: hidden 2880,
intermediate 2880, 128 / 32 experts, top 4) at TP 1, 2, 4 and 8, over the token counts of the other
fused-MoE rows, and checks the whole layer (both GEMMs) against a float reference on the dequantized
weights. Rows go to fused_moe.csv as mode ``mxfp4``: bytes are the touched experts' packed weights
and scales (4.25 bits a weight) plus the rows in and out, as the cost model counts them.

The kernels are vLLM's own copy of triton_kernels (vllm/third_party/triton_kernels in the vLLM 0.18.0
wheel, built for Triton 3.6): ``python3 validation/fetch_triton_kernels.py`` unpacks it into
validation/vendor/ (not committed; the device call carries it).
"""
from __future__ import annotations

import os
import sys

from validation.common import Budget, CsvOut, bench, guarded, log, params_str, part_args, rel_error

HERE = os.path.dirname(os.path.abspath(__file__))
VENDOR = os.path.join(HERE, "vendor")

HIDDEN = 2880  # gpt-oss-120b and -20b config.json hidden_size (= intermediate_size)
TOP_K = 4  # num_experts_per_tok
ALIGN = 64  # vLLM pads each rank's expert width to a multiple of 64 for the Triton backend (mxfp4.py)
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0  # triton_kernel_fused_experts' defaults (gpt-oss's activation)
# (experts, TP, label): the per-rank expert shards vLLM runs (TP shards every expert's width)
SHAPES = [(128, 1, "gpt-oss-120b.tp1"), (128, 2, "gpt-oss-120b.tp2"), (128, 4, "gpt-oss-120b.tp4"),
          (128, 8, "gpt-oss-120b.tp8"), (32, 1, "gpt-oss-20b.tp1"), (32, 2, "gpt-oss-20b.tp2")]
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
MXFP4_BLOCK = 32  # elements per e8m0 scale
MXFP4_BITS_PER_WEIGHT = 4 + 8 / MXFP4_BLOCK


def expert_width(tp):
    """One rank's expert width at tensor parallel ``tp``: the intermediate size split, padded to ALIGN."""
    return -(-(HIDDEN // tp) // ALIGN) * ALIGN


def _kernels():
    """The triton_kernels modules vLLM 0.18.0 ships, from validation/vendor/."""
    if not os.path.isdir(os.path.join(VENDOR, "triton_kernels")):
        raise SystemExit("validation/vendor/triton_kernels is missing: run python3 validation/fetch_triton_kernels.py "
                         "and carry validation/vendor to the device")
    sys.path.insert(0, VENDOR)
    import triton_kernels.matmul_ogs as mo
    import triton_kernels.matmul_ogs_details.opt_flags as opt_flags
    import triton_kernels.numerics_details.mxfp as mxfp
    import triton_kernels.swiglu as sw
    import triton_kernels.tensor as tt
    from triton_kernels.numerics import InFlexData
    from triton_kernels.tensor_details import layout
    from triton_kernels.topk import topk

    opt_flags.update_opt_flags_constraints({"split_k": 1})  # vLLM's constraint on compute capability 9.x
    return mo, mxfp, sw, tt, InFlexData, layout, topk


def quantized_experts(w, k):
    """(weight as vLLM hands it to matmul_ogs, its PrecisionConfig, the dequantized bf16 weight) of bf16 expert
    weights w [E, N, K], quantized to MXFP4 along K and swizzled as vllm's _swizzle_mxfp4 does (8 warps)."""
    mo, mxfp, _, tt, InFlexData, layout, _ = k
    import torch

    packed, scale = mxfp.downcast_to_mxfp(w, torch.uint8, axis=-1)  # [E, N, K/2], [E, N, K/32]
    deq = mxfp.upcast_from_mxfp(packed, scale, torch.bfloat16, axis=-1)
    value_layout, value_opts = layout.make_default_matmul_mxfp4_w_layout(mx_axis=1)
    scale_layout, scale_opts = layout.make_default_matmul_mxfp4_w_scale_layout(mx_axis=1, num_warps=8)
    wq = tt.convert_layout(tt.wrap_torch_tensor(packed.transpose(-2, -1), dtype=tt.FP4), value_layout, **value_opts)
    sq = tt.convert_layout(tt.wrap_torch_tensor(scale.transpose(-2, -1)), scale_layout, **scale_opts)
    return wq, mo.PrecisionConfig(weight_scale=sq, flex_ctx=mo.FlexCtx(rhs_data=InFlexData())), deq


def routing(logits, n_experts, k):
    """vLLM's legacy_routing (gpt_oss_triton_kernels_moe.py): softmax over the top k, then the gather and
    scatter indices and the ragged metadata of the expert-sorted rows."""
    mo, _, _, tt, _, _, topk = k
    sparse = topk(logits, TOP_K, apply_softmax=True)
    meta = sparse.mask_metadata
    ragged = tt.make_ragged_tensor_metadata(meta.col_sum, meta.row_sorted_indx.shape[0])
    gate_scal = sparse.vals.flatten()[meta.col_sorted_indx]
    rd = mo.RoutingData(gate_scal, ragged.slice_sizes, n_experts, TOP_K, ragged)  # expert histogram
    return (rd, mo.GatherIndx(meta.col_sorted_indx, meta.row_sorted_indx),
            mo.ScatterIndx(meta.row_sorted_indx, meta.col_sorted_indx), sparse)


def reference(x, sparse, deq13, b13, deq2, b2):
    """The layer in float32 on the dequantized weights, expert by expert: each token's top-k experts,
    SwiGLU on the interleaved (gate, up) columns, weighted by the router's softmax."""
    import torch

    xf, out = x.float(), torch.zeros(x.shape[0], deq2.shape[1], device=x.device)
    idx, val = sparse.indx.long(), sparse.vals.float()
    for e in torch.unique(idx).tolist():
        m, j = (idx == e).nonzero(as_tuple=True)
        h = xf[m] @ deq13[e].float().T + b13[e]
        gelu, lin = h[:, ::2].clamp(max=SWIGLU_LIMIT), h[:, 1::2].clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT)
        a = gelu * torch.sigmoid(SWIGLU_ALPHA * gelu) * (lin + 1)
        out.index_add_(0, m, val[m, j, None] * (a @ deq2[e].float().T + b2[e]))
    return out


def point(E, inter, tokens, copies, label, csv, gen, k):
    """Both GEMMs of one layer at one token count, checked together against the float reference, then each
    timed in a CUDA graph two ways: calling the copies of the layer's weights in turn (as the engine streams
    one layer after another: weights cold, routing and activations where the previous kernel left them;
    the fitted rows) and on one copy with the L2 flushed before every call (a comparison row, params
    src=l2-flush, not fitted)."""
    import torch

    mo, _, sw, _, _, _, _ = k
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=gen)
    logits = torch.randn(tokens, E, device="cuda", dtype=torch.bfloat16, generator=gen)
    rd, gather, scatter, sparse = routing(logits, E, k)
    act = mo.FusedActivation(mo.FnSpecs("swiglu", sw.swiglu_fn, ("alpha", "limit"), reduction_n=2),
                             (SWIGLU_ALPHA, SWIGLU_LIMIT))
    mid = torch.empty(1, tokens * TOP_K, inter, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)

    def gemm1(i=0):
        w13, pc13, _, b13 = copies[i % len(copies)][:4]
        mo.matmul_ogs(x, w13, b13, rd, gather_indx=gather, precision_config=pc13, fused_activation=act, y=mid)

    def gemm2(i=0):
        w2, pc2, _, b2 = copies[i % len(copies)][4:]
        mo.matmul_ogs(mid.view(tokens * TOP_K, inter), w2, b2, rd, scatter_indx=scatter, precision_config=pc2,
                      gammas=rd.gate_scal, y=out)

    out.fill_(float("nan"))
    gemm1()
    gemm2()
    _, _, deq13, b13, _, _, deq2, b2 = copies[0]
    err = rel_error(out.view(tokens, HIDDEN).float(), reference(x, sparse, deq13, b13, deq2, b2))
    active = int(torch.unique(sparse.indx).numel())
    rows = tokens * TOP_K
    # weights as stored: 4 bits a weight plus one e8m0 byte per 32 (scales), of the touched experts
    for gemm, n, kk, fn in (("w13", 2 * inter, HIDDEN, gemm1), ("w2", HIDDEN, inter, gemm2)):
        w_bytes = active * (n * kk // 2 + n * kk // MXFP4_BLOCK)
        in_bytes = (tokens if gemm == "w13" else rows) * kk * 2
        out_bytes = (rows * n // 2 if gemm == "w13" else tokens * n) * 2  # SwiGLU halves gate/up's columns
        byts = w_bytes + in_bytes + out_bytes
        times = {}
        for how, t in (("layers", bench(fn, rep_ms=10, flush=False, indexed=True)[0]),
                       ("l2-flush", bench(fn, rep_ms=10)[0])):
            times[how] = t
            params = params_str(**({"src": how} if how == "l2-flush" else {}),
                                kernel="triton_kernels.matmul_ogs (vLLM 0.18.0 vllm/third_party)", layout="hopper",
                                warps=8, split_k=1, weight_copies=len(copies) if how == "layers" else 1)
            csv.row(mode="mxfp4", experts=E, top_k=TOP_K, tokens=tokens, active_experts=active, n=n, k=kk, time_s=t,
                    flops=2 * rows * n * kk, bytes=byts, rel_error=f"{err:.2e}", layer=f"{label}.{gemm}", params=params)
        if tokens in (1, 16, 64, 1024):
            log(f"oai_moe {label}.{gemm} T{tokens}: {times['layers']*1e6:.1f} us {byts/times['layers']/1e12:.2f} TB/s "
                f"(L2 flushed: {times['l2-flush']*1e6:.1f} us) err {err:.1e}")


# Weight copies a point rotates through: enough that the touched experts of one token (the smallest case)
# over all copies pass twice the H100's 50 MB L2, at most COPY_BYTES of weights in all.
COLD_BYTES = 100 * 2**20
COPY_BYTES = 24 * 2**30


def run(args, out, budget):
    import torch

    k = _kernels()
    csv = CsvOut(os.path.join(out, "fused_moe.csv"),
                 ["mode", "experts", "top_k", "tokens", "active_experts", "n", "k", "time_s", "flops", "bytes",
                  "rel_error", "layer", "params"])
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = SHAPES[:1] if args.quick else SHAPES
    for E, tp, label in shapes:
        if not budget.ok(10):
            log("oai_moe: budget spent")
            return
        inter = expert_width(tp)
        layer_bytes = E * 3 * inter * HIDDEN * MXFP4_BITS_PER_WEIGHT / 8
        touched_bytes = TOP_K * 3 * inter * HIDDEN * MXFP4_BITS_PER_WEIGHT / 8
        n_copies = max(2, min(int(COPY_BYTES // layer_bytes), -(-COLD_BYTES // int(touched_bytes))))
        copies = []
        for c in range(n_copies):
            w13 = torch.randn(E, 2 * inter, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=gen) / HIDDEN ** 0.5
            w2 = torch.randn(E, HIDDEN, inter, device="cuda", dtype=torch.bfloat16, generator=gen) / inter ** 0.5
            q13, pc13, deq13 = quantized_experts(w13, k)
            q2, pc2, deq2 = quantized_experts(w2, k)
            del w13, w2
            if c:  # the reference needs the first copy's weights only
                deq13 = deq2 = None
            b13 = torch.randn(E, 2 * inter, device="cuda", generator=gen) * 0.1  # gpt-oss's fp32 expert biases
            b2 = torch.randn(E, HIDDEN, device="cuda", generator=gen) * 0.1
            copies.append((q13, pc13, deq13, b13, q2, pc2, deq2, b2))
        log(f"oai_moe {label}: {n_copies} weight copies")
        for tokens in ([1, 64] if args.quick else TOKENS):
            if not budget.ok(3):
                break
            guarded(f"oai_moe {label} T{tokens}", point, E, inter, tokens, copies, label, csv, gen, k)
        del copies
        torch.cuda.empty_cache()


def main():
    args = part_args(120).parse_args()
    run(args, args.out, Budget(args.budget_s))


if __name__ == "__main__":
    main()
