"""The reference decoder on CPU (float32, Triton under the interpreter): a paged cache gives the
contiguous cache's logits; decoding one token after a prefill of P tokens gives the logits of a
prefill of P + 1 tokens (dense GQA, MoE, and MLA: absorbed decode vs un-absorbed prefill)."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from validation.engine_model import Decoder, EngineConfig, MLAConfig  # noqa: E402

GQA = EngineConfig("tiny-gqa", 64, 100, 2, 4, 2, 16, 128)
MOE_MLA = EngineConfig("tiny-mla-moe", 64, 100, 2, 4, 4, 24, 128, moe_experts=4, moe_top_k=2, moe_intermediate=32,
                       shared_intermediate=32, dense_layers=(0,), mla=MLAConfig(32, 16, 16, 16))
MOE = EngineConfig("tiny-moe", 64, 100, 2, 4, 4, 16, 128, moe_experts=4, moe_top_k=2, moe_intermediate=32)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def model(cfg, seed):
    torch.manual_seed(seed)
    return Decoder(cfg, cfg.layers, device="cpu", dtype=torch.float32)


def test_paged_equals_contiguous():
    m = model(GQA, 1)
    B, S = 2, 40
    m.alloc_cache(B, S)
    kc, vc = [k.clone() for k in m.kc], [v.clone() for v in m.vc]
    tok = torch.tensor([3, 7])
    ref = m.decode_step(tok, S)
    m.alloc_cache(B, S, paged=True)
    for i in range(m.L):
        for b in range(B):
            rows = m.table[b].long()[torch.arange(S) // 16] * 16 + torch.arange(S) % 16
            m.kc[i][rows], m.vc[i][rows] = kc[i][b, :, :S].transpose(0, 1), vc[i][b, :, :S].transpose(0, 1)
    assert rel(m.decode_step(tok, S), ref) < 1e-5


@pytest.mark.parametrize("cfg", [GQA, MOE, MOE_MLA], ids=lambda c: c.name)
def test_decode_continues_prefill(cfg):
    m = model(cfg, 2)
    P = 10
    toks = torch.randint(0, cfg.vocab, (1, P + 1))
    m.alloc_cache(1, P + 1)
    full = m.prefill(toks)
    m.alloc_cache(1, P)
    m.prefill(toks[:, :P])
    assert rel(m.decode_step(toks[:, P], P), full) < 1e-5


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
        w1, w3, w2 = torch.randn(cfg.intermediate, H, dtype=torch.float64), torch.randn(cfg.intermediate, H, dtype=torch.float64), torch.randn(H, cfg.intermediate, dtype=torch.float64)

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
