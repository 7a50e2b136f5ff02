"""gpt-oss-120b's decode step on one tensor-parallel rank as vLLM runs it on Hopper, layer after layer in one
CUDA graph, beside each of its kernels timed alone: does a step cost the sum of its kernels' times, as kvsim
prices it, and which kernels' prices hold?

A decoder layer here is vLLM's (vllm/model_executor/models/gpt_oss.py, TransformerBlock / OAIAttention /
MLPBlock; vLLM 0.18) with the kernels its Hopper path runs, all of them vLLM's own builds:
  fused_add_rms_norm (input_layernorm)       vLLM _C (vendor/vllm, the 0.24.0 wheel's _C_stable_libtorch)
  qkv: F.linear with bias                    cuBLAS (torch), 64/8 query/KV heads of 64 split over TP
  rotary_embedding (neox, rotary dim 64)     vLLM _C, in place on the q and k views of the qkv output
  reshape_and_cache_flash                    vLLM _C, into a paged cache of 16-token blocks
  FlashAttention 3 decode with sinks         vLLM's _vllm_fa3_C (s_aux: one bf16 sink per head; a 128-token
                                             window on every other layer: gpt-oss's sliding layers)
  o_proj: F.linear with bias                 cuBLAS
  (all-reduce: one GPU here; kvsim prices it apart, from vLLM's custom all-reduce tables)
  fused_add_rms_norm (post_attention_layernorm)
  router: F.linear with bias (128 experts)   cuBLAS
  routing and the two expert GEMMs           triton_kernels topk / ragged metadata / matmul_ogs, as
                                             validation/oai_moe.py runs them (vLLM 0.18.0's third_party copy)
Variant ``compiled`` replaces the two norms and the rotary embedding by their native PyTorch forms compiled by
torch.compile (Inductor, dynamic shapes), the norm, the qkv GEMM and the rotary embedding in one compiled
piece and o_proj, the norm and the router in another, as vLLM's default compilation does (custom ops off
under Inductor; attention and the MoE are opaque ops it cannot fuse across).

Each (TP, batch) point builds LAYERS layers with their own weights (weights cold, as in a real step), a
cache of CONTEXT tokens per sequence, and times: ``step`` (every layer in one graph), then each kernel alone
over the same layers (``op:<name>``), all with the graph replayed and timed by CUDA events (no L2 flush:
the layers' weights, 12 x 7-900 MB, do not fit it). Rows go to layer_step.csv (time per layer). The step's
output is checked finite (a non-finite step is not written) and the two variants against each other (same weights
and inputs; a relative difference past DIFF_TOL is logged as a warning).

  python3 validation/vllm_layer.py --out OUT --budget-s 300 [--quick] [--tps 8,4,2] [--batches 4,1,16,64,256]

Then ``.venv/bin/python scripts/layer_vs_kvsim.py validation/results/<gpu>/layer_step.csv --gpu <gpu>`` sets each
kernel against kvsim's term (tests/test_layer_vs_kvsim.py).
"""
from __future__ import annotations

import functools
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from validation import oai_moe  # noqa: E402
from validation.common import Budget, CsvOut, _graph_ms, guarded, load_vllm_library, log, part_args, rel_error  # noqa: E402
from validation.vllm_prefill import BLOCK, SPLITS_FOR_GRAPH  # noqa: E402

# gpt-oss-120b config.json: hidden 2880, 64 query / 8 KV heads of 64, 128 experts top 4, sliding window 128
# on every other layer (layer_types), rms_norm_eps 1e-5, rope_theta 150000
HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, EXPERTS, WINDOW, EPS, ROPE_THETA = 2880, 64, 8, 64, 128, 128, 1e-5, 150000.0
TPS = [8, 4, 2]
BATCHES = [4, 1, 16, 64, 256]
CONTEXT = 2048
LAYERS = 12
DIFF_TOL = 5e-2  # variants c and compiled: relative difference of the step outputs beyond which a warning is logged
COLUMNS = ["model", "tp", "batch", "context", "variant", "what", "layers", "time_s", "params"]


def shard(tp):
    """(query heads, KV heads, expert width) on one rank: heads split, KV heads at least one (replicated),
    the expert width as validation/oai_moe.py shards it."""
    return Q_HEADS // tp, max(1, KV_HEADS // tp), oai_moe.expert_width(tp)


def cos_sin_cache(max_pos):
    """A neox cos/sin cache [max_pos, head_dim] (cos half, sin half); gpt-oss's YaRN scaling changes the values,
    not the shapes or the kernels."""
    inv = 1.0 / (ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, device="cuda", dtype=torch.float32) / HEAD_DIM))
    f = torch.outer(torch.arange(max_pos, device="cuda", dtype=torch.float32), inv)
    return torch.cat([f.cos(), f.sin()], dim=-1)


def build_weights(tp, k, gen):
    """LAYERS layers' weights at one TP (bf16 linears with biases, MXFP4 experts swizzled as vLLM does)."""
    hq, hkv, inter = shard(tp)
    layers = []
    for i in range(LAYERS):
        def w(*shape, scale=None):
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen) * (scale or shape[-1] ** -0.5)
        q13, pc13, _ = oai_moe.quantized_experts(w(EXPERTS, 2 * inter, HIDDEN), k)
        q2, pc2, _ = oai_moe.quantized_experts(w(EXPERTS, HIDDEN, inter), k)
        layers.append(dict(
            wqkv=w((hq + 2 * hkv) * HEAD_DIM, HIDDEN), bqkv=w((hq + 2 * hkv) * HEAD_DIM, scale=0.1),
            wo=w(HIDDEN, hq * HEAD_DIM), bo=w(HIDDEN, scale=0.1), wr=w(EXPERTS, HIDDEN), br=w(EXPERTS, scale=0.1),
            ln1=1 + w(HIDDEN, scale=0.1), ln2=1 + w(HIDDEN, scale=0.1),
            sinks=w(hq, scale=1.0),  # bf16, as FA3 takes s_aux (hopper/flash_api.cpp) and gpt_oss.py stores them
            moe=(q13, pc13, torch.randn(EXPERTS, 2 * inter, device="cuda", generator=gen) * 0.1,
                 q2, pc2, torch.randn(EXPERTS, HIDDEN, device="cuda", generator=gen) * 0.1),
            sliding=i % 2 == 0, idx=i))
    return layers


def build_caches(tp, B, layers, gen):
    """Each layer's paged cache holding CONTEXT tokens per sequence (blocks scattered over the pool), and the
    step's shared inputs: block table, positions, slots of the new tokens."""
    hq, hkv, inter = shard(tp)
    nblk = CONTEXT // BLOCK + 1  # the context plus the block the new token lands in
    for layer in layers:
        kv = torch.randn(B * nblk, 2, BLOCK, hkv, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
        layer["key_cache"], layer["value_cache"] = kv.unbind(1)
    table = torch.randperm(B * nblk, device="cuda", generator=gen).to(torch.int32).view(B, nblk)
    pos = torch.full((B,), CONTEXT, device="cuda", dtype=torch.int64)
    slots = (table[:, CONTEXT // BLOCK].long() * BLOCK + CONTEXT % BLOCK).contiguous()
    return dict(hq=hq, hkv=hkv, inter=inter, table=table, pos=pos, slots=slots,
                cos_sin=cos_sin_cache(CONTEXT + 1).to(torch.bfloat16),
                seqused=torch.full((B,), CONTEXT + 1, device="cuda", dtype=torch.int32),
                cu_q=torch.arange(0, B + 1, device="cuda", dtype=torch.int32))


def native_norm(x, res, w):
    """vLLM's RMSNorm.forward_static with a residual (what Inductor compiles with custom ops off)."""
    xf = x.float() + res.float()
    res = xf.to(torch.bfloat16)
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + EPS)
    return xf.to(torch.bfloat16) * w, res


def native_rope(pos, q, k, cos_sin, hq, hkv):
    """vLLM's RotaryEmbedding.forward_static, neox style, rotary dim = head dim."""
    cos, sin = cos_sin.index_select(0, pos).chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)

    def rot(x, h):
        x = x.view(x.shape[0], h, HEAD_DIM).float()
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(torch.bfloat16)
    return rot(q, hq), rot(k, hkv)


@functools.cache
def pieces(hq, hkv):
    """The two compiled pieces of a layer between vLLM's opaque ops (attention, MoE), compiled once per shard
    (dynamic shapes: every batch size runs the same compiled code, as in vLLM)."""
    qd, kd = hq * HEAD_DIM, hkv * HEAD_DIM

    def pre(x, res, ln1, wqkv, bqkv, pos, cos_sin):
        h, res = native_norm(x, res, ln1)
        qkv = F.linear(h, wqkv, bqkv)
        q, k, v = qkv.split([qd, kd, kd], dim=-1)
        q, k = native_rope(pos, q, k, cos_sin, hq, hkv)
        return q, k, v.reshape(v.shape[0], hkv, HEAD_DIM).contiguous(), res

    def post(a, res, wo, bo, ln2, wr, br):
        o = F.linear(a, wo, bo)
        h, res = native_norm(o, res, ln2)
        return h, res, F.linear(h, wr, br)
    return torch.compile(pre, dynamic=True), torch.compile(post, dynamic=True)


class Step:
    """One decode step's layers as callables: the whole layer (variant c or compiled) and each kernel alone."""

    def __init__(self, C, fa, layers, s, B, k):
        self.C, self.fa, self.L, self.s, self.B, self.k = C, fa, layers, s, B, k
        hq, hkv = s["hq"], s["hkv"]
        self.x = torch.randn(B, HIDDEN, device="cuda", dtype=torch.bfloat16)
        self.res = torch.randn(B, HIDDEN, device="cuda", dtype=torch.bfloat16)
        self.h = torch.empty_like(self.x)
        self.attn = torch.empty(B, hq, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        self.mid = torch.empty(1, B * oai_moe.TOP_K, s["inter"], device="cuda", dtype=torch.bfloat16)
        # two MoE outputs, alternating layer by layer (one layer's output is the next one's input)
        self.outs = [torch.empty(1, B, HIDDEN, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        self.one = torch.ones((), device="cuda", dtype=torch.float32)
        self.meta = {sl: fa.get_scheduler_metadata(B, 1, CONTEXT + 1, hq, hkv, HEAD_DIM, HEAD_DIM, torch.bfloat16,
                                                   s["seqused"], s["cu_q"], None, None, None, None, BLOCK, 0, True,
                                                   WINDOW - 1 if sl else -1, -1, False, SPLITS_FOR_GRAPH, None, 0)
                     for sl in (True, False)}
        mo, sw = k[0], k[2]
        self.act = mo.FusedActivation(mo.FnSpecs("swiglu", sw.swiglu_fn, ("alpha", "limit"), reduction_n=2),
                                      (oai_moe.SWIGLU_ALPHA, oai_moe.SWIGLU_LIMIT))
        self.pre, self.post = pieces(hq, hkv)
        self.logits = torch.randn(B, EXPERTS, device="cuda", dtype=torch.bfloat16)
        self.route = oai_moe.routing(self.logits, EXPERTS, k)[:3]
        self.live_routing = True  # False: every layer reuses self.route (if the routing cannot be captured)

    # --- the kernels, each on layer l's weights
    def qkv(self, l, x):
        return F.linear(x, l["wqkv"], l["bqkv"])

    def split(self, qkv):
        qd, kd = self.s["hq"] * HEAD_DIM, self.s["hkv"] * HEAD_DIM
        q, k, v = qkv.split([qd, kd, kd], dim=-1)
        return q, k, v

    def rope(self, q, k):
        self.C.rotary_embedding(self.s["pos"], q, k, HEAD_DIM, self.s["cos_sin"], True)

    def cache(self, l, k, v):
        hkv = self.s["hkv"]
        torch.ops._C_cache_ops.reshape_and_cache_flash(k.view(-1, hkv, HEAD_DIM), v.view(-1, hkv, HEAD_DIM), l["key_cache"],
                                       l["value_cache"], self.s["slots"], "auto", self.one, self.one)

    def attention(self, l, q):
        s, B = self.s, self.B
        q = q.view(B, s["hq"], HEAD_DIM)
        one = self.one.expand(B, s["hkv"])
        self.fa.fwd(q, l["key_cache"], l["value_cache"], None, None, None, self.attn, s["cu_q"], None, None, None,
                    s["seqused"], 1, CONTEXT + 1, s["table"], None, None, None, None, None, one, one, one,
                    1.0 / math.sqrt(HEAD_DIM), True, WINDOW - 1 if l["sliding"] else -1, -1, 0.0, True,
                    self.meta[l["sliding"]], SPLITS_FOR_GRAPH, None, 0, l["sinks"], 1, 0, None)
        return self.attn.view(B, -1)

    def o_proj(self, l, a):
        return F.linear(a, l["wo"], l["bo"])

    def router(self, l, h):
        return F.linear(h, l["wr"], l["br"])

    def routing(self, logits):
        return oai_moe.routing(logits, EXPERTS, self.k)[:3]

    def gemm1(self, l, h, route):
        q13, pc13, b13 = l["moe"][:3]
        self.k[0].matmul_ogs(h, q13, b13, route[0], gather_indx=route[1], precision_config=pc13,
                             fused_activation=self.act, y=self.mid)

    def gemm2(self, l, route):
        q2, pc2, b2 = l["moe"][3:]
        out = self.outs[l["idx"] % 2]
        self.k[0].matmul_ogs(self.mid.view(self.B * oai_moe.TOP_K, -1), q2, b2, route[0], scatter_indx=route[2],
                             precision_config=pc2, gammas=route[0].gate_scal, y=out)
        return out.view(self.B, HIDDEN)

    # --- whole layers: (x, residual) in, (x, residual) out
    def layer_c(self, l, x, res):
        self.C.fused_add_rms_norm(x, res, l["ln1"], EPS)  # x := norm(x + res), res := x + res, in place
        q, k, v = self.split(self.qkv(l, x))
        self.rope(q, k)
        self.cache(l, k, v)
        o = self.o_proj(l, self.attention(l, q))
        self.C.fused_add_rms_norm(o, res, l["ln2"], EPS)
        route = self.routing(self.router(l, o)) if self.live_routing else self.route
        self.gemm1(l, o, route)
        return self.gemm2(l, route), res

    def layer_compiled(self, l, x, res):
        s = self.s
        q, k, v, res = self.pre(x, res, l["ln1"], l["wqkv"], l["bqkv"], s["pos"], s["cos_sin"])
        self.cache(l, k, v)
        h, res, logits = self.post(self.attention(l, q), res, l["wo"], l["bo"], l["ln2"], l["wr"], l["br"])
        route = self.routing(logits) if self.live_routing else self.route
        self.gemm1(l, h, route)
        return self.gemm2(l, route), res

    def step(self, variant):
        layer = self.layer_c if variant == "c" else self.layer_compiled

        def run(_=0):
            # the step's inputs copied in and its output out: three small copies a step, about 0.5 us a layer
            x, res = self.x.clone(), self.res.clone()
            for l in self.L:
                x, res = layer(l, x, res)
            self.h.copy_(x)
        return run

    def ops(self):
        """name -> callable over every layer, each kernel alone (inputs from one layer's real values)."""
        x, L = self.x, self.L
        qkv = self.qkv(L[0], x)
        q, k, v = self.split(qkv)
        a = self.attention(L[0], q).clone()
        route = self.route
        self.gemm1(L[0], x, route)
        return {
            "norm": lambda _=0: [self.C.fused_add_rms_norm(x, self.res, l["ln1"], EPS) for l in L],
            "qkv": lambda _=0: [self.qkv(l, x) for l in L],
            "rope": lambda _=0: [self.rope(q, k) for _ in L],
            "kv_write": lambda _=0: [self.cache(l, k, v) for l in L],
            "attention": lambda _=0: [self.attention(l, q) for l in L],
            "o_proj": lambda _=0: [self.o_proj(l, a) for l in L],
            "router": lambda _=0: [self.router(l, x) for l in L],
            "routing": lambda _=0: [self.routing(self.logits) for _ in L],
            "gemm1": lambda _=0: [self.gemm1(l, x, route) for l in L],
            "gemm2": lambda _=0: [self.gemm2(l, route) for l in L],
        }


def timed(fn):
    """Seconds per layer: fn (all LAYERS layers) captured once into a CUDA graph, median of 7 replays."""
    t = _graph_ms(fn, 1)
    return t[len(t) // 2] / 1e3 / LAYERS


def point(C, fa, k, tp, B, layers, csv, gen, variants):
    st = Step(C, fa, layers, build_caches(tp, B, layers, gen), B, k)
    outs = {}
    params = f"kernels=vllm 0.24.0 _C + _vllm_fa3_C, triton_kernels (vLLM 0.18.0), cuBLAS (torch {torch.__version__})"
    for variant in variants:
        def one(variant=variant):
            fn = st.step(variant)
            fn()
            torch.cuda.synchronize()
            if not torch.isfinite(st.h).all():
                raise RuntimeError(f"{variant}: non-finite output")
            t = timed(fn)
            label = variant + ("" if st.live_routing else "+routing-outside")
            csv.row(model="gpt-oss-120b", tp=tp, batch=B, context=CONTEXT, variant=label, what="step", layers=LAYERS,
                    time_s=t, params=params)
            log(f"vllm_layer tp{tp} B{B} {label}: {t*1e6:.1f} us a layer")
            return t
        if guarded(f"vllm_layer tp{tp} B{B} {variant}", one) is None and st.live_routing:
            st.live_routing = False  # the routing would not capture: time the rest, routing timed apart below
            guarded(f"vllm_layer tp{tp} B{B} {variant} (routing outside)", one)
    if len(variants) == 2:
        # The output check routes every layer of both variants by one fixed choice (self.route): live top-4
        # routing over near-tied logits flips on bf16 rounding, which made run h100-call33's outputs differ
        # by 0.23-0.56 while every kernel agreed. The same weights and inputs through twelve layers: the
        # native and _C norms and rotary embeddings round differently in bf16, so the outputs agree to
        # rounding, not bit for bit.
        live, st.live_routing = st.live_routing, False
        for variant in variants:
            def fixed(variant=variant):
                st.step(variant)()
                torch.cuda.synchronize()
                outs[variant] = st.h.float().clone()
            guarded(f"vllm_layer tp{tp} B{B} {variant} (fixed routing)", fixed)
        st.live_routing = live
    if len(outs) == 2:
        diff = rel_error(outs["compiled"], outs["c"])
        log(f"{'[WARN] ' if not diff < DIFF_TOL else ''}vllm_layer tp{tp} B{B}: compiled vs _C output rel diff "
            f"{diff:.2e} (bound {DIFF_TOL:.0e})")
    total = 0.0
    for name, fn in (guarded(f"vllm_layer tp{tp} B{B} ops", st.ops) or {}).items():
        t = guarded(f"vllm_layer tp{tp} B{B} {name}", timed, fn)
        if t is None:
            continue
        total += 2 * t if name == "norm" else t  # two norms a layer
        csv.row(model="gpt-oss-120b", tp=tp, batch=B, context=CONTEXT, variant="c", what=f"op:{name}", layers=LAYERS,
                time_s=t, params=params)
        log(f"vllm_layer tp{tp} B{B} op {name}: {t*1e6:.1f} us")
    log(f"vllm_layer tp{tp} B{B}: sum of the kernels alone {total*1e6:.1f} us a layer")
    for layer in layers:
        del layer["key_cache"], layer["value_cache"]
    del st
    torch.cuda.empty_cache()


def main():
    ap = part_args(300)
    ap.add_argument("--variants", default="c,compiled")
    ap.add_argument("--tps", default=",".join(map(str, TPS)), help="TP shards to run, in order")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="sequences per step, in order")
    args = ap.parse_args()
    budget = Budget(args.budget_s)
    if torch.cuda.get_device_capability()[0] != 9:
        raise SystemExit(f"vllm_layer: FA3 and the Hopper matmul_ogs layouts need compute capability 9.x, not "
                         f"{torch.cuda.get_device_name()}")
    k = oai_moe._kernels()
    C = load_vllm_library("_C_stable_libtorch.abi3.so.xz", "_C",
                          ("fused_add_rms_norm", "rotary_embedding"), "vllm_layer")
    fa = load_vllm_library("_vllm_fa3_C.abi3.so.xz", "_vllm_fa3_C", ("fwd",), "vllm_layer")
    csv = CsvOut(os.path.join(args.out, "layer_step.csv"), COLUMNS)
    gen = torch.Generator(device="cuda").manual_seed(0)
    variants = args.variants.split(",")
    tps, batches = [int(x) for x in args.tps.split(",")], [int(x) for x in args.batches.split(",")]
    for tp in (tps[:1] if args.quick else tps):
        if not budget.ok(40):
            log("vllm_layer: budget spent")
            return
        layers = build_weights(tp, k, gen)
        for B in (batches[:1] if args.quick else batches):
            if not budget.ok(15):
                log("vllm_layer: budget spent")
                return
            guarded(f"vllm_layer tp{tp} B{B}", point, C, fa, k, tp, B, layers, csv, gen, variants)
        del layers
        torch.cuda.empty_cache()
    log(f"vllm_layer: done, {budget.left():.0f} s of the budget left")


if __name__ == "__main__":
    main()
