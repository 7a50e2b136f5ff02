"""The reference decoder: random bf16 weights built from a model's dimensions (no checkpoints).

Dense MHA/GQA/MQA, sliding window (ring-buffer KV), MoE (top-k routing, grouped GEMM) on any subset
of layers, MLA (DeepSeek-V2: absorbed decode over the latent cache, un-absorbed prefill), run with
the kernels a serving engine runs (``Decoder`` lists them): torch GEMMs, vLLM's element-wise and
routing kernels in Triton (kernels/engine_ops.py), split-K Triton decode attention over a contiguous
or a paged cache (a block table of 16-token pages, as vLLM), SDPA flash for prefill. A
tensor-parallel rank is the same decoder built from ``EngineConfig.shard`` with an all-reduce hook
(tp_engine.py).

Shapes come from kvsim's model spec (``get_config``); FALLBACK is a documented fallback for a
machine where kvsim's loader cannot import (pydantic missing): the same numbers, each from the
model's HF config.json, and get_config warns when the two disagree."""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    name: str
    hidden: int
    vocab: int
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    gated_mlp: bool = True
    sliding_window: int | None = None  # applied to every layer when set
    tie_embeddings: bool = False
    moe_experts: int = 0
    moe_top_k: int = 0
    moe_intermediate: int = 0
    shared_intermediate: int = 0
    dense_layers: tuple[int, ...] = ()  # MoE models: layers whose MLP is dense (DeepSeek's first layer)
    mla: MLAConfig | None = None
    tp: int = 1  # ranks this config is a shard for (heads, intermediates and vocab already divided)
    source: str = ""

    def is_moe(self, layer: int) -> bool:
        return self.moe_experts > 0 and layer not in self.dense_layers

    def attn_params(self) -> int:
        h = self.hidden
        if self.mla:
            m = self.mla
            return (h * self.q_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim) + h * (m.kv_lora_rank + m.qk_rope_head_dim)
                    + m.kv_lora_rank * self.q_heads * (m.qk_nope_head_dim + m.v_head_dim)
                    + self.q_heads * m.v_head_dim * h)
        return h * (self.q_heads + 2 * self.kv_heads) * self.head_dim + self.q_heads * self.head_dim * h

    def mlp_params(self, layer: int) -> int:
        if self.is_moe(layer):
            return (self.moe_experts * 3 * self.hidden * self.moe_intermediate + self.hidden * self.moe_experts
                    + 3 * self.hidden * self.shared_intermediate)
        return (3 if self.gated_mlp else 2) * self.hidden * self.intermediate

    def weight_params(self, layers=None) -> int:
        L = self.layers if layers is None else layers
        emb = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return sum(self.attn_params() + self.mlp_params(i) + 2 * self.hidden for i in range(L)) + emb

    def kv_slots(self, context: int) -> int:
        return min(context, self.sliding_window) if self.sliding_window else context

    def kv_bytes(self, batch, context, layers=None) -> int:
        """Contiguous cache: `context` slots per sequence (ring buffer of `sliding_window`)."""
        L = self.layers if layers is None else layers
        per_token = (self.mla.kv_lora_rank + self.mla.qk_rope_head_dim) if self.mla else 2 * self.kv_heads * self.head_dim
        return L * batch * self.kv_slots(context) * per_token * 2

    def rank_slices(self, tp: int, rank: int) -> dict[str, tuple[int, int]]:
        """[start, stop) of what rank `rank` of `tp` holds under Megatron tensor parallelism: query
        heads, KV heads (each rank holds the KV heads its query heads read: replicated when there are
        fewer KV heads than ranks, as vLLM does), MLP and expert intermediates, vocabulary rows."""
        assert self.q_heads % tp == 0 and self.hidden % tp == 0, (self.name, tp)
        if self.kv_heads >= tp:
            assert self.kv_heads % tp == 0, f"{self.name}: {self.kv_heads} KV heads do not split over {tp} ranks"
            kv = (rank * self.kv_heads // tp, (rank + 1) * self.kv_heads // tp)
        else:
            first = rank * self.q_heads // tp // (self.q_heads // self.kv_heads)
            kv = (first, first + 1)
        vocab = -(-self.vocab // tp)

        def even(n):
            return (rank * n // tp, (rank + 1) * n // tp)
        return dict(q_heads=even(self.q_heads), kv_heads=kv, intermediate=even(self.intermediate),
                    moe_intermediate=even(self.moe_intermediate), shared_intermediate=even(self.shared_intermediate),
                    vocab=(rank * vocab, min(self.vocab, (rank + 1) * vocab)))

    def shard(self, tp: int) -> EngineConfig:
        """Rank 0's share (every rank holds the same sizes); vocab rounded up as vLLM pads it."""
        n = {k: b - a for k, (a, b) in self.rank_slices(tp, 0).items()}
        return dataclasses.replace(self, q_heads=n["q_heads"], kv_heads=n["kv_heads"], intermediate=n["intermediate"],
                                   moe_intermediate=n["moe_intermediate"], shared_intermediate=n["shared_intermediate"],
                                   vocab=n["vocab"], tp=tp)


# Fallback shapes, each from the model's Hugging Face config.json.
FALLBACK = {
    # meta-llama/Llama-2-7b-hf: hidden 4096, 32 layers, 32 heads, 32 kv heads, intermediate 11008, vocab 32000
    "llama-2-7b": EngineConfig("llama-2-7b", 4096, 32000, 32, 32, 32, 128, 11008, source="meta-llama/Llama-2-7b-hf"),
    # meta-llama/Meta-Llama-3-8B: 4096, 32 layers, 32/8 heads, 14336, vocab 128256
    "llama-3-8b": EngineConfig("llama-3-8b", 4096, 128256, 32, 32, 8, 128, 14336, source="meta-llama/Meta-Llama-3-8B"),
    # Qwen/Qwen2.5-7B: 3584, 28 layers, 28/4 heads, 18944, vocab 152064
    "qwen2.5-7b": EngineConfig("qwen2.5-7b", 3584, 152064, 28, 28, 4, 128, 18944, source="Qwen/Qwen2.5-7B"),
    # mistralai/Mistral-7B-v0.1: 4096, 32 layers, 32/8, 14336, vocab 32000, sliding_window 4096
    "mistral-7b": EngineConfig("mistral-7b", 4096, 32000, 32, 32, 8, 128, 14336, sliding_window=4096,
                               source="mistralai/Mistral-7B-v0.1"),
    # microsoft/Phi-3-mini-4k-instruct: 3072, 32 layers, 32/32 heads (head_dim 96), 8192, vocab 32064, sliding_window 2047
    "phi-3-mini": EngineConfig("phi-3-mini", 3072, 32064, 32, 32, 32, 96, 8192, sliding_window=2047,
                               source="microsoft/Phi-3-mini-4k-instruct"),
    # tiiuae/falcon-7b: 4544, 32 layers, 71 heads, 1 kv head (multi_query), head_dim 64, mlp 4*4544=18176 (GELU,
    # not gated), vocab 65024; falcon runs attention and MLP in parallel, modelled here sequentially
    "falcon-7b": EngineConfig("falcon-7b", 4544, 65024, 32, 71, 1, 64, 18176, gated_mlp=False, tie_embeddings=True,
                              source="tiiuae/falcon-7b"),
    # google/gemma-2b: 2048, 18 layers, 8 heads, 1 kv head, head_dim 256, intermediate 16384 (GeGLU), vocab 256000, tied
    "gemma-2b": EngineConfig("gemma-2b", 2048, 256000, 18, 8, 1, 256, 16384, tie_embeddings=True, source="google/gemma-2b"),
    # Qwen/Qwen1.5-MoE-A2.7B: 2048, 24 layers, 16/16 heads, 60 experts top-4, moe_intermediate 1408,
    # shared_expert_intermediate 5632, vocab 151936
    "qwen1.5-moe-a2.7b": EngineConfig("qwen1.5-moe-a2.7b", 2048, 151936, 24, 16, 16, 128, 5632, moe_experts=60,
                                      moe_top_k=4, moe_intermediate=1408, shared_intermediate=5632,
                                      source="Qwen/Qwen1.5-MoE-A2.7B"),
    # mistralai/Mixtral-8x7B-v0.1: 4096, 32 layers, 32/8, 8 experts top-2 of 14336, vocab 32000 (run truncated)
    "mixtral-8x7b": EngineConfig("mixtral-8x7b", 4096, 32000, 32, 32, 8, 128, 14336, moe_experts=8, moe_top_k=2,
                                 moe_intermediate=14336, source="mistralai/Mixtral-8x7B-v0.1"),
    # deepseek-ai/DeepSeek-V2-Lite: 2048, 27 layers (first dense, 10944), 16 heads, MLA kv_lora_rank 512,
    # qk_nope 128, qk_rope 64, v_head_dim 128, no q LoRA; 64 experts top-6 of 1408 + 2 shared of 1408; vocab 102400
    "deepseek-v2-lite": EngineConfig("deepseek-v2-lite", 2048, 102400, 27, 16, 16, 192, 10944, moe_experts=64,
                                     moe_top_k=6, moe_intermediate=1408, shared_intermediate=2816, dense_layers=(0,),
                                     mla=MLAConfig(512, 128, 64, 128), source="deepseek-ai/DeepSeek-V2-Lite"),
}


def from_kvsim_spec(spec) -> EngineConfig:
    """Adapter from kvsim.spec.model.ModelSpec to EngineConfig."""
    a = spec.attention
    kinds = {layer.attention for layer in spec.layers}
    windows = [layer.window_tokens for layer in spec.layers if layer.attention == "sliding" and layer.window_tokens]
    if kinds - {"full", "sliding", "mla"} or ("mla" in kinds and len(kinds) > 1):
        raise NotImplementedError(f"engine does not model attention kinds {kinds}")
    if windows and "full" in kinds:
        raise NotImplementedError("mixed sliding/full layers not modelled")
    moe = spec.moe
    mla = MLAConfig(a.mla.kv_lora_rank, a.mla.qk_nope_head_dim, a.mla.qk_rope_head_dim, a.mla.v_head_dim) \
        if "mla" in kinds else None
    return EngineConfig(
        name=spec.name, hidden=spec.hidden_size, vocab=spec.vocab_size, layers=len(spec.layers),
        q_heads=a.num_heads, kv_heads=a.num_kv_heads, head_dim=a.head_dim, intermediate=spec.intermediate_size or 0,
        gated_mlp=getattr(spec, "mlp_gated", True),
        sliding_window=max(windows) if windows else None, tie_embeddings=bool(spec.tie_word_embeddings),
        moe_experts=moe.num_experts if moe else 0, moe_top_k=moe.top_k if moe else 0,
        moe_intermediate=moe.expert_intermediate_size if moe else 0,
        shared_intermediate=moe.shared_intermediate_size if moe else 0,  # kvsim: all shared experts together
        dense_layers=tuple(layer.index for layer in spec.layers if not layer.moe) if moe else (),
        mla=mla, source="kvsim.spec")


def get_config(name: str, log=print) -> EngineConfig:
    """kvsim's spec (catalogue, or validation/models/<name>.yaml); FALLBACK if kvsim cannot load."""
    import os

    try:
        from kvsim.spec.model import load_model  # noqa: PLC0415

        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", f"{name}.yaml")
        cfg = from_kvsim_spec(load_model(here if os.path.isfile(here) else name))
        fb = FALLBACK.get(name)
        if fb and dataclasses.replace(cfg, source="") != dataclasses.replace(fb, source=""):
            log(f"[WARN] kvsim spec {name} differs from the fallback table: {cfg} vs {fb}")
        return cfg
    except ImportError as e:
        if name not in FALLBACK:
            raise
        log(f"[info] {name}: kvsim loader unavailable ({e}); fallback table")
        return FALLBACK[name]


# ----------------------------------------------------------------------------- torch model
# Split-K decode launch config: the fastest of bench_attention's eight on the H100 (BLOCK_N 64,
# 4 warps, 2 stages: 188 us vs 188-193 us for the rest at batch 16, 32/8/128, 8k context;
# validation/results/h100-sxm/attention_decode.csv, triton_bf16_tune rows).
DECODE_CFG = dict(BLOCK_N=64, num_warps=4, num_stages=2)
ROPE_BASE = 10000.0  # Llama-2's rope_theta; the weights are random, so only the arithmetic matters


class Decoder:
    """Random-weight decoder for one GPU (or one TP rank: pass ``allreduce``/``allgather``).

    Kernels per decoder layer, decode and prefill alike (vLLM's order; GEMMs are torch/cuBLAS,
    the rest Triton from kernels/engine_ops.py):
      fused_add_rms_norm (plain rms_norm in layer 0), QKV GEMM, rotary_embedding (q and k in
      place), reshape_and_cache, attention (decode: split-K partials + reduce over any cache;
      prefill: causal SDPA flash on the new tokens), O GEMM, fused_add_rms_norm, gate_up GEMM,
      silu_and_mul, down GEMM; MoE layers: router GEMM, top-k softmax, align, permute, two
      grouped GEMMs around silu_and_mul, un-permute/sum (+ shared experts: 2 GEMMs, silu_and_mul).
    MLA (DeepSeek-V2) replaces QKV by q and kv_a GEMMs, an rms_norm of the latent in place, RoPE on
    the rope parts, one cache write of the 576-wide row, and decodes absorbed: q_nope x W_UK
    (bmm), the Triton latent kernel (partials + reduce), x W_UV (bmm). Then the final
    fused_add_rms_norm and the LM head (prefill: last token of each sequence)."""

    def __init__(self, cfg: EngineConfig, layers: int, allreduce=None, allgather=None, device="cuda", dtype=None):
        torch = _torch()
        self.cfg, self.L, self.dev = cfg, layers, device
        self.dt = dtype or torch.bfloat16  # float32 only for CPU tests (the Triton interpreter lacks bf16)
        self.allreduce = allreduce or (lambda x: x)
        self.allgather = allgather or (lambda x: x)
        d = dict(device=device, dtype=self.dt)
        H = cfg.hidden

        def w(*shape):
            return torch.empty(*shape, **d).normal_(0, 0.02)

        self.embed = w(cfg.vocab * cfg.tp, H)  # replicated (a lookup of B rows; vLLM shards it, same bytes read)
        self.lm_head = w(cfg.vocab, H)  # vocab-parallel: this rank's rows, logits gathered
        self.layers = []
        for i in range(layers):
            lw = dict(ln1=torch.ones(H, **d), ln2=torch.ones(H, **d))
            if cfg.mla:
                m = cfg.mla
                lw["wq"] = w(cfg.q_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim), H)
                lw["wkv_a"] = w(m.kv_lora_rank + m.qk_rope_head_dim, H)
                lw["kv_norm"] = torch.ones(m.kv_lora_rank, **d)
                lw["wkv_b"] = w(cfg.q_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)  # HF kv_b_proj
                lw["wo"] = w(H, cfg.q_heads * m.v_head_dim)
            else:
                lw["wqkv"] = w((cfg.q_heads + 2 * cfg.kv_heads) * cfg.head_dim, H)
                lw["wo"] = w(H, cfg.q_heads * cfg.head_dim)
            if cfg.is_moe(i):
                E, inter = cfg.moe_experts, cfg.moe_intermediate
                lw["router"] = w(E, H)
                lw["w13"] = w(E, 2 * inter, H)  # vLLM's expert layout [E, N, K]
                lw["w2"] = w(E, H, inter)
                if cfg.shared_intermediate:
                    lw["s13"] = w(2 * cfg.shared_intermediate, H)
                    lw["s2"] = w(H, cfg.shared_intermediate)
            else:
                lw["w13"] = w((2 if cfg.gated_mlp else 1) * cfg.intermediate, H)
                lw["w2"] = w(H, cfg.intermediate)
            self.layers.append(lw)
        self.ln_f = torch.ones(H, **d)
        self.moe_impl = "grouped_mm" if cfg.moe_experts else None
        self.rot = cfg.mla.qk_rope_head_dim if cfg.mla else cfg.head_dim
        self.cos_sin = ops().rope_cache(1, self.rot, device, ROPE_BASE)
        self.cache = None
        self.table = None
        self._meta = {}

    # --- KV cache
    def alloc_cache(self, batch, context, paged=False, page=16):
        """Caches for `batch` sequences of `context` tokens plus the one being decoded, one tensor
        per layer as vLLM allocates them: [2, slots, kv_heads, head_dim] (K and V planes; MLA:
        [slots, latent + RoPE key]), where the slots are every sequence's `kv_slots(context + 1)`
        rows back to back (contiguous; a ring of `sliding_window` rows) or whole `page`-token pages
        handed out in a shuffled order through a block table (paged; a window that has slid holds
        one page more, as vLLM's sliding-window manager frees only whole pages and the window does
        not start on a page boundary: the ring of `sliding_window` slots runs over the first
        pages). Returns (kv_bytes: the exact bytes of the cache tensors, kv_alloc_bytes: the
        caching allocator's delta for them)."""
        torch = _torch()
        cfg = self.cfg
        assert not (paged and cfg.mla), "the MLA latent kernel reads a contiguous cache"
        self.free_cache()
        self.batch, self.paged, self.page = batch, paged, page
        self.slots = cfg.kv_slots(context + 1)
        rows = batch * self.slots
        if paged:
            pages = -(-self.slots // page) + (1 if self.slots < context + 1 else 0)
            rows = batch * pages * page
            self.table = torch.randperm(rows // page, device=self.dev).view(batch, pages).to(torch.int32)
        shape = (rows, cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim) if cfg.mla else \
            (2, rows, cfg.kv_heads, cfg.head_dim)
        mem = torch.cuda.memory_allocated if str(self.dev).startswith("cuda") else (lambda: 0)
        m0 = mem()
        self.cache = [torch.empty(shape, device=self.dev, dtype=self.dt) for _ in range(self.L)]
        alloc = mem() - m0
        for t in self.cache:
            t.normal_()
        return sum(t.numel() * t.element_size() for t in self.cache), alloc

    def free_cache(self):
        self.cache = self.table = None
        self._meta = {}

    def _slot_rows(self, seq, pos):
        """Cache row of token `pos` (tensor) of sequence `seq` (tensor): ring slot pos % slots,
        through the block table when paged."""
        s = pos % self.slots
        if self.table is None:
            return seq * self.slots + s
        return self.table[seq, s // self.page].long() * self.page + s % self.page

    def _ensure_rope(self, max_pos):
        if self.cos_sin.shape[0] < max_pos:
            self.cos_sin = ops().rope_cache(max(max_pos, 2 * self.cos_sin.shape[0]), self.rot, self.dev, ROPE_BASE)

    def _decode_meta(self, context):
        """Positions and cache rows of one decode step at `context`, built once per context
        outside the captured graph (vLLM fills such static buffers before each replay)."""
        if ("decode", context) not in self._meta:
            torch = _torch()
            seq = torch.arange(self.batch, device=self.dev)
            pos = torch.full((self.batch,), context, device=self.dev, dtype=torch.int64)
            self._ensure_rope(context + 1)
            self._meta[("decode", context)] = (pos, self._slot_rows(seq, pos), min(context + 1, self.slots))
        return self._meta[("decode", context)]

    def _prefill_meta(self, B, P):
        """Positions 0..P-1 of each sequence; only the last `slots` tokens of a prompt are cached
        (a ring shorter than the prompt), the others get slot -1 (skipped)."""
        if ("prefill", B, P) not in self._meta:
            torch = _torch()
            pos = torch.arange(P, device=self.dev).repeat(B)
            seq = torch.arange(B, device=self.dev).repeat_interleave(P)
            rows = torch.where(pos >= P - self.slots, self._slot_rows(seq, pos), -1)
            self._ensure_rope(P)
            self._meta[("prefill", B, P)] = (pos, rows, P)
        return self._meta[("prefill", B, P)]

    # --- steps
    def decode_step(self, tokens, context):
        """Logits of one decode step at position `context` (the cache holds `context` earlier
        tokens of each sequence); tokens [B]."""
        return self._forward(self.embed[tokens], self._decode_meta(context), tokens.shape[0], 1)

    def prefill(self, tokens):
        """Logits of the last token of each prompt; tokens [B, P]."""
        B, P = tokens.shape
        return self._forward(self.embed[tokens].view(B * P, -1), self._prefill_meta(B, P), B, P)

    @staticmethod
    def sample(logits):
        """Greedy sampling as vLLM's sampler runs it: logits to fp32, softmax, pick (3 kernels)."""
        return logits.float().softmax(-1).argmax(-1)

    def _forward(self, x, meta, B, P):
        eo = ops()
        residual, h = x, eo.rms_norm(x, self.layers[0]["ln1"]) if self.L else x
        out = None
        for i, lw in enumerate(self.layers):
            if i:
                h = eo.fused_add_rms_norm(out, residual, lw["ln1"])
            o = self._mla(lw, h, self.cache[i], meta, B, P) if self.cfg.mla else self._attn(lw, h, self.cache[i], meta, B, P)
            h = eo.fused_add_rms_norm(self.allreduce(o @ lw["wo"].t()), residual, lw["ln2"])
            out = self.allreduce(self._mlp(i, lw, h))
        h = eo.fused_add_rms_norm(out, residual, self.ln_f) if self.L else eo.rms_norm(x, self.ln_f)
        if P > 1:
            h = h.view(B, P, -1)[:, -1]
        return self.allgather(h @ self.lm_head.t())

    def _attn(self, lw, h, cache, meta, B, P):
        torch = _torch()
        from validation.kernels import triton_decode as td

        eo = ops()
        cfg = self.cfg
        T, hd, Hq, Hkv = h.shape[0], cfg.head_dim, cfg.q_heads, cfg.kv_heads
        pos, rows, n_att = meta
        qkv = h @ lw["wqkv"].t()
        q = qkv[:, :Hq * hd].view(T, Hq, hd)
        k = qkv[:, Hq * hd:(Hq + Hkv) * hd]
        v = qkv[:, (Hq + Hkv) * hd:]
        eo.rotary_embedding(pos, q, k.view(T, Hkv, hd), self.cos_sin)
        eo.reshape_and_cache(k, v, cache[0], cache[1], rows)
        if P > 1:  # prefill: causal flash attention over the new tokens (the sliding window is not applied)
            o = torch.nn.functional.scaled_dot_product_attention(
                q.view(B, P, Hq, hd).transpose(1, 2), k.view(B, P, Hkv, hd).transpose(1, 2),
                v.view(B, P, Hkv, hd).transpose(1, 2), is_causal=True, enable_gqa=Hq != Hkv)
            return o.transpose(1, 2).reshape(T, Hq * hd)
        if self.paged:
            kc, vc = cache[0], cache[1]
        else:
            kc, vc = (c.view(B, self.slots, Hkv, hd).permute(0, 2, 1, 3)[:, :, :n_att] for c in cache)
        return td.decode_attention(q, kc, vc, cfg=DECODE_CFG, out_dtype=h.dtype, block_table=self.table,
                                   page=self.page, seq_len=n_att).view(T, Hq * hd)

    def _mla(self, lw, h, cache, meta, B, P):
        """DeepSeek-V2 MLA. Decode absorbed: W_UK folded into the query, attention (Triton) over the
        cached latent + shared RoPE key, W_UV applied to the latent output. Prefill un-absorbed
        (DeepSeek-V2 sec. 2.1): per-head keys and values from one kv_b GEMM, causal SDPA."""
        torch = _torch()
        from validation.kernels import triton_decode as td

        eo = ops()
        m, H, T = self.cfg.mla, self.cfg.q_heads, h.shape[0]
        R, dn, dr, dv = m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        pos, rows, n_att = meta
        q = (h @ lw["wq"].t()).view(T, H, dn + dr)
        ckv = h @ lw["wkv_a"].t()  # [T, R + dr]: latent | RoPE key
        eo.rms_norm(ckv[:, :R], lw["kv_norm"], out=ckv[:, :R])
        eo.rotary_embedding(pos, q[..., dn:], ckv[:, None, R:], self.cos_sin)
        eo.reshape_and_cache(ckv, None, cache, None, rows)
        wkv_b = lw["wkv_b"].view(H, dn + dv, R)
        scale = 1.0 / math.sqrt(dn + dr)
        if P > 1:
            kv = (ckv[:, :R] @ lw["wkv_b"].t()).view(T, H, dn + dv)
            k = torch.cat([kv[..., :dn], ckv[:, None, R:].expand(T, H, dr)], -1)
            o = torch.nn.functional.scaled_dot_product_attention(
                *(t.view(B, P, H, -1).transpose(1, 2) for t in (q, k, kv[..., dn:])), is_causal=True, scale=scale)
            return o.transpose(1, 2).reshape(T, H * dv)
        q_lat = torch.bmm(q[..., :dn].transpose(0, 1), wkv_b[:, :dn])  # [H, B, R]
        c = cache.view(B, self.slots, R + dr)[:, :n_att]
        o = td.mla_attention(q_lat.transpose(0, 1), q[..., dn:], c[..., :R], c[..., R:], scale)  # [B, H, R]
        return torch.bmm(o.transpose(0, 1), wkv_b[:, dn:].transpose(1, 2)).transpose(0, 1).reshape(T, H * dv)

    def _mlp(self, i, lw, h):
        torch = _torch()
        eo = ops()
        cfg = self.cfg
        if cfg.is_moe(i):
            return self._moe(lw, h)
        gu = h @ lw["w13"].t()
        a = eo.silu_and_mul(gu) if cfg.gated_mlp else torch.nn.functional.gelu(gu)  # falcon: exact GELU, one kernel
        return a @ lw["w2"].t()

    def _moe(self, lw, h):
        """Routed experts through torch._grouped_mm (one launch per expert GEMM over all groups),
        four routing kernels around them; the shared experts' sum folds into the un-permute."""
        torch = _torch()
        eo = ops()
        cfg = self.cfg
        wts, ids = eo.moe_topk_softmax(h @ lw["router"].t(), cfg.moe_top_k)
        xs, ends, inv = eo.moe_permute(h, ids, cfg.moe_experts)
        a = eo.silu_and_mul(torch._grouped_mm(xs, lw["w13"].transpose(1, 2), offs=ends))
        dn = torch._grouped_mm(a, lw["w2"].transpose(1, 2), offs=ends)
        shared = None
        if cfg.shared_intermediate:
            shared = eo.silu_and_mul(h @ lw["s13"].t()) @ lw["s2"].t()
        return eo.moe_unpermute(dn, inv, wts, shared)


def _torch():
    import torch  # noqa: PLC0415  (the config half of this module runs without torch)

    return torch


def ops():
    from validation.kernels import engine_ops  # noqa: PLC0415

    return engine_ops
