"""The reference decoder on CPU (float32, Triton under the interpreter): its logits equal a float64
torch decoder written out from the same weights (causal, sliding-window ring, GQA/MQA, gated and
GELU MLPs, head dims off powers of two); a paged cache gives the contiguous cache's logits;
decoding one token after a prefill of P tokens gives the logits of a prefill of P + 1 tokens
(dense, MoE, MLA: absorbed decode vs un-absorbed prefill); the cache's exact bytes equal kvsim's
prediction for every engine model."""
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from validation.engine_model import ROPE_BASE, Decoder, EngineConfig, MLAConfig  # noqa: E402

GQA = EngineConfig("tiny-gqa", 64, 100, 2, 4, 2, 16, 128)
MQA_GELU = EngineConfig("tiny-mqa-gelu", 60, 100, 2, 5, 1, 24, 96, gated_mlp=False)  # falcon-like, odd sizes
WINDOW = EngineConfig("tiny-window", 64, 100, 2, 4, 4, 24, 128, sliding_window=6)
MOE_MLA = EngineConfig("tiny-mla-moe", 64, 100, 2, 4, 4, 24, 128, moe_experts=4, moe_top_k=2, moe_intermediate=32,
                       shared_intermediate=32, dense_layers=(0,), mla=MLAConfig(32, 16, 16, 16))
MOE = EngineConfig("tiny-moe", 64, 100, 2, 4, 4, 16, 128, moe_experts=4, moe_top_k=2, moe_intermediate=32)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def model(cfg, seed):
    torch.manual_seed(seed)
    return Decoder(cfg, cfg.layers, device="cpu", dtype=torch.float32)


def reference_logits(m, toks, window=None):
    """float64 logits of the last token of `toks` [T], from the decoder's weights: RMSNorm, neox
    RoPE, causal attention over the last `window` positions, gated-SiLU or GELU MLP."""
    cfg = m.cfg
    T, hd, Hq, Hkv = len(toks), cfg.head_dim, cfg.q_heads, cfg.kv_heads
    pos = torch.arange(T, dtype=torch.float64)

    def f(t):
        return t.double()

    def norm(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * f(w)

    def rope(v):
        ang = pos[:, None] * ROPE_BASE ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]
        v1, v2 = v[..., :hd // 2], v[..., hd // 2:]
        return torch.cat([v1 * cos - v2 * sin, v2 * cos + v1 * sin], -1)

    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & ((j > i - window) if window else True)
    x = f(m.embed[toks])
    for lw in m.layers:
        q, k, v = (norm(x, lw["ln1"]) @ f(lw["wqkv"]).t()).split([Hq * hd, Hkv * hd, Hkv * hd], -1)
        q, k = rope(q.view(T, Hq, hd)), rope(k.view(T, Hkv, hd)).repeat_interleave(Hq // Hkv, 1)
        s = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
        o = torch.einsum("hts,shd->thd", p, v.view(T, Hkv, hd).repeat_interleave(Hq // Hkv, 1)).reshape(T, -1)
        x = x + o @ f(lw["wo"]).t()
        gu = norm(x, lw["ln2"]) @ f(lw["w13"]).t()
        if cfg.gated_mlp:
            g, u = gu.chunk(2, -1)
            a = torch.nn.functional.silu(g) * u
        else:
            a = torch.nn.functional.gelu(gu)
        x = x + a @ f(lw["w2"]).t()
    return norm(x, m.ln_f)[-1] @ f(m.lm_head).t()


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("cfg", [GQA, MQA_GELU, WINDOW], ids=lambda c: c.name)
def test_prefill_then_decode_equals_float64_reference(cfg, paged):
    """Prefill P <= window tokens, then decode one token at a time well past the window (the
    ring overwrites the oldest slots): each step's logits equal the float64 decoder's."""
    m = model(cfg, 4)
    P, N = 4, 11
    toks = torch.randint(0, cfg.vocab, (N + 1,), generator=torch.Generator().manual_seed(5))
    m.alloc_cache(1, N, paged=paged)
    assert rel(m.prefill(toks[None, :P])[0], reference_logits(m, toks[:P], cfg.sliding_window)) < 1e-5
    for p in range(P, N + 1):
        out = m.decode_step(toks[p:p + 1], p)[0]
        if p in (P, N):
            assert rel(out, reference_logits(m, toks[:p + 1], cfg.sliding_window)) < 1e-5


def test_paged_equals_contiguous():
    """The same cache contents laid out through a shuffled block table give the same logits."""
    m = model(GQA, 1)
    B, S = 2, 40
    m.alloc_cache(B, S)
    contiguous = [c.view(2, B, m.slots, GQA.kv_heads, GQA.head_dim).clone() for c in m.cache]
    tok = torch.tensor([3, 7])
    ref = m.decode_step(tok, S)
    m.alloc_cache(B, S, paged=True)
    t = torch.arange(S)
    for i in range(m.L):
        for b in range(B):
            m.cache[i][:, m.table[b].long()[t // 16] * 16 + t % 16] = contiguous[i][:, b, :S]
    assert rel(m.decode_step(tok, S), ref) < 1e-5


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("cfg", [GQA, MOE, MOE_MLA], ids=lambda c: c.name)
def test_decode_continues_prefill(cfg, paged):
    if paged and cfg.mla:
        pytest.skip("MLA decodes from a contiguous latent cache")
    m = model(cfg, 2)
    P = 10
    toks = torch.randint(0, cfg.vocab, (2, P + 1), generator=torch.Generator().manual_seed(3))
    m.alloc_cache(2, P + 1, paged=paged)
    full = m.prefill(toks)
    m.alloc_cache(2, P, paged=paged)
    m.prefill(toks[:, :P])
    assert rel(m.decode_step(toks[:, P], P), full) < 1e-5


def test_kv_bytes_equal_kvsim_prediction():
    """alloc_cache's exact bytes (numel x element size, every layer's tensor) equal kvsim's
    `batch x gpu_bytes(context + 1)`, whole 16-token pages when paged, per rank under TP; models
    built on the meta device (no memory)."""
    pytest.importorskip("pydantic")
    from kvsim.kv import layout_for
    from kvsim.validate import engine_model
    from validation.engine import MODELS, pageable
    from validation.engine_model import get_config

    for name in MODELS:
        cfg = get_config(name, log=lambda *a: None)
        layout = layout_for(engine_model(name, 3))
        for tp in (1, 2):
            if cfg.q_heads % tp:
                continue
            m = Decoder(cfg.shard(tp), 3, device="meta")
            for B, S in ((3, 1000), (2, 5000)):
                for paged in (False, True) if pageable(cfg) else (False,):
                    kv_bytes, _ = m.alloc_cache(B, S, paged=paged)
                    expect = B * layout.gpu_bytes(S + 1, tp, block_size=16 if paged else 1)[0]
                    assert kv_bytes == expect, (name, tp, B, S, paged)


def test_tp_ranks_sum_to_unsharded_layer():
    """Megatron split simulated in one process: each rank's column-parallel QKV/gate-up slice and
    row-parallel O/down slice give partial outputs that sum (the all-reduce) to the unsharded
    attention block and MLP; KV heads replicated when fewer than ranks (MQA, tp 4)."""
    torch.manual_seed(3)
    for cfg, tp in ((EngineConfig("gqa", 64, 100, 1, 8, 4, 8, 96), 2), (EngineConfig("mqa", 64, 100, 1, 8, 1, 8, 96), 4)):
        H, hd, Hq, Hkv, T = cfg.hidden, cfg.head_dim, cfg.q_heads, cfg.kv_heads, 5
        x = torch.randn(T, H, dtype=torch.float64)
        wq, wk, wv = (torch.randn(n * hd, H, dtype=torch.float64) for n in (Hq, Hkv, Hkv))
        wo = torch.randn(H, Hq * hd, dtype=torch.float64)
        w1, w3, w2 = (torch.randn(*s, dtype=torch.float64) for s in ((cfg.intermediate, H), (cfg.intermediate, H),
                                                                      (H, cfg.intermediate)))

        def attn(q_heads, kv_heads, rows_o):
            q = (x @ wq[q_heads[0] * hd: q_heads[1] * hd].t()).view(T, -1, hd)
            k = (x @ wk[kv_heads[0] * hd: kv_heads[1] * hd].t()).view(T, -1, hd)
            v = (x @ wv[kv_heads[0] * hd: kv_heads[1] * hd].t()).view(T, -1, hd)
            group = Hq // Hkv
            kv_of = [(h // group) - kv_heads[0] for h in range(q_heads[0], q_heads[1])]
            p = torch.softmax(torch.einsum("thd,shd->hts", q, k[:, kv_of]), -1)
            o = torch.einsum("hts,shd->thd", p, v[:, kv_of]).reshape(T, -1)
            return o @ wo[:, rows_o[0] * hd: rows_o[1] * hd].t()

        def mlp(sl):
            a, b = sl
            return (torch.nn.functional.silu(x @ w1[a:b].t()) * (x @ w3[a:b].t())) @ w2[:, a:b].t()

        full_attn = attn((0, Hq), (0, Hkv), (0, Hq))
        full_mlp = mlp((0, cfg.intermediate))
        parts = [cfg.rank_slices(tp, r) for r in range(tp)]
        assert rel(sum(attn(s["q_heads"], s["kv_heads"], s["q_heads"]) for s in parts), full_attn) < 1e-12
        assert rel(sum(mlp(s["intermediate"]) for s in parts), full_mlp) < 1e-12
