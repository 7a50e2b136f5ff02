"""The KV layout of a model under a stack of methods: what each layer stores, where, and how much.

A layout is computed, never special-cased: the baseline layout comes from the model's layers, and
each method is a pure function ``KVLayout -> KVLayout`` (sharing rewires which layer's cache a
layer reads, latent methods change dimensions, eviction caps tokens, quantization changes bits,
offloading moves old tokens to host or SSD). The memory planner, the cost model and the simulator
read only the fields defined here, so a new method needs no change anywhere else.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Literal, TypedDict, Unpack

import numpy as np

from kvsim.spec.model import DTYPE_BYTES, AttentionKind, ModelSpec

Tier = Literal["gpu", "host", "ssd"]
TIERS: tuple[Tier, ...] = ("gpu", "host", "ssd")


@dataclass(frozen=True)
class Quant:
    """Group quantization of cached elements (bits include nothing else; metadata is separate)."""

    bits: float
    group_size: int  # elements sharing one set of metadata (scale, zero point)
    meta_bits_per_group: float  # e.g. 32 = fp16 scale + fp16 zero point (KIVI)
    residual_tokens: int = 0  # most recent tokens kept in full precision (KIVI's R)
    outlier_fraction: float = 0.0  # dense-and-sparse outliers (KVQuant)
    outlier_bits: float = 0.0  # bits per stored outlier (value + index)

    @property
    def bits_per_element(self) -> float:
        """Storage bits of one quantized element, metadata and outliers included."""
        return (self.bits + self.meta_bits_per_group / self.group_size
                + self.outlier_fraction * self.outlier_bits)


@dataclass(frozen=True)
class Stream:
    """One stored tensor of one layer (K, V, an MLA latent, landmarks, counters, ...)."""

    part: str
    heads: int  # heads along which tensor parallelism splits the stream
    dim: int  # elements per head per stored entry
    elem_bytes: float  # bytes per element in full precision
    quant: Quant | None = None
    token_cap: int | None = None  # most tokens retained (window, eviction budget); None: all
    tokens_per_entry: int = 1  # one stored entry per this many tokens (MTLA stride, landmark chunk)
    const_entries: int = 0  # entries held regardless of length (a per-sequence basis)
    tier: Tier = "gpu"
    gpu_recent_tokens: int = 0  # with tier != gpu: entries of the most recent tokens kept on GPU
    split_by_tp: bool = True  # False: every rank holds the whole stream (MLA latent)
    scored_whole: bool = False  # read in full every decode step to choose what to read (ShadowKV landmarks,
    # MKA session memory): the layer's read_cap does not cap it
    gathered_per_kv_head: bool = False  # shared by the KV heads (heads 1) but each KV head reads the rows of
    # its own selection (ShadowKV's low-rank key factor)

    def heads_per_rank(self, tp: int) -> int:
        return max(1, self.heads // tp) if self.split_by_tp else self.heads

    def entries(self, tokens: np.ndarray, block_size: int = 1) -> np.ndarray:
        """Stored entries for sequences of ``tokens`` tokens (vectorized). With ``block_size`` > 1
        the kept tokens are rounded up to whole pages, and a capped stream that has slid holds one
        more page, because its window does not start on a page boundary (vLLM's sliding-window
        manager frees only whole pages)."""
        kept = tokens if self.token_cap is None else np.minimum(tokens, self.token_cap)
        if block_size > 1:
            kept = -(-kept // block_size) * block_size
            if self.token_cap:  # a stream that keeps no tokens (token_cap 0) has no window to slide
                kept = kept + np.where(tokens > self.token_cap, block_size, 0)
        n = -(-kept // self.tokens_per_entry)
        return n + np.where(tokens > 0, self.const_entries, 0)

    def _bytes_of(self, newest: np.ndarray, oldest: np.ndarray) -> np.ndarray:
        """Bytes per head-element of the entries between ``newest`` and ``oldest`` (counted from the
        most recent entry); the most recent ``residual_tokens`` entries stay in full precision."""
        if self.quant is None:
            return (oldest - newest) * self.elem_bytes
        r = self.quant.residual_tokens
        full = np.clip(oldest, 0, r) - np.clip(newest, 0, r)
        return full * self.elem_bytes + (oldest - newest - full) * self.quant.bits_per_element / 8

    def bytes_by_tier(self, tokens: np.ndarray, tp: int = 1, block_size: int = 1) -> dict[Tier, np.ndarray]:
        """Resident bytes of one sequence on one rank, split by tier."""
        n = self.entries(tokens, block_size)
        scale = self.heads_per_rank(tp) * self.dim
        zero = np.zeros_like(n, dtype=float)
        if self.tier == "gpu":
            return {"gpu": self._bytes_of(zero, n) * scale}
        on_gpu = np.minimum(n, self.gpu_recent_tokens)
        return {"gpu": self._bytes_of(zero, on_gpu) * scale, self.tier: self._bytes_of(on_gpu, n) * scale}


@dataclass(frozen=True)
class LayerKV:
    """One decoder layer: the streams it owns and the attention it computes."""

    index: int
    kind: AttentionKind
    source: int  # layer whose streams this layer attends over (itself when it owns KV)
    streams: tuple[Stream, ...]  # empty unless the layer owns KV
    q_heads: int
    kv_heads: int  # heads of K/V the attention reads (MLA absorbed: 1 shared latent)
    qk_dim: int  # per-head dot-product dim (MLA absorbed: kv_lora_rank + rope)
    vo_dim: int  # per-head value dim the attention sums (MLA absorbed: kv_lora_rank)
    span_cap: int | None  # most tokens one query attends (window, chunk, eviction budget)
    read_cap: int | None = None  # most tokens whose KV one decode step reads (top-k selection)

    @property
    def owns_kv(self) -> bool:
        return self.source == self.index


PrefixSharing = Literal["global", "user", "selective"]  # SafeKV policy: who may hit whose cached prefix


@dataclass(frozen=True)
class Runtime:
    """What a method changes in how a step runs; read by the cost model and the simulator."""

    per_step_scoring: bool = False  # H2O: attention probabilities accumulated every decode step
    prefill_scoring_window: int = 0  # SnapKV: queries scored against the prompt at prefill end
    prefill_scores_all_queries: bool = False  # H2O/KeepKV: every prompt query's scores accumulated
    prefill_passes: float = 1.0  # LCKV/top-target sharing: iterative prefill
    prefill_layer_fraction: float = 1.0  # YOCO: prefill exits early after the self-decoder
    reconstruct_rank: int = 0  # low-rank K/V rebuilt per read token (LRKV, ShadowKV keys)
    rebuild_lowrank_keys: bool = False  # LoRC: RoPE forces each step to rebuild keys from the cached rank
    merge_ops_per_token: float = 0.0  # KeepKV: extra element ops per evicted token, per KV head
    prefill_svd_rank: int = 0  # ShadowKV: truncated SVD of the prompt's pre-RoPE keys at prefill
    host_fetch_reuse: float = 0.0  # ShadowKV: fraction of fetched tokens still on the GPU from the last step
    host_fetch_tokens: int = 0  # ShadowKV/TTKV: tokens fetched from host per layer per step
    host_fetch_all: bool = False  # plain offload: every offloaded token is fetched each step
    prefix_sharing: PrefixSharing = "global"  # SafeKV policy
    image_token_keep: float = 1.0  # LightKV: fraction of vision tokens kept after prefill
    doc_kv_from_ssd: bool = False  # MatKV: document KV is loaded from NVMe instead of prefilled
    notes: tuple[str, ...] = ()


class RuntimeChanges(TypedDict, total=False):
    """Keyword arguments of KVLayout.with_runtime: any subset of Runtime's fields."""

    per_step_scoring: bool
    prefill_scoring_window: int
    prefill_scores_all_queries: bool
    prefill_passes: float
    prefill_layer_fraction: float
    reconstruct_rank: int
    rebuild_lowrank_keys: bool
    merge_ops_per_token: float
    prefill_svd_rank: int
    host_fetch_reuse: float
    host_fetch_tokens: int
    host_fetch_all: bool
    prefix_sharing: PrefixSharing
    image_token_keep: float
    doc_kv_from_ssd: bool
    notes: tuple[str, ...]


@dataclass(frozen=True)
class KVLayout:
    model: ModelSpec
    layers: tuple[LayerKV, ...]
    methods: tuple[str, ...] = ()
    runtime: Runtime = field(default_factory=Runtime)
    prefill: KVLayout | None = None  # the layout while prefilling, when eviction compresses it after

    def with_layers(self, layers: list[LayerKV] | tuple[LayerKV, ...]) -> KVLayout:
        return replace(self, layers=tuple(layers))

    def with_runtime(self, **changes: Unpack[RuntimeChanges]) -> KVLayout:
        return replace(self, runtime=replace(self.runtime, **changes))

    @cached_property
    def stream_counts(self) -> tuple[tuple[Stream, int], ...]:
        """Identical streams grouped, so whole-model sums cost one numpy pass per distinct stream."""
        return tuple(Counter(s for layer in self.layers for s in layer.streams).items())

    def stored_tokens(self, tokens: np.ndarray, image_tokens: np.ndarray | int = 0) -> np.ndarray:
        """Tokens a sequence keeps after vision-token merging (LightKV)."""
        keep = self.runtime.image_token_keep
        if keep >= 1.0:
            return tokens
        dropped = np.floor((1.0 - keep) * np.minimum(image_tokens, tokens))
        return (tokens - dropped).astype(tokens.dtype)

    def bytes_by_tier(self, tokens: np.ndarray | int, tp: int = 1, image_tokens: np.ndarray | int = 0,
                      block_size: int = 1) -> dict[Tier, np.ndarray]:
        """Resident bytes of one sequence of ``tokens`` tokens on ONE rank, per tier; with
        ``block_size`` > 1, as a paged cache holds them (whole pages)."""
        t = self.stored_tokens(np.atleast_1d(np.asarray(tokens, dtype=np.int64)), image_tokens)
        total: dict[Tier, np.ndarray] = {tier: np.zeros(t.shape) for tier in TIERS}
        for stream, count in self.stream_counts:
            for tier, b in stream.bytes_by_tier(t, tp, block_size).items():
                total[tier] += count * b
        return total

    def gpu_bytes(self, tokens: np.ndarray | int, tp: int = 1, image_tokens: np.ndarray | int = 0,
                  block_size: int = 1) -> np.ndarray:
        return self.bytes_by_tier(tokens, tp, image_tokens, block_size)["gpu"]

    def prefill_peak_gpu_bytes(self, prompt_tokens: np.ndarray | int, tp: int = 1) -> np.ndarray:
        """Transient GPU bytes while a prompt is prefilled: the full prompt before eviction
        compresses it, and never less than what stays resident (bookkeeping included)."""
        resident = self.gpu_bytes(prompt_tokens, tp)
        return resident if self.prefill is None else np.maximum(self.prefill.gpu_bytes(prompt_tokens, tp), resident)

    def layer_bytes(self, tokens: int, tp: int = 1) -> list[dict[str, float]]:
        """Per-layer, per-stream resident bytes (all tiers) of one sequence, for breakdowns."""
        t = np.asarray([tokens], dtype=np.int64)
        rows = []
        for layer in self.layers:
            row = {s.part: float(sum(b[0] for b in s.bytes_by_tier(t, tp).values())) for s in layer.streams}
            rows.append(row)
        return rows


def _state_streams(model: ModelSpec) -> tuple[Stream, ...]:
    """A linear-attention / state-space layer's per-sequence state: one entry per sequence whatever
    its length (``token_cap`` 0, ``const_entries`` 1), split over the state heads under TP, as vLLM's
    ``MambaSpec`` holds it (conv state in the model dtype, recurrent state in its own dtype)."""
    st = model.state
    assert st is not None  # validated by the model loader
    return (Stream("conv_state", st.heads, st.conv_elements // st.heads, model.dtype_bytes,
                   token_cap=0, const_entries=1),
            Stream("recurrent_state", st.heads, st.recurrent_elements // st.heads,
                   DTYPE_BYTES[st.recurrent_dtype], token_cap=0, const_entries=1))


def _indexer_bytes(index_head_dim: int) -> int:
    """Bytes per token of DeepSeek-V3.2's lightning-indexer key: fp8 elements plus one fp32 scale
    per 128 (vLLM ``DeepseekV32IndexerCache``: head size ``index_head_dim + index_head_dim // 128 * 4``
    in uint8)."""
    return index_head_dim + index_head_dim // 128 * 4


def baseline_layout(model: ModelSpec) -> KVLayout:
    """KV as vLLM stores it for the model in its serving dtype (the ``bf16`` default)."""
    a, e = model.attention, model.dtype_bytes
    layers = []
    for spec in model.layers:
        if spec.attention == "mla":
            m = a.mla
            assert m is not None  # validated by the model loader
            # DeepSeek-V2 eq. 10-11: the latent c_kv and the decoupled RoPE key are cached, shared by
            # all heads; vLLM keeps them whole on every TP rank.
            streams: tuple[Stream, ...] = (Stream("latent", 1, m.kv_lora_rank, e, split_by_tp=False),
                                           Stream("k_rope", 1, m.qk_rope_head_dim, e, split_by_tp=False))
            if m.index_head_dim:
                streams += (Stream("index_k", 1, _indexer_bytes(m.index_head_dim), 1, split_by_tp=False),)
            layer = LayerKV(spec.index, "mla", spec.kv_source, streams if spec.owns_kv else (),
                            a.num_heads, 1, m.kv_lora_rank + m.qk_rope_head_dim, m.kv_lora_rank, None)
        elif spec.attention in ("state", "none"):  # no per-token KV: attention spans no tokens
            streams = _state_streams(model) if spec.attention == "state" else ()
            layer = LayerKV(spec.index, spec.attention, spec.index, streams,
                            a.num_heads, a.num_kv_heads, a.head_dim, a.v_head_dim, 0)
        else:
            streams = (Stream("k", a.num_kv_heads, a.head_dim, e, token_cap=spec.window_tokens),
                       Stream("v", a.num_kv_heads, a.v_head_dim, e, token_cap=spec.window_tokens))
            layer = LayerKV(spec.index, spec.attention, spec.kv_source, streams if spec.owns_kv else (),
                            a.num_heads, a.num_kv_heads, a.head_dim, a.v_head_dim, spec.window_tokens)
        layers.append(layer)
    return KVLayout(model, tuple(layers))


def min_cap(a: int | None, b: int | None) -> int | None:
    """The tighter of two optional token caps."""
    if a is None:
        return b
    return a if b is None else min(a, b)
