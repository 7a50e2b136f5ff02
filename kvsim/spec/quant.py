"""Weight precision: what a ``weights:`` choice or a checkpoint's ``quantization_config`` means for the
bytes each linear layer stores and for the GEMM kernel vLLM runs on a given GPU.

Embeddings, the LM head, MoE routers and norms stay in the model dtype whatever the choice (vLLM
leaves them unquantized: ``lm_head`` and routers are in every method's ignore list or not
``LinearBase`` layers it replaces). Bits per weight include the scales (and zero points) stored with
the weights; the source of each layout is beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, cast, get_args

from kvsim.errors import KvsimError
from kvsim.spec.hardware import HardwareSpec
from kvsim.spec.model import ModelSpec, QuantModules, WeightPrecision, WeightQuantSpec

WeightsChoice = Literal["bf16", "fp8", "int8", "int4", "mxfp4", "nvfp4"]
WEIGHTS_CHOICES: tuple[str, ...] = get_args(WeightsChoice)

# int4 W4A16 as GPTQ / AWQ store it (vLLM gptq_marlin / awq_marlin): 4-bit weights, one fp16 scale
# and one packed 4-bit zero point per group of 128 input channels -> 4 + (16 + 4) / 128 bits.
INT4_GROUP = 128
INT4_BITS = 4 + (16 + 4) / INT4_GROUP
MXFP4_BITS = 4 + 8 / 32  # OCP Microscaling v1.0: E2M1 elements, one E8M0 scale per 32
NVFP4_BITS = 4 + 8 / 16  # NVIDIA NVFP4 (ModelOpt): E2M1 elements, one E4M3 scale per 16 (+ a tensor scale)


@dataclass(frozen=True)
class _Choice:
    modules: QuantModules
    bits: float
    weight_only: bool
    source: str


# What serving a bf16 checkpoint "with <precision> weights" means in vLLM.
_CHOICES: dict[str, _Choice] = {
    "fp8": _Choice("linear", 8.0, False, "vLLM --quantization fp8 (quantization/fp8.py): per-tensor FP8 E4M3 "
                   "weights, dynamic per-token FP8 activations"),
    "int8": _Choice("linear", 8.0, False, "W8A8 INT8 checkpoint (compressed-tensors int-quantized): per-channel "
                    "weight scales, dynamic per-token INT8 activations"),
    "int4": _Choice("linear", INT4_BITS, True, "W4A16 GPTQ/AWQ layout, group 128 (quantization/gptq_marlin.py)"),
    "mxfp4": _Choice("experts", MXFP4_BITS, False, "vLLM quantization/mxfp4.py: MoE experts only (gpt-oss)"),
    "nvfp4": _Choice("linear", NVFP4_BITS, False, "ModelOpt NVFP4 (quantization/modelopt.py ModelOptNvFp4Config)"),
}


def with_weights(model: ModelSpec, weights: str, file: str | None = None) -> ModelSpec:
    """``model`` served with ``weights`` precision (``bf16``: unquantized in the model dtype)."""
    if weights not in WEIGHTS_CHOICES:
        raise KvsimError(f"must be one of {', '.join(WEIGHTS_CHOICES)}", field="weights", value=weights, file=file)
    if weights == "bf16":
        return replace(model, weight_quant=None)
    c = _CHOICES[weights]
    if c.modules == "experts" and model.moe is None:
        raise KvsimError(f"vLLM's MXFP4 method quantizes MoE experts only and {model.name} has none",
                         field="weights", value=weights, file=file)
    precision = cast(WeightPrecision, weights)  # one of WEIGHTS_CHOICES (checked above), not "bf16"
    # a quantized checkpoint stays one in vLLM's eyes whatever precision it is served at
    checkpoint = model.weight_quant is not None and model.weight_quant.from_checkpoint
    # the checkpoint's own scales where it already holds this precision (a block-FP8 release stays one)
    same = checkpoint and model.weight_quant is not None and model.weight_quant.precision == precision
    blocks = same and model.weight_quant is not None and model.weight_quant.block_scaled
    # ... and its own method (an AWQ checkpoint served as int4 stays on AWQ's kernel)
    method = model.weight_quant.method if same and model.weight_quant is not None else ""
    return replace(model, weight_quant=WeightQuantSpec(c.modules, c.bits, precision, c.weight_only,
                                                       block_scaled=blocks, method=method, from_checkpoint=checkpoint))


GemmPath = Literal["bf16", "fp8", "int8", "w8a16", "w4a16"]
# The calibration curve of each quantized path (a profile may carry them; kvsim/cost/calibration.py), and
# of the routed experts' grouped GEMM where it has its own kernel (vLLM's fused-MoE with FP8 scales per
# tensor or per 128x128 block: validation/kernels/fused_moe.py measures both).
# W4A16 GEMMs (Marlin: validation/gemm.py --part marlin; kvsim/calibrate.py fits it)
W4A16_CURVE = "gemm.w4a16"
# vLLM's Machete (CUTLASS mixed-input GEMM), its W4A16 kernel for GPTQ and compressed-tensors 4-bit checkpoints
# on compute capability 9.0 (kernels/linear/__init__.py _POSSIBLE_KERNELS: MacheteLinearKernel precedes Marlin;
# CutlassW4A8 before it needs 8-bit activations): its own curve (validation/vllm_gemm.py)
MACHETE_CURVE = W4A16_CURVE + ".machete"
# Block-FP8 checkpoints' linears (128 x 128 weight blocks, 1 x 128 activation groups) in vLLM's CUTLASS blockwise
# kernel, what vLLM runs for them on compute capability 9.0 when DeepGEMM is not installed (a PyPI install; the
# Docker image's DeepGEMM is not measured): W8A8BlockFp8LinearOp._run_cutlass (quantization/utils/fp8_utils.py),
# its own curve (validation/vllm_gemm.py)
FP8_BLOCK_CURVE = "gemm.fp8.block"
GEMM_PATH_CURVES = ("gemm.fp8", FP8_BLOCK_CURVE, "gemm.int8", "gemm.w8a16", W4A16_CURVE, MACHETE_CURVE)
# Block-FP8 checkpoints (DeepSeek-V3, Qwen3-FP8, MiniMax-M2.5: weight_block_size [128, 128]) scale their
# activations per 1 x 128 group along K, the weight block's width (vLLM per_token_group_quant_fp8)
FP8_ACTIVATION_GROUP = 128
# MXFP4 experts on Hopper: vLLM's Mxfp4Backend.TRITON, OpenAI's triton_kernels matmul_ogs with the weights
# upcast in the kernel (quantization/mxfp4.py get_mxfp4_backend: compute capability 9.x; validation/oai_moe.py).
# Its two GEMMs are different kernels (gate/up gathers the token rows and applies SwiGLU in its epilogue;
# down scatters the rows back and sums each token's top-k outputs with the router weights), so each has
# its own curve, named by the expert linear (kvsim.spec.linears: experts.gate_up, experts.down).
MXFP4_HOPPER_CURVE = "gemm_grouped.mxfp4"
# ...whose expert width per rank vLLM pads to a multiple of 64 (mxfp4.py, create_weights: round_up(
# intermediate_size_per_partition, 64) for the Triton backend): gpt-oss-120b's 2,880 at TP 8 runs as 384, not 360
MXFP4_TRITON_WIDTH_ALIGN = 64
EXPERT_GEMMS = ("gate_up", "down")
GROUPED_PATH_CURVES = ("gemm_grouped.fp8", "gemm_grouped.fp8_block",
                       *(f"{MXFP4_HOPPER_CURVE}.{gemm}" for gemm in EXPERT_GEMMS))


@dataclass(frozen=True)
class WeightKernel:
    """How the quantized linears' GEMMs run on one GPU: the tensor-core dtype, whether weights are
    dequantized inside the kernel, and what the choice rests on."""

    path: GemmPath
    peak_dtype: str  # key of HardwareSpec.peak_flops_per_s the GEMM runs at
    dequant: bool  # weights are unpacked to the activation dtype in the kernel (W8A16 / W4A16)
    curve: str  # calibration op name of the GEMM efficiency curve for this path
    note: str
    grouped_curve: str = ""  # the routed experts' own curve on this path ("": the path's GEMM curve)
    # the experts' kernel gathers the token rows, applies the activation and sums each token's top-k
    # outputs inside its GEMMs (OpenAI's matmul_ogs), so none of those is a kernel of its own
    experts_fused: bool = False
    # where a profile lacks ``curve``: a measured curve of a kernel of the same kind that prices it instead,
    # and the words that say so ("": the bf16 GEMM curve, labelled a prior, kvsim/cost/model.py)
    fallback_curve: str = ""
    fallback_note: str = ""


def expert_width_align(model: ModelSpec, hw: HardwareSpec) -> int:
    """The multiple vLLM pads each rank's routed-expert width (intermediate size) to, for ``model``'s
    weights on ``hw``: MXFP4 experts on Hopper (MXFP4_TRITON_WIDTH_ALIGN); 1 elsewhere. (vLLM also pads
    MXFP4 for Marlin, to 128 with the hidden size to 256, and for Blackwell's FlashInfer kernels, to 256;
    kvsim does not model those.)"""
    wq = model.weight_quant
    if model.moe is None or wq is None or wq.precision != "mxfp4" or hw.family != "hopper":
        return 1
    return MXFP4_TRITON_WIDTH_ALIGN


def weight_kernel(model: ModelSpec, hw: HardwareSpec, file: str | None = None) -> WeightKernel:
    """The GEMM path vLLM takes for ``model``'s quantized linears on ``hw``; an error where it has none."""
    wq = model.weight_quant
    if wq is None:
        return WeightKernel("bf16", "bf16", False, "gemm", "")
    peaks = hw.peak_flops_per_s
    p: WeightPrecision = wq.precision
    if p == "fp8" and not wq.weight_only:
        if peaks.get("fp8") and wq.block_scaled:
            return WeightKernel("fp8", "fp8", False, FP8_BLOCK_CURVE,
                                "block FP8 W8A8 (128 x 128 weight blocks) at the FP8 peak in vLLM's blockwise kernel "
                                "(on Hopper: CUTLASS's where DeepGEMM is not installed, as in a PyPI install; the "
                                "Docker image runs DeepGEMM, not measured)", "gemm_grouped.fp8_block",
                                fallback_curve="gemm.fp8",
                                fallback_note="block-FP8 GEMMs are unmeasured in this profile: priced on its "
                                              "per-tensor FP8 curve")
        if peaks.get("fp8"):
            return WeightKernel("fp8", "fp8", False, "gemm.fp8", "FP8 W8A8 at the FP8 peak", "gemm_grouped.fp8")
        if wq.needs_native_fp8:
            raise KvsimError(f"{hw.display_name} has no FP8 tensor cores and this checkpoint's method (ModelOpt "
                             "FP8) has no weight-only fallback in vLLM (modelopt.py: compute capability >= 8.9)",
                             field="weights", value=p, file=file)
        return WeightKernel("w8a16", "bf16", True, "gemm.w8a16", f"{hw.display_name} has no FP8 tensor cores: "
                            "weight-only FP8 with vLLM's Marlin kernel (utils/marlin_utils_fp8.py), bf16 compute")
    if p == "int8" and not wq.weight_only:
        if not peaks.get("int8"):
            raise KvsimError(f"{hw.display_name} has no INT8 tensor cores for W8A8 INT8", field="weights", value=p,
                             file=file)
        return WeightKernel("int8", "int8", False, "gemm.int8", "INT8 W8A8 at the INT8 peak")
    if hw.vendor != "nvidia":
        # the paths below are vLLM's CUDA kernels (Marlin, Machete) or priced on their curves; ROCm's own
        # weight-only kernels are not modelled
        raise KvsimError(f"kvsim models weight-only and 4-bit weights on NVIDIA GPUs only (vLLM's Marlin and Machete "
                         f"are CUDA kernels); {hw.display_name}'s are not modelled", field="weights", value=p,
                         file=file)
    if p in ("fp8", "int8"):
        return WeightKernel("w8a16", "bf16", True, "gemm.w8a16", "weight-only 8-bit, dequantized in the GEMM")
    if p in ("mxfp4", "nvfp4") and hw.family == "blackwell":
        note = (f"{p.upper()} on Blackwell runs on FP4 tensor cores, but the catalogue has no FP4 peak: priced as "
                "the W4A16 path (an upper bound)")
    elif p == "mxfp4" and hw.family == "hopper":
        return WeightKernel("w4a16", "bf16", True, W4A16_CURVE, f"{hw.display_name} has no FP4 tensor cores: vLLM "
                            "runs MXFP4 experts in OpenAI's Triton matmul_ogs, upcasting the weights to bf16 in the "
                            "kernel (Mxfp4Backend.TRITON, quantization/mxfp4.py)", MXFP4_HOPPER_CURVE, True)
    elif p in ("mxfp4", "nvfp4"):
        note = (f"{hw.display_name} has no FP4 tensor cores: vLLM dequantizes {p.upper()} weights in a W4A16 kernel "
                "(Marlin, quantization/utils/marlin_utils_fp4.py)")
    elif p == "int4" and hw.family == "hopper" and wq.method not in ("awq", "bitsandbytes"):  # every Hopper: 9.0
        # vLLM 0.12 quantization/kernels/mixed_precision/__init__.py and 0.24 kernels/linear/__init__.py
        # (choose_mp_linear_kernel; machete.py: compute capability 9.0 only, group sizes -1 and 128)
        return WeightKernel("w4a16", "bf16", True, MACHETE_CURVE,
                            "W4A16: GPTQ / compressed-tensors 4-bit weights in vLLM's Machete (CUTLASS, compute "
                            "capability 9.0; it precedes Marlin in vLLM's kernel choice)",
                            fallback_curve=W4A16_CURVE,
                            fallback_note="Machete is unmeasured in this profile: priced on Marlin's measured curve "
                                          "(on an H100 Machete takes 1.2-1.3x Marlin's time at 1-16 rows and about "
                                          "half of it from 512 rows on, run h100-call26)")
    else:
        note = "W4A16: 4-bit weights dequantized to bf16 in the GEMM (Marlin)"
        if hw.family == "hopper" and wq.method == "awq":  # vLLM <= 0.12 quantization/awq_marlin.py
            note += ("; vLLM up to 0.12 runs AWQ checkpoints in Marlin (awq_marlin.py apply_awq_marlin_linear), "
                     "where 0.24 routes them through its kernel choice, i.e. Machete on Hopper (auto_awq.py), which "
                     "kvsim does not model")
        if wq.method == "bitsandbytes":
            note += "; bitsandbytes runs its own kernels, not Marlin: priced on Marlin's curve, not measured"
    return WeightKernel("w4a16", "bf16", True, W4A16_CURVE, note)


# ---------------------------------------------------------------- HF quantization_config

def _ignored_attention(ignored: object) -> bool:
    """True when an ignore list keeps the attention projections unquantized (only the MLPs are)."""
    return isinstance(ignored, list) and any(isinstance(x, str) and ("self_attn" in x or "attn" in x.split(".")[-1])
                                             for x in ignored)


def _int_bits(bits: int, group: int | None, zero_point: bool) -> float:
    """Integer weights with one fp16 scale (and a zero point of the same width) per group (per row: None)."""
    if group is None or group <= 0:
        return float(bits)  # per-channel scales: one per output row, negligible per weight
    return bits + (16 + (bits if zero_point else 0)) / group


def quant_from_hf(full: dict, file: str) -> dict | None:
    """The model YAML ``weight_quantization`` mapping of a HF config's ``quantization_config``."""
    q = full.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    field = "quantization_config.quant_method"

    def spec(precision: str, bits: float, source: str, modules: str = "linear", weight_only: bool = False,
             needs_native_fp8: bool = False, block_scaled: bool = False) -> dict:
        return {"modules": modules, "bits_per_weight": float(bits), "precision": precision,
                "weight_only": weight_only, "needs_native_fp8": needs_native_fp8,
                **({"block_scaled": True} if block_scaled else {}), "method": method, "source": source}

    if method == "mxfp4":  # gpt-oss: MoE experts only (vLLM quantization/mxfp4.py)
        return spec("mxfp4", MXFP4_BITS, "quantization_config mxfp4 (OCP Microscaling v1.0)", modules="experts")
    if method == "fp8":
        block = q.get("weight_block_size")
        if block:
            rows, cols = block
            return spec("fp8", 8 + 32 / (rows * cols), f"quantization_config fp8 blocks {rows}x{cols}",
                        modules="mlp" if _ignored_attention(q.get("modules_to_not_convert")) else "linear",
                        block_scaled=True)
        return spec("fp8", 8, "quantization_config fp8 (per-tensor scales)",
                    modules="mlp" if _ignored_attention(q.get("modules_to_not_convert")) else "linear")
    if method == "modelopt":
        algo = str(q.get("quant_algo") or (q.get("quantization") or {}).get("quant_algo") or "").upper()
        modules = "mlp" if _ignored_attention(q.get("exclude_modules")) else "linear"
        if algo == "FP8":
            return spec("fp8", 8, "quantization_config modelopt FP8 (per-tensor)", modules, needs_native_fp8=True)
        if algo == "NVFP4":
            return spec("nvfp4", NVFP4_BITS, "quantization_config modelopt NVFP4 (E4M3 scale per 16)", modules)
        raise KvsimError("modelopt quant_algo not modelled (known: FP8, NVFP4)", field="quantization_config.quant_algo",
                         value=algo or None, file=file)
    if method in ("awq", "gptq"):
        bits = int(q.get("bits", q.get("w_bit", 4)))
        group = q.get("group_size", q.get("q_group_size", 128))
        zero = bool(q.get("zero_point", True)) if method == "awq" else True  # GPTQ stores qzeros even when sym
        if bits not in (4, 8):
            raise KvsimError(f"{method} with {bits}-bit weights is not modelled (4 or 8)",
                             field="quantization_config.bits", value=bits, file=file)
        return spec("int4" if bits == 4 else "int8", _int_bits(bits, group, zero),
                    f"quantization_config {method} {bits}-bit group {group}", weight_only=True)
    if method == "bitsandbytes":
        if q.get("load_in_4bit"):  # NF4/FP4, blocksize 64, fp32 absmax (8-bit with double quantization)
            absmax_bits = 8 + 32 / 256 if q.get("bnb_4bit_use_double_quant") else 32
            return spec("int4", 4 + absmax_bits / 64, "quantization_config bitsandbytes 4-bit (blocks of 64)",
                        weight_only=True)
        if q.get("load_in_8bit"):  # LLM.int8(): int8 rows with one fp32 scale per row
            return spec("int8", 8, "quantization_config bitsandbytes 8-bit (LLM.int8)", weight_only=True)
        raise KvsimError("bitsandbytes config sets neither load_in_4bit nor load_in_8bit",
                         field="quantization_config.load_in_4bit", value=None, file=file)
    if method == "compressed-tensors":
        return _compressed_tensors(q, file)
    raise KvsimError("unknown quant_method (known: fp8, modelopt, compressed-tensors, awq, gptq, bitsandbytes, mxfp4)",
                     field=field, value=method, file=file)


def _compressed_tensors(q: dict, file: str) -> dict:
    """compressed-tensors: the weights scheme of its (first) config group."""
    groups = q.get("config_groups") or {}
    if not groups:
        raise KvsimError("compressed-tensors config has no config_groups", field="quantization_config.config_groups",
                         value=None, file=file)
    group = next(iter(groups.values()))
    w, a = group.get("weights") or {}, group.get("input_activations")
    bits, kind, strategy = int(w.get("num_bits", 0)), w.get("type", "int"), w.get("strategy", "tensor")
    size = w.get("group_size") if strategy == "group" else None
    modules = "mlp" if _ignored_attention(q.get("ignore")) else "linear"
    where = f"quantization_config compressed-tensors {kind}{bits} {strategy}"
    base = {"modules": modules, "needs_native_fp8": False, "method": "compressed-tensors", "source": where}
    if kind == "float" and bits == 8:
        block = w.get("block_structure") if strategy == "block" else None
        extra = 32 / (block[0] * block[1]) if block else 0.0
        return {**base, "precision": "fp8", "bits_per_weight": 8 + extra, "weight_only": a is None,
                **({"block_scaled": True} if block else {})}
    if kind == "float" and bits == 4:  # nvfp4-pack-quantized: group 16 with E4M3 scales
        return {**base, "precision": "nvfp4", "bits_per_weight": NVFP4_BITS, "weight_only": a is None}
    if kind == "int" and bits == 8:
        return {**base, "precision": "int8", "bits_per_weight": _int_bits(8, size, not w.get("symmetric", True)),
                "weight_only": a is None}
    if kind == "int" and bits == 4:
        return {**base, "precision": "int4", "bits_per_weight": _int_bits(4, size, not w.get("symmetric", True)),
                "weight_only": True}
    raise KvsimError(f"compressed-tensors {kind} {bits}-bit weights are not modelled",
                     field="quantization_config.config_groups", value=f"{kind}{bits}", file=file)
