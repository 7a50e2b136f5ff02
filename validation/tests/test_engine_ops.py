"""The engine's element-wise and MoE-routing Triton kernels (kernels/engine_ops.py) under the
interpreter against float64 torch references, on fresh random inputs, through the strided views
the engine passes (q/k/v slices of the fused QKV row, MLA's latent and RoPE key in one row)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from validation.kernels import engine_ops as eo  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))  # fresh inputs every run


def ref_norm(x, w, eps=1e-6):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("H", [48, 100, 256])
def test_rms_norms(H, gen):
    wide = torch.randn(5, H + 7, generator=gen)
    x = wide[:, 3:3 + H]  # a strided view, as MLA's latent inside the kv_a row
    w = torch.randn(H, generator=gen)
    assert rel(eo.rms_norm(x, w), ref_norm(x, w)) < 1e-6
    before = wide.clone()
    eo.rms_norm(x, w, out=x)  # in place leaves the rest of the row alone
    assert rel(x, ref_norm(before[:, 3:3 + H], w)) < 1e-6
    assert torch.equal(wide[:, :3], before[:, :3]) and torch.equal(wide[:, 3 + H:], before[:, 3 + H:])
    x, r = torch.randn(5, H, generator=gen), torch.randn(5, H, generator=gen)
    z = x.double() + r.double()
    out = eo.fused_add_rms_norm(x, r, w)
    assert out.data_ptr() == x.data_ptr()
    assert rel(r, z) < 1e-7 and rel(x, ref_norm(z, w)) < 1e-6


def ref_rope(x, pos, cs):
    half = x.shape[-1] // 2
    cos, sin = cs[pos, :half].double()[:, None], cs[pos, half:].double()[:, None]
    x1, x2 = x[..., :half].double(), x[..., half:].double()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


@pytest.mark.parametrize("hq,hk,d", [(4, 2, 16), (7, 1, 96), (3, 3, 32)])
def test_rotary_embedding_in_place_on_qkv_views(hq, hk, d, gen):
    T = 6
    qkv = torch.randn(T, (hq + 2 * hk) * d, generator=gen)
    pos = torch.randint(0, 50, (T,), generator=gen)
    cs = eo.rope_cache(64, d, "cpu")
    before = qkv.clone()
    q, k = qkv[:, :hq * d].view(T, hq, d), qkv[:, hq * d:(hq + hk) * d].view(T, hk, d)
    eo.rotary_embedding(pos, q, k, cs)
    assert rel(q, ref_rope(before[:, :hq * d].view(T, hq, d), pos, cs)) < 1e-6
    assert rel(k, ref_rope(before[:, hq * d:(hq + hk) * d].view(T, hk, d), pos, cs)) < 1e-6
    assert torch.equal(qkv[:, (hq + hk) * d:], before[:, (hq + hk) * d:])  # v untouched


def test_rotary_embedding_mla_rope_parts(gen):
    """q's RoPE part inside each head [nope | rope], k's RoPE key after the latent in one row."""
    T, H, dn, dr, R = 5, 4, 16, 8, 32
    q, ckv = torch.randn(T, H, dn + dr, generator=gen), torch.randn(T, R + dr, generator=gen)
    q0, c0 = q.clone(), ckv.clone()
    pos = torch.randint(0, 30, (T,), generator=gen)
    cs = eo.rope_cache(32, dr, "cpu")
    eo.rotary_embedding(pos, q[..., dn:], ckv[:, None, R:], cs)
    assert rel(q[..., dn:], ref_rope(q0[..., dn:], pos, cs)) < 1e-6 and torch.equal(q[..., :dn], q0[..., :dn])
    assert rel(ckv[:, R:], ref_rope(c0[:, None, R:], pos, cs)[:, 0]) < 1e-6 and torch.equal(ckv[:, :R], c0[:, :R])


def test_rope_cache_angles():
    cs = eo.rope_cache(5, 8, "cpu", base=10000.0)
    inv = 10000.0 ** (-np.arange(0, 8, 2) / 8)
    assert np.allclose(cs[3, :4].numpy(), np.cos(3 * inv), atol=1e-7)
    assert np.allclose(cs[3, 4:].numpy(), np.sin(3 * inv), atol=1e-7)


def test_reshape_and_cache_slots(gen):
    T, hk, d, slots = 7, 2, 16, 20
    qkv = torch.randn(T, (4 + 2 * hk) * d, generator=gen)
    k, v = qkv[:, 4 * d:(4 + hk) * d], qkv[:, (4 + hk) * d:]
    cache = torch.full((2, slots, hk, d), float("nan"))
    rows = torch.randperm(slots, generator=gen)[:T]
    rows[2] = -1  # skipped (a ring shorter than the prompt)
    eo.reshape_and_cache(k, v, cache[0], cache[1], rows)
    keep = rows >= 0
    assert torch.equal(cache[0][rows[keep]].reshape(-1, hk * d), k[keep])
    assert torch.equal(cache[1][rows[keep]].reshape(-1, hk * d), v[keep])
    assert torch.isnan(cache[0][[s for s in range(slots) if s not in rows.tolist()]]).all()
    mla = torch.full((slots, 40), float("nan"))
    row = torch.randn(T, 40, generator=gen)
    eo.reshape_and_cache(row, None, mla, None, rows)
    assert torch.equal(mla[rows[keep]], row[keep])


@pytest.mark.parametrize("inter", [32, 1100])
def test_silu_and_mul(inter, gen):
    gu = torch.randn(5, 2 * inter, generator=gen)
    g, u = gu[:, :inter].double(), gu[:, inter:].double()
    assert rel(eo.silu_and_mul(gu), torch.nn.functional.silu(g) * u) < 1e-6


@pytest.mark.parametrize("E,k,renorm", [(8, 2, True), (60, 4, False), (6, 6, True), (5, 1, True)])
def test_topk_softmax(E, k, renorm, gen):
    logits = torch.randn(70, E, generator=gen)  # 70 rows: more than one program, a partial last block
    w, ids = eo.moe_topk_softmax(logits, k, renormalize=renorm)
    vals, idx = torch.softmax(logits.double(), -1).topk(k, -1)
    if renorm:
        vals = vals / vals.sum(-1, keepdim=True)
    assert torch.equal(ids.long(), idx) and rel(w, vals) < 1e-6


def moe_ref(x, ids, w, w13, w2, shared):
    """float64: each token's chosen experts run one by one (silu-gated), weighted, summed."""
    out = shared.double().clone() if shared is not None else torch.zeros_like(x, dtype=torch.float64)
    inter = w13.shape[1] // 2
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gu = w13[e].double() @ x[t].double()
            out[t] += w[t, j].double() * (w2[e].double() @ (torch.nn.functional.silu(gu[:inter]) * gu[inter:]))
    return out


@pytest.mark.parametrize("shared", [False, True])
def test_moe_pipeline_matches_per_token_reference(shared, gen):
    """topk_softmax -> align + permute -> grouped GEMMs (as the engine runs them) -> un-permute."""
    T, H, E, k, inter = 9, 16, 6, 3, 8
    x = torch.randn(T, H, generator=gen)
    w13, w2 = torch.randn(E, 2 * inter, H, generator=gen), torch.randn(E, H, inter, generator=gen)
    w, ids = eo.moe_topk_softmax(torch.randn(T, E, generator=gen), k)
    xs, ends, inv = eo.moe_permute(x, ids, E)
    a = eo.silu_and_mul(torch._grouped_mm(xs, w13.transpose(1, 2), offs=ends))
    dn = torch._grouped_mm(a, w2.transpose(1, 2), offs=ends)
    sh = torch.randn(T, H, generator=gen) if shared else None
    assert rel(eo.moe_unpermute(dn, inv, w, sh), moe_ref(x, ids, w, w13, w2, sh)) < 1e-5


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 40), st.integers(1, 12), st.data())
def test_permute_groups_rows_by_expert(T, E, data):
    """Every (token, choice) row lands once, inside its expert's group; group ends are the
    prefix sums of the counts; inv points at the row's copy."""
    k = data.draw(st.integers(1, min(E, 4)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    ids = torch.from_numpy(np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int32))
    x = torch.from_numpy(rng.standard_normal((T, 8)).astype(np.float32))
    xs, ends, inv = eo.moe_permute(x, ids, E)
    assert torch.equal(ends.long(), torch.bincount(ids.flatten().long(), minlength=E).cumsum(0))
    assert sorted(inv.tolist()) == list(range(T * k))
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), ends.long()[:-1]])
    flat = ids.flatten().long()
    assert ((inv >= starts[flat]) & (inv < ends.long()[flat])).all()
    assert torch.equal(xs[inv.long()], x.repeat_interleave(k, 0))
