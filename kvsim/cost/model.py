"""Price one engine step of any model, KV method and GPU: a per-operator roofline.

    time(op) = max(FLOPs / (peak x compute_eff(size)), bytes / (bandwidth x memory_eff(size)))
               + floor x kernels

Each decode term of a KV layout is a sum of ``coef x sum_i min(context_i, cap)`` over a few
distinct caps (sliding windows, eviction budgets, quantization residual windows, GPU tiers,
top-k reads), so the coefficients are computed once per (model, method, GPU, TP) and a step costs
a few numpy reductions however large the batch. ``decode_times_s`` prices ``k`` consecutive
decode-only steps in one pass with the same arithmetic as ``step``, so the simulator can
fast-forward and still equal step-by-step simulation exactly.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np

from kvsim.cost.calibration import FP32_GEMM_CURVE, GROUPED_MM_CURVE, Calibration, find_calibration, is_engine_kernel
from kvsim.cost.collectives import custom_one_stage
from kvsim.cost.execution import Execution, eager_launch
from kvsim.cost.kernels import KernelSource, decode_kernel
from kvsim.kv import METHODS
from kvsim.kv.layout import KVLayout, Stream
from kvsim.spec.hardware import HardwareSpec
from kvsim.spec.linears import check_tp, head_linears, kv_heads_per_rank, layer_linears, padded_expert
from kvsim.spec.model import ModelSpec
from kvsim.spec.parallel import SINGLE, Parallel, expert_shard, gathers_tokens, max_rank_load
from kvsim.spec.quant import EXPERT_GEMMS, FP8_ACTIVATION_GROUP, W4A16_CURVE, expert_width_align, weight_kernel

NO_CAP = -1  # cap key meaning "the whole context"
DEQUANT_FLOPS_PER_ELEMENT = 4  # unpack, convert, multiply by scale, add zero point
# A weight-only (W8A16 / W4A16) GEMM dequantizes each weight it reads once per slice of this many rows:
# vLLM's Marlin kernels work on at most 4 thread M-blocks of 16 rows (csrc/quantization/gptq_marlin).
DEQUANT_ROWS_PER_PASS = 64
# vLLM --enforce-eager captures no CUDA graph: every kernel of a step is launched from the CPU, which
# small decode steps then wait on (labelled in every such run's notes).
EAGER_NOTE = ("PRIOR: engine.enforce_eager (no CUDA graphs): a step takes at least the CPU time of launching its "
              "kernels one by one (host.eager_launch), as {source}; vLLM's own Python per layer is likely more "
              "(public runs measured TPOT 1.7-4.3x a CUDA-graph run's: Qwen2.5-Omni 3B and 7B on H200 and A800, "
              "vllm-project/vllm-omni issue 7960) and the host CPU sets it, so eager steps may be longer still")
# Element-wise kernels of one decoder layer as vLLM runs them (and validation/engine.py mirrors):
# fused_add_rms_norm before attention and before the MLP (read x and the residual, write both),
# rotary_embedding in place on q and k, silu_and_mul on the gate/up output. The KV-cache write
# (reshape_and_cache) is priced separately as ``kv_write``.
NORMS_PER_LAYER = 2
# A routed-expert layer adds, besides its GEMMs: top-k softmax, the token permutation into expert
# order (vLLM moe_align_block_size + gather) and the weighted un-permute/sum (moe_sum): four
# kernels that move each routed token's hidden state (vLLM fused_moe, layer/fused_moe/fused_moe.py).
MOE_ROUTING_KERNELS_PER_LAYER = 4
# W8A8 routed experts: vLLM's fused MoE quantizes each expert GEMM's input in its own kernel, two per
# layer (fused_experts_impl: moe_kernel_quantize_input before each invoke_fused_moe_kernel)
MOE_QUANT_KERNELS_PER_LAYER = 2
# Token counts up to this are priced ahead, all at once, into per-op tables (a simulation asks for
# the same few thousand counts again and again); larger or fractional counts are priced on demand
# with the same vectorized arithmetic, so a value never depends on which path produced it.
FIXED_TABLE_MAX_TOKENS = 1 << 15
_NO_TOKENS = np.zeros(0)  # a step without prefill: no prompt chunks (never written)
DRIVERS = ("tokens", "sampled", "new_tokens")  # the count each token-only op depends on
Passes = tuple[tuple[float, float], ...]  # (weight, token count) passes of the model over a step's rows


@dataclass(frozen=True)
class Batch:
    """One engine step: prefill chunks (each with the tokens already cached before it) and decode
    tokens (each sequence's cached context before this step)."""

    prefill_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    prefill_context: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    decode_context: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    prefill_samples: int | None = None  # prefill chunks that finish their prompt (sample a token)
    merged_tokens: int = 0  # vision tokens those chunks merge away (LightKV), summed


@dataclass(frozen=True)
class Op:
    name: str
    flops: float
    bytes: float
    seconds: float
    bound: str  # compute | memory | floor | link | host | overlapped


@dataclass(frozen=True)
class StepCost:
    total_s: float
    ops: tuple[Op, ...]

    @property
    def breakdown(self) -> dict[str, float]:
        return {op.name: op.seconds for op in self.ops}


# A dense linear more than this factor below the smallest weight its GEMM curve measured is labelled
# extrapolated (a factor of 2 leaves a shape just past the measured ones unlabelled)
BELOW_MEASURED = 2.0


def mib(nbytes: float) -> str:
    """Bytes as MiB for a note: two significant digits below 10, whole MiB above."""
    v = nbytes / 2**20
    return f"{v:.2g}" if v < 10 else f"{v:,.0f}"


@dataclass(frozen=True)
class _Gemms:
    """The GEMMs of one step as parallel arrays (one entry per linear of a layer kind)."""

    names: tuple[str, ...]  # role names, ``gemm.<role>``
    role: np.ndarray  # index into names
    layers: np.ndarray  # layers running this linear
    weight_bytes: np.ndarray  # per layer, all experts
    flops_per_token: np.ndarray  # top_k experts included
    act_bytes_per_token: np.ndarray
    experts: np.ndarray  # experts this GPU holds
    top_k: np.ndarray
    routed: np.ndarray  # a routed-expert linear (a token uses top_k of the model's experts)
    pick: np.ndarray  # chance that one token picks one given expert: top_k / the model's experts
    token_scale: np.ndarray  # tokens it runs on per token of this rank: every DP rank's, gathered
    share: np.ndarray  # share of the routed token-expert pairs this GPU computes (its experts / all)
    peak: np.ndarray  # FLOP/s of the dtype the GEMM runs in
    per_sampled: np.ndarray  # the output head runs on sampled rows, not on every token
    curve_names: tuple[str, ...]  # calibration curves the GEMMs use
    curve: np.ndarray  # index into curve_names, per linear
    dequant_flops_per_byte: np.ndarray  # per weight byte read, per pass of DEQUANT_ROWS_PER_PASS rows


METHOD_STAGES = {name: m.stage.name.lower() for name, m in METHODS.items()}


def decode_family(layout: KVLayout) -> str:
    """Which decode-attention kernel a layout needs, named by the method that decides it (a
    calibration profile may fit each kernel's efficiency separately): MLA's absorbed latent kernel
    (``mla``, or ``mtla`` over a strided latent), a quantized method's fused-dequantization kernel
    (``kivi``, ``intkv``, ...), FP8 loads, per-step score accumulation (``h2o``, ``keepkv``), low-rank
    reconstruction (``lrkv``, ``shadowkv``), else the dense kernel (``dense``). Quantized kernels are
    keyed with their key and value bit widths too (``kivi.k2v2``, ``intkv.k8v8``)."""
    names = [spec.split(":", 1)[0] for spec in layout.methods]
    streams = [s for layer in layout.layers for s in layer.streams]
    rt = layout.runtime

    def deciding(*stages: str) -> str:  # the first stage (in this order) that has a method decides
        return next((n for stage in stages for n in names if METHOD_STAGES.get(n) == stage), "dense")

    if any(layer.kind == "mla" for layer in layout.layers):
        kernel = "mtla" if "mtla" in names else "mla"
        widths = {s.quant.bits if s.quant else s.elem_bytes * 8 for s in streams if s.part in ("latent", "k_rope")}
        narrowest = min(widths, default=16.0)  # a latent stored narrower than the model dtype needs dequantizing
        return f"{kernel}.k{narrowest:g}v{narrowest:g}" if narrowest < layout.model.dtype_bytes * 8 else kernel
    if any(s.quant for s in streams):  # the unpacking work per byte depends on the bit widths
        bits = {s.part[0]: s.quant.bits for s in streams if s.quant and s.part[:1] in ("k", "v")}
        return f"{deciding('precision', 'placement', 'eviction')}.k{bits.get('k', 16):g}v{bits.get('v', 16):g}"
    if rt.per_step_scoring:
        return deciding("eviction")
    if rt.reconstruct_rank or rt.rebuild_lowrank_keys:
        return deciding("structure", "placement")
    if any(s.tier != "gpu" for s in streams):  # a host tier: what the step reads depends on the fetch path
        return deciding("placement")
    if any(s.elem_bytes < layout.model.dtype_bytes for s in streams if s.part in ("k", "v")):
        return deciding("precision")
    return "dense"


def sum_min_range(start: np.ndarray, count: np.ndarray, cap: int) -> np.ndarray:
    """sum_{j=start+1}^{start+count} min(j, cap), vectorized (cap == NO_CAP: no cap)."""
    end = start + count
    if cap == NO_CAP:
        return (start + 1 + end) * count / 2.0
    lo = np.minimum(start, cap)
    hi = np.minimum(end, cap)
    below = (lo + 1 + hi) * (hi - lo) / 2.0  # the part of the range under the cap
    return below + cap * (end - np.maximum(start, hi))


@dataclass
class _Terms:
    """Per-sequence decode terms: kind -> cap -> coefficient (summed over layers)."""

    by_kind: dict[str, dict[int, float]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(float)))
    const: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, kind: str, cap: int | None, coef: float) -> None:
        if coef:
            self.by_kind[kind][NO_CAP if cap is None else cap] += coef


def _cap(*caps: int | None) -> int | None:
    real = [c for c in caps if c is not None]
    return min(real) if real else None


class CostModel:
    """Step times of one replica (model, KV layout, GPU, TP degree, calibration profile)."""

    def __init__(self, model: ModelSpec, hardware: HardwareSpec, layout: KVLayout, tp: int = 1,
                 calibration: Calibration | str | None = None, execution: Execution | None = None,
                 parallel: Parallel = SINGLE) -> None:
        """``execution``: the engine's all-reduce and CUDA-graph padding (``vllm_execution(...)`` for
        vLLM); None prices the reference engine (a graph at every exact size, every all-reduce
        with the calibrated ring model of its graph-captured NCCL). ``parallel``: data-parallel
        attention and expert parallelism (kvsim.spec.parallel); a step is then one DP rank's, with
        every DP rank carrying as many tokens (vLLM pads them all to the busiest rank's count under
        CUDA graphs: ``coordinate_batch_across_dp`` in vllm/v1/worker/dp_utils.py)."""
        check_tp(model, tp)
        self.model, self.hw, self.layout, self.tp = model, hardware, layout, tp
        self.parallel = parallel
        self.ep = parallel.ep_size(tp)
        self.cal = calibration if isinstance(calibration, Calibration) else find_calibration(hardware, calibration)
        self.execution = execution
        self.allreduce = execution.allreduce if execution is not None else None
        k_ = weight_kernel(model, hardware)
        if k_.curve not in self.cal.ops and k_.fallback_curve in self.cal.ops:  # e.g. Machete unmeasured here
            k_ = replace(k_, curve=k_.fallback_curve, note=f"{k_.note}; {k_.fallback_note}")
        self.weight_kernel = k_
        self.notes: tuple[str, ...] = ()  # how weights and experts are priced (labels priors), set by _build_gemms
        self._gemms = self._build_gemms()
        if gathers_tokens(model, parallel):
            self.notes += (self._parallel_note(),)
        # --enforce-eager: the CPU time of launching one step's kernels (the GPU's floor; 0 under CUDA graphs)
        self._eager_launch_s = 0.0
        if execution is not None and execution.eager:
            layer_s, launched = eager_launch()
            self._eager_launch_s = layer_s * model.num_layers
            self.notes += (EAGER_NOTE.format(source=launched),)
        self._fixed_cache: dict[tuple[Passes, float, float], list] = {}
        self._table: list[tuple] = []  # (name, driver index, flops, bytes, seconds, bound) arrays
        self._table_sums: list[list[float]] = []  # per driver: seconds of its ops, by count
        self._table_n = 0
        self._decode = self._build_decode_terms()
        self.decode_family = decode_family(layout)
        # query heads sharing one KV head on one rank: the decode kernel's rows per KV read (its second axis).
        # A rank holds q_heads / tp query heads and kv_heads / tp KV heads, or one replicated KV head where
        # there are fewer KV heads than ranks (kv_heads_per_rank), as an MLA latent always is: DeepSeek-V3's
        # 128 heads at TP 8 are 16 per rank over one latent (once priced as 128, on the kernel's slower rows)
        self.query_group = float(max(max(lay.q_heads // tp, 1) // max(lay.kv_heads // tp, 1) for lay in layout.layers))
        decode_curve, source = decode_kernel(self.decode_family, self.cal)
        self.decode_kernel: KernelSource = source  # measured, derived (by which rule), prior or roofline
        self._decode_curve = decode_curve.at(self.query_group)
        caps = sorted({cap for kinds in self._decode.by_kind.values() for cap in kinds})
        self._caps = np.array([np.iinfo(np.int64).max if c == NO_CAP else c for c in caps], dtype=np.int64)
        rt = layout.runtime
        # no windows, budgets, residuals or tiers: a decode run's cap sums have a closed form
        self._uncapped = caps == [NO_CAP] and not self._decode.const and not (rt.host_fetch_all or rt.host_fetch_tokens)
        self._coefs = {kind: [(caps.index(cap), coef) for cap, coef in by_cap.items()]
                       for kind, by_cap in self._decode.by_kind.items()}
        # decode attention at efficiency 1, per cap: compute seconds and HBM bytes per unit of
        # sum_i min(ctx_i, cap) (the per-step hot path multiplies these by the cap sums)
        c = self.cal.ceilings
        per_second = {"attn_flops": 1 / c.flops_per_s["bf16"], "reconstruct_flops": 1 / c.flops_per_s["bf16"],
                      "dequant_flops": 1 / c.flops_per_s["fp32"], "merge_flops": 1 / c.flops_per_s["fp32"]}
        self._roof_coefs = [(j, sum(dict(self._coefs.get(k, ())).get(j, 0.0) * w for k, w in per_second.items()),
                             dict(self._coefs.get("hbm_read", ())).get(j, 0.0)) for j in range(len(caps))]
        self._prefill_groups = self._build_prefill_groups()
        self._elementwise = self._build_elementwise()
        self.cost_notes: tuple[str, ...] = self._cost_notes()

    def _parallel_note(self) -> str:
        """How a DP rank's MoE layers are priced (kvsim.spec.parallel), one line."""
        held, split = expert_shard(self.model, self.tp, self.parallel)
        dp = self.parallel.dp
        where = (f"expert parallel over {self.ep} GPUs ({held} experts on the fullest), load of the busiest EP rank "
                 "under uniform routing (balls into bins)" if self.ep > 1 else
                 f"every expert on every GPU, split {split} ways (TP over data_parallel_size x tp)")
        return (f"MoE over {dp} DP ranks: {where}; each MoE layer all-gathers every rank's tokens (moe.dispatch) and "
                "reduce-scatters the outputs (moe.combine), vLLM's allgather_reducescatter backend priced as NCCL "
                "rings on the calibrated link; every rank is assumed to carry this rank's tokens (vLLM pads them "
                "to the busiest rank's)")

    def _cost_notes(self) -> tuple[str, ...]:
        """What this layout's price rests on besides measured kernels, one line each."""
        rt = self.layout.runtime
        notes = [] if self.decode_kernel.status == "measured" else [f"decode attention: {self.decode_kernel.label}"]
        if self.decode_family.startswith("mla") and self.cal.kind == "measured":
            # vLLM's FlashMLA (validation/flashmla.py) where this profile has it, else kvsim's stand-in; either
            # way the rest of vLLM's MLA module is kvsim's own kernels (README, 'MLA decode')
            curve = self.decode_kernel.curve
            notes.append(f"MLA decode attention on vLLM's FlashMLA ({curve}); the rest of vLLM's MLA module on "
                         "kvsim's kernel curves: at a few sequences vLLM's whole module, as aiconfigurator measured "
                         "it, takes longer than kvsim's parts (scripts/mla_vs_aiconfigurator.py)"
                         if is_engine_kernel(self.cal.ops, curve) else
                         f"MLA decode attention on kvsim's Triton stand-in kernel ({curve}), not vLLM's FlashMLA "
                         "(unmeasured on this GPU): against vLLM's whole MLA module as aiconfigurator measured it, "
                         "kvsim's is too fast at a few sequences, and too slow at many long ones with many heads "
                         "per rank (TP 1-2; scripts/mla_vs_aiconfigurator.py)")
        rule = "cost from the roofline on the prefill-attention curve, not measured"
        if rt.prefill_scoring_window or rt.prefill_scores_all_queries:
            notes.append(f"prefill.scoring (the method's scoring pass): {rule}")
        if rt.merge_ops_per_token:
            notes.append(f"prefill.merge and the per-step merge (KeepKV, 4 * head_dim ops per token, inferred): {rule}")
        if rt.prefill_svd_rank:
            notes.append(f"prefill.svd (randomized truncated SVD, fp32): {rule}")
        if any(s.tier != "gpu" for s, _ in self.layout.stream_counts):
            notes.append("prefill.host_store and host fetches: the measured host-link ceiling (no offload kernel "
                         "is measured)")
        if rt.image_token_keep < 1.0:
            notes.append("prefill.vision_merge (LightKV): a memory-bound pass on the element-wise curve, not fitted to "
                         "the measured lightkv_merge rows")
        if rt.doc_kv_from_ssd:
            notes.append("document KV load (MatKV): the hardware description's NVMe read rate, not measured")
        return tuple(notes)

    # ---------------------------------------------------------------- precomputation
    def _build_gemms(self) -> _Gemms:
        """Every linear of the model (per layer kind) and the output head, as arrays. Quantized linears
        run on their weight kernel's path (kvsim.spec.quant.weight_kernel): its peak, its efficiency
        curve when the profile has one (else the bf16 curve, labelled a prior in ``notes``), and for
        weight-only paths the in-kernel dequantization. Sets ``_moe_in_table``: whether the routed experts
        are priced on an imported table of the whole MoE layer (read by ``_build_elementwise``)."""
        e, c, k_ = self.model.dtype_bytes, self.cal.ceilings, self.weight_kernel
        native_bits = 8 * e
        rows: list[tuple] = []
        kinds: dict[tuple, list] = {}
        fp32_router = False
        on_prior = False  # a quantized linear priced on the bf16 curve (its path unmeasured)
        for layer in self.model.layers:  # layers with the same weights: mixer kind, MLP, MoE
            key = (layer.attention if layer.attention in ("state", "none") else "attention", layer.mlp, layer.moe)
            kinds.setdefault(key, [layer, 0])[1] += 1
        moe = self.model.moe
        top_k = moe.top_k if moe else 1
        dp = self.parallel.dp if gathers_tokens(self.model, self.parallel) else 1
        # 16-bit routed experts: the fused-MoE kernel vLLM runs, else the other measured grouped kernel
        grouped = next((g for g in ("gemm_grouped", GROUPED_MM_CURVE) if g in self.cal.ops), "gemm")
        prior = k_.path != "bf16" and k_.curve not in self.cal.ops
        # quantized routed experts on their own fused-MoE curve where the profile measured it, or on a curve
        # per expert GEMM, named by the expert linear, where the kernel's two GEMMs differ (MXFP4 on Hopper)
        split = {f"experts.{g}": f"{k_.grouped_curve}.{g}" for g in EXPERT_GEMMS}
        if k_.grouped_curve and all(cv in self.cal.ops for cv in split.values()):
            experts_curve = k_.grouped_curve
        else:
            experts_curve, split = (k_.grouped_curve if k_.grouped_curve in self.cal.ops else ""), {}
        # a kernel that gathers, activates and sums inside its GEMMs (vLLM fused_moe/gpt_oss_triton_kernels_moe.py):
        # _build_elementwise prices none of those apart
        self._moe_fused = k_.experts_fused
        align = expert_width_align(self.model, self.hw)
        for layer, count in kinds.values():
            for lin in layer_linears(self.model, layer, self.tp, self.parallel):
                routed = lin.role == "experts"
                lin = padded_expert(lin, align)  # the width the engine runs
                k = top_k if routed else 1
                quantized = lin.bits < native_bits
                if lin.bits > native_bits:  # an fp32 router: vLLM runs it as an fp32 GEMM (no tensor cores)
                    fp32_router, dq = True, 0.0
                    if FP32_GEMM_CURVE in self.cal.ops:
                        peak, curve = c.flops_per_s["fp32"], FP32_GEMM_CURVE
                    else:  # prior: the share of the datasheet peak a bf16 GEMM of the shape reaches
                        peak = c.flops_per_s["fp32"] * c.flops_per_s["bf16"] / self.hw.peak_flops_per_s["bf16"]
                        curve = "gemm"
                elif quantized:
                    peak = c.flops_per_s.get(k_.peak_dtype) or self.hw.peak_flops_per_s[k_.peak_dtype]
                    own = routed and bool(experts_curve)  # the experts' own measured kernel
                    curve = (split.get(lin.name, experts_curve) if own else k_.curve if not prior
                             else grouped if routed else "gemm")
                    # a measured curve of the path already holds its dequantization; the prior adds it
                    dq = DEQUANT_FLOPS_PER_ELEMENT * 8 / lin.bits if k_.dequant and prior and not own else 0.0
                    on_prior = on_prior or (prior and not own)
                else:
                    peak, curve, dq = c.flops_per_s["bf16"], grouped if routed else "gemm", 0.0
                n_all = moe.num_experts if routed and moe else 1
                act_e = max(e, lin.bits / 8)  # an fp32 GEMM reads and writes fp32 rows
                rows.append((f"gemm.{lin.role}", count, lin.bytes, 2.0 * lin.in_features * lin.out_features * k,
                             (lin.in_features + lin.out_features) * act_e * k, lin.experts, k, peak, False, curve, dq,
                             routed, k / n_all if routed else 1.0, dp if routed else 1,
                             lin.experts / n_all if routed else 1.0))
        for lin in head_linears(self.model, self.tp):
            if lin.role == "lm_head" or self.model.tie_word_embeddings:  # runs on sampled rows only
                rows.append(("gemm.lm_head", 1, lin.bytes, 2.0 * lin.params,
                             (lin.in_features + lin.out_features) * e, 1, 1, c.flops_per_s["bf16"], True, "gemm", 0.0,
                             False, 1.0, 1, 1.0))
        if moe and grouped != "gemm_grouped" and (k_.path == "bf16" or prior):
            self.notes += (f"profile {self.cal.gpu} has no gemm_grouped curve (vLLM's fused-MoE kernel unmeasured): "
                           f"16-bit routed experts priced on the {grouped} curve",)
        if fp32_router:
            self.notes += ((f"the router runs in fp32 (vLLM's MiniMax-M2 gate): {FP32_GEMM_CURVE} curve, "
                            f"{self.cal.label}") if FP32_GEMM_CURVE in self.cal.ops else
                           (f"PRIOR: the router runs in fp32 (vLLM's MiniMax-M2 gate); profile {self.cal.gpu} has "
                            f"no {FP32_GEMM_CURVE} curve: priced at the share of the FP32 datasheet peak a bf16 GEMM "
                            "of its shape reaches of the bf16 one"),)
        if k_.path != "bf16":
            wq = self.model.weight_quant
            assert wq is not None  # weight_kernel gives the bf16 path to a model without weight quantization
            self.notes += (f"weights {wq.precision} ({wq.bits_per_weight:g} bits, {wq.modules}): {k_.note}",)
            if moe and k_.grouped_curve:
                took = sorted({self.cal.derived[cv] for cv in split.values() if cv in self.cal.derived})
                self.notes += ((f"routed experts on the {', '.join(split.values())} curves (one per GEMM of the "
                                f"kernel vLLM runs; {'; '.join(took) or self.cal.label})" if split else
                                f"routed experts on the {experts_curve} curve (fused-MoE kernel; {self.cal.label})"
                                if experts_curve else f"profile {self.cal.gpu} has no {k_.grouped_curve} curve (the "
                                f"fused-MoE kernel unmeasured): routed experts priced on the "
                                f"{grouped if prior else k_.curve} curve"),)
                if self.cal.kind == "measured" and not split:  # (split curves: vLLM's own kernel, measured)
                    self.notes += (f"quantized routed experts on kvsim's own {self.cal.gpu} profile (its stand-in "
                                   "kernels): judged on held-out vLLM runs on H100 and H200 it prices their decode "
                                   "too fast, where the imported profile of vLLM's own kernels was closer "
                                   "(README, 'Which profile prices Hopper's quantized MoE'; --calibration imported)",)
            if on_prior:
                self.notes += (f"PRIOR: profile {self.cal.gpu} has no {k_.curve} curve: {k_.path} GEMMs use the bf16 "
                               "GEMM efficiency curve at the " + k_.peak_dtype + " peak"
                               + (f", plus {DEQUANT_FLOPS_PER_ELEMENT} dequantization FLOPs per weight per "
                                  f"{DEQUANT_ROWS_PER_PASS} rows at the FP32 rate" if k_.dequant else "")
                               + (" (a labelled prior: the W4A16 kernels validation/gemm.py times are slower than"
                                  " vLLM's and not fitted, kvsim/calibrate.py)" if k_.curve == W4A16_CURVE else
                                  " (a labelled prior, not a measurement; validation/gemm.py measures it)"),)
        self.notes += self._unmeasured_weight_sizes(rows)
        routed_curves = {r[9] for r in rows if r[11]}
        # an imported MoE table times vLLM's whole routed-expert layer (top-k, alignment, activation
        # quantization, both GEMMs, activation, weighted sum: kvsim/importers/aiconfigurator.py), so
        # _build_elementwise adds none of those kernels again
        self._moe_in_table = (bool(routed_curves) and self.cal.kind == "imported"
                              and all(cv.startswith("gemm_grouped") for cv in routed_curves))
        if self._moe_in_table:
            self.notes += (f"routed experts on {self.cal.label}'s MoE table ({', '.join(sorted(routed_curves))}), "
                           "which times the engine's whole MoE layer: top-k, alignment, activation quantization, "
                           "activation and weighted sum are inside gemm.experts, not priced apart",)
        names = list(dict.fromkeys(r[0] for r in rows))
        curve_names = tuple(dict.fromkeys(r[9] for r in rows))
        col = list(zip(*rows, strict=True))
        n_layers, w_bytes, flops, act_bytes, experts, top_ks, peaks = (np.array(v, dtype=float) for v in col[1:8])
        return _Gemms(tuple(names), np.array([names.index(n) for n in col[0]]),
                      n_layers, w_bytes, flops, act_bytes, experts, top_ks,
                      np.array(col[11], dtype=bool), np.array(col[12], dtype=float), np.array(col[13], dtype=float),
                      np.array(col[14], dtype=float), peaks, np.array(col[8], dtype=bool),
                      curve_names, np.array([curve_names.index(n) for n in col[9]]), np.array(col[10], dtype=float))

    def _unmeasured_weight_sizes(self, rows: list[tuple]) -> tuple[str, ...]:
        """A note per GEMM curve with dense linears (rows of _build_gemms: role at 0, weight bytes at 2,
        curve at 9, routed at 11) more than a factor 2 below the smallest weight it measured: a table
        curve clamps there, pricing the linear at that shape's efficiency, with nothing of the fixed time
        a small kernel takes beyond the table's one floor (an H200 profile measured on 32-224 MiB weights
        prices a 0.7 MiB router in 0.3 us). Above the largest, efficiency has levelled off (the H100's bf16
        table: 1.08-1.22 of the copy rate at one row from 48 to 1,002 MiB), so larger ones go unlabelled."""
        outside: dict[str, list[str]] = defaultdict(list)
        for r in rows:
            role, nbytes, name, routed = r[0], r[2], r[9], r[11]
            curve = self.cal.ops.get(name)
            if routed or curve is None or not curve.log2_size2:
                continue  # routed experts touch a share of their weights that depends on the tokens
            if nbytes < 2.0 ** curve.log2_size2[0] / BELOW_MEASURED:
                outside[name].append(f"{role} {mib(nbytes)} MiB")
        return tuple(f"{', '.join(dict.fromkeys(v))}: weights below the smallest measured on curve {cv} of "
                     f"profile {self.cal.gpu} ({mib(2.0 ** self.cal.ops[cv].log2_size2[0])} MiB); priced at its "
                     "efficiency (extrapolated)" for cv, v in outside.items())

    def _build_decode_terms(self) -> _Terms:
        terms = _Terms()
        layout, tp = self.layout, self.tp
        owners = {layer.index: layer for layer in layout.layers}
        for layer in layout.layers:
            src = owners[layer.source]
            heads = layer.q_heads // tp
            tpe = src.streams[0].tokens_per_entry if src.streams else 1
            attend = _cap(layer.span_cap, layer.read_cap)
            terms.add("attn_flops", attend, 2.0 * heads * (layer.qk_dim + layer.vo_dim) / tpe)
            for s in src.streams:
                self._add_stream(terms, s, layer.read_cap)
            rank, rt = layout.runtime.reconstruct_rank, layout.runtime
            width = kv_heads_per_rank(self.model, tp) * self.model.attention.head_dim
            if rank:
                terms.add("reconstruct_flops", attend, 4.0 * rank * width)
            if rt.rebuild_lowrank_keys:  # LoRC: keys rebuilt from their rank-r factor (2*r*width FLOPs per token)
                k_rank = next(s.dim for s in src.streams if s.part == "k_lowrank")
                terms.add("reconstruct_flops", attend, 2.0 * k_rank * width)
            if rt.merge_ops_per_token and layer.owns_kv and layer.span_cap is not None:
                # KeepKV: past its budget a sequence evicts one token per KV head per step and merges
                # it into a kept one; sum_i min(ctx_i, B+1) - min(ctx_i, B) counts those sequences
                coef = rt.merge_ops_per_token * kv_heads_per_rank(self.model, tp)
                terms.add("merge_flops", layer.span_cap + 1, coef)
                terms.add("merge_flops", layer.span_cap, -coef)
        if layout.runtime.per_step_scoring:  # H2O/KeepKV: write back the accumulated scores
            for layer in layout.layers:
                for s in owners[layer.source].streams:
                    if s.part in ("score", "merge_state"):
                        terms.add("hbm_read", _cap(s.token_cap, layer.read_cap),
                                  s.heads_per_rank(tp) * s.dim * s.elem_bytes)
        return terms

    def _add_stream(self, terms: _Terms, s: Stream, read_cap: int | None) -> None:
        """Bytes one decode step reads (HBM) or fetches (host link) of stream ``s``."""
        readers = kv_heads_per_rank(self.model, self.tp) if s.gathered_per_kv_head else 1
        width = readers * s.heads_per_rank(self.tp) * s.dim / s.tokens_per_entry
        full = width * s.elem_bytes
        q = width * s.quant.bits_per_element / 8 if s.quant else full
        r = s.quant.residual_tokens if s.quant else 0
        cap = s.token_cap if s.scored_whole else _cap(s.token_cap, read_cap)
        if s.const_entries:
            terms.const["hbm_read"] += s.const_entries * s.heads_per_rank(self.tp) * s.dim * s.elem_bytes
        if s.token_cap == 0:
            return
        deq = DEQUANT_FLOPS_PER_ELEMENT * width if s.quant else 0.0
        if s.tier == "gpu":
            terms.add("hbm_read", cap, q)
            terms.add("hbm_read", _cap(cap, r), full - q)
            terms.add("dequant_flops", cap, deq)
            return
        g = s.gpu_recent_tokens
        terms.add("hbm_read", _cap(cap, g), q)  # the recent tokens on the GPU
        terms.add("hbm_read", _cap(cap, g, r), full - q)
        terms.add("dequant_flops", _cap(cap, g), deq)
        rt = self.layout.runtime
        fetched_cap = None if rt.host_fetch_all else _cap(cap, g + rt.host_fetch_tokens)
        # fetched over PCIe (less what the last step already fetched: ShadowKV's reuse), then read from HBM
        for kind, share in (("host_fetch", 1.0 - rt.host_fetch_reuse), ("hbm_read", 1.0)):
            terms.add(kind, fetched_cap, q * share)
            terms.add(kind, _cap(cap, g), -q * share)
        terms.add("dequant_flops", fetched_cap, deq)
        terms.add("dequant_flops", _cap(cap, g), -deq)

    def _build_prefill_groups(self) -> list[tuple[int, float, float, float, int]]:
        """(layers, attention flops per attended token, KV bytes per token, Q+O bytes per token, cap)
        per group of identical layers."""
        a, tp = self.model.attention, self.tp
        groups: dict[tuple, int] = defaultdict(int)
        # eviction compresses the cache after the prompt is prefilled: prefill attends the whole prompt
        for layer in (self.layout.prefill or self.layout).layers:
            if layer.kind == "mla":  # prefill runs un-absorbed over per-head K/V (DeepSeek-V2 sec. 2.1)
                qk, vo, kvh = a.head_dim, a.v_head_dim, layer.q_heads // tp
            elif self.layout.runtime.rebuild_lowrank_keys:  # LoRC: the prompt's K/V are made whole first
                qk, vo, kvh = a.head_dim, a.v_head_dim, max(1, layer.kv_heads // tp)
            else:
                qk, vo, kvh = layer.qk_dim, layer.vo_dim, max(1, layer.kv_heads // tp)
            kv_bytes = kvh * (qk + vo) * self.model.dtype_bytes
            qo_bytes = layer.q_heads // tp * (qk + vo) * self.model.dtype_bytes
            groups[(2.0 * layer.q_heads // tp * (qk + vo), kv_bytes, qo_bytes,
                    NO_CAP if layer.span_cap is None else layer.span_cap)] += 1
        return [(n, f, b, qo, cap) for (f, b, qo, cap), n in groups.items()]

    def _build_elementwise(self) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
        """Element-wise kernels: names, bytes per token (summed over layers) and kernels per step.
        The KV write comes first and sampling last."""
        m, tp, e = self.model, self.tp, self.model.dtype_bytes
        h, L = m.hidden_size, m.num_layers
        # reshape_and_cache reads the new K/V rows and writes them into their slots
        kv_write = 2 * sum(count * s.heads_per_rank(tp) * s.dim * s.elem_bytes / s.tokens_per_entry
                           for s, count in self.layout.stream_counts if s.token_cap != 0)
        norm = NORMS_PER_LAYER * 4 * h * e * L + 2 * h * e  # + the final norm (read, write)
        a = m.attention
        if a.mla is not None:  # RoPE touches only the decoupled rope dims: every query head + one key
            rope = 2 * (a.num_heads // tp + 1) * a.mla.qk_rope_head_dim * e * L
        else:
            rope = 2 * (a.num_heads // tp + kv_heads_per_rank(m, tp)) * a.head_dim * e * L
        act, act_kernels = 0.0, 0
        for layer in m.layers:
            if layer.moe and m.moe:  # shared_intermediate_size is the shared experts' total width
                routed = 0 if self._moe_in_table or self._moe_fused else m.moe.expert_intermediate_size * m.moe.top_k
                inter = routed + (m.moe.shared_intermediate_size or 0)
            else:
                inter = m.intermediate_size
            act += 3 * inter // tp * e  # read gate and up, write their product
            act_kernels += inter > 0
        rows = [("kv_write", kv_write, L), ("norm", norm, NORMS_PER_LAYER * L + 1), ("rope", rope, L)]
        if a.qk_norm_across_heads and tp > 1:
            # the sums of squares of this rank's Q and K slices, a pass that must finish before their
            # all-reduce (_qk_norm_allreduce); the normalization after it joins the rotary embedding's
            # kernel in the compiled graph, like a per-head QK norm, which kvsim does not price apart
            attn = m.attention_layers
            rows.append(("qk_norm", (a.num_heads // tp + kv_heads_per_rank(m, tp)) * a.head_dim * e * attn, attn))
        if act_kernels:  # none where every MLP is a routed-expert layer an imported MoE table holds
            rows.append(("activation", act, act_kernels))
        moe_layers = m.moe_layers if m.moe else 0
        # permute: read h, write k copies; un-permute: read k copies, write h (+ shared out); with data
        # parallelism over every DP rank's tokens (gathered), of which this GPU's experts get their share
        if moe_layers and m.moe is not None and not self._moe_in_table:
            dp = self.parallel.dp if gathers_tokens(m, self.parallel) else 1
            share = expert_shard(m, tp, self.parallel)[0] / m.moe.num_experts
            # fused into matmul_ogs: only the routing is apart (top-k over the router's logits, read and
            # about as much written, and the expert-order metadata: triton_kernels topk, make_ragged_tensor_metadata)
            moved = m.moe.num_experts * 2 if self._moe_fused else (3 * m.moe.top_k * share + 2) * h
            rows.append(("moe_routing", moved * dp * e * moe_layers, MOE_ROUTING_KERNELS_PER_LAYER * moe_layers))
            quant = self._moe_input_quant(share)
            if quant:
                rows.append(("moe_act_quant", quant * dp * moe_layers, MOE_QUANT_KERNELS_PER_LAYER * moe_layers))
        # sampler (vLLM; validation/engine_model.py sample): logits bf16 -> fp32 (read 2, write 4 B),
        # softmax (read 4, write 4), pick (read 4): 18 bytes per vocabulary entry, 3 kernels
        rows.append(("sampling", m.vocab_size * 18, 3))  # every rank samples the gathered logits
        names, per_token, kernels = zip(*rows, strict=True)
        return tuple(names), np.array(per_token, dtype=float), np.array(kernels, dtype=float)

    def _moe_input_quant(self, share: float) -> float:
        """Bytes per token of the activation quantization before W8A8 routed-expert GEMMs (0: none):
        vLLM's fused MoE quantizes the hidden states once per token before gate/up and the activated
        intermediate, top_k rows per token, before down (fused_experts_impl: moe_kernel_quantize_input),
        reading 16-bit values and writing 8-bit ones plus fp32 scales (one per 128-wide group for block
        scales, one per row otherwise). ``share``: this GPU's share of the experts."""
        m, wq, e = self.model, self.model.weight_quant, self.model.dtype_bytes
        if m.moe is None or wq is None or self.weight_kernel.path not in ("fp8", "int8"):
            return 0.0
        layer = next(layer for layer in m.layers if layer.moe)
        total = 0.0
        for lin in layer_linears(m, layer, self.tp, self.parallel):
            if lin.role != "experts" or lin.bits == 8 * e:  # 16-bit experts quantize nothing
                continue
            rows = 1.0 if lin.in_features == m.hidden_size else m.moe.top_k * share  # gate/up: each token once
            scales = 4 * (-(-lin.in_features // FP8_ACTIVATION_GROUP) if wq.block_scaled else 1)
            total += rows * (lin.in_features * (e + 1) + scales)
        return total

    # ---------------------------------------------------------------- pricing
    def _roof(self, kind: str, flops: np.ndarray | float, nbytes: np.ndarray | float, size: np.ndarray | float,
              kernels: float, peak: float, bandwidth: float) -> tuple[np.ndarray, np.ndarray]:
        curve = self.cal.ops[kind]
        ce, me = curve.eff(size)
        t_c = np.asarray(flops) / (peak * ce)
        t_m = np.asarray(nbytes) / (bandwidth * me)
        return np.maximum(t_c, t_m) + curve.floor_s * kernels, t_c >= t_m

    def _fixed_ops(self, passes: Passes, sampled: float, new_tokens: float) -> list[tuple]:
        """Ops that depend only on token counts (GEMMs, KV writes, element-wise, sampling,
        all-reduce), each on one count (its driver): looked up in tables priced ahead. ``passes``
        are the (weight, token count) passes of the model over the step's rows (``_passes``): an
        op driven by tokens sums its weighted passes; sampling and the KV write happen once."""
        counts = [n for _, n in passes]
        if all(self._in_table(n, sampled, new_tokens) for n in counts):
            weighted = [(w, int(n)) for w, n in passes]
            once = (0, int(sampled), int(new_tokens))

            def over_passes(v: list) -> float:
                return sum(w * v[i] for w, i in weighted)

            return [(name, f[once[d]], b[once[d]], t[once[d]], bound[once[d]]) if d else
                    (name, over_passes(f), over_passes(b), over_passes(t), bound[weighted[0][1]])
                    for name, d, f, b, t, bound in self._table]
        key = (passes, sampled, new_tokens)
        hit = self._fixed_cache.get(key)
        if hit is None:
            if len(self._fixed_cache) > 4096:
                self._fixed_cache.clear()
            k = len(passes)
            rows = self._fixed_rows(np.array(counts, dtype=float), np.full(k, float(sampled)),
                                    np.full(k, float(new_tokens)))
            w = [x for x, _ in passes]
            hit = self._fixed_cache[key] = [
                (name, f[0], b[0], t[0], bound[0]) if d else
                (name, float(np.dot(w, f)), float(np.dot(w, b)), float(np.dot(w, t)), bound[0])
                for name, d, f, b, t, bound in rows]
        return hit

    def _in_table(self, tokens: float, sampled: float, new_tokens: float) -> bool:
        """Whether these whole counts are priced ahead (growing the tables to cover them)."""
        need = max(tokens, sampled, new_tokens)
        if need >= FIXED_TABLE_MAX_TOKENS or not (float(tokens).is_integer() and float(sampled).is_integer()
                                                  and float(new_tokens).is_integer()):
            return False
        if need >= self._table_n:
            self._build_table(1 << max(10, int(need).bit_length()))
        return True

    def _build_table(self, n: int) -> None:
        """Price every token count below ``n`` at once; keep per-op values and, per driver, the
        sum of the ops' seconds (what a step's total needs, without building the op list)."""
        m = np.arange(n, dtype=float)
        self._table = self._fixed_rows(m, m, m)
        sums = [np.zeros(n) for _ in DRIVERS]
        for _, d, _, _, t, _ in self._table:
            sums[d] = sums[d] + np.asarray(t)
        self._table_sums = [v.tolist() for v in sums]
        self._table_n = n

    def _fixed_total_s(self, passes: Passes, sampled: float, new_tokens: float) -> float:
        """Seconds of the token-count ops of a step (the fast path of step_time_s and decode runs)."""
        if len(passes) == 1:  # the simulator's hot path: one whole pass
            (w, c), = passes
            if self._in_table(c, sampled, new_tokens):
                t, s, n = self._table_sums
                return w * t[int(c)] + s[int(sampled)] + n[int(new_tokens)]
        elif all(self._in_table(c, sampled, new_tokens) for _, c in passes):
            t, s, n = self._table_sums
            return sum(w * t[int(c)] for w, c in passes) + s[int(sampled)] + n[int(new_tokens)]
        total = 0.0
        for op in self._fixed_ops(passes, sampled, new_tokens):
            total += op[3]
        return total

    def _passes(self, n_decode: int, chunk: float, pad: float) -> Passes:
        """(weight, token count) passes of the model over one step's rows. One pass over the decode
        rows, the prompt chunk and the captured graph's padding, unless the layout runs the chunk
        otherwise: its extra passes (LCKV's iterations, XKV's profiling pass) run the model again
        over the chunk alone, and YOCO's prompt leaves after a fraction f of the layers while the
        decode rows go through all (f of a pass over every row, 1 - f over the decode rows). Priced
        as passes whose times add, never as a longer chunk in one pass: a kernel's efficiency can
        rise with its rows faster than its time, which would price more work cheaper."""
        rt = self.layout.runtime
        whole = ((1.0, n_decode + chunk + pad),)
        if not chunk or (rt.prefill_passes == 1.0 and rt.prefill_layer_fraction == 1.0):
            return whole
        f = rt.prefill_layer_fraction
        passes = ((f, n_decode + chunk + pad), (1.0 - f, float(n_decode)), ((rt.prefill_passes - 1.0) * f, chunk))
        return tuple((w, n) for w, n in passes if w and n)

    def _fixed_rows(self, tokens: np.ndarray, sampled: np.ndarray, new_tokens: np.ndarray) -> list[tuple]:
        """(name, driver index, flops, bytes, seconds, bound) per op, elementwise over the counts."""
        by_driver = (tokens, sampled, new_tokens)
        rows = self._gemm_rows(tokens, sampled)
        c, curve = self.cal.ceilings, self.cal.ops["elementwise"]
        names, per_token, kernels = self._elementwise
        for name, bpt, k in zip(names, per_token, kernels, strict=True):
            d = 2 if name == "kv_write" else 1 if name == "sampling" else 0
            nbytes = bpt * by_driver[d]
            _, me = curve.eff(np.maximum(nbytes / k, 1.0))
            t = np.where(nbytes > 0, nbytes / (c.copy_bytes_per_s * me) + curve.floor_s * k, 0.0)
            rows.append((name, d, np.zeros_like(nbytes), nbytes, t, np.full(t.shape, "memory")))
        if self.tp > 1:
            rows.append(self._allreduce(tokens))
            if self.model.attention.qk_norm_across_heads:
                rows.append(self._qk_norm_allreduce(tokens))
        if gathers_tokens(self.model, self.parallel):
            rows += self._dispatch_combine(tokens)
        return [(name, d, f.tolist(), b.tolist(), t.tolist(), bound.tolist()) for name, d, f, b, t, bound in rows]

    def _gemm_rows(self, tokens: np.ndarray, sampled: np.ndarray) -> list[tuple]:
        """Every GEMM for every count at once (linears x counts), summed per role in a fixed order."""
        g, c = self._gemms, self.cal.ceilings
        col = lambda v: v[:, None]  # noqa: E731 - per-linear values broadcast over the counts
        m = np.where(col(g.per_sampled), sampled[None, :], tokens[None, :])
        routed = col(g.routed)
        m_all = m * col(g.token_scale)  # routed experts run on every DP rank's tokens, gathered
        # expected experts of this GPU touched by those tokens, each choosing top_k of all experts
        active = np.where(routed, col(g.experts) * (1.0 - (1.0 - col(g.pick)) ** m_all), 1.0)
        wbytes = col(g.weight_bytes) * np.where(routed, active / col(g.experts), 1.0)
        load = col(g.share)  # this GPU's share of the token-expert pairs (1: it holds every expert)
        if self.ep > 1:  # the most loaded EP rank sets the pace (kvsim.spec.parallel.max_rank_load)
            mean = m_all * col(g.top_k) * load
            most = m_all * np.minimum(col(g.top_k), col(g.experts))
            load = np.where(routed, max_rank_load(mean, self.ep, most) / np.maximum(m_all * col(g.top_k), 1e-9),
                            load)
        m_eff = np.where(routed, m_all * col(g.top_k) * load / np.maximum(active, 1e-9), m)
        flops = col(g.flops_per_token) * m_all * load
        nbytes = wbytes + col(g.act_bytes_per_token) * m_all * load
        ce, me, floor = np.empty(m.shape), np.empty(m.shape), np.empty(m.shape)
        sizes = np.maximum(m_eff, 1.0)
        for ci, name in enumerate(g.curve_names):  # each linear's own curve (bf16, grouped, quantized path)
            sel = g.curve == ci
            curve = self.cal.ops[name]
            c_, m_ = curve.eff_many(sizes[sel].ravel(), wbytes[sel].ravel())
            ce[sel], me[sel], floor[sel] = c_.reshape(sizes[sel].shape), m_.reshape(sizes[sel].shape), curve.floor_s
        passes = np.ceil(m_eff / DEQUANT_ROWS_PER_PASS)
        dequant_s = wbytes * col(g.dequant_flops_per_byte) * passes / c.flops_per_s["fp32"]
        t_c, t_m = flops / (col(g.peak) * ce) + dequant_s, nbytes / (c.copy_bytes_per_s * me)
        t = np.where(m > 0, np.maximum(t_c, t_m) + floor, 0.0)
        rows = []
        for i, name in enumerate(g.names):
            sel = np.flatnonzero(g.role == i)
            f, b, s, compute = 0.0, 0.0, 0.0, np.zeros(m.shape[1], dtype=bool)
            for r in sel:  # python order: the same sums whatever the number of counts
                f, b, s = f + flops[r] * g.layers[r], b + nbytes[r] * g.layers[r], s + t[r] * g.layers[r]
                compute |= t_c[r] >= t_m[r]
            rows.append((name, 1 if g.per_sampled[sel[0]] else 0, f, b, s, np.where(compute, "compute", "memory")))
        return rows

    def _decode_roofline(self, term) -> tuple:
        """Decode attention at efficiency 1: (FLOPs, HBM bytes, compute s, memory s) of all layers."""
        c = self.cal.ceilings
        flops, deq = term("attn_flops") + term("reconstruct_flops"), term("dequant_flops") + term("merge_flops")
        nbytes = term("hbm_read")
        t_c = flops / c.flops_per_s["bf16"] + deq / c.flops_per_s["fp32"]
        return flops + deq, nbytes, t_c, nbytes / c.copy_bytes_per_s

    def decode_attention_roofline(self, decode_context: np.ndarray) -> tuple[float, float, float]:
        """(compute s, memory s, HBM bytes) of one decode step's attention over all layers at
        efficiency 1: what ``kvsim calibrate`` divides a measured kernel time by."""
        _, nbytes, t_c, t_m = self._decode_roofline(self._terms(np.asarray(decode_context, dtype=np.int64)[None, :])[1])
        return float(np.ravel(t_c)[0]), float(np.ravel(t_m)[0]), float(np.ravel(nbytes)[0])

    def _terms(self, ctx: np.ndarray):
        """The cap sums (caps, steps) and kind -> per-step total of a decode term
        (coef x sum_i min(ctx_i, cap)), for ctx (steps, batch)."""
        if self._uncapped:  # no windows, budgets or residuals: the plain context sums
            sums = ctx.sum(axis=1, dtype=np.int64)[None, :].astype(float)
        else:
            sums = np.minimum(ctx[None, :, :], self._caps[:, None, None]).sum(axis=2).astype(float)
        const = self._decode.const
        active = (ctx > 0).sum(axis=1).astype(float) if const else None

        def term(kind: str) -> np.ndarray | float:
            total: np.ndarray | float = 0.0
            for j, coef in self._coefs.get(kind, ()):
                total = total + coef * sums[j]
            return total + const[kind] * active if kind in const and active is not None else total

        return sums, term

    def _price(self, n_decode: int, ctx: np.ndarray | None, prefill: Batch | None, breakdown: bool = True,
               sums: np.ndarray | None = None) -> list[tuple]:
        """Ops of ``steps`` steps (rows of ctx) sharing one prefill part; values are (steps,) arrays.
        Without ``breakdown`` the token-count ops come as one summed op (totals need no more)."""
        c, rt, L = self.cal.ceilings, self.layout.runtime, self.model.num_layers
        if sums is None:
            assert ctx is not None  # the contexts, or their cap sums
            sums, term = self._terms(ctx)
        else:
            term = None

        p_scale = rt.prefill_passes * rt.prefill_layer_fraction
        if prefill is None:
            p_tok = p_ctx = _NO_TOKENS
            chunk, sampled = 0.0, float(n_decode)
        else:
            p_tok, p_ctx = prefill.prefill_tokens.astype(float), prefill.prefill_context.astype(float)
            chunk = float(p_tok.sum())
            sampled = n_decode + (len(p_tok) if prefill.prefill_samples is None else prefill.prefill_samples)
        new_tokens = n_decode + chunk
        # the model runs the captured graph's padded token count
        pad = 0.0 if self.execution is None else self.execution.padded_tokens(new_tokens) - new_tokens
        passes = self._passes(n_decode, chunk, pad)
        ops: list = (list(self._fixed_ops(passes, sampled, new_tokens)) if breakdown else
                     [("token_ops", 0.0, 0.0, self._fixed_total_s(passes, sampled, new_tokens), "memory")])

        # decode attention (+ fused dequantization and low-rank reconstruction)
        if n_decode:
            c_bw, L = self.cal.ceilings.copy_bytes_per_s, self.model.num_layers
            if breakdown or self._decode.const:
                flops, nbytes, t_c, t_m = self._decode_roofline(term)
            else:  # the simulator's path: precombined coefficients, one pass over the caps
                t_c, nbytes = 0.0, 0.0
                for j, tc_coef, b_coef in self._roof_coefs:
                    t_c, nbytes = t_c + tc_coef * sums[j], nbytes + b_coef * sums[j]
                flops, t_m = 0.0, nbytes / c_bw
            curve = self._decode_curve
            ce, me = curve.eff(np.maximum(nbytes / L, 1.0))
            t_c, t_m = t_c / ce, t_m / me
            t = np.maximum(t_c, t_m) + curve.floor_s * L
            bound = ("compute" if np.ravel(t_c)[0] >= np.ravel(t_m)[0] else "memory") if breakdown else ""
            ops.append(("attention.decode", flops, nbytes, t, bound))
        if prefill is not None and len(p_tok):
            pf, pb = 0.0, 0.0
            for layers, fpt, kvb, qob, cap in self._prefill_groups:
                pf += layers * fpt * float(sum_min_range(p_ctx, p_tok, cap).sum())
                # FlashAttention streams the chunk's Q/O once and each key/value it attends once per
                # query tile; the re-reads of a tile hit L2, so HBM traffic is the single pass.
                reach = p_ctx + p_tok if cap == NO_CAP else np.minimum(p_ctx + p_tok, cap)
                pb += layers * (qob * float(p_tok.sum()) + kvb * float(reach.sum()))
            pf, pb = pf * p_scale, pb * p_scale
            t, compute = self._roof("attention_prefill", pf, pb, float(p_tok.max()), L, c.flops_per_s["bf16"],
                                    c.copy_bytes_per_s)
            ops.append(("attention.prefill", pf, pb, float(t), "compute" if compute else "memory"))
            ops += self._prefill_extras(p_tok, p_ctx, prefill.merged_tokens)
        if n_decode and (rt.host_fetch_all or rt.host_fetch_tokens):
            assert term is not None  # offloading layouts are priced from contexts, not cap sums
            fetch = term("host_fetch")
            ops.append(("host_transfer", 0.0, fetch, fetch / c.h2d_bytes_per_s,
                        "link" if rt.host_fetch_all else "overlapped"))
        ops.append(("overhead", 0.0, 0.0, self.cal.step_overhead_s, "floor"))
        if self._eager_launch_s:  # eager: the GPU waits where launching the kernels takes longer than running them
            kernels = sum((op[3] for op in ops if op[4] != "overlapped"), 0.0)
            ops.append(("host.eager_launch", 0.0, 0.0, np.maximum(self._eager_launch_s - kernels, 0.0), "host"))
        if self.execution is not None:  # the engine loop's CPU time: after the GPU's, or hidden behind it
            host = self.execution.host
            ops.append(("host.step", 0.0, 0.0, host.seconds(n_decode + len(p_tok)),
                        "overlapped" if host.overlapped else "host"))
        return ops

    def _prefill_extras(self, p_tok: np.ndarray, p_ctx: np.ndarray, merged: int) -> list[tuple]:
        """A method's own work while prompts are prefilled, one op per kind of work."""
        rt, c, L, a = self.layout.runtime, self.cal.ceilings, self.model.num_layers, self.model.attention
        heads = a.num_heads // self.tp
        width = kv_heads_per_rank(self.model, self.tp) * a.head_dim  # key elements per token and layer
        key_bytes = width * self.model.dtype_bytes
        chunk = float(p_tok.sum())  # each chunk pays for its own tokens, so a chunked prompt pays once in all
        size = float(p_tok.max())
        ops = []

        def roof(name: str, flops: float, nbytes: float, kernels: float, peak: str = "bf16") -> None:
            t, compute = self._roof("attention_prefill", flops, nbytes, size, kernels, c.flops_per_s[peak],
                                    c.copy_bytes_per_s)
            ops.append((name, flops, nbytes, float(t), "compute" if compute else "memory"))

        if rt.prefill_scoring_window or rt.prefill_scores_all_queries:
            # SnapKV (arXiv 2404.14469 sec. 4): the last `window` queries' softmax(QK^T) over every
            # prompt key, once at its end; H2O/KeepKV: every prompt query's probabilities summed per
            # key (scores FlashAttention never materializes: a second QK^T pass, causal).
            queries = (float(sum_min_range(p_ctx, p_tok, NO_CAP).sum()) if rt.prefill_scores_all_queries
                       else rt.prefill_scoring_window * chunk)
            roof("prefill.scoring", 2.0 * queries * L * heads * a.head_dim, L * key_bytes * chunk, L)
        if rt.merge_ops_per_token:  # KeepKV: the prompt's tokens past each layer's budget merged at its end
            kvh = kv_heads_per_rank(self.model, self.tp)
            evicted = sum(float((np.maximum(p_ctx + p_tok - layer.span_cap, 0)
                                 - np.maximum(p_ctx - layer.span_cap, 0)).sum())
                          for layer in self.layout.layers if layer.owns_kv and layer.span_cap is not None)
            roof("prefill.merge", evicted * kvh * rt.merge_ops_per_token, evicted * 2 * key_bytes, L, "fp32")
        if rt.prefill_svd_rank:
            # ShadowKV: a truncated SVD of each layer's pre-RoPE prompt keys (T x Hkv*d) at rank r; a
            # randomized range finder (Halko et al., arXiv 0909.4061, alg. 4.1 + 5.1) is two products
            # with the matrix, 4*T*W*r FLOPs per layer, in fp32
            roof("prefill.svd", 4.0 * chunk * width * rt.prefill_svd_rank * L, L * key_bytes * chunk, L, "fp32")
        keep = rt.image_token_keep
        if merged and keep < 1.0:
            # LightKV: each layer reads the vision tokens' K/V and writes the merged pairs (the shape
            # validation/kernels/bench_evict.py lightkv_merge times), a memory-bound pass
            kv_token = self._elementwise[1][0] / 2  # the KV write's bytes per token, read and write halved
            nbytes = kv_token * (merged / (1.0 - keep) + merged)
            curve = self.cal.ops["elementwise"]
            _, me = curve.eff(max(nbytes / L, 1.0))
            ops.append(("prefill.vision_merge", 0.0, nbytes, nbytes / (c.copy_bytes_per_s * me) + curve.floor_s * L,
                        "memory"))
        host = self._host_store_bytes(p_ctx, p_tok)
        if host:  # offloaded tiers: the prompt's KV leaves for host memory over the same link
            ops.append(("prefill.host_store", 0.0, host, host / c.h2d_bytes_per_s, "link"))
        return ops

    def _host_store_bytes(self, p_ctx: np.ndarray, p_tok: np.ndarray) -> float:
        """Bytes of the chunks' KV that the layout keeps in host memory (or on NVMe) on this rank."""
        if all(s.tier == "gpu" for s, _ in self.layout.stream_counts):
            return 0.0
        ctx = p_ctx.astype(np.int64)
        before = self.layout.bytes_by_tier(ctx, self.tp)
        after = self.layout.bytes_by_tier(ctx + p_tok.astype(np.int64), self.tp)
        return float(sum((after[t] - before[t]).sum() for t in ("host", "ssd")))

    def _allreduce(self, tokens: np.ndarray) -> tuple:
        """Two all-reduces per layer of the hidden states (Megatron TP), and one of the logits: the
        engine's measured tables where it has them (``self.allreduce``), else a calibrated ring."""
        msg = tokens * self.model.hidden_size * self.model.dtype_bytes
        per_call = self._allreduce_call_s(msg)
        calls = 2 * self.model.num_layers + 1
        return ("allreduce", 0, np.zeros_like(msg), msg * calls, per_call * calls, np.full(msg.shape, "link"))

    def _allreduce_call_s(self, msg: np.ndarray) -> np.ndarray:
        """One TP all-reduce of ``msg`` bytes: the engine's measured tables where it has them
        (``self.allreduce``), else vLLM's custom kernel modelled on the calibrated link where the group runs
        it, else a calibrated ring of 2(tp-1) hops."""
        ring = self._ring_s(msg, self.tp, 2)
        if self.allreduce is None:
            return ring
        custom = self._custom_allreduce_s(msg) if self.allreduce.custom_ok and self.allreduce.custom is None else None
        return self.allreduce.seconds(msg, ring, custom)

    def _custom_allreduce_s(self, msg: np.ndarray) -> np.ndarray:
        """vLLM's custom all-reduce without a measured table: its one-stage kernel reads every peer's whole
        message over the GPU's link in one round, its two-stage kernel moves (tp-1)/tp of it twice in two
        rounds (kvsim.cost.collectives.custom_one_stage picks as vLLM does); the calibrated link terms of the
        ring. Judged against the measured custom tables of six NVLink GPUs (README)."""
        tp = self.tp
        one, two = self._link_s(msg, tp - 1, 1), self._link_s(msg, 2 * (tp - 1) / tp, 2)
        return np.where(custom_one_stage(tp, msg), one, two)

    def _ring_s(self, msg: np.ndarray, ranks: int, passes: int) -> np.ndarray:
        """One NCCL ring collective of ``msg`` bytes over ``ranks`` GPUs, priced with the calibrated link
        terms: each of ``passes`` passes (an all-reduce is a reduce-scatter and an all-gather, 2; an
        all-gather or a reduce-scatter alone, 1) moves (ranks - 1) / ranks of the message through
        each link in ranks - 1 hops."""
        hops = passes * (ranks - 1)
        return self._link_s(msg, hops / ranks, hops)

    def _link_s(self, msg: np.ndarray, messages: float, rounds: int) -> np.ndarray:
        """A collective that moves ``messages`` times ``msg`` bytes through each GPU's link in ``rounds``
        dependent rounds, on the calibrated link terms (efficiency by size, latency per round, floor)."""
        link = self.hw.nvlink_bandwidth_bytes_per_s or self.hw.pcie_bandwidth_bytes_per_s
        curve = self.cal.ops["allreduce"]
        _, me = curve.eff(np.maximum(msg, 1.0))
        return messages * msg / (link * me) + rounds * self.cal.ceilings.link_latency_s + curve.floor_s

    def _qk_norm_allreduce(self, tokens: np.ndarray) -> tuple:
        """A query/key norm over all heads (``AttentionSpec.qk_norm_across_heads``) under TP: each
        attention layer all-reduces the two fp32 sums of squares per token of its Q and K slices (vLLM
        MiniMaxText01RMSNormTP.forward_qk: one all-reduce of the concatenated q and k sums; releases
        before it ran one per norm). The reduction pass before it is the element-wise ``qk_norm``."""
        layers = self.model.attention_layers
        msg = tokens * 2 * 4.0  # q and k sums of squares, fp32
        t = np.where(tokens > 0, self._allreduce_call_s(msg) * layers, 0.0)
        return ("allreduce.qk_norm", 0, np.zeros_like(msg), msg * layers, t, np.full(msg.shape, "link"))

    def _dispatch_combine(self, tokens: np.ndarray) -> list[tuple]:
        """Each MoE layer's token dispatch and combine over the DP group, as vLLM's default single-node
        all-to-all backend runs them (``allgather_reducescatter``: ``all_gatherv`` of every rank's hidden
        states, top-k weights and ids, then ``reduce_scatterv`` of the expert outputs; NCCL rings,
        vllm/distributed/device_communicators/all2all.py ``AgRsAll2AllManager``), every DP rank carrying
        ``tokens``: each one ring pass (``_ring_s``) of the gathered message."""
        dp, h, e = self.parallel.dp, self.model.hidden_size, self.model.dtype_bytes
        assert self.model.moe is not None  # gathers_tokens: a MoE model
        layers = self.model.moe_layers
        # dispatch: bf16 hidden states + fp32 top-k weights + int32 top-k ids per token; combine: hidden states
        k = self.model.moe.top_k
        rows = []
        for name, per_token in (("moe.dispatch", h * e + k * (4 + 4)), ("moe.combine", h * e)):
            gathered = tokens * per_token * dp
            t = np.where(tokens > 0, self._ring_s(gathered, dp, 1) * layers, 0.0)
            rows.append((name, 0, np.zeros_like(gathered), gathered * layers, t, np.full(gathered.shape, "link")))
        return rows

    @staticmethod
    def _total(ops: list, steps: int) -> np.ndarray:
        """Kernels (and the host time of an engine without async scheduling) run one after another;
        an overlapped transfer, or the host time under async scheduling, hides behind them. Scalars
        (the token-count ops) are added first, then the per-step arrays, in op order on every path."""
        scalar, arrays, overlapped = 0.0, [], None
        for op in ops:
            if op[4] == "overlapped":
                overlapped = op[3] if overlapped is None else np.maximum(overlapped, op[3])
            elif isinstance(op[3], float):
                scalar += op[3]
            else:
                arrays.append(op[3])
        gpu = scalar + arrays[0] if arrays else np.full(steps, scalar)
        for a in arrays[1:]:
            gpu = gpu + a
        return gpu if overlapped is None else np.maximum(gpu, overlapped)

    # ---------------------------------------------------------------- public API
    def step(self, batch: Batch) -> StepCost:
        """Price one step, with its named breakdown (seconds per operator)."""
        dec = np.asarray(batch.decode_context, dtype=np.int64)[None, :]
        has_prefill = len(batch.prefill_tokens) > 0
        ops = self._price(dec.shape[1], dec, batch if has_prefill else None)
        total = self.step_time_s(batch)  # the same arithmetic as the simulator's path

        def first(x: np.ndarray | float) -> float:
            return float(np.asarray(x).ravel()[0])

        return StepCost(total, tuple(Op(n, first(f), first(b), first(t), bound) for n, f, b, t, bound in ops))

    def step_time_s(self, batch: Batch) -> float:
        dec = np.asarray(batch.decode_context, dtype=np.int64)[None, :]
        has_prefill = len(batch.prefill_tokens) > 0
        return float(self._total(self._price(dec.shape[1], dec, batch if has_prefill else None, False), 1)[0])

    def decode_times_s(self, contexts: np.ndarray, steps: int) -> np.ndarray:
        """Times of ``steps`` consecutive decode-only steps; step j sees ``contexts + j``."""
        contexts = np.asarray(contexts, dtype=np.int64)
        if self._uncapped:  # sum_i (ctx_i + j) = sum_i ctx_i + j * batch, exactly
            sums = (int(contexts.sum()) + np.arange(steps, dtype=np.int64) * len(contexts)).astype(float)[None, :]
            return self._total(self._price(len(contexts), None, None, False, sums), steps)
        ctx = contexts[None, :] + np.arange(steps, dtype=np.int64)[:, None]
        return self._total(self._price(ctx.shape[1], ctx, None, False), steps)

    def host_transfer_s(self, nbytes: float) -> float:
        """Pinned host-to-GPU copy (swap-in, offload fetch)."""
        return nbytes / self.cal.ceilings.h2d_bytes_per_s

    def ssd_read_s(self, nbytes: float) -> float:
        """NVMe read then host-to-GPU copy, pipelined: the slower link sets the pace (MatKV)."""
        c = self.cal.ceilings
        return nbytes / min(c.disk_read_bytes_per_s, c.h2d_bytes_per_s)


def calibration_summary(cost: CostModel) -> dict:
    """Where a cost model's numbers come from (a scenario summary's ``calibration`` block)."""
    cal = cost.cal
    key = f"attention_decode.{cost.decode_family}"
    decode = cal.derived.get(key) or (f"fitted ({key})" if key in cal.ops else "fitted (attention_decode)")
    return {"kind": cal.kind, "label": cal.label, "gpu": cal.gpu, "engine": cal.engine,
            "engine_version": cal.engine_version, "source": cal.source,
            "decode_kernel": cost.decode_kernel.as_dict(), "decode_curve": decode, "note": cal.note}
