"""Triton decode kernels under the interpreter (CPU) against float64 references on fresh random
inputs: dense GQA, gathered indices, per-token bias (KeepKV), paged block table, separate value
dim (LoRC latents), MLA absorbed, H2O score accumulation; and every quantized layout."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from validation.kernels import quant_decode as qd  # noqa: E402
from validation.kernels import triton_decode as td  # noqa: E402

CFG = dict(BLOCK_N=16, num_warps=4, num_stages=1)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def ref(q, k, v, scale, idx=None, bias_log2=None):
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    if idx is not None:
        k = torch.gather(k, 2, idx.long()[..., None].expand(-1, -1, -1, k.shape[-1]))
        v = torch.gather(v, 2, idx.long()[..., None].expand(-1, -1, -1, v.shape[-1]))
    s = torch.einsum("bhgd,bhsd->bhgs", q.double().view(B, Hkv, Hq // Hkv, D), k.double()) * scale
    if bias_log2 is not None:
        s = s + bias_log2.double()[:, :, None, :] / math.log2(math.e)
    return torch.einsum("bhgs,bhsd->bhgd", torch.softmax(s, -1), v.double()).reshape(B, Hq, -1)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))  # fresh inputs every run


def test_dense_gqa_and_splits(gen):
    q, k, v = (torch.randn(*s, generator=gen) for s in ((2, 8, 32), (2, 2, 100, 32), (2, 2, 100, 32)))
    for splits in (1, 3):
        o = td.decode_attention(q, k, v, cfg=CFG, splits=splits, out_dtype=torch.float32)
        assert rel(o, ref(q, k, v, 32 ** -0.5)) < 1e-5


def test_gather_bias_and_value_dim(gen):
    q, k, v = torch.randn(2, 4, 32, generator=gen), torch.randn(2, 1, 70, 32, generator=gen), torch.randn(2, 1, 70, 64, generator=gen)
    idx = torch.stack([torch.randperm(70, generator=gen)[:40].sort().values for _ in range(2)])[:, None].to(torch.int32)
    bias = torch.log2(torch.randint(1, 5, (2, 1, 70), generator=gen).float())
    o = td.decode_attention(q, k, v, cfg=CFG, idx=idx, out_dtype=torch.float32)
    assert rel(o, ref(q, k, v, 32 ** -0.5, idx=idx)) < 1e-5
    o = td.decode_attention(q, k, v, cfg=CFG, bias=bias, out_dtype=torch.float32)
    assert rel(o, ref(q, k, v, 32 ** -0.5, bias_log2=bias)) < 1e-5


def test_paged_equals_contiguous(gen):
    B, Hkv, S, D, page = 3, 2, 45, 16, 16
    q, k, v = torch.randn(B, 4, D, generator=gen), torch.randn(B, Hkv, S, D, generator=gen), torch.randn(B, Hkv, S, D, generator=gen)
    pages = -(-S // page)
    table = torch.randperm(B * pages, generator=gen).view(B, pages).to(torch.int32)
    kp, vp = torch.full((B * pages * page, Hkv, D), float("nan")), torch.full((B * pages * page, Hkv, D), float("nan"))
    for b in range(B):
        rows = table[b].long()[torch.arange(S) // page] * page + torch.arange(S) % page
        kp[rows], vp[rows] = k[b].transpose(0, 1), v[b].transpose(0, 1)
    o = td.decode_attention(q, kp, vp, block_table=table, page=page, seq_len=S, cfg=CFG, out_dtype=torch.float32)
    assert rel(o, ref(q, k, v, D ** -0.5)) < 1e-5  # NaN in unused slots would poison a wrong read


def test_mla_absorbed(gen):
    B, H, S = 2, 16, 50
    ql, qr = torch.randn(B, H, 64, generator=gen), torch.randn(B, H, 16, generator=gen)
    c, kr = torch.randn(B, S, 64, generator=gen), torch.randn(B, S, 16, generator=gen)
    o = td.mla_attention(ql, qr, c, kr, 0.1, cfg=dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1))
    s = (torch.einsum("bhr,bsr->bhs", ql.double(), c.double()) + torch.einsum("bhr,bsr->bhs", qr.double(), kr.double())) * 0.1
    assert rel(o, torch.einsum("bhs,bsr->bhr", torch.softmax(s, -1), c.double())) < 1e-5


def test_h2o_scores(gen):
    q, k, v = torch.randn(1, 4, 16, generator=gen), torch.randn(1, 2, 40, 16, generator=gen), torch.randn(1, 2, 40, 16, generator=gen)
    scores = torch.rand(1, 2, 40, generator=gen)
    s0 = scores.clone()
    td.h2o_step(q, k, v, scores, cfg=CFG)
    p = torch.softmax(torch.einsum("hgd,hsd->hgs", q[0].double().view(2, 2, 16), k[0].double()) / 4, -1)
    assert rel(scores[0], s0[0].double() + p.sum(1)) < 1e-5


LAYOUTS = [dict(kbits=2, vbits=2), dict(kbits=4, vbits=4), dict(kbits=4, vbits=2), dict(kbits=2, vbits=4),
           dict(kbits=8, vbits=8, key_mode="token", k_group=64, v_group=64, residual=0),
           dict(kbits=4, vbits=4, key_mode="token", k_group=64, v_group=64, residual=0),
           dict(kbits=2, vbits=2, key_mode="token", k_group=64, v_group=64, residual=0),
           dict(kbits=2, vbits=2, key_mode="token", k_group=64, v_group=64, residual=32, clip=0.95, perm=True)]


def _quant_case(kw, gen, S, B=2, Hq=8, Hkv=2, D=128):
    """Fresh random q, k, v (fp16), their QuantCache for the layout `kw` and its dequantized K, V."""
    kw = dict(kw)
    q = torch.randn(B, Hq, D, generator=gen).half()
    k, v = torch.randn(B, Hkv, S, D, generator=gen).half(), torch.randn(B, Hkv, S, D, generator=gen).half()
    if kw.pop("perm", False):
        kw["perm"] = torch.randperm(D, generator=gen)
    cache = qd.QuantCache(k, v, residual=kw.pop("residual", 64), **kw)
    kd, vd = cache.dequant()
    return q, k, cache, kd, vd


@pytest.mark.parametrize("kw", LAYOUTS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_quant_attention(kw, gen):
    """Fused dequant attention (pure-Triton unpack) == float64 attention over the dequantized cache;
    the cache dequantizes to the input within half a quantization step."""
    D, S = 128, 200
    q, k, cache, kd, vd = _quant_case(kw, gen, S)
    for bn in (32, 64):  # one and two 32-token slabs per iteration (3-D tiles)
        o = qd.quant_attention(q, cache, cfg=dict(BN=bn, num_warps=4, num_stages=1, waves=1), asm=False)
        assert rel(o, ref(q, kd, vd, D ** -0.5)) < 2e-3
    assert torch.isfinite(o.float()).all()
    assert cache.n_res == S - cache.seq_q and cache.seq_q % 32 == 0
    if cache.clip == 1.0:
        sq = cache.seq_q
        assert (kd[:, :, :sq] - k[:, :, :sq].float()).abs().max() <= 0.51 * cache.k_scale.float().max() + 1e-2
    assert torch.equal(kd[:, :, cache.seq_q:], k[:, :, cache.seq_q:].float())  # residual kept exactly


@pytest.mark.parametrize("kw", LAYOUTS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_quant_attention_register_dequant(kw, gen):
    """The register-dequant kernel (kern "rd": per-field dots, scales folded into q / scores / p) ==
    float64 attention over the dequantized cache, at every BN it accepts, several splits."""
    D = 128
    q, k, cache, kd, vd = _quant_case(kw, gen, 300)
    want = ref(q, kd, vd, D ** -0.5)
    bns = (32, 64) if cache.key_mode == "token" else (32,)
    for bn in bns:
        for waves in (1, 64):
            o = qd.quant_attention(q, cache, cfg=dict(kern="rd", BN=bn, num_warps=2, num_stages=1, waves=waves),
                                   asm=False)
            assert rel(o, want) < 2e-3, (bn, waves)


def test_quant_words_match_numpy_reference(gen):
    from validation import kivi_ref as kr

    codes = torch.randint(0, 16, (3, 128), generator=gen, dtype=torch.uint8)
    w = qd.pack16(codes, 4)
    assert np.array_equal(w.numpy().view(np.uint16), kr.pack16(codes.numpy(), 4))
    assert torch.equal(qd.unpack16(w, 4), codes)
