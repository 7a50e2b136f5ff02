"""Memory plan of one replica, sized the way vLLM sizes its KV cache.

vLLM (worker ``determine_available_memory``, PR #10511): the instance may use
``gpu_memory_utilization x total device memory``; from that come the weights, the peak activation
memory of a profiling forward pass over ``max_num_batched_tokens`` tokens, and the memory outside
torch's allocator (CUDA context, cuBLAS workspaces, NCCL buffers); the rest becomes KV pages of
``block_size`` tokens. CUDA graphs are captured after the KV cache is allocated and come out of the
memory left outside the budget (vLLM <= 0.10), so they are 0 here unless the user sets them.

Everything is per GPU (one tensor-parallel rank) unless a name says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property
from importlib import resources

import numpy as np

from kvsim.errors import KvsimError
from kvsim.fileio import load_yaml
from kvsim.kv.layout import KVLayout
from kvsim.spec.hardware import HardwareSpec
from kvsim.spec.linears import check_tp, head_linears, layer_linears, norm_params
from kvsim.spec.model import ModelSpec

GIB = 2**30


@dataclass(frozen=True)
class EngineOverheads:
    """Engine memory outside weights and KV (fitted values in kvsim/data/engine_memory.yaml)."""

    non_torch_bytes_tp1: float
    nccl_extra_bytes: float
    sampler_logit_copies: float


@cache
def engine_overheads() -> EngineOverheads:
    data = load_yaml((resources.files("kvsim") / "data" / "engine_memory.yaml").read_text())["vllm"]
    return EngineOverheads(float(data["non_torch_bytes_tp1"]), float(data["nccl_extra_bytes"]),
                           float(data["sampler_logit_copies"]))


@dataclass(frozen=True)
class EngineMemoryConfig:
    """The vLLM engine arguments that decide memory."""

    gpu_memory_utilization: float = 0.9  # vLLM default
    block_size: int = 16  # vLLM default for CUDA
    max_num_batched_tokens: int = 8192  # vLLM `vllm serve` default on >= 70 GiB GPUs
    max_num_seqs: int = 256
    non_torch_bytes: float | None = None  # None: the fitted default (engine_memory.yaml)
    cuda_graph_bytes: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise KvsimError("must be in (0, 1]", field="gpu_memory_utilization",
                             value=self.gpu_memory_utilization)
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs"):
            if getattr(self, name) <= 0:
                raise KvsimError("must be a positive integer", field=name, value=getattr(self, name))


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

    @property
    def total(self) -> float:
        return (self.embedding + self.lm_head + self.attention + self.mlp + self.router + self.experts
                + self.shared_experts + self.norms + self.vision)


def weight_bytes(model: ModelSpec, tp: int) -> WeightBytes:
    """Weights one rank holds: all MoE experts (TP splits each expert), embeddings, LM head."""
    by_role: dict[str, float] = {}
    for layer in model.layers:
        for lin in layer_linears(model, layer, tp):
            by_role[lin.role] = by_role.get(lin.role, 0.0) + lin.bytes
    for lin in head_linears(model, tp):
        by_role[lin.role] = by_role.get(lin.role, 0.0) + lin.bytes
    e = model.dtype_bytes
    vision = model.vision.params * e if model.vision else 0.0  # replicated on every rank
    return WeightBytes(
        embedding=by_role.get("embedding", 0.0), lm_head=by_role.get("lm_head", 0.0),
        attention=by_role.get("attention", 0.0), mlp=by_role.get("mlp", 0.0),
        router=by_role.get("router", 0.0), experts=by_role.get("experts", 0.0),
        shared_experts=by_role.get("shared_experts", 0.0), norms=norm_params(model) * e, vision=vision)


def activation_peak_bytes(model: ModelSpec, tp: int, cfg: EngineMemoryConfig) -> float:
    """Peak torch memory of vLLM's profiling run above the weights: the larger of the forward pass
    over ``max_num_batched_tokens`` tokens and the sampler over ``max_num_seqs`` logit rows."""
    n, e, h = cfg.max_num_batched_tokens, model.dtype_bytes, model.hidden_size
    widest = 0
    for layer in {(layer.moe,): layer for layer in model.layers}.values():
        lins = layer_linears(model, layer, tp)
        attn = sum(lin.out_features for lin in lins if lin.role == "attention")
        mlp = max((lin.out_features * 1.5 for lin in lins if lin.name.endswith("gate_up")), default=0)
        if layer.moe and model.moe is not None:
            mlp *= model.moe.top_k  # fused-MoE intermediate cache holds top_k rows per token
        widest = max(widest, attn, mlp)
    forward = n * e * (2 * h + widest)  # residual + normed hidden + the widest layer transient
    sampler = cfg.max_num_seqs * model.vocab_size * 4 * engine_overheads().sampler_logit_copies
    return float(max(forward, sampler))


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
                f"= {need / GIB:.2f} GiB per GPU exceed the {self.budget_bytes / GIB:.2f} GiB budget "
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
    def offload_budget_bytes(self) -> dict[str, float | None]:
        """Host memory and NVMe one GPU may fill with offloaded KV: the machine description's host,
        shared evenly by the node's ``max_gpus_per_node`` GPUs (None: the disk size is not given)."""
        host, n = self.hardware.host, self.hardware.max_gpus_per_node
        return {"host": host.memory_bytes / n, "ssd": None if host.nvme_bytes is None else host.nvme_bytes / n}

    def _sequences_by_tier(self, ctx: np.ndarray, blocks: int) -> dict[str, np.ndarray]:
        """Sequences of ``ctx`` tokens each tier holds, unrounded: ``blocks`` GPU blocks and, for a
        layout that offloads, this GPU's share of host memory and NVMe."""
        out = {"gpu": blocks / np.maximum(self.blocks_for(ctx), 1) if self.fits else np.zeros(np.shape(ctx))}
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

    def concurrency_by_tier(self, context: np.ndarray | int) -> dict[str, np.ndarray]:
        """Most sequences of ``context`` tokens each tier holds: the GPU's KV blocks and, for a
        layout that offloads, this GPU's share of host memory and NVMe."""
        fill = self._sequences_by_tier(np.atleast_1d(context), self.num_gpu_blocks)
        return {tier: np.floor(np.minimum(f, 2.0**62)).astype(np.int64) for tier, f in fill.items()}  # inf: unbounded

    def max_concurrency(self, context: np.ndarray | int) -> np.ndarray:
        """Most sequences of ``context`` tokens the KV cache holds at once (the binding tier's)."""
        return np.minimum.reduce(list(self.concurrency_by_tier(context).values()))

    def binding_tier(self, context: int) -> str:
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
                engine: EngineMemoryConfig | None = None) -> MemoryPlan:
    """Size one replica's memory the way vLLM does."""
    engine = engine or EngineMemoryConfig()
    check_tp(model, tp)
    non_torch = engine.non_torch_bytes
    if non_torch is None:
        fitted = engine_overheads()
        non_torch = fitted.non_torch_bytes_tp1 + (fitted.nccl_extra_bytes if tp > 1 else 0.0)
    return MemoryPlan(model, hardware, layout, tp, engine, weight_bytes(model, tp),
                      activation_peak_bytes(model, tp, engine), non_torch, engine.cuda_graph_bytes)
