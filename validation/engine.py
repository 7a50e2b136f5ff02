"""Reference decoder with random bf16 weights built from model dimensions (no checkpoints).
Dense MHA/GQA/MQA, sliding window (ring-buffer KV), MoE (top-k routing, grouped GEMM), torch GEMMs,
torch SDPA attention, contiguous KV cache, whole decode step captured in a CUDA graph.
Writes engine_decode.csv and engine_prefill.csv."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


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
    source: str = ""

    def weight_params(self, layers=None) -> int:
        L = self.layers if layers is None else layers
        attn = self.hidden * (self.q_heads + 2 * self.kv_heads) * self.head_dim + self.q_heads * self.head_dim * self.hidden
        if self.moe_experts:
            mlp = self.moe_experts * 3 * self.hidden * self.moe_intermediate + self.hidden * self.moe_experts
            mlp += 3 * self.hidden * self.shared_intermediate
        else:
            mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        emb = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return L * (attn + mlp + 2 * self.hidden) + emb

    def kv_bytes(self, batch, context, layers=None) -> int:
        L = self.layers if layers is None else layers
        ctx = min(context, self.sliding_window) if self.sliding_window else context
        return L * 2 * batch * ctx * self.kv_heads * self.head_dim * 2


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
    # microsoft/Phi-3-mini-4k-instruct: 3072, 32 layers, 32/32 heads (head_dim 96), 8192, vocab 32064
    "phi-3-mini": EngineConfig("phi-3-mini", 3072, 32064, 32, 32, 32, 96, 8192, source="microsoft/Phi-3-mini-4k-instruct"),
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
}


def from_kvsim_spec(spec) -> EngineConfig:
    """Adapter from kvsim.spec.model.ModelSpec (pure-Python team loader) to EngineConfig."""
    a = spec.attention
    kinds = {layer.attention for layer in spec.layers}
    windows = [layer.window_tokens for layer in spec.layers if layer.attention == "sliding" and layer.window_tokens]
    if "mla" in kinds or (kinds - {"full", "sliding"}):
        raise NotImplementedError(f"engine does not model attention kinds {kinds}")
    if windows and "full" in kinds:
        raise NotImplementedError("mixed sliding/full layers not modelled")
    moe = spec.moe
    return EngineConfig(
        name=spec.name, hidden=spec.hidden_size, vocab=spec.vocab_size, layers=len(spec.layers),
        q_heads=a.num_heads, kv_heads=a.num_kv_heads, head_dim=a.head_dim, intermediate=spec.intermediate_size or 0,
        sliding_window=max(windows) if windows else None, tie_embeddings=bool(spec.tie_word_embeddings),
        moe_experts=moe.num_experts if moe else 0, moe_top_k=moe.top_k if moe else 0,
        moe_intermediate=moe.expert_intermediate_size if moe else 0,
        shared_intermediate=(moe.shared_intermediate_size or 0) * (moe.num_shared_experts or 0) if moe else 0,
        source="kvsim.spec")


def get_config(name: str) -> EngineConfig:
    try:
        from kvsim.spec.model import load_model  # noqa: PLC0415

        cfg = from_kvsim_spec(load_model(name))
        fb = FALLBACK.get(name)
        if fb and (cfg.hidden, cfg.q_heads, cfg.kv_heads, cfg.head_dim) != (fb.hidden, fb.q_heads, fb.kv_heads, fb.head_dim):
            print(f"[WARN] kvsim spec {name} differs from fallback: {cfg} vs {fb}", flush=True)
        return cfg
    except Exception as e:  # noqa: BLE001
        if name not in FALLBACK:
            raise
        print(f"[info] {name}: using fallback table ({type(e).__name__}: {str(e)[:120]})", flush=True)
        return FALLBACK[name]


# ----------------------------------------------------------------------------- torch model
def _torch():
    import torch  # noqa: PLC0415

    return torch


class Decoder:
    def __init__(self, cfg: EngineConfig, layers: int):
        torch = _torch()
        self.cfg, self.L = cfg, layers
        d = dict(device="cuda", dtype=torch.bfloat16)
        H, hd = cfg.hidden, cfg.head_dim
        qkv_out = (cfg.q_heads + 2 * cfg.kv_heads) * hd
        std = 0.02

        def w(*shape):
            return torch.empty(*shape, **d).normal_(0, std)

        self.embed = w(cfg.vocab, H)
        self.lm_head = self.embed if cfg.tie_embeddings else w(cfg.vocab, H)
        self.layers = []
        for _ in range(layers):
            lw = dict(ln1=torch.ones(H, **d), ln2=torch.ones(H, **d), wqkv=w(qkv_out, H), wo=w(H, cfg.q_heads * hd))
            if cfg.moe_experts:
                E, I = cfg.moe_experts, cfg.moe_intermediate
                lw["router"] = w(E, H)
                lw["w13"] = w(E, H, 2 * I)  # [E, K, N] for grouped mm
                lw["w2"] = w(E, I, H)
                if cfg.shared_intermediate:
                    lw["s13"] = w(2 * cfg.shared_intermediate, H)
                    lw["s2"] = w(H, cfg.shared_intermediate)
            else:
                lw["w13"] = w((2 if cfg.gated_mlp else 1) * cfg.intermediate, H)
                lw["w2"] = w(H, cfg.intermediate)
            self.layers.append(lw)
        self.ln_f = torch.ones(H, **d)
        self.moe_impl = None

    # --- pieces
    def rms(self, x, w):
        from validation.gemm import rmsnorm_triton  # fused Triton RMSNorm (one kernel, as serving engines do)

        return rmsnorm_triton(x, w)

    def cos_sin(self, pos):
        torch = _torch()
        hd = self.cfg.head_dim
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device="cuda", dtype=torch.float32) / hd))
        ang = pos.float()[:, None] * inv[None, :]
        return ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)

    def rope(self, x, cs):
        """x [..., T, hd] (neox style); cs = cos_sin(pos)."""
        torch = _torch()
        cos, sin = cs
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)

    def mlp(self, lw, h):
        torch = _torch()
        F = torch.nn.functional
        cfg = self.cfg
        if not cfg.moe_experts:
            gu = h @ lw["w13"].t()
            if cfg.gated_mlp:
                from validation.gemm import silu_mul_triton

                a = silu_mul_triton(gu)
            else:
                a = F.gelu(gu, approximate="tanh")
            return a @ lw["w2"].t()
        return self.moe(lw, h)

    def moe(self, lw, h):
        torch = _torch()
        F = torch.nn.functional
        cfg = self.cfg
        T = h.shape[0]
        E, k = cfg.moe_experts, cfg.moe_top_k
        logits = (h @ lw["router"].t()).float()
        wts, ids = torch.softmax(logits, -1).topk(k, -1)
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
                up = torch._grouped_mm(xs, lw["w13"], offs=offs)
                g, u = up.chunk(2, -1)
                dn = torch._grouped_mm((F.silu(g) * u).contiguous(), lw["w2"], offs=offs)
                self.moe_impl = "grouped_mm"
            except Exception as e:  # noqa: BLE001
                if self.moe_impl == "grouped_mm":
                    raise
                print(f"[info] _grouped_mm unavailable ({str(e)[:100]}); gathered-weight bmm fallback", flush=True)
                self.moe_impl = "gather_bmm"
        if self.moe_impl == "gather_bmm":
            eid = flat[order]
            up = torch.bmm(xs[:, None, :], lw["w13"][eid])[:, 0]
            g, u = up.chunk(2, -1)
            dn = torch.bmm((F.silu(g) * u)[:, None, :], lw["w2"][eid])[:, 0]
        out = torch.zeros_like(h)
        out.index_add_(0, tok, dn * wts.reshape(-1)[order][:, None])
        if cfg.shared_intermediate:
            gu = h @ lw["s13"].t()
            g, u = gu.chunk(2, -1)
            out = out + (F.silu(g) * u) @ lw["s2"].t()
        return out

    # --- decode
    def alloc_cache(self, batch, context):
        torch = _torch()
        cfg = self.cfg
        slots = min(context + 1, cfg.sliding_window) if cfg.sliding_window else context + 1
        m0 = torch.cuda.memory_allocated()
        self.kc = [torch.empty(batch, cfg.kv_heads, slots, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
                   for _ in range(self.L)]
        self.vc = [torch.empty_like(self.kc[0]) for _ in range(self.L)]
        kv_bytes = torch.cuda.memory_allocated() - m0
        for t in self.kc + self.vc:
            t.normal_()
        self.slots = slots
        return kv_bytes

    def free_cache(self):
        self.kc = self.vc = None

    def decode_step(self, tokens, context):
        """One decode step at position `context` (cache holds `context` earlier tokens)."""
        torch = _torch()
        F = torch.nn.functional
        cfg = self.cfg
        B = tokens.shape[0]
        hd, Hq, Hkv = cfg.head_dim, cfg.q_heads, cfg.kv_heads
        G = Hq // Hkv
        slot = context % self.slots
        n_att = min(context + 1, self.slots)
        pos = torch.full((1,), context, device="cuda", dtype=torch.int64)
        cs = self.cos_sin(pos)
        x = self.embed[tokens]
        for i, lw in enumerate(self.layers):
            h = self.rms(x, lw["ln1"])
            qkv = h @ lw["wqkv"].t()
            q, k, v = qkv.split([Hq * hd, Hkv * hd, Hkv * hd], -1)
            q = self.rope(q.view(B, Hq, 1, hd), cs)
            k = self.rope(k.view(B, Hkv, 1, hd), cs)
            self.kc[i][:, :, slot : slot + 1].copy_(k)
            self.vc[i][:, :, slot : slot + 1].copy_(v.view(B, Hkv, 1, hd))
            kk = self.kc[i][:, :, :n_att]
            vv = self.vc[i][:, :, :n_att]
            o = F.scaled_dot_product_attention(q.reshape(B, Hkv, G, hd), kk, vv)  # GQA decode: fold group into q
            x = x + o.reshape(B, Hq * hd) @ lw["wo"].t()
            x = x + self.mlp(lw, self.rms(x, lw["ln2"]))
        return self.rms(x, self.ln_f) @ self.lm_head.t()

    def prefill(self, tokens):
        torch = _torch()
        F = torch.nn.functional
        cfg = self.cfg
        B, P = tokens.shape
        hd, Hq, Hkv = cfg.head_dim, cfg.q_heads, cfg.kv_heads
        pos = torch.arange(P, device="cuda")
        cs = self.cos_sin(pos)
        x = self.embed[tokens].view(B * P, -1)
        for i, lw in enumerate(self.layers):
            h = self.rms(x, lw["ln1"])
            qkv = h @ lw["wqkv"].t()
            q, k, v = qkv.split([Hq * hd, Hkv * hd, Hkv * hd], -1)
            q = self.rope(q.view(B, P, Hq, hd).transpose(1, 2), cs)
            k = self.rope(k.view(B, P, Hkv, hd).transpose(1, 2), cs)
            v = v.view(B, P, Hkv, hd).transpose(1, 2)
            n = min(P, self.slots)
            self.kc[i][:, :, :n].copy_(k[:, :, P - n :])
            self.vc[i][:, :, :n].copy_(v[:, :, P - n :])
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + o.transpose(1, 2).reshape(B * P, Hq * hd) @ lw["wo"].t()
            x = x + self.mlp(lw, self.rms(x, lw["ln2"]))
        return self.rms(x[-1:], self.ln_f) @ self.lm_head.t()


def time_graph(step, iters=20):
    torch = _torch()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    del g
    ts.sort()
    n = len(ts)
    return ts[n // 2], ts[int(0.1 * (n - 1))], ts[int(math.ceil(0.9 * (n - 1)))]


MODELS = ["llama-3-8b", "llama-2-7b", "qwen2.5-7b", "mistral-7b", "phi-3-mini", "gemma-2b", "falcon-7b",
          "qwen1.5-moe-a2.7b", "mixtral-8x7b"]


def run(args):
    torch = _torch()
    from validation.common import Budget, CsvOut, guarded, log  # noqa: PLC0415

    budget = Budget(args.budget_s)
    dec = CsvOut(os.path.join(args.out, "engine_decode.csv"),
                 ["model", "batch", "context", "time_s", "time_p10_s", "time_p90_s", "kv_bytes", "layers",
                  "total_layers", "weight_bytes", "graph", "notes"])
    pre = CsvOut(os.path.join(args.out, "engine_prefill.csv"),
                 ["model", "batch", "prompt", "time_s", "layers", "total_layers", "notes"])
    models = args.models.split(",") if args.models else (MODELS[:2] + ["qwen1.5-moe-a2.7b"] if args.quick else MODELS)
    batches = [1, 8] if args.quick else [1, 4, 16, 64, 256]
    contexts = [512, 2048] if args.quick else [512, 2048, 8192, 32768]
    prompts = [128, 1024] if args.quick else [128, 512, 2048, 8192, 16384]
    per_model = budget.left() / max(1, len(models))
    for mi, name in enumerate(models):
        mb = Budget(min(budget.left(), budget.left() / max(1, len(models) - mi)))
        cfg = guarded(f"config {name}", get_config, name)
        if cfg is None:
            continue
        free, total = torch.cuda.mem_get_info()
        wfull = cfg.weight_params() * 2
        layers = cfg.layers
        if wfull > 0.6 * free or args.quick:
            # truncate: keep embeddings, fewest layers that keep weights under 60% of free memory (or 4 when quick)
            per_layer = (cfg.weight_params(1) - cfg.weight_params(0)) * 2
            layers = max(1, min(cfg.layers, int((0.6 * free - cfg.weight_params(0) * 2) // per_layer)))
            if args.quick:
                layers = min(layers, 4)
        log(f"== {name}: {layers}/{cfg.layers} layers, weights {cfg.weight_params(layers)*2/1e9:.1f} GB, "
            f"budget {mb.left():.0f}s  ({cfg})")
        model = guarded(f"build {name}", Decoder, cfg, layers)
        if model is None:
            continue
        wbytes = cfg.weight_params(layers) * 2
        # prefill first (cheap), batch 1
        for P in prompts:
            if not mb.ok(mb.seconds * 0.6):
                break

            def pf(P=P):
                model.alloc_cache(1, P)
                toks = torch.randint(0, cfg.vocab, (1, P), device="cuda")
                t, _, _ = _bench_plain(lambda: model.prefill(toks), iters=5 if P <= 4096 else 3)
                note = "sliding window ignored in prefill attention" if cfg.sliding_window and P > cfg.sliding_window else ""
                pre.row(model=name, batch=1, prompt=P, time_s=t, layers=layers, total_layers=cfg.layers, notes=note)
                log(f"  prefill P{P}: {t*1e3:.2f} ms")
                model.free_cache()
            guarded(f"prefill {name} {P}", pf)
            torch.cuda.empty_cache()
        for B in batches:
            for S in contexts:
                if not mb.ok(3):
                    break
                free, _ = torch.cuda.mem_get_info()
                need = cfg.kv_bytes(B, S + 1, layers)
                if need > free - 6 * 2**30:
                    continue

                def dp(B=B, S=S):
                    kvb = model.alloc_cache(B, S)
                    toks = torch.randint(0, cfg.vocab, (B,), device="cuda")
                    graph = 1
                    notes = model.moe_impl or ""
                    try:
                        t, p10, p90 = time_graph(lambda: model.decode_step(toks, S), iters=20 if S * B < 2**18 else 10)
                    except Exception as e:  # noqa: BLE001
                        log(f"  graph capture failed ({str(e)[:120]}); eager timing")
                        torch.cuda.synchronize()
                        graph = 0
                        t, p10, p90 = _bench_plain(lambda: model.decode_step(toks, S), iters=10)
                    notes = model.moe_impl or ""
                    dec.row(model=name, batch=B, context=S, time_s=t, time_p10_s=p10, time_p90_s=p90, kv_bytes=kvb,
                            layers=layers, total_layers=cfg.layers, weight_bytes=wbytes, graph=graph, notes=notes)
                    log(f"  decode B{B} S{S}: {t*1e3:.3f} ms (p10 {p10*1e3:.3f} p90 {p90*1e3:.3f}) kv {kvb/1e9:.2f} GB")
                    model.free_cache()
                guarded(f"decode {name} B{B} S{S}", dp)
                torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()


def _bench_plain(fn, iters=5):
    torch = _torch()
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    ts.sort()
    n = len(ts)
    return ts[n // 2], ts[int(0.1 * (n - 1))], ts[int(math.ceil(0.9 * (n - 1)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=200)
    ap.add_argument("--models", default="")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    _torch().manual_seed(0)
    run(a)


if __name__ == "__main__":
    main()
