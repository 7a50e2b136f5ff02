"""How each cached element is stored: 16-bit, FP8, and the group-quantization family.

Metadata is counted: a group of ``G`` elements sharing an fp16 scale and an fp16 zero point costs
``32 / G`` extra bits per element (KIVI arXiv 2402.02750, section 3: "b + 32/G bits"). Quantization
applies to K/V-like streams (K, V, latents, low-rank factors); bookkeeping streams (scores, merge
counts) stay as they are.
"""

from __future__ import annotations

from dataclasses import replace

from kvsim.kv.layout import KVLayout, Quant, Stream
from kvsim.kv.method import Method, Param, Params, Stage

# Streams that hold cached keys/values (or their latent/low-rank forms) and so get quantized.
KEY_PARTS = frozenset({"k", "k_rope", "k_shared", "k_res", "k_lowrank", "latent", "outlier_kv"})
VALUE_PARTS = frozenset({"v", "v_shared", "v_res", "v_lowrank"})

FP16_SCALE_ZERO_BITS = 32  # one fp16 scale + one fp16 zero point per group (KIVI section 3)
KVQUANT_OUTLIER_BITS = 16 + 16  # fp16 value + 16-bit position per sparse outlier (KVQuant, arXiv 2401.18079)


def set_precision(layout: KVLayout, key: Quant | float, value: Quant | float) -> KVLayout:
    """Store key streams as ``key`` and value streams as ``value`` (a Quant or bytes per element)."""
    def convert(s: Stream) -> Stream:
        target = key if s.part in KEY_PARTS else value if s.part in VALUE_PARTS else None
        if target is None:
            return s
        if isinstance(target, Quant):
            return replace(s, quant=target)
        return replace(s, elem_bytes=target, quant=None)

    return layout.with_layers([replace(layer, streams=tuple(convert(s) for s in layer.streams))
                               for layer in layout.layers])


def _sixteen_bit(layout: KVLayout, p: Params) -> KVLayout:
    return set_precision(layout, 2.0, 2.0)


def _fp8(layout: KVLayout, p: Params) -> KVLayout:
    # vLLM fp8_e4m3/e5m2 KV: one byte per element; the per-tensor or per-head scales are a few
    # floats per layer, not per token, so they add nothing per token.
    return set_precision(layout, 1.0, 1.0)


def _kivi(layout: KVLayout, p: Params) -> KVLayout:
    # Keys per channel and values per token, both in groups of G with fp16 scale + zero point,
    # and the most recent R tokens in fp16 (KIVI arXiv 2402.02750, sections 3.2-3.3).
    q = Quant(float(p["bits"]), int(p["group"]), FP16_SCALE_ZERO_BITS, int(p["residual"]))
    return set_precision(layout, q, q)


def _asym(layout: KVLayout, p: Params) -> KVLayout:
    # "Quantize what counts" (arXiv 2502.15075): keys need more bits than values (e.g. K4V2);
    # KIVI-style grouping and residual window, at the paper's G = 128 and R = 64.
    g, r = int(p["group"]), int(p["residual"])
    return set_precision(layout, Quant(float(p["k_bits"]), g, FP16_SCALE_ZERO_BITS, r),
                         Quant(float(p["v_bits"]), g, FP16_SCALE_ZERO_BITS, r))


def _intkv(layout: KVLayout, p: Params) -> KVLayout:
    # Plain per-token group quantization (e.g. the INT8/INT4 KV of LMDeploy and TensorRT-LLM),
    # no full-precision window.
    q = Quant(float(p["bits"]), int(p["group"]), FP16_SCALE_ZERO_BITS)
    return set_precision(layout, q, q)


def _skvq(layout: KVLayout, p: Params) -> KVLayout:
    # SKVQ (arXiv 2405.06219): group-wise quantization with clipping (keys ~2 bits, values ~1.5 bits
    # by mixing group widths) and a full-precision sliding window of recent tokens.
    g, w = int(p["group"]), int(p["window"])
    return set_precision(layout, Quant(float(p["k_bits"]), g, FP16_SCALE_ZERO_BITS, w),
                         Quant(float(p["v_bits"]), g, FP16_SCALE_ZERO_BITS, w))


def _kvquant(layout: KVLayout, p: Params) -> KVLayout:
    # KVQuant (arXiv 2401.18079): non-uniform per-channel keys / per-token values, with a fraction
    # of dense-and-sparse outliers kept as an fp16 value and a 16-bit position (CSR; the per-vector
    # row pointers add under 0.01 bit per element). 3 bits with 1% outliers is then 3.32 bits per
    # element, the paper's reported 3.32-3.35. Per-channel codebooks are per layer, not per token.
    q = Quant(float(p["bits"]), 1 << 30, 0.0, 0, float(p["outliers"]), KVQUANT_OUTLIER_BITS)
    return set_precision(layout, q, q)


def _packkv(layout: KVLayout, p: Params) -> KVLayout:
    # PackKV (arXiv 2512.24449): lossy quantization then data-dependent repacking; the stored size
    # is a distribution, modelled by its mean bits per element (a user-set parameter) plus the
    # per-group headers of the packed format (fp16 scale + zero + a 16-bit length per group).
    q = Quant(float(p["mean_bits"]), int(p["group"]), FP16_SCALE_ZERO_BITS + 16)
    return set_precision(layout, q, q)


METHODS = (
    Method("bf16", Stage.PRECISION, "16-bit KV (bfloat16), vLLM's default 'auto' for bf16 models",
           "vLLM docs: kv_cache_dtype=auto", (), _sixteen_bit, "bf16"),
    Method("fp16", Stage.PRECISION, "16-bit KV (float16)", "vLLM docs: kv_cache_dtype=auto", (),
           _sixteen_bit, "fp16"),
    Method("fp8", Stage.PRECISION, "FP8 (e4m3/e5m2) KV, one byte per element, per-tensor scale",
           "vLLM docs: quantized KV cache (kv_cache_dtype=fp8)",
           (Param("format", str, "e4m3", ("e4m3", "e5m2"), doc="FP8 format"),), _fp8, "fp8"),
    Method("kivi", Stage.PRECISION, "KIVI: keys per channel, values per token, fp16 residual window",
           "arXiv 2402.02750",
           (Param("bits", int, 2, minimum=1, maximum=8, doc="bits per element"),
            Param("group", int, 32, minimum=1, doc="group size G"),
            Param("residual", int, 128, minimum=0, doc="recent tokens kept in fp16 (R)")),
           _kivi, "kivi:bits=2"),
    Method("asymkv", Stage.PRECISION, "More bits for keys than values (e.g. K4V2), KIVI layout",
           "arXiv 2502.15075",
           (Param("k_bits", int, 4, minimum=1, maximum=8, doc="key bits"),
            Param("v_bits", int, 2, minimum=1, maximum=8, doc="value bits"),
            Param("group", int, 128, minimum=1, doc="group size (arXiv 2502.15075: G = 128)"),
            Param("residual", int, 64, minimum=0, doc="recent tokens in fp16 (arXiv 2502.15075: R = 64)")),
           _asym, "asymkv:k_bits=4,v_bits=2"),
    Method("intkv", Stage.PRECISION, "Per-token group-quantized INT8/INT4/INT2 KV, no residual window",
           "LMDeploy / TensorRT-LLM INT8 and INT4 KV cache docs",
           (Param("bits", int, 8, choices=(), minimum=1, maximum=8, doc="bits per element"),
            Param("group", int, 64, minimum=1, doc="elements per scale/zero group")),
           _intkv, "intkv:bits=4"),
    Method("skvq", Stage.PRECISION, "SKVQ: clipped group quantization + full-precision recent window",
           "arXiv 2405.06219",
           (Param("k_bits", float, 2.0, minimum=1, maximum=8, doc="key bits"),
            Param("v_bits", float, 1.5, minimum=1, maximum=8, doc="value bits"),
            Param("group", int, 128, minimum=1, doc="group size"),
            Param("window", int, 128, minimum=0, doc="recent tokens in fp16")),
           _skvq, "skvq"),
    Method("kvquant", Stage.PRECISION, "KVQuant: non-uniform quantization with sparse fp16 outliers",
           "arXiv 2401.18079",
           (Param("bits", int, 3, minimum=2, maximum=8, doc="bits per element"),
            Param("outliers", float, 0.01, minimum=0, maximum=0.5, doc="fraction kept sparse in fp16")),
           _kvquant, "kvquant:bits=3"),
    Method("packkv", Stage.PRECISION, "PackKV: quantize, repack and bit-pack; mean bits per element",
           "arXiv 2512.24449",
           (Param("mean_bits", float, None, minimum=0.5, maximum=16,
                  doc="mean stored bits per element after packing"),
            Param("group", int, 64, minimum=1, doc="elements per packed group")),
           _packkv, "packkv:mean_bits=2.5"),
)
