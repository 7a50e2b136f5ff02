"""Memory plan of one replica, sized the way vLLM sizes its KV cache.

vLLM's worker (``determine_available_memory``) lets the instance use ``gpu_memory_utilization x
total device memory`` (the total CUDA reports); from that come the weights, the peak torch memory of
a profiling run (a forward pass over ``max_num_batched_tokens`` tokens, then the sampler over
``min(max_num_seqs, max_num_batched_tokens)`` rows), the memory outside torch's allocator that grew
after the worker's baseline snapshot, and, from vLLM 0.20 on, the CUDA-graph estimate of the model
runner vLLM picks for the model (its V2 runner's is 0 up to 0.28); the rest
becomes KV pages of ``block_size`` tokens. Where the baseline is taken, what the sampler holds and
whether graphs are charged depend on the vLLM version: one rule per version range, read from that
version's source, in kvsim/data/vllm_memory.yaml.

Everything is per GPU (one tensor-parallel rank) unless a name says otherwise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache, cached_property
from types import MappingProxyType

import numpy as np

from kvsim.errors import KvsimError
from kvsim.fileio import load_data_file
from kvsim.kv.layout import KVLayout, Tier
from kvsim.spec.hardware import HardwareSpec
from kvsim.spec.linears import check_tp, head_linears, layer_linears, norm_params, padded_expert
from kvsim.spec.model import ModelSpec
from kvsim.spec.parallel import SINGLE, Parallel, check_parallel
from kvsim.spec.quant import expert_width_align

GIB = 2**30
# vllm/v1/sample/ops/topk_topp_sampler.py v0.19.0: the Triton kernel serves batches of at least 8 rows
TRITON_SAMPLER_MIN_ROWS = 8
_RULES_FILE = "kvsim/data/vllm_memory.yaml"


def parse_version(text: str) -> tuple[int, int, int]:
    """``0.19``, ``0.19.1``, ``v0.19.1rc1`` or ``0.19.1.post1`` -> (0, 19, 1)."""
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?(?:[.+-]?(?:rc|post|dev|a|b)\w*)?", str(text).strip())
    if m is None:
        raise KvsimError("expected a vLLM version such as 0.19 or 0.19.1", field="vllm_version", value=text)
    return int(m[1]), int(m[2]), int(m[3] or 0)


@dataclass(frozen=True)
class ModelRunnerV2:
    """Which models a vLLM range runs on its V2 model runner by default, whose CUDA-graph estimate is 0
    in that range (kvsim/data/vllm_memory.yaml says where each range comes from)."""

    default_for: str  # "dense": models without experts or recurrent state, plus ``architectures``; "listed"
    unless_quantized: bool  # a checkpoint with a quantization_config stays on the V1 runner
    architectures: frozenset[str]  # HF model classes that run V2 by default

    def runs(self, model: ModelSpec) -> bool:
        """Whether vLLM runs ``model`` on the V2 runner by default."""
        dense = model.moe is None and model.state is None
        if self.unless_quantized and model.weight_quant is not None and model.weight_quant.from_checkpoint:
            return False
        if self.default_for == "dense" and dense:
            return True
        if model.architecture is None:
            raise KvsimError("unknown: this vLLM version picks its model runner, and so whether it charges CUDA-graph "
                             "memory, by the HF architecture (config.json 'architectures'); add `architecture:` to "
                             "the model YAML", field="architecture", value=None, file=model.name)
        return model.architecture in self.architectures


@dataclass(frozen=True)
class VllmMemoryRule:
    """How one range of vLLM versions sizes its KV cache (kvsim/data/vllm_memory.yaml cites each field)."""

    first: tuple[int, int, int]
    until: tuple[int, int, int]  # exclusive
    label: str
    source: str
    non_torch_bytes: float  # non-torch growth after the worker's baseline snapshot, TP 1
    non_torch_extra_bytes: float | None  # added when TP > 1 (None: not measured, TP > 1 is refused)
    non_torch_extra_per_rank_bytes: float  # and this much per rank when TP > 1
    # added instead when TP > 1 on GPUs without NVLink, whose NCCL keeps its buffers elsewhere (None: the
    # NVLink figures above hold for them too, as the rule file says where no PCIe growth was measured)
    non_torch_extra_pcie_bytes: float | None
    sampler_bytes_per_logit: float  # per (sampled row x vocabulary entry) at the sampler's peak
    sampler_holds_dtype_logits: bool  # the model-dtype logits stay alive beside them
    cuda_graphs_charged: bool  # by the V1 model runner
    triton_sampler_buffer: bool  # the sampler's Triton top-k/top-p kernel caches a per-SM row buffer
    # the experts kernel whose workspace vLLM's WorkspaceManager keeps after the forward pass, per experts
    # precision ("bf16", "fp8" dynamic or block scales, "fp8_static"), on Hopper and on other GPUs
    # ("triton" or "flashinfer"; absent: fused_experts_impl's caches, freed after the layer)
    moe_experts_hopper: Mapping[str, str] = field(default_factory=dict)
    moe_experts_other: Mapping[str, str] = field(default_factory=dict)
    runner_v2: ModelRunnerV2 | None = None  # models on the V2 runner are not charged (None: every model runs V1)

    def moe_experts_kernel(self, model: ModelSpec, hw: HardwareSpec) -> str | None:
        """The experts kernel that holds ``model``'s MoE workspace through the profiling run on ``hw``
        (None: the workspace is freed after each layer)."""
        wq = model.weight_quant
        if wq is None:
            kind = "bf16"
        elif wq.precision == "fp8" and not wq.weight_only:
            kind = "fp8_static" if wq.needs_native_fp8 else "fp8"
        else:
            return None  # weight-only and other quantized experts keep fused_experts_impl's freed caches
        return (self.moe_experts_hopper if hw.family == "hopper" else self.moe_experts_other).get(kind)

    def charges_graphs(self, model: ModelSpec) -> bool:
        """Whether this range subtracts ``model``'s CUDA-graph estimate from the KV budget."""
        return self.cuda_graphs_charged and not (self.runner_v2 is not None and self.runner_v2.runs(model))

    def non_torch_growth(self, tp: int, hw: HardwareSpec) -> tuple[float, str]:
        """Non-torch growth over the baseline on one GPU of a ``tp``-wide group of ``hw`` GPUs, and which
        of the rule's measured growths it is."""
        if tp == 1:
            return self.non_torch_bytes, "TP 1 growth"
        nvlink = hw.nvlink_bandwidth_bytes_per_s > 0
        if not nvlink and self.non_torch_extra_pcie_bytes is not None:
            return self.non_torch_bytes + self.non_torch_extra_pcie_bytes, "growth at TP > 1 over PCIe"
        if self.non_torch_extra_bytes is None:
            raise KvsimError(f"{self.label}: memory at TP > 1 is not modelled (its growth over the baseline is not "
                             f"measured; {_RULES_FILE})", field="vllm_version", value=_dotted(self.first))
        growth = self.non_torch_bytes + self.non_torch_extra_bytes + self.non_torch_extra_per_rank_bytes * tp
        if nvlink:
            return growth, "growth at TP > 1 over NVLink"
        # NCCL's P2P transport keeps its buffers in GPU memory, its SHM transport (no peer access) in host memory;
        # the two PCIe logs that bear on it are cited at the 0.10.2 rule in kvsim/data/vllm_memory.yaml
        hint = {True: "with peer access NCCL's buffers sit in GPU memory as over NVLink: an RTX PRO 6000 log held more",
                False: "without peer access NCCL keeps its buffers in host memory: an L40S log held less",
                None: "a PCIe group may hold less or more"}[hw.peer_to_peer]
        return growth, f"growth at TP > 1 measured over NVLink, not on PCIe ({hint}; {_RULES_FILE})"

    def non_torch(self, tp: int, hw: HardwareSpec) -> float:
        return self.non_torch_growth(tp, hw)[0]


@cache
def _rules() -> tuple[str, tuple[VllmMemoryRule, ...]]:
    data = load_data_file(_RULES_FILE)
    fields = ("label", "source", "non_torch_bytes", "non_torch_extra_bytes", "sampler_bytes_per_logit",
              "sampler_holds_dtype_logits", "cuda_graphs_charged")
    rules = tuple(VllmMemoryRule(first=parse_version(r["first"]), until=parse_version(r["until"]),
                                 **{f: r[f] for f in fields},
                                 non_torch_extra_per_rank_bytes=float(r.get("non_torch_extra_per_rank_bytes", 0)),
                                 non_torch_extra_pcie_bytes=r.get("non_torch_extra_pcie_bytes"),
                                 triton_sampler_buffer=bool(r.get("triton_sampler_buffer", False)),
                                 moe_experts_hopper=MappingProxyType(dict(r.get("moe_experts_hopper", {}))),
                                 moe_experts_other=MappingProxyType(dict(r.get("moe_experts_other", {}))),
                                 runner_v2=_runner_v2(r.get("model_runner_v2")))
                  for r in data["rules"])
    return str(data["default_version"]), rules


def _runner_v2(data: dict | None) -> ModelRunnerV2 | None:
    if data is None:
        return None
    return ModelRunnerV2(str(data["default_for"]), bool(data["unless_quantized"]), frozenset(data["architectures"]))


def default_vllm_version() -> str:
    return _rules()[0]


def vllm_rule(version: str) -> VllmMemoryRule:
    """The memory rule of a vLLM version; a version outside every modelled range is an error."""
    v = parse_version(version)
    for rule in _rules()[1]:
        if rule.first <= v < rule.until:
            return rule
    ranges = ", ".join(f"{_dotted(r.first)}-<{_dotted(r.until)}" for r in _rules()[1])
    raise KvsimError(f"no memory rule for this vLLM version (modelled: {ranges}; {_RULES_FILE})",
                     field="vllm_version", value=version)


def _dotted(v: tuple[int, int, int]) -> str:
    return ".".join(map(str, v))


_BATCH_FILE = "kvsim/data/vllm_batch_defaults.yaml"


@dataclass(frozen=True)
class BatchLimits:
    """The token budget, sequence limit and chunked prefill of one engine, and where they came from."""

    max_num_batched_tokens: int
    max_num_seqs: int
    enable_chunked_prefill: bool
    source: str  # "given", or the vLLM default rule that set what was not given

    def as_dict(self) -> dict:
        return {"max_num_batched_tokens": self.max_num_batched_tokens, "max_num_seqs": self.max_num_seqs,
                "enable_chunked_prefill": self.enable_chunked_prefill, "source": self.source}


@cache
def _batch_ranges() -> tuple[tuple[tuple[int, int, int], tuple[int, int, int], dict], ...]:
    return tuple((parse_version(r["first"]), parse_version(r["until"]), r)
                 for r in load_data_file(_BATCH_FILE)["ranges"])


def vllm_batch_limits(version: str, hardware: HardwareSpec, model: ModelSpec, max_model_len: int,
                      max_num_batched_tokens: int | None = None, max_num_seqs: int | None = None,
                      enable_chunked_prefill: bool | None = None) -> BatchLimits:
    """What `vllm serve` of ``version`` runs with on ``hardware``: each value the user gave (not None),
    the rest as vLLM's arg_utils defaults it (kvsim/data/vllm_batch_defaults.yaml). A budget below the
    sequence limit is refused, as vLLM's SchedulerConfig refuses it."""
    v = parse_version(version or default_vllm_version())
    r = next((r for first, until, r in _batch_ranges() if first <= v < until), None)
    if r is None:
        ranges = ", ".join(f"{_dotted(first)}-<{_dotted(until)}" for first, until, _ in _batch_ranges())
        raise KvsimError(f"no batch defaults for this vLLM version (modelled: {ranges}; {_BATCH_FILE})",
                         field="vllm_version", value=version)
    span = f"vLLM {version or default_vllm_version()}"
    chunked, budget, seqs = enable_chunked_prefill, max_num_batched_tokens, max_num_seqs
    if "v0" in r:
        d = r["v0"]
        if chunked is None:  # on by default only for long contexts of text models without a sliding window
            chunked = (max_model_len > d["chunked_above_len"] and model.vision is None
                       and not any(layer.attention == "sliding" for layer in model.layers))
        if budget is None:
            budget = d["chunked_budget"] if chunked else max(max_model_len, d["unchunked_floor"])
        seqs = d["max_num_seqs"] if seqs is None else seqs
        rule = f"{span} V0 defaults"
    else:
        chunked = True if chunked is None else chunked
        gib, name = hardware.memory_bytes / GIB, hardware.display_name.lower()
        excluded = [t["not_named"] for t in r["tiers"]  # a tier the GPU's size reaches but its name rules out
                    if gib >= t["min_memory_gib"] and t.get("not_named", "\0") in name]
        tier = next(t for t in r["tiers"] if gib >= t["min_memory_gib"] and t.get("not_named") not in excluded)
        seqs = tier["max_num_seqs"] if seqs is None else seqs  # set first: the budget's cap reads it
        if budget is None:
            budget = tier["max_num_batched_tokens"]
            if not chunked:
                budget = max_model_len if r["unchunked"] == "max_model_len" else max(max_model_len, budget)
            if r["cap_by_len"]:
                budget = min(seqs * max_model_len, budget)
        if max_num_seqs is None:
            seqs = min(seqs, budget)
        rule = f"{span} `vllm serve` defaults for a GPU of {gib:.0f} GiB" + "".join(
            f" named {x.upper()} (kept off the larger tier)" for x in excluded)
    given = [n for n, x in (("max_num_batched_tokens", max_num_batched_tokens), ("max_num_seqs", max_num_seqs),
                            ("enable_chunked_prefill", enable_chunked_prefill)) if x is not None]
    source = "given" if len(given) == 3 else f"{rule}, {_BATCH_FILE}" + (f"; given: {', '.join(given)}"
                                                                           if given else "")
    if budget < seqs:
        raise KvsimError(f"must be >= max_num_seqs ({seqs}; vLLM refuses a smaller budget)",
                         field="max_num_batched_tokens", value=budget)
    return BatchLimits(int(budget), int(seqs), bool(chunked), source)


# The sampler's top-k/top-p implementation (engine.sampler):
# - "native": vLLM's own, the PyTorch sort up to 0.16 and its Triton kernel from 0.17 (each version
#   rule's sampler_bytes_per_logit);
# - "flashinfer": FlashInfer's top_k_top_p_sampling_from_logits, which vLLM's V1 sampler runs wherever
#   FlashInfer is installed in 0.10.2 and 0.11 (vllm/v1/sample/ops/topk_topp_sampler.py: an unset
#   VLLM_USE_FLASHINFER_SAMPLER means on; vLLM's container images install it) and only with
#   VLLM_USE_FLASHINFER_SAMPLER=1 from 0.12. Its dummy-run peak, derived from flashinfer/sampling.py
#   (v0.3.0 and v0.3.1, the versions vLLM 0.10.2 and 0.11.0 pin): the fp32 logits 4 B + the top-k mask's
#   output (top_k_mask_logits: torch.empty_like(logits)) 4 B + the softmax probabilities 4 B per logit,
#   the sampled ids [rows] aside; no row buffer. The model-dtype logits are held as in the rule. Measured on an
#   H100 with FlashInfer 0.5.3, whose sampling.py allocates the same (validation/sampler_peak.py --sampler
#   flashinfer, run h100-call23; validation/results/h100-sxm/sampler_peak.csv): 12.00-12.07 B per logit.
SAMPLERS = ("native", "flashinfer")
FLASHINFER_SAMPLER_BYTES_PER_LOGIT = 12
V1_FROM = (0, 10, 2)  # the oldest V1 engine kvsim models (0.6.x is V0)
# --block-size values vLLM accepts (vllm/config/cache.py: BlockSize = Literal[1, 8, 16, 32, 64, 128, 256])
VLLM_BLOCK_SIZES = (1, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class EngineMemoryConfig:
    """The vLLM engine arguments that decide memory."""

    gpu_memory_utilization: float = 0.9  # vLLM default
    block_size: int = 16  # vLLM default for CUDA
    # None: what `vllm serve` of this version defaults to on the GPU (vllm_batch_limits), set by resolved()
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    vllm_version: str = ""  # "": the newest modelled version needing no measured input (vllm_memory.yaml)
    enforce_eager: bool = False  # no CUDA graphs: nothing to charge
    cuda_graph_bytes: float | None = None  # measured graph estimate; required where the version charges it
    sampler: str = "native"  # SAMPLERS: which top-k/top-p implementation the server's sampler runs

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise KvsimError("must be in (0, 1]", field="gpu_memory_utilization",
                             value=self.gpu_memory_utilization)
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise KvsimError("must be a positive integer", field=name, value=getattr(self, name))
        if self.block_size > 0 and self.block_size not in VLLM_BLOCK_SIZES:
            raise KvsimError(f"vLLM takes one of {', '.join(map(str, VLLM_BLOCK_SIZES))}", field="block_size",
                             value=self.block_size)
        graphs = self.cuda_graph_bytes
        if graphs is not None and not (math.isfinite(graphs) and graphs >= 0):
            raise KvsimError("must be a finite number >= 0", field="cuda_graph_gib", value=graphs / GIB)
        if self.sampler not in SAMPLERS:
            raise KvsimError(f"must be one of {', '.join(SAMPLERS)}", field="sampler", value=self.sampler)
        rule = self.rule  # an unknown version fails here, where the engine is configured
        if self.sampler == "flashinfer" and rule.first < V1_FROM:
            raise KvsimError(f"{rule.label}: FlashInfer's sampler is modelled for the V1 engine (0.10.2+)",
                             field="sampler", value=self.sampler)

    @property
    def rule(self) -> VllmMemoryRule:
        return vllm_rule(self.vllm_version or default_vllm_version())

    @property
    def batch(self) -> tuple[int, int]:
        """(max_num_batched_tokens, max_num_seqs) of a resolved config."""
        if self.max_num_batched_tokens is None or self.max_num_seqs is None:
            raise AssertionError("EngineMemoryConfig.resolved() first")  # a planner bug, not an input error
        return self.max_num_batched_tokens, self.max_num_seqs

    def resolved(self, model: ModelSpec, hardware: HardwareSpec,
                 max_model_len: int | None = None) -> EngineMemoryConfig:
        """This config with vLLM's defaults for what it leaves unset, on ``hardware`` and with the
        model's context as max_model_len unless given (as `vllm serve` sizes them)."""
        if self.max_num_batched_tokens is not None and self.max_num_seqs is not None:
            return self
        b = vllm_batch_limits(self.vllm_version, hardware, model, max_model_len or model.max_position_embeddings,
                              self.max_num_batched_tokens, self.max_num_seqs)
        return replace(self, max_num_batched_tokens=b.max_num_batched_tokens, max_num_seqs=b.max_num_seqs)

    def graph_bytes(self, model: ModelSpec) -> float:
        """CUDA-graph memory the version charges against ``model``'s KV budget."""
        if self.enforce_eager or not self.rule.charges_graphs(model):
            return 0.0
        if self.cuda_graph_bytes is None:
            raise KvsimError(f"{self.rule.label} charges the CUDA-graph memory it measures at start-up for "
                             f"{model.name}; give "
                             "engine.cuda_graph_gib (the 'Estimated CUDA graph memory' of its log) or "
                             "engine.enforce_eager: true", field="vllm_version",
                             value=self.vllm_version or default_vllm_version())
        return float(self.cuda_graph_bytes)


VLLM_DEFAULTS = EngineMemoryConfig()  # the one place vLLM's engine defaults live (scenario schema, CLI)


@dataclass(frozen=True)
class WeightBytes:
    """Weight bytes on one GPU, by role."""

    embedding: float
    lm_head: float
    attention: float
    mlp: float
    router: float
    experts: float
    shared_experts: float
    norms: float
    vision: float
    buffers: float  # non-persistent buffers allocated with the model (the rotary cos/sin cache)

    @property
    def total(self) -> float:
        return (self.embedding + self.lm_head + self.attention + self.mlp + self.router + self.experts
                + self.shared_experts + self.norms + self.vision + self.buffers)


def rotary_cache_bytes(model: ModelSpec) -> float:
    """vLLM's RotaryEmbedding registers a (max_position x rotary_dim) cos/sin cache in the model dtype as
    a non-persistent buffer, one instance shared by every layer (get_rope caches by its arguments;
    vllm/model_executor/layers/rotary_embedding/base.py v0.19.0): it counts in "model loading took"."""
    if not model.attention_layers:
        return 0.0
    mla = model.attention.mla
    rotary_dim = mla.qk_rope_head_dim if mla is not None else model.attention.head_dim
    return float(model.max_position_embeddings * rotary_dim * model.dtype_bytes)


def weight_bytes(model: ModelSpec, tp: int, par: Parallel = SINGLE, expert_align: int = 1) -> WeightBytes:
    """Weights one GPU holds: its share of the routed experts (``par``: TP-sharded, or whole experts
    under expert parallelism; ``expert_align``: the multiple the engine pads their width to on this GPU,
    kvsim.spec.quant.expert_width_align), the attention, dense and shared parts of its DP rank
    (TP-sharded), embeddings, LM head, buffers."""
    by_role: dict[str, float] = {}
    for layer in model.layers:
        for lin in (padded_expert(x, expert_align) for x in layer_linears(model, layer, tp, par)):
            by_role[lin.role] = by_role.get(lin.role, 0.0) + lin.bytes
    for lin in head_linears(model, tp):
        by_role[lin.role] = by_role.get(lin.role, 0.0) + lin.bytes
    e = model.dtype_bytes
    vision = model.vision.params * e if model.vision else 0.0  # replicated on every rank
    return WeightBytes(
        embedding=by_role.get("embedding", 0.0), lm_head=by_role.get("lm_head", 0.0),
        attention=by_role.get("attention", 0.0), mlp=by_role.get("mlp", 0.0),
        router=by_role.get("router", 0.0), experts=by_role.get("experts", 0.0),
        shared_experts=by_role.get("shared_experts", 0.0), norms=norm_params(model) * e, vision=vision,
        buffers=rotary_cache_bytes(model))


# PyTorch's cuBLAS workspace, taken from its caching allocator by the profiling run's first GEMM:
# ":4096:2:16:8 default, 32MiB for Hopper" (aten/src/ATen/cuda/CublasHandlePool.cpp,
# parseChosenWorkspaceSize: 4096 x 8 KiB on compute capability 9.0, else 4096 x 2 + 16 x 8 KiB)
CUBLAS_WORKSPACE_BYTES = {"hopper": 4096 * 8 * 1024}
CUBLAS_WORKSPACE_DEFAULT_BYTES = 4096 * 1024 * 2 + 16 * 1024 * 8


def _triton_sampler_buffer_bytes(hw: HardwareSpec, rows: int, vocab: int) -> int:
    """The per-program fp32 row buffer vLLM's Triton top-k/top-p kernel caches (vllm/v1/sample/ops/
    topk_topp_triton.py v0.19.0: min(next_power_of_2(min(SMs, rows)), SMs) rows of the vocabulary)."""
    programs = min(hw.sm_count, rows)
    return min(1 << (programs - 1).bit_length(), hw.sm_count) * vocab * 4


def moe_workspace(model: ModelSpec, hw: HardwareSpec, tp: int, cfg: EngineMemoryConfig,
                  par: Parallel = SINGLE) -> tuple[str | None, float]:
    """The experts kernel whose MoE workspace vLLM's WorkspaceManager keeps through the profiling run
    (``VllmMemoryRule.moe_experts_kernel``) and its bytes: the largest MoE layer's request, the
    manager's one buffer only growing (vllm/v1/worker/workspace.py). (None, 0): none is kept."""
    if model.moe is None:
        return None, 0.0
    kernel = cfg.rule.moe_experts_kernel(model, hw)
    if kernel is None:
        return None, 0.0
    n, e, h = cfg.resolved(model, hw).batch[0], model.dtype_bytes, model.hidden_size
    if kernel == "flashinfer":
        # FlashInferExperts (FlashInfer CUTLASS) take workspace1 of M x K; the CUTLASS kernel's own
        # per-call workspace is not modelled
        return kernel, float(n * par.dp * h * e)
    # the modular kernel's TritonExperts take workspace13 of M x top_k x max(N/2, K) and workspace2 of
    # M x top_k x max(N, K), in the activation dtype (modular_kernel.py _allocate_buffers,
    # TritonExperts.workspace_shapes); M is every DP rank's tokens, N the experts' gate_up width per rank
    moe_layer = next(layer for layer in model.layers if layer.moe)  # every MoE layer has the same experts
    widest = max(lin.out_features for lin in layer_linears(model, moe_layer, tp, par) if lin.name == "experts.gate_up")
    return kernel, float(n * model.moe.top_k * par.dp * e * (max(widest / 2, h) + max(widest, h)))


def activation_peak_bytes(model: ModelSpec, hw: HardwareSpec, tp: int, cfg: EngineMemoryConfig,
                          par: Parallel = SINGLE) -> float:
    """Peak torch memory of vLLM's profiling run above the weights: the larger of the forward pass over
    ``max_num_batched_tokens`` tokens and the dummy sampler run over ``min(max_num_seqs, tokens)`` rows
    (gpu_model_runner ``profile_run`` / ``_dummy_sampler_run``), which also holds the run's hidden states,
    plus PyTorch's cuBLAS workspace and a MoE workspace the engine keeps through both (:func:`moe_workspace`).
    With data parallelism a MoE layer runs on every DP rank's tokens, all-gathered (kvsim.spec.parallel)."""
    (n, seqs), e, h = cfg.resolved(model, hw).batch, model.dtype_bytes, model.hidden_size
    rule = cfg.rule
    widest: float = 0
    kernel, persistent = moe_workspace(model, hw, tp, cfg, par)
    for layer in {(layer.moe,): layer for layer in model.layers}.values():
        lins = layer_linears(model, layer, tp, par)
        attn = sum(lin.out_features for lin in lins if lin.role == "attention")
        # a dense MLP: the gate_up output and the activation's half of it
        mlp = max((lin.out_features * 1.5 for lin in lins if lin.name.endswith("gate_up")), default=0)
        if layer.moe and model.moe is not None and kernel is None:
            # vLLM's Triton fused MoE (fused_experts_impl, vllm/model_executor/layers/fused_moe/fused_moe.py
            # v0.19.0), freed after the layer: cache13 of M x top_k x max(N, K) elements (the gate_up
            # output, reused for the experts' down outputs before the top-k sum) and cache2 of
            # M x top_k x N/2 (the activation), N the routed experts' gate_up width on this rank, K the
            # hidden size; M is every DP rank's tokens. Fine-grained experts (K > N) hold K per routed token.
            width = max(lin.out_features for lin in lins if lin.name == "experts.gate_up")
            mlp = max(mlp, model.moe.top_k * par.dp * (max(width, h) + width / 2))
        widest = max(widest, attn, mlp)
    forward = n * e * (2 * h + widest)  # residual + normed hidden + the widest layer transient
    native = cfg.sampler == "native"
    per_logit = (rule.sampler_bytes_per_logit if native else FLASHINFER_SAMPLER_BYTES_PER_LOGIT) + (
        e if rule.sampler_holds_dtype_logits else 0)
    rows = min(seqs, n)
    # the run's hidden states stay alive, with the sampled rows' (a gathered copy) and the random
    # stand-in _dummy_sampler_run makes of them (torch.rand_like)
    sampler = rows * model.vocab_size * per_logit + n * h * e + 2 * rows * h * e
    if native and rule.triton_sampler_buffer and rows >= TRITON_SAMPLER_MIN_ROWS:
        sampler += _triton_sampler_buffer_bytes(hw, rows, model.vocab_size)
    workspace = CUBLAS_WORKSPACE_BYTES.get(hw.family, CUBLAS_WORKSPACE_DEFAULT_BYTES)
    return float(persistent + max(forward, sampler) + workspace)


@dataclass(frozen=True)
class Overheads:
    """Per-GPU memory besides weights and KV, by the engine's version rule: one place for plan_memory
    and the vectorized capacity grid."""

    activation_peak_bytes: float
    non_torch_bytes: float
    cuda_graph_bytes: float


def engine_overheads(model: ModelSpec, hw: HardwareSpec, tp: int, engine: EngineMemoryConfig,
                     par: Parallel = SINGLE) -> Overheads:
    return Overheads(activation_peak_bytes(model, hw, tp, engine, par), engine.rule.non_torch(tp, hw),
                     engine.graph_bytes(model))


@dataclass(frozen=True)
class MemoryPlan:
    model: ModelSpec
    hardware: HardwareSpec
    layout: KVLayout
    tp: int
    engine: EngineMemoryConfig
    weights: WeightBytes
    activation_peak_bytes: float
    non_torch_bytes: float
    cuda_graph_bytes: float
    parallel: Parallel = SINGLE  # data parallelism and expert parallelism (a plan is one GPU of one DP rank)

    @property
    def rule(self) -> VllmMemoryRule:
        return self.engine.rule

    @property
    def budget_bytes(self) -> float:
        return self.engine.gpu_memory_utilization * self.hardware.memory_bytes

    @property
    def kv_cache_bytes(self) -> float:
        """Bytes left for KV pages on one GPU (negative when the rest does not fit)."""
        return (self.budget_bytes - self.weights.total - self.activation_peak_bytes
                - self.non_torch_bytes - self.cuda_graph_bytes)

    @property
    def fits(self) -> bool:
        return self.num_gpu_blocks > 0

    @property
    def reason(self) -> str:
        if self.fits:
            return "fits"
        need = self.weights.total + self.activation_peak_bytes + self.non_torch_bytes + self.cuda_graph_bytes
        return (f"does not fit: weights {self.weights.total / GIB:.2f} GiB + activations "
                f"{self.activation_peak_bytes / GIB:.2f} GiB + non-torch {self.non_torch_bytes / GIB:.2f} GiB "
                + (f"+ CUDA graphs {self.cuda_graph_bytes / GIB:.2f} GiB " if self.cuda_graph_bytes else "")
                + f"= {need / GIB:.2f} GiB per GPU exceed the {self.budget_bytes / GIB:.2f} GiB budget "
                f"({self.engine.gpu_memory_utilization} x {self.hardware.memory_bytes / GIB:.2f} GiB)"
                if self.kv_cache_bytes <= 0 else
                "does not fit: not one KV block fits in the memory left")

    @cached_property
    def block_bytes(self) -> float:
        """GPU bytes of one page of ``block_size`` tokens across every layer that grows with the
        sequence, on one GPU (what vLLM divides the KV memory by)."""
        bs = self.engine.block_size
        return float(self.layout.gpu_bytes(bs, self.tp, block_size=bs)[0])

    @property
    def num_gpu_blocks(self) -> int:
        if self.kv_cache_bytes <= 0 or self.block_bytes <= 0:
            return 0
        return int(self.kv_cache_bytes // self.block_bytes)

    def kv_capacity_tokens(self, context: int, blocks: int | None = None) -> int:
        """Tokens of ``context``-token sequences the KV cache (``blocks``: default ``num_gpu_blocks``)
        and, for an offloading layout, this GPU's share of host memory and NVMe hold: what the method
        gives at that length (a quantization window, an eviction budget or a host tier changes the
        bytes a token costs with the length), not pages x page tokens."""
        fill = self._sequences_by_tier(np.atleast_1d(context), self.num_gpu_blocks if blocks is None else blocks)
        return int(min(float(f[0]) for f in fill.values()) * context)

    def seq_gpu_bytes(self, tokens: np.ndarray | int, image_tokens: np.ndarray | int = 0) -> np.ndarray:
        """Paged GPU bytes one sequence holds on one GPU (whole pages)."""
        return self.layout.gpu_bytes(tokens, self.tp, image_tokens, self.engine.block_size)

    def blocks_for(self, tokens: np.ndarray | int, image_tokens: np.ndarray | int = 0) -> np.ndarray:
        """Blocks (of ``block_bytes``) one sequence of ``tokens`` holds after prefill."""
        return np.ceil(self.seq_gpu_bytes(tokens, image_tokens) / self.block_bytes - 1e-9).astype(np.int64)

    def prefill_blocks_for(self, tokens: np.ndarray | int) -> np.ndarray:
        """Blocks a sequence holds while its prompt is prefilled (before eviction compresses it)."""
        bs = self.engine.block_size
        b = self.layout.gpu_bytes(tokens, self.tp, block_size=bs)
        if self.layout.prefill is not None:
            b = np.maximum(b, self.layout.prefill.gpu_bytes(tokens, self.tp, block_size=bs))
        return np.ceil(b / self.block_bytes - 1e-9).astype(np.int64)

    @property
    def offload_budget_bytes(self) -> dict[Tier, float | None]:
        """Host memory and NVMe one GPU may fill with offloaded KV: the machine description's host,
        shared evenly by the node's ``max_gpus_per_node`` GPUs (None: the disk size is not given)."""
        host, n = self.hardware.host, self.hardware.max_gpus_per_node
        return {"host": host.memory_bytes / n, "ssd": None if host.nvme_bytes is None else host.nvme_bytes / n}

    def _sequences_by_tier(self, ctx: np.ndarray, blocks: int) -> dict[Tier, np.ndarray]:
        """Sequences of ``ctx`` tokens each tier holds, unrounded: ``blocks`` GPU blocks and, for a
        layout that offloads, this GPU's share of host memory and NVMe."""
        out: dict[Tier, np.ndarray] = {
            "gpu": blocks / np.maximum(self.blocks_for(ctx), 1) if self.fits else np.zeros(np.shape(ctx))}
        tiers = self.layout.bytes_by_tier(ctx, self.tp)
        for tier, budget in self.offload_budget_bytes.items():
            need = tiers[tier]
            if not np.any(need > 0):
                continue
            if budget is None:
                raise KvsimError(f"{'+'.join(self.layout.methods)} places KV on NVMe, but {self.hardware.name}'s "
                                 "host gives no NVMe capacity", field="host.nvme_bytes", value=None)
            out[tier] = np.where(need > 0, budget / np.maximum(need, 1.0), np.inf)
        return out

    def concurrency_by_tier(self, context: np.ndarray | int) -> dict[Tier, np.ndarray]:
        """Most sequences of ``context`` tokens each tier holds: the GPU's KV blocks and, for a
        layout that offloads, this GPU's share of host memory and NVMe."""
        fill = self._sequences_by_tier(np.atleast_1d(context), self.num_gpu_blocks)
        return {tier: np.floor(np.minimum(f, 2.0**62)).astype(np.int64) for tier, f in fill.items()}  # inf: unbounded

    def max_concurrency(self, context: np.ndarray | int) -> np.ndarray:
        """Most sequences of ``context`` tokens the KV cache holds at once (the binding tier's)."""
        return np.minimum.reduce(list(self.concurrency_by_tier(context).values()))

    def binding_tier(self, context: int) -> Tier:
        """The tier that bounds ``max_concurrency(context)`` (gpu, host or ssd)."""
        by_tier = self.concurrency_by_tier(context)
        return min(by_tier, key=lambda t: (int(by_tier[t][0]), t != "gpu"))

    def max_context(self, batch: int) -> int:
        """Longest context (up to the model's maximum) that ``batch`` sequences can each hold."""
        if batch <= 0:
            raise KvsimError("must be a positive integer", field="batch", value=batch)
        limit = self.model.max_position_embeddings
        if int(self.max_concurrency(1)[0]) < batch:
            return 0
        if int(self.max_concurrency(limit)[0]) >= batch:
            return limit
        lo, hi = 1, limit  # every tier's need is monotone in length: binary search
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if int(self.max_concurrency(mid)[0]) >= batch:
                lo = mid
            else:
                hi = mid - 1
        return lo


def plan_memory(model: ModelSpec, hardware: HardwareSpec, layout: KVLayout, tp: int = 1,
                engine: EngineMemoryConfig | None = None, par: Parallel = SINGLE) -> MemoryPlan:
    """Size one GPU's memory the way the engine's vLLM version does. With data parallelism (``par``)
    each DP rank is a TP group with its own KV cache of its own sequences, sized the same way: the
    plan is one GPU of one rank (the one holding the most experts)."""
    engine = (engine or EngineMemoryConfig()).resolved(model, hardware)
    check_tp(model, tp)
    check_parallel(model, tp, par, hardware.max_gpus_per_node)
    o = engine_overheads(model, hardware, tp, engine, par)
    weights = weight_bytes(model, tp, par, expert_width_align(model, hardware))
    return MemoryPlan(model, hardware, layout, tp, engine, weights, o.activation_peak_bytes, o.non_torch_bytes,
                      o.cuda_graph_bytes, par)
