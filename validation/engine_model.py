"""The reference decoder: random bf16 weights built from a model's dimensions (no checkpoints).

Dense MHA/GQA/MQA, sliding window (ring-buffer KV), MoE (top-k routing, grouped GEMM) on any subset
of layers, MLA (DeepSeek-V2: absorbed decode over the latent cache, un-absorbed prefill), torch
GEMMs, SDPA (flash) attention over a contiguous cache or the Triton kernel over a paged cache (a
block table of 16-token pages, as vLLM), fused Triton RMSNorm and SiLU-mul. A tensor-parallel rank
is the same decoder built from ``EngineConfig.shard`` with an all-reduce hook (tp_engine.py).

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
def _torch():
    import torch  # noqa: PLC0415

    return torch


class Decoder:
    """Random-weight decoder for one GPU (or one TP rank: pass ``allreduce``/``allgather``)."""

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
                lw["w_uk"] = w(cfg.q_heads, m.qk_nope_head_dim, m.kv_lora_rank)  # wkv_b split per head
                lw["w_uv"] = w(cfg.q_heads, m.v_head_dim, m.kv_lora_rank)
                lw["wo"] = w(H, cfg.q_heads * m.v_head_dim)
            else:
                lw["wqkv"] = w((cfg.q_heads + 2 * cfg.kv_heads) * cfg.head_dim, H)
                lw["wo"] = w(H, cfg.q_heads * cfg.head_dim)
            if cfg.is_moe(i):
                E, inter = cfg.moe_experts, cfg.moe_intermediate
                lw["router"] = w(E, H)
                lw["w13"] = w(E, H, 2 * inter)  # [E, K, N] for grouped mm
                lw["w2"] = w(E, inter, H)
                if cfg.shared_intermediate:
                    lw["s13"] = w(2 * cfg.shared_intermediate, H)
                    lw["s2"] = w(H, cfg.shared_intermediate)
            else:
                lw["w13"] = w((2 if cfg.gated_mlp else 1) * cfg.intermediate, H)
                lw["w2"] = w(H, cfg.intermediate)
            self.layers.append(lw)
        self.ln_f = torch.ones(H, **d)
        self.moe_impl = None
        self.paged = False

    # --- pieces
    def rms(self, x, w):
        from validation.gemm import rmsnorm_triton  # fused Triton RMSNorm (one kernel, as serving engines do)

        return rmsnorm_triton(x, w)

    def cos_sin(self, pos, dim):
        torch = _torch()
        inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=self.dev, dtype=torch.float32) / dim))
        ang = pos.float()[:, None] * inv[None, :]
        return ang.cos().to(self.dt), ang.sin().to(self.dt)

    @staticmethod
    def rope(x, cs):
        """x [..., T, d] (neox style); cs = cos_sin(pos)."""
        torch = _torch()
        cos, sin = cs
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)

    def mlp(self, i, lw, h):
        torch = _torch()
        cfg = self.cfg
        if cfg.is_moe(i):
            return self.moe(lw, h)
        gu = h @ lw["w13"].t()
        if cfg.gated_mlp:
            from validation.gemm import silu_mul_triton

            a = silu_mul_triton(gu)
        else:
            a = torch.nn.functional.gelu(gu, approximate="tanh")
        return a @ lw["w2"].t()

    def moe(self, lw, h):
        torch = _torch()
        F = torch.nn.functional
        cfg = self.cfg
        E, k = cfg.moe_experts, cfg.moe_top_k
        wts, ids = torch.softmax((h @ lw["router"].t()).float(), -1).topk(k, -1)
        wts = (wts / wts.sum(-1, keepdim=True)).to(h.dtype)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // k
        counts = torch.zeros(E, device=h.device, dtype=torch.int32).scatter_add_(
            0, flat.to(torch.int64), torch.ones_like(flat, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        xs = h[tok]
        if self.moe_impl in (None, "grouped_mm"):
            try:
                g, u = torch._grouped_mm(xs, lw["w13"], offs=offs).chunk(2, -1)
                dn = torch._grouped_mm((F.silu(g) * u).contiguous(), lw["w2"], offs=offs)
                self.moe_impl = "grouped_mm"
            except Exception as e:  # noqa: BLE001
                if self.moe_impl == "grouped_mm":
                    raise
                print(f"[info] _grouped_mm unavailable ({str(e)[:100]}); gathered-weight bmm fallback", flush=True)
                self.moe_impl = "gather_bmm"
        if self.moe_impl == "gather_bmm":
            eid = flat[order]
            g, u = torch.bmm(xs[:, None, :], lw["w13"][eid])[:, 0].chunk(2, -1)
            dn = torch.bmm((F.silu(g) * u)[:, None, :], lw["w2"][eid])[:, 0]
        out = torch.zeros_like(h)
        out.index_add_(0, tok, dn * wts.reshape(-1)[order][:, None])
        if cfg.shared_intermediate:
            g, u = (h @ lw["s13"].t()).chunk(2, -1)
            out = out + (F.silu(g) * u) @ lw["s2"].t()
        return out

    # --- KV cache
    def alloc_cache(self, batch, context, paged=False, page=16):
        """Caches for `batch` sequences of `context` tokens plus the one being decoded. Returns the
        bytes allocated (torch.cuda.memory_allocated delta). Paged: vLLM's flash layout
        [num_pages * page, kv_heads, head_dim] per layer, pages handed out in a shuffled order."""
        torch = _torch()
        cfg = self.cfg
        self.paged, self.page = paged, page
        self.slots = cfg.kv_slots(context + 1)
        mem = torch.cuda.memory_allocated if self.dev == "cuda" else (lambda: 0)
        m0 = mem()
        if cfg.mla:
            width = cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
            self.kc = [torch.empty(batch, self.slots, width, device=self.dev, dtype=self.dt) for _ in range(self.L)]
            self.vc = [None] * self.L
        elif paged:
            pages = -(-self.slots // page)
            self.kc = [torch.empty(batch * pages * page, cfg.kv_heads, cfg.head_dim, device=self.dev, dtype=self.dt)
                       for _ in range(self.L)]
            self.vc = [torch.empty_like(self.kc[0]) for _ in range(self.L)]
            self.table = torch.randperm(batch * pages, device=self.dev).view(batch, pages).to(torch.int32)
        else:
            self.kc = [torch.empty(batch, cfg.kv_heads, self.slots, cfg.head_dim, device=self.dev, dtype=self.dt)
                       for _ in range(self.L)]
            self.vc = [torch.empty_like(self.kc[0]) for _ in range(self.L)]
        kv_bytes = mem() - m0
        if paged and self.dev == "cuda":
            kv_bytes -= self.table.numel() * 4
        for t in self.kc + self.vc:
            if t is not None:
                t.normal_()
        return kv_bytes

    def free_cache(self):
        self.kc = self.vc = self.table = None

    # --- decode
    def decode_step(self, tokens, context):
        """One decode step at position `context` (the cache holds `context` earlier tokens)."""
        torch = _torch()
        cfg = self.cfg
        slot = context % self.slots
        n_att = min(context + 1, self.slots)
        pos = torch.full((1,), context, device=self.dev, dtype=torch.int64)
        x = self.embed[tokens]
        if self.paged:
            b = torch.arange(tokens.shape[0], device=self.dev)
            self.write_rows = self.table[b, slot // self.page].long() * self.page + slot % self.page
        for i, lw in enumerate(self.layers):
            h = self.rms(x, lw["ln1"])
            o = self.mla_decode(i, lw, h, pos, slot, n_att) if cfg.mla else self.attn_decode(i, lw, h, pos, slot, n_att)
            x = x + self.allreduce(o @ lw["wo"].t())
            x = x + self.allreduce(self.mlp(i, lw, self.rms(x, lw["ln2"])))
        return self.allgather(self.rms(x, self.ln_f) @ self.lm_head.t())

    def attn_decode(self, i, lw, h, pos, slot, n_att):
        torch = _torch()
        cfg = self.cfg
        B, hd, Hq, Hkv = h.shape[0], cfg.head_dim, cfg.q_heads, cfg.kv_heads
        q, k, v = (h @ lw["wqkv"].t()).split([Hq * hd, Hkv * hd, Hkv * hd], -1)
        cs = self.cos_sin(pos, hd)
        q = self.rope(q.view(B, Hq, 1, hd), cs)
        k = self.rope(k.view(B, Hkv, 1, hd), cs)
        if self.paged:
            from validation.kernels import triton_decode as td

            self.kc[i].index_copy_(0, self.write_rows, k.view(B, Hkv, hd))
            self.vc[i].index_copy_(0, self.write_rows, v.view(B, Hkv, hd))
            return td.decode_attention(q.view(B, Hq, hd), self.kc[i], self.vc[i], block_table=self.table,
                                       page=self.page, seq_len=n_att, out_dtype=q.dtype).reshape(B, Hq * hd)
        self.kc[i][:, :, slot: slot + 1].copy_(k)
        self.vc[i][:, :, slot: slot + 1].copy_(v.view(B, Hkv, 1, hd))
        o = torch.nn.functional.scaled_dot_product_attention(  # GQA decode: the group folded into q
            q.reshape(B, Hkv, Hq // Hkv, hd), self.kc[i][:, :, :n_att], self.vc[i][:, :, :n_att])
        return o.reshape(B, Hq * hd)

    def mla_decode(self, i, lw, h, pos, slot, n_att):
        """DeepSeek-V2 absorbed decode: W_UK folded into the query, W_UV applied to the latent output,
        attention (Triton) over the cached latent + shared RoPE key."""
        torch = _torch()
        from validation.kernels import triton_decode as td

        m, B, H = self.cfg.mla, h.shape[0], self.cfg.q_heads
        R = m.kv_lora_rank
        q = (h @ lw["wq"].t()).view(B, H, m.qk_nope_head_dim + m.qk_rope_head_dim)
        q_nope, q_rope = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], -1)
        cs = self.cos_sin(pos, m.qk_rope_head_dim)
        q_rope = self.rope(q_rope, cs).contiguous()
        q_lat = torch.einsum("bhn,hnr->bhr", q_nope, lw["w_uk"]).contiguous()
        ckv = h @ lw["wkv_a"].t()
        lat = self.rms(ckv[:, :R].contiguous(), lw["kv_norm"])
        self.kc[i][:, slot, :R].copy_(lat)
        self.kc[i][:, slot, R:].copy_(self.rope(ckv[:, R:], cs))
        c = self.kc[i][:, :n_att]
        o_lat = td.mla_attention(q_lat, q_rope, c[..., :R], c[..., R:],
                                 1.0 / math.sqrt(m.qk_nope_head_dim + m.qk_rope_head_dim))
        return torch.einsum("bhr,hvr->bhv", o_lat, lw["w_uv"]).reshape(B, H * m.v_head_dim)

    # --- prefill
    def prefill(self, tokens):
        torch = _torch()
        cfg = self.cfg
        B, P = tokens.shape
        x = self.embed[tokens].view(B * P, -1)
        pos = torch.arange(P, device=self.dev)
        for i, lw in enumerate(self.layers):
            h = self.rms(x, lw["ln1"])
            o = self.mla_prefill(i, lw, h, B, P, pos) if cfg.mla else self.attn_prefill(i, lw, h, B, P, pos)
            x = x + self.allreduce(o @ lw["wo"].t())
            x = x + self.allreduce(self.mlp(i, lw, self.rms(x, lw["ln2"])))
        return self.allgather(self.rms(x.view(B, P, -1)[:, -1], self.ln_f) @ self.lm_head.t())

    def attn_prefill(self, i, lw, h, B, P, pos):
        torch = _torch()
        cfg = self.cfg
        hd, Hq, Hkv = cfg.head_dim, cfg.q_heads, cfg.kv_heads
        q, k, v = (h @ lw["wqkv"].t()).split([Hq * hd, Hkv * hd, Hkv * hd], -1)
        cs = self.cos_sin(pos, hd)
        q = self.rope(q.view(B, P, Hq, hd).transpose(1, 2), cs)
        k = self.rope(k.view(B, P, Hkv, hd).transpose(1, 2), cs)
        v = v.view(B, P, Hkv, hd).transpose(1, 2)
        n = min(P, self.slots)
        self.kc[i][:, :, :n].copy_(k[:, :, P - n:])
        self.vc[i][:, :, :n].copy_(v[:, :, P - n:])
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return o.transpose(1, 2).reshape(B * P, Hq * hd)

    def mla_prefill(self, i, lw, h, B, P, pos):
        """Un-absorbed (DeepSeek-V2 sec. 2.1): per-head K/V from the latent, causal SDPA."""
        torch = _torch()
        m, H = self.cfg.mla, self.cfg.q_heads
        R, dn, dr = m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim
        q = (h @ lw["wq"].t()).view(B, P, H, dn + dr).transpose(1, 2)
        cs = self.cos_sin(pos, dr)
        ckv = h @ lw["wkv_a"].t()
        lat = self.rms(ckv[:, :R].contiguous(), lw["kv_norm"]).view(B, P, R)
        kr = self.rope(ckv[:, R:].reshape(B, 1, P, dr), cs)
        self.kc[i][:, :P, :R].copy_(lat)
        self.kc[i][:, :P, R:].copy_(kr[:, 0])
        k_nope = torch.einsum("bpr,hnr->bhpn", lat, lw["w_uk"])
        v = torch.einsum("bpr,hvr->bhpv", lat, lw["w_uv"])
        q = torch.cat([q[..., :dn], self.rope(q[..., dn:], cs)], -1)
        k = torch.cat([k_nope, kr.expand(-1, H, -1, -1)], -1)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return o.transpose(1, 2).reshape(B * P, H * m.v_head_dim)
