"""engine.py on CPU: the point plan (priority order, paged where the kernel serves it, --quick
reaching every path), the CSV rows decode_row/prefill_row produce (timer stubbed: no GPU), and
the kernels each decoder layer launches, counted per phase for dense, MoE and MLA layers."""
import collections

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from validation import engine  # noqa: E402
from validation.engine_model import FALLBACK, Decoder, EngineConfig, MLAConfig  # noqa: E402
from validation.kernels import engine_ops, triton_decode  # noqa: E402


def test_plan_order_and_coverage():
    llama, mla = FALLBACK["llama-3-8b"], FALLBACK["deepseek-v2-lite"]
    pts = list(engine.plan(llama, quick=False))
    assert pts[:5] == [("prefill", p) for p in engine.PROMPTS]
    decode = pts[5:]
    coarse = len(engine.BATCHES) * len(engine.CONTEXTS[0]) * 2
    assert {p[2] for p in decode[:coarse]} == set(engine.CONTEXTS[0])  # the coarse grid comes first
    assert sum(p[3] for p in decode) == len(decode) // 2  # every point on both caches
    assert not any(p[0] == "decode" and p[3] for p in engine.plan(mla, quick=False))  # MLA: contiguous only
    tp = list(engine.plan(llama, quick=False, grid="tp"))
    assert {p[1] for p in tp if p[0] == "decode"} == set(engine.TP_GRID["batches"])


def test_quick_reaches_every_path():
    cfgs = [FALLBACK[n] for n in engine.QUICK_MODELS]
    kinds = {"mla": any(c.mla for c in cfgs), "moe": any(c.moe_experts for c in cfgs),
             "gelu": any(not c.gated_mlp for c in cfgs), "head_dim_off_pow2": any(c.head_dim & (c.head_dim - 1)
                                                                                  for c in cfgs)}
    assert all(kinds.values()), kinds
    window = next(c for c in cfgs if c.sliding_window)
    pts = list(engine.plan(window, quick=True))
    assert any(p[0] == "prefill" and p[1] > window.sliding_window for p in pts)  # ring shorter than the prompt
    assert any(p[0] == "decode" and p[2] + 1 > window.sliding_window and p[3] for p in pts)  # paged ring
    assert any(p[0] == "decode" and (p[2] + 1) % 16 for p in pts)  # a partly filled page


def test_fits_leaves_headroom():
    c = FALLBACK["llama-3-8b"]
    need = c.kv_bytes(64, 8192 + 16, 32)
    assert engine.fits(c, 32, ("decode", 64, 8192, True), need + engine.HEADROOM_BYTES + 1)
    assert not engine.fits(c, 32, ("decode", 64, 8192, True), need + engine.HEADROOM_BYTES - 1)


def test_rows_carry_every_column(monkeypatch):
    monkeypatch.setattr(engine, "time_graph", lambda step, agree=None, min_iters=5: (step(), (3e-3, 2e-3, 4e-3))[1])
    cfg = EngineConfig("tiny", 64, 100, 2, 4, 2, 16, 128, sliding_window=20)
    m = Decoder(cfg, 2, device="cpu", dtype=torch.float32)
    row = engine.decode_row(m, "tiny", 2, 30, True)
    assert set(row) == set(engine.DEC_COLS)
    assert row["kv_bytes"] == 2 * 2 * (2 + 1) * 16 * 2 * (2 * 16) * 4  # layers x batch x (2 window pages + 1) x page
    # x K/V x (kv heads x head dim) x fp32
    assert row["graph"] == 1 and row["cache"] == "paged" and row["time_s"] == 3e-3
    row = engine.prefill_row(m, "tiny", 40)
    assert set(row) == set(engine.PRE_COLS) and row["notes"] and row["graph"] == 1


def counted(monkeypatch):
    calls = collections.Counter()
    for mod, names in ((engine_ops, ["rms_norm", "fused_add_rms_norm", "rotary_embedding", "reshape_and_cache",
                                     "silu_and_mul", "moe_topk_softmax", "moe_permute", "moe_unpermute"]),
                       (triton_decode, ["decode_attention", "mla_attention"])):
        for n in names:
            def wrap(*a, _f=getattr(mod, n), _n=n, **k):
                calls[_n] += 1
                return _f(*a, **k)
            monkeypatch.setattr(mod, n, wrap)
    return calls


@pytest.mark.parametrize("cfg,per_layer", [
    (EngineConfig("dense", 64, 100, 3, 4, 2, 16, 128), dict(rms_norm=0, fused_add_rms_norm=2, rotary_embedding=1,
                                                               reshape_and_cache=1, silu_and_mul=1)),
    (EngineConfig("moe", 64, 100, 3, 4, 4, 16, 128, moe_experts=4, moe_top_k=2, moe_intermediate=32,
                  shared_intermediate=32, dense_layers=()),
     dict(rms_norm=0, fused_add_rms_norm=2, rotary_embedding=1, reshape_and_cache=1, silu_and_mul=2,
          moe_topk_softmax=1, moe_permute=1, moe_unpermute=1)),
    (EngineConfig("mla", 64, 100, 3, 4, 4, 24, 128, mla=MLAConfig(32, 16, 16, 16)),
     dict(rms_norm=1, fused_add_rms_norm=2, rotary_embedding=1, reshape_and_cache=1, silu_and_mul=1))],
    ids=lambda x: x.name if isinstance(x, EngineConfig) else "")
def test_kernels_per_layer(monkeypatch, cfg, per_layer):
    """Each layer launches the same engine kernels in decode and prefill; only attention differs
    (decode: the split-K Triton kernel; prefill: SDPA). Layer 0's first norm is the plain
    rms_norm, the final norm a fused_add_rms_norm."""
    calls = counted(monkeypatch)
    m = Decoder(cfg, cfg.layers, device="cpu", dtype=torch.float32)
    m.alloc_cache(2, 20)
    m.prefill(torch.randint(0, cfg.vocab, (2, 20)))
    want = collections.Counter({k: v * cfg.layers for k, v in per_layer.items()})
    want.update(rms_norm=1)  # first layer's input norm (the residual starts as the embedding)
    assert calls == +want
    calls.clear()
    m.decode_step(torch.randint(0, cfg.vocab, (2,)), 20)
    want.update({"mla_attention" if cfg.mla else "decode_attention": cfg.layers})
    assert calls == +want
