"""Where tokens live (HBM, host DRAM, NVMe) and how caches are shared between requests.

Offloading methods keep recent or selected tokens on the GPU and fetch the rest over PCIe; the
cost model prices those fetches from ``Runtime.host_fetch_tokens`` / ``host_fetch_all``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import cast

from kvsim.errors import KvsimError
from kvsim.kv.layout import KVLayout, PrefixSharing, Quant, Stream, min_cap
from kvsim.kv.method import Method, Param, Params, Stage
from kvsim.kv.precision import FP16_SCALE_ZERO_BITS, KEY_PARTS, VALUE_PARTS


def _dense_only(layout: KVLayout, method: str) -> None:
    if any(layer.kind == "mla" for layer in layout.layers):
        raise KvsimError(f"{layout.model.name} caches an MLA latent; {method} works on per-head K/V",
                         field=f"method.{method}", value=layout.model.name)


def _shadowkv(layout: KVLayout, p: Params) -> KVLayout:
    # ShadowKV (arXiv 2410.21465): on the GPU, the rank-r SVD factor of the pre-RoPE keys (plus its
    # r x (Hkv*d) basis per sequence), one landmark (mean key) per chunk and a few outlier chunks
    # kept whole; all values go to host memory. Each decode step selects the top chunks within the
    # sparse budget, rebuilds their keys from the low-rank factor and fetches their values.
    _dense_only(layout, "shadowkv")
    rank, chunk, budget = int(p["rank"]), int(p["chunk"]), int(p["budget"])
    outlier_tokens = int(p["outlier_chunks"]) * chunk
    out = []
    for layer in layout.layers:
        streams: tuple[Stream, ...] = ()
        if layer.owns_kv:
            k, v = layer.streams[0], layer.streams[1]
            width = k.heads * k.dim
            # each KV head selects its own chunks, so it gathers its own rows of the shared factor, and
            # every step scores all S/chunk landmarks to select them (arXiv 2410.21465: approximate scores
            # against the chunk landmarks, then the top-k chunks per KV head)
            streams = (
                replace(k, part="k_lowrank", heads=1, dim=rank, split_by_tp=False, gathered_per_kv_head=True),
                replace(k, part="k_basis", heads=1, dim=width, token_cap=0, const_entries=rank,
                        split_by_tp=False),
                replace(k, part="landmarks", tokens_per_entry=chunk, scored_whole=True),
                replace(k, part="outlier_kv", dim=k.dim + v.dim, token_cap=min_cap(k.token_cap, outlier_tokens)),
                replace(v, tier="host", gpu_recent_tokens=0),
            )
        out.append(replace(layer, streams=streams, read_cap=min_cap(layer.read_cap, budget)))
    return layout.with_layers(out).with_runtime(host_fetch_tokens=budget, reconstruct_rank=rank, prefill_svd_rank=rank,
                                                host_fetch_reuse=float(p["reuse"]))


def _tiered(layout: KVLayout, recent: int, key: Quant | None, value: Quant | None) -> KVLayout:
    """Most recent ``recent`` tokens of each K/V stream on the GPU, the rest in host memory
    (optionally quantized there)."""
    def move(s: Stream) -> Stream:
        q = key if s.part in KEY_PARTS else value if s.part in VALUE_PARTS else None
        return replace(s, tier="host", gpu_recent_tokens=recent, quant=q or s.quant)

    return layout.with_layers([replace(layer, streams=tuple(move(s) for s in layer.streams))
                               for layer in layout.layers])


def _ttkv(layout: KVLayout, p: Params) -> KVLayout:
    # TTKV (arXiv 2604.19769): recent blocks in HBM at full precision; older blocks in host DRAM,
    # quantized with more bits for keys than values; each step streams the top-k older tokens over
    # PCIe, overlapped with compute.
    recent, topk = int(p["recent"]), int(p["topk"])
    k = Quant(float(p["k_bits"]), 32, FP16_SCALE_ZERO_BITS, recent)
    v = Quant(float(p["v_bits"]), 32, FP16_SCALE_ZERO_BITS, recent)
    tiered = _tiered(layout, recent, k, v)
    return (tiered.with_layers([replace(layer, read_cap=min_cap(layer.read_cap, recent + topk))
                                for layer in tiered.layers])
            .with_runtime(host_fetch_tokens=topk))


def _offload(layout: KVLayout, p: Params) -> KVLayout:
    # Plain CPU offload (e.g. vLLM's cpu_offload of KV / LMCache): tokens older than the GPU window
    # live in host memory and every decode step reads all of them back over PCIe.
    return _tiered(layout, int(p["gpu_tokens"]), None, None).with_runtime(host_fetch_all=True)


def _mka(layout: KVLayout, p: Params) -> KVLayout:
    # MKA (arXiv 2603.20586): local memory (recent tokens, full KV on GPU), session memory (pooled
    # keys/values, one entry per `stride` tokens, on GPU) and long-term memory (full KV in host
    # memory, routed: top-k tokens fetched per step). Tier sizes are parameters (inferred model).
    _dense_only(layout, "mka")
    local, stride, topk = int(p["local"]), int(p["stride"]), int(p["topk"])
    out = []
    for layer in layout.layers:
        streams: tuple[Stream, ...] = ()
        if layer.owns_kv and layer.streams[0].token_cap is not None and layer.streams[0].token_cap <= local:
            streams = layer.streams  # a window no longer than local memory needs no other tier
        elif layer.owns_kv:
            k, v = layer.streams[0], layer.streams[1]
            streams = (replace(k, token_cap=min_cap(k.token_cap, local)),
                       replace(v, token_cap=min_cap(v.token_cap, local)),
                       # session memory is routed over and attended in full every step (FastMKA fuses
                       # local, session and fetched long-term entries into one attention)
                       replace(k, part="k_session", tokens_per_entry=stride, scored_whole=True),
                       replace(v, part="v_session", tokens_per_entry=stride, scored_whole=True),
                       replace(k, part="k_longterm", tier="host"),
                       replace(v, part="v_longterm", tier="host"))
        out.append(replace(layer, streams=streams, read_cap=min_cap(layer.read_cap, local + topk)))
    return layout.with_layers(out).with_runtime(host_fetch_tokens=topk)


def _matkv(layout: KVLayout, p: Params) -> KVLayout:
    # MatKV (arXiv 2512.22195): KV of RAG document chunks precomputed on NVMe and loaded instead of
    # prefilled; the GPU layout is unchanged.
    return layout.with_runtime(doc_kv_from_ssd=True)


def _safekv(layout: KVLayout, p: Params) -> KVLayout:
    # SafeKV (arXiv 2508.08438): who may hit whose cached prefix: everyone (global), the same user
    # only (isolation), or only blocks not flagged private (selective).
    return layout.with_runtime(prefix_sharing=cast(PrefixSharing, str(p["policy"])))  # Param choices admit only these


METHODS = (
    Method("shadowkv", Stage.PLACEMENT, "ShadowKV: low-rank keys + landmarks on GPU, values on host",
           "arXiv 2410.21465",
           (Param("rank", int, 160, minimum=1, doc="SVD rank of pre-RoPE keys"),
            Param("chunk", int, 8, minimum=1, doc="tokens per chunk (landmark)"),
            Param("outlier_chunks", int, 48, minimum=0, doc="chunks kept whole on GPU"),
            Param("budget", int, 2048, minimum=1, doc="sparse budget: tokens read per step"),
            # arXiv 2410.21465, contributions: the cache of selected chunks "reduce[s] computation and
            # data fetching by 60% during decoding" (temporal locality of adjacent steps)
            Param("reuse", float, 0.6, minimum=0, maximum=1, doc="fetched values reused from the last step")),
           _shadowkv, "shadowkv", True),
    Method("ttkv", Stage.PLACEMENT, "TTKV: recent tokens in HBM, older quantized in host DRAM",
           "arXiv 2604.19769",
           (Param("recent", int, 4096, minimum=1, doc="recent tokens in HBM (the token being decoded at least)"),
            Param("k_bits", int, 4, minimum=1, maximum=8, doc="host key bits"),
            Param("v_bits", int, 2, minimum=1, maximum=8, doc="host value bits"),
            Param("topk", int, 2048, minimum=0, doc="older tokens fetched per step")),
           _ttkv, "ttkv"),
    Method("offload", Stage.PLACEMENT, "KV offload: only the most recent tokens stay on the GPU",
           "vLLM docs: KV offloading (LMCache connector)",
           (Param("gpu_tokens", int, None, minimum=1,
                  doc="recent tokens kept on the GPU (the token being decoded at least)"),),
           _offload, "offload:gpu_tokens=4096"),
    Method("mka", Stage.PLACEMENT, "MKA: local, session and long-term memory tiers with routing",
           "arXiv 2603.20586",
           (Param("local", int, 2048, minimum=1, doc="recent tokens in full on GPU"),
            Param("stride", int, 16, minimum=1, doc="tokens pooled per session-memory entry"),
            Param("topk", int, 1024, minimum=0, doc="long-term tokens fetched per step")),
           _mka, "mka"),
    Method("matkv", Stage.PLACEMENT, "MatKV: document KV loaded from NVMe instead of prefilled",
           "arXiv 2512.22195", (), _matkv, "matkv"),
    Method("safekv", Stage.SERVING, "SafeKV: prefix-cache sharing policy against timing side channels",
           "arXiv 2508.08438",
           (Param("policy", str, "selective", ("global", "user", "selective"), doc="who may share prefixes"),),
           _safekv, "safekv:policy=user"),
)
