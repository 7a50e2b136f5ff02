"""vLLM's own compiled GEMM kernels for quantized linears on Hopper, timed over the layer shapes of
validation/gemm.py (SHAPES, MS_FULL), from the vLLM 0.24.0 wheel's ``_C_stable_libtorch.abi3.so``:

* FP8 W8A8 (``torch.ops._C.cutlass_scaled_mm``): what vLLM runs for an FP8 checkpoint's linears on
  compute capability 9.0 (vllm/model_executor/kernels/linear/__init__.py, _POSSIBLE_FP8_KERNELS: Marlin
  FP8 is for GPUs without FP8 MMA and FlashInfer's for Blackwell, so CutlassFP8ScaledMMLinearKernel);
  per-tensor scales (a ModelOpt FP8 checkpoint: gemm.csv dtype ``fp8_cutlass``) and per-token x
  per-channel scales (compressed-tensors FP8-dynamic: dtype ``fp8_cutlass_rowwise``). The weight is
  the [N, K] matrix passed transposed ([K, N], column-major), as the kernel's
  process_weights_after_loading leaves it; any row count (no padding to 16, which torch._scaled_mm needs).
* Block FP8 W8A8 (the same op with 128 x 128 weight-block scales and 1 x 128 activation-group scales,
  both column-major): what vLLM runs on compute capability 9.0 for a block-FP8 checkpoint (Qwen3 FP8,
  DeepSeek-V3, MiniMax-M2) when DeepGEMM is not installed (the PyPI wheel; the Docker image installs
  DeepGEMM, which runs instead): W8A8BlockFp8LinearOp._run_cutlass -> padded_cutlass, which pads the
  rows to a multiple of 4 with a zeroed copy of the activations and of their scales
  (vllm/model_executor/layers/quantization/utils/fp8_utils.py); the padding is timed with the GEMM, as
  vLLM runs it (gemm.csv dtype ``fp8_cutlass_block``). Shapes whose N or K is not a multiple of 128
  have no block-FP8 form and are skipped.
* W4A16 (``torch.ops._C.machete_mm``): what vLLM runs for GPTQ / compressed-tensors 4-bit weights on
  compute capability 9.0 (_POSSIBLE_KERNELS: CutlassW4A8 needs 8-bit activations, so MacheteLinearKernel
  for bf16 activations): uint4b8 weights (GPTQ's symmetric 4 bits, stored value - 8), bf16 group scales
  per 128 weights along K, no zero points, prepacked by ``machete_prepack_B`` (gemm.csv dtype
  ``w4a16_machete``).

Every point is checked against a float32 product of the same quantized values (first rows) and timed
in a CUDA graph over weight copies rotated past the L2, as validation/gemm.py times torch's kernels.
The library is carried compressed: ``python3 validation/fetch_vllm_kernels.py`` writes
validation/vendor/vllm/_C_stable_libtorch.abi3.so.xz (only its compute capability 9.0 code; see there),
which this part unpacks to a temporary folder and loads with torch.ops.load_library.

  python3 validation/vllm_gemm.py --out OUT --budget-s 200 [--quick]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from validation.common import Budget, CsvOut, bench, guarded, load_vllm_library, log, part_args  # noqa: E402
from validation.gemm import LOGGED_MS, MS_FULL, MS_QUICK, SHAPES, log_gemm, only_layers, weight_copies  # noqa: E402

GROUP = 128  # GPTQ's usual group size, one of Machete's (query_machete_supported_group_sizes)
# vllm/scalar_type.py ScalarType.uint(4, 8).id: exponent 0 (8 bits), mantissa 4 (8), unsigned (1), bias 8
# (32), finite_values_only False (1), nan_repr IEEE_754 = 1 (8), packed from the low bits in that order
UINT4B8_ID = (0 | 4 << 8 | 0 << 16 | 8 << 17 | 0 << 49 | 1 << 50)
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
BLOCK = 128  # block-FP8 checkpoints' weight block (quantization_config weight_block_size [128, 128])
ROW_PAD = 4  # padded_cutlass's pad_multiple on Hopper
COLUMNS = ["dtype", "m", "n", "k", "time_s", "flops", "bytes", "layer"]


def load_ops():
    """vLLM's _C library, unpacked and loaded (the ops this part calls logged)."""
    return load_vllm_library("_C_stable_libtorch.abi3.so.xz", "_C",
                             ("cutlass_scaled_mm", "machete_prepack_B", "machete_mm"), "vllm_gemm")


def fp8_weights(n, k):
    """Weight copies in FP8 ([N, K], returned transposed: [K, N] column-major) and their per-channel scales."""
    out = []
    for _ in range(weight_copies(n * k)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        s = w.float().abs().amax(dim=1, keepdim=True) / FP8_MAX
        out.append(((w.float() / s).to(torch.float8_e4m3fn).t(), s.reshape(n).contiguous()))
    return out


def fp8_point(ops, m, n, k, label, csv, ws, rowwise):
    """One FP8 GEMM, per-tensor scales (rowwise False) or per-token x per-channel ones (True)."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    if rowwise:
        sa = x.float().abs().amax(dim=1, keepdim=True) / FP8_MAX
        xq = (x.float() / sa).to(torch.float8_e4m3fn)
        scales = [(sa.contiguous(), s) for _, s in ws]
    else:
        sa = x.float().abs().amax() / FP8_MAX
        xq = (x.float() / sa).to(torch.float8_e4m3fn)
        scales = [(sa.reshape(1), s.amax().reshape(1)) for _, s in ws]
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    nw = len(ws)

    def fn(i):
        a_s, b_s = scales[i % nw]
        ops.cutlass_scaled_mm(out, xq, ws[i % nw][0], a_s, b_s, None)
        return out

    rows = min(m, 4)
    a_s, b_s = scales[0]
    ref = (xq[:rows].float() * (a_s[:rows] if rowwise else a_s)) @ (ws[0][0].float() * b_s.reshape(1, -1))
    got = fn(0)[:rows].float()
    err = ((got - ref).norm() / ref.norm()).item()
    dtype = "fp8_cutlass_rowwise" if rowwise else "fp8_cutlass"
    if not err < 2e-2:
        log(f"[WARN] {dtype} {m}x{n}x{k} rel error {err:.2e}")
        return None
    fl = 2 * m * n * k
    byts = m * k + n * k + m * n * 2
    t = bench(fn, rep_ms=max(6.0, min(60.0, (max(fl / 900e12, byts / 2.5e12) + 5e-6) * 1.5e4)), flush=False,
              indexed=True)[0]
    csv.row(dtype=dtype, m=m, n=n, k=k, time_s=t, flops=fl, bytes=byts, layer=label)
    return t


def block_weights(n, k):
    """Block-FP8 weight copies ([K, N] column-major) with their [K/128, N/128] column-major block scales,
    as vLLM passes them (weight.T, weight_scale.T)."""
    out = []
    for _ in range(weight_copies(n * k)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16).float()
        s = w.view(n // BLOCK, BLOCK, k // BLOCK, BLOCK).abs().amax(dim=(1, 3)) / FP8_MAX  # [N/128, K/128]
        wq = (w / s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)).to(torch.float8_e4m3fn)
        out.append((wq.t(), s.contiguous().t()))
    return out


def block_point(ops, m, n, k, label, csv, ws):
    """One block-FP8 GEMM as padded_cutlass runs it: rows padded to ROW_PAD (zeroed copies), then the GEMM."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16).float()
    sa = x.view(m, k // BLOCK, BLOCK).abs().amax(dim=2) / FP8_MAX  # [M, K/128]
    xq = (x / sa.repeat_interleave(BLOCK, 1)).to(torch.float8_e4m3fn)
    sa_cm = sa.t().contiguous().t()  # column-major, as QuantFP8(column_major_scales=True) writes them
    mp = -(-m // ROW_PAD) * ROW_PAD
    out = torch.empty(mp, n, device="cuda", dtype=torch.bfloat16)
    nw = len(ws)

    def fn(i):
        a, a_s = xq, sa_cm
        if mp > m:  # padded_cutlass: zeros + copy of the activations, ones + copy of their scales
            a = torch.zeros(mp, k, device="cuda", dtype=xq.dtype)
            a[:m].copy_(xq)
            a_s = torch.ones(k // BLOCK, mp, device="cuda", dtype=sa.dtype).permute(1, 0)
            a_s[:m].copy_(sa_cm)
        ops.cutlass_scaled_mm(out, a, ws[i % nw][0], a_s, ws[i % nw][1], None)
        return out[:m]

    rows = min(m, 4)
    wq, s = ws[0]
    w_ref = wq.float() * s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)  # [K, N]
    ref = (xq[:rows].float() * sa[:rows].repeat_interleave(BLOCK, 1)) @ w_ref
    err = ((fn(0)[:rows].float() - ref).norm() / ref.norm()).item()
    if not err < 2e-2:
        log(f"[WARN] fp8_cutlass_block {m}x{n}x{k} rel error {err:.2e}")
        return None
    fl = 2 * m * n * k
    byts = m * k + n * k + m * n * 2 + (m + n // BLOCK) * (k // BLOCK) * 4
    t = bench(fn, rep_ms=max(6.0, min(60.0, (max(fl / 900e12, byts / 2.5e12) + 5e-6) * 1.5e4)), flush=False,
              indexed=True)[0]
    csv.row(dtype="fp8_cutlass_block", m=m, n=n, k=k, time_s=t, flops=fl, bytes=byts, layer=label)
    return t


def machete_weights(ops, n, k):
    """uint4b8 weights prepacked for Machete, their bf16 group scales, and the dequantized [K, N] matrix
    of the first copy (for the check)."""
    out, ref = [], None
    for i in range(weight_copies(n * k // 2)):
        q = torch.randint(0, 16, (k, n), dtype=torch.int32, device="cuda")
        packed = torch.zeros(k // 8, n, dtype=torch.int32, device="cuda")
        for j in range(8):  # pack_quantized_values_into_int32 along K (vllm quant_utils)
            packed |= (q[j::8, :] & 0xF) << (4 * j)
        scales = (torch.rand(k // GROUP, n, device="cuda", dtype=torch.bfloat16) * 0.02 + 0.001).contiguous()
        b = ops.machete_prepack_B(packed.t().contiguous().t(), torch.bfloat16, UINT4B8_ID, torch.bfloat16)
        out.append((b, scales))
        if i == 0:
            ref = (q - 8).float() * scales.float().repeat_interleave(GROUP, dim=0)
    return out, ref


def machete_point(ops, m, n, k, label, csv, w):
    packs, ref_w = w
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    nw = len(packs)

    def fn(i):
        b, s = packs[i % nw]
        return ops.machete_mm(x, b, UINT4B8_ID, None, s, None, GROUP, None, None, None)

    rows = min(m, 4)
    ref = x[:rows].float() @ ref_w
    err = ((fn(0)[:rows].float() - ref).norm() / ref.norm()).item()
    if not err < 2e-2:
        log(f"[WARN] w4a16_machete {m}x{n}x{k} rel error {err:.2e}")
        return None
    fl = 2 * m * n * k
    byts = n * k // 2 + (k // GROUP) * n * 2 + m * k * 2 + m * n * 2
    t = bench(fn, rep_ms=max(6.0, min(60.0, (max(fl / 600e12, byts / 2.5e12) + 5e-6) * 1.5e4)), flush=False,
              indexed=True)[0]
    csv.row(dtype="w4a16_machete", m=m, n=n, k=k, time_s=t, flops=fl, bytes=byts, layer=label)
    return t


def main():
    ap = part_args(200)
    ap.add_argument("--layers", default="", help="comma-separated layer labels of validation/gemm.py, only these")
    args = ap.parse_args()
    args.part = "vllm_gemm"  # only_layers names the part in its error
    budget = Budget(args.budget_s)
    ops = load_ops()
    csv = CsvOut(os.path.join(args.out, "gemm.csv"), COLUMNS)
    shapes = only_layers(args, SHAPES, lambda s: s[2])
    shapes = shapes[:2] if args.quick else shapes
    ms = MS_QUICK if args.quick else MS_FULL
    # each shape's points share the budget evenly, so a short run still spans every shape at small and
    # large row counts (MS_FULL lists powers of two first)
    for si, (n, k, label) in enumerate(shapes):
        share = budget.left() / (len(shapes) - si)
        stop = budget.left() - share
        w8 = guarded(f"fp8 weights {n}x{k}", fp8_weights, n, k) if n % 16 == 0 and k % 16 == 0 else None
        w4 = (guarded(f"machete weights {n}x{k}", machete_weights, ops, n, k)
              if k % GROUP == 0 and n % 128 == 0 else None)
        wb = guarded(f"block fp8 weights {n}x{k}", block_weights, n, k) if n % BLOCK == 0 and k % BLOCK == 0 else None
        for m in ms:
            if budget.left() < stop + 1:
                break
            if w8 is not None:
                for rowwise in (False, True):
                    t = guarded(f"fp8 {m}x{n}x{k}", fp8_point, ops, m, n, k, label, csv, w8, rowwise)
                    if m in LOGGED_MS:
                        log_gemm(label, "fp8_cutlass" + ("_rowwise" if rowwise else ""), m, n, k, t,
                                 m * k + n * k + m * n * 2)
            if wb is not None:
                t = guarded(f"block fp8 {m}x{n}x{k}", block_point, ops, m, n, k, label, csv, wb)
                if m in LOGGED_MS:
                    log_gemm(label, "fp8_cutlass_block", m, n, k, t, m * k + n * k + m * n * 2)
            if w4 is not None:
                t = guarded(f"machete {m}x{n}x{k}", machete_point, ops, m, n, k, label, csv, w4)
                if m in LOGGED_MS:
                    log_gemm(label, "w4a16_machete", m, n, k, t, n * k // 2 + m * k * 2 + m * n * 2)
        del w8, w4, wb
        torch.cuda.empty_cache()
    log(f"vllm_gemm: done, {budget.left():.0f} s of the budget left")


if __name__ == "__main__":
    main()
