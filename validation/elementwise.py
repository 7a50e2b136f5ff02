"""Element-wise and MoE-routing kernel times: exactly the kernels the reference engine runs
(kernels/engine_ops.py), over token counts 1..16384 and the shapes of the catalogue's models,
each checked against a float64 reference first. Appends to elementwise.csv; run through
`gemm.py --part elementwise`.

Columns: op, tokens, hidden, time_s, bytes, impl, rel_error, params, kernels. `hidden` is the
per-token width the op is sized by (below), `bytes` what the kernel must read plus write, `kernels`
how many launches the timed call makes (1, except moe_align_permute: align + permute, whose
cursors the permute consumes; the permute alone is that row minus the moe_align row):

  op                  hidden               bytes (e = 2, bf16)
  rms_norm            H                    2 T H e + H e
  fused_add_rms_norm  H                    4 T H e + H e            (x, residual read and written)
  rotary_embedding    (Hq + Hk) x rot      2 T (Hq + Hk) rot e + T rot 4 + 8 T   (fp32 cos/sin, positions)
  reshape_and_cache   K + V width          2 T W e + 8 T            (slot mapping)
  silu_and_mul        I                    3 T I e
  moe_topk_softmax    E                    T E e + 8 T k            (weights fp32, ids int32)
  moe_align           E                    4 T k + 8 E
  moe_align_permute   k x H                2 T k H e + 12 T k + 8 E
  moe_unpermute       k x H                T k H e + T H e (+ T H e shared) + 8 T k
  fp8_group_quant     W                    T W e + T W + 4 T ceil(W / 128)   (fp8 out, fp32 scales)

fp8_group_quant rows (params src=act-quant, which kvsim calibrate does not fit) check kvsim's pricing of
the activation quantization vLLM's fused MoE runs before each block-FP8 expert GEMM, on the widths
it quantizes: the hidden size (gate/up input) and the expert intermediate size at TP 1, 4 and 8
(down input, T x top_k rows).
"""
from __future__ import annotations

import os

import torch

from validation.common import CsvOut, bench, guarded, log, params_str, rel_error
from validation.engine import MODELS
from validation.engine_model import get_config
from validation.kernels import engine_ops as eo

COLS = ["op", "tokens", "hidden", "time_s", "bytes", "impl", "rel_error", "params", "kernels"]
TOKENS = [1, 4, 16, 64, 256, 1024, 4096, 16384]
TOKENS_EXTRA = [1, 64, 1024, 16384]  # every shape of an op after its first: fewer points each
QUICK_TOKENS = [1, 64, 1024]
# Catalogue models beyond the engine's: hidden 5120/7168/8192, 256 experts top-8, 128-head MLA.
EXTRA_MODELS = ["llama-3-70b", "qwen3-32b", "deepseek-v3"]


def shapes(cfgs):
    """(op, hidden, params, setup) for every distinct (op, hidden) of the models, in model order;
    setup(T, device, dtype) -> (fn, relative error, bytes)."""
    seen = set()
    for c in cfgs:
        rot = c.mla.qk_rope_head_dim if c.mla else c.head_dim
        hk = 1 if c.mla else c.kv_heads
        width = c.mla.kv_lora_rank + c.mla.qk_rope_head_dim if c.mla else 2 * c.kv_heads * c.head_dim
        items = [("fused_add_rms_norm", c.hidden, {}, lambda *a, H=c.hidden: norm_case(*a, H, True)),
                 ("rms_norm", c.hidden, {}, lambda *a, H=c.hidden: norm_case(*a, H, False)),
                 ("rotary_embedding", (c.q_heads + hk) * rot, dict(q_heads=c.q_heads, k_heads=hk, rot=rot),
                  lambda *a, c=c, hk=hk, rot=rot: rope_case(*a, c.q_heads, hk, rot)),
                 ("reshape_and_cache", width, dict(v=not c.mla), lambda *a, w=width, c=c: cache_case(*a, w, not c.mla))]
        if c.mla:
            items.append(("rms_norm", c.mla.kv_lora_rank, dict(row=width),
                          lambda *a, c=c, w=width: norm_case(*a, c.mla.kv_lora_rank, False, row=w)))
        inters = [c.intermediate] if c.gated_mlp and (not c.moe_experts or c.dense_layers) else []
        if c.moe_experts:
            inters += [c.moe_intermediate] + ([c.shared_intermediate] if c.shared_intermediate else [])
            k, ne, H = c.moe_top_k, c.moe_experts, c.hidden
            mp = dict(experts=ne, top_k=k, hidden=H)
            items += [("moe_topk_softmax", ne, mp, lambda *a, ne=ne, k=k: topk_case(*a, ne, k)),
                      ("moe_align", ne, mp, lambda *a, ne=ne, k=k: align_case(*a, ne, k)),
                      ("moe_align_permute", k * H, mp, lambda *a, ne=ne, k=k, H=H: permute_case(*a, ne, k, H)),
                      ("moe_unpermute", k * H, dict(mp, shared=bool(c.shared_intermediate)),
                       lambda *a, ne=ne, k=k, H=H, s=bool(c.shared_intermediate): unpermute_case(*a, ne, k, H, s))]
        items += [("silu_and_mul", i, {}, lambda *a, i=i: silu_case(*a, i)) for i in inters]
        if c.moe_experts:
            widths = [c.hidden] + [c.moe_intermediate // tp for tp in (1, 4, 8) if c.moe_intermediate // tp >= 128]
            items += [("fp8_group_quant", w, {"src": "act-quant"}, lambda *a, w=w: quant_case(*a, w)) for w in widths]
        for op, hidden, params, setup in items:
            if (op, hidden) not in seen:
                seen.add((op, hidden))
                yield op, hidden, dict(params, model=c.name), setup


class Inputs:
    """Fresh random tensors of one dtype on one device (bf16 on the GPU; fp32 in CPU tests)."""

    def __init__(self, device, dtype):
        self.dev, self.dt = device, dtype
        self.e = torch.finfo(dtype).bits // 8

    def randn(self, *shape):
        return torch.randn(*shape, device=self.dev, dtype=self.dt)

    def routed(self, T, ne, k):
        return eo.moe_topk_softmax(self.randn(T, ne), k)


def ref_norm(x, w):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()


def norm_case(T, g, H, add, row=None):
    w = g.randn(H)
    if add:
        x, r = g.randn(T, H), g.randn(T, H)
        x0, r0 = x.clone(), r.clone()
        eo.fused_add_rms_norm(x0, r0, w)
        err = max(rel_error(r0, x.double() + r.double()), rel_error(x0, ref_norm(r0, w)))
        return (lambda: eo.fused_add_rms_norm(x, r, w)), err, 4 * T * H * g.e + H * g.e
    x = g.randn(T, row or H)[:, :H]  # MLA's latent: the first R columns of the kv_a row, normalized in place
    err = rel_error(eo.rms_norm(x, w), ref_norm(x, w))
    return (lambda: eo.rms_norm(x, w, out=x if row else None)), err, 2 * T * H * g.e + H * g.e


def rope_case(T, g, hq, hk, rot):
    qk = g.randn(T, (hq + hk) * rot)
    pos = torch.randint(0, 32768, (T,), device=g.dev)
    cs = eo.rope_cache(32768, rot, g.dev)
    q, k = qk[:, :hq * rot].view(T, hq, rot), qk[:, hq * rot:].view(T, hk, rot)
    x = qk.double().view(T, hq + hk, rot)
    eo.rotary_embedding(pos, q, k, cs)
    half = rot // 2
    cos, sin = cs[pos, :half].double()[:, None], cs[pos, half:].double()[:, None]
    ref = torch.cat([x[..., :half] * cos - x[..., half:] * sin, x[..., half:] * cos + x[..., :half] * sin], -1)
    err = rel_error(qk.view(T, hq + hk, rot), ref)
    return (lambda: eo.rotary_embedding(pos, q, k, cs)), err, 2 * T * (hq + hk) * rot * g.e + T * rot * 4 + 8 * T


def cache_case(T, g, width, has_v):
    w = width // 2 if has_v else width
    kv = g.randn(T, 2 * w)
    slots = torch.randperm(4 * T, device=g.dev)[:T]
    kc, vc = g.randn(4 * T, w), g.randn(4 * T, w)
    v = kv[:, w:] if has_v else None
    fn = lambda: eo.reshape_and_cache(kv[:, :w], v, kc, vc if has_v else None, slots)  # noqa: E731
    fn()
    err = max(rel_error(kc[slots], kv[:, :w]), rel_error(vc[slots], kv[:, w:]) if has_v else 0.0)
    return fn, err, 2 * T * width * g.e + 8 * T


def silu_case(T, g, inter):
    gu = g.randn(T, 2 * inter)
    ref = torch.nn.functional.silu(gu[:, :inter].double()) * gu[:, inter:].double()
    return (lambda: eo.silu_and_mul(gu)), rel_error(eo.silu_and_mul(gu), ref), 3 * T * inter * g.e


def quant_case(T, g, width):
    x = g.randn(T, width) * 4
    q, scales = eo.fp8_group_quant(x)
    groups = scales.shape[1]
    pad = groups * eo.QUANT_GROUP - width
    xg = torch.nn.functional.pad(x.double(), (0, pad)).view(T, groups, eo.QUANT_GROUP)
    ref_s = xg.abs().amax(-1).clamp_min(1e-10) / eo.FP8_MAX
    ref_q = (xg / ref_s[..., None]).clamp(-eo.FP8_MAX, eo.FP8_MAX).float().to(q.dtype).double().view(T, -1)
    err = max(rel_error(scales, ref_s), rel_error(q.double(), ref_q[:, :width]))  # a value off by a rounding tie
    return (lambda: eo.fp8_group_quant(x)), err, T * width * g.e + T * width + 4 * T * groups


def topk_case(T, g, ne, k):
    logits = g.randn(T, ne)
    w, _ = eo.moe_topk_softmax(logits, k)
    vals = torch.softmax(logits.double(), -1).topk(k, -1).values  # values: the same whichever of tied experts wins
    err = rel_error(w, vals / vals.sum(-1, keepdim=True))
    return (lambda: eo.moe_topk_softmax(logits, k)), err, T * ne * g.e + 8 * T * k


def align_case(T, g, ne, k):
    _, ids = g.routed(T, ne, k)
    ends, _ = eo.moe_align(ids, ne)
    want = torch.bincount(ids.flatten().long(), minlength=ne).cumsum(0)
    err = 0.0 if torch.equal(ends.long(), want) else float("inf")
    return (lambda: eo.moe_align(ids, ne)), err, 4 * T * k + 8 * ne


def permute_case(T, g, ne, k, H):
    (_, ids), x = g.routed(T, ne, k), g.randn(T, H)
    xs, _, inv = eo.moe_permute(x, ids, ne)
    err = 0.0 if torch.equal(xs[inv.long()], x.repeat_interleave(k, 0)) else float("inf")
    return (lambda: eo.moe_permute(x, ids, ne)), err, 2 * T * k * H * g.e + 12 * T * k + 8 * ne


def unpermute_case(T, g, ne, k, H, shared):
    w, ids = g.routed(T, ne, k)
    rows, _, inv = eo.moe_permute(g.randn(T, H), ids, ne)
    sh = g.randn(T, H) if shared else None
    n = min(T, 256)  # float64 reference on the first tokens (all of them: 7.5 GB at deepseek-v3's largest)
    ref = (rows.double()[inv[:n * k].long()].view(n, k, H) * w[:n].double()[..., None]).sum(1)
    err = rel_error(eo.moe_unpermute(rows, inv, w, sh)[:n], ref + (sh[:n].double() if shared else 0.0))
    nbytes = T * k * H * g.e + T * H * g.e * (2 if shared else 1) + 8 * T * k
    return (lambda: eo.moe_unpermute(rows, inv, w, sh)), err, nbytes


def point(op, T, hidden, params, setup, csv):
    fn, err, nbytes = setup(T, Inputs("cuda", torch.bfloat16))
    if not err < 2e-2:
        log(f"[WARN] {op} T{T} hidden {hidden} rel error {err:.2e}")
    t = bench(fn, rep_ms=6)[0]
    csv.row(op=op, tokens=T, hidden=hidden, time_s=t, bytes=nbytes, impl="triton", rel_error=err,
            params=params_str(**params), kernels=2 if op == "moe_align_permute" else 1)
    return t


def run(args, out, budget):
    csv = CsvOut(os.path.join(out, "elementwise.csv"), COLS)
    from validation.engine import QUICK_MODELS

    names = QUICK_MODELS if args.quick else MODELS + EXTRA_MODELS
    cfgs = [c for c in (guarded(f"config {n}", get_config, n, log) for n in names) if c is not None]
    swept = set()
    only = set(filter(None, getattr(args, "ops", "").split(",")))
    for op, hidden, params, setup in shapes(cfgs):
        if only and op not in only:
            continue
        tokens = QUICK_TOKENS if args.quick else TOKENS_EXTRA if op in swept else TOKENS
        swept.add(op)
        for T in tokens:
            if not budget.ok(1):
                log("elementwise: budget spent")
                return
            t = guarded(f"{op} T{T} hidden {hidden}", point, op, T, hidden, params, setup, csv)
            if t is not None and T in (1, 1024, 16384):
                log(f"{op} hidden {hidden} T{T}: {t*1e6:.1f} us")
        torch.cuda.empty_cache()
