"""Reference-engine measurements (what kvsim validate judges end-to-end predictions against):
decode-step time over batch x context grids with the whole step captured in one CUDA graph, on a
contiguous cache (SDPA flash) and on a paged cache (block table of 16-token pages, Triton kernel),
prefill time over prompt lengths, and the KV bytes allocated per point. Models too big for the GPU
run truncated (fewer layers; `layers` and `total_layers` record it so predictions use the same
count). Writes engine_decode.csv and engine_prefill.csv (tp = 1).

  python3 validation/engine.py --out DIR --budget-s 170 [--quick] [--models a,b]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from validation.engine_model import Decoder, get_config  # noqa: E402

DEC_COLS = ["model", "batch", "context", "time_s", "time_p10_s", "time_p90_s", "kv_bytes", "layers", "total_layers",
            "weight_bytes", "graph", "notes", "cache", "tp"]
PRE_COLS = ["model", "batch", "prompt", "time_s", "layers", "total_layers", "notes", "tp"]
# Four dense shapes (MHA, GQA x2, MQA x2, head_dim 96), a sliding window, two MoE and one MLA model.
MODELS = ["llama-3-8b", "llama-2-7b", "qwen2.5-7b", "falcon-7b", "phi-3-mini", "gemma-2b", "mistral-7b",
          "qwen1.5-moe-a2.7b", "deepseek-v2-lite", "mixtral-8x7b"]
QUICK_MODELS = ["llama-3-8b", "qwen1.5-moe-a2.7b", "deepseek-v2-lite"]
BATCHES = [1, 4, 16, 64, 128, 256]
CONTEXTS = [512, 2048, 8192, 32768, 1024, 4096, 16384]  # coarse grid first: a short budget still spans it


def time_graph(step, iters=20):
    """Median/p10/p90 seconds of one CUDA-graph replay of step() (warmed up on a side stream)."""
    import torch

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
    return quantiles(ts)


def time_eager(fn, iters=5):
    import torch

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
    return quantiles(ts)


def quantiles(ts):
    ts = sorted(ts)
    n = len(ts)
    return ts[n // 2], ts[int(0.1 * (n - 1))], ts[int(math.ceil(0.9 * (n - 1)))]


def pageable(cfg) -> bool:
    """The paged Triton kernel needs a power-of-two head dim and no ring buffer or latent."""
    return cfg.mla is None and cfg.sliding_window is None and cfg.head_dim & (cfg.head_dim - 1) == 0


def fit_layers(cfg, free_bytes, quick):
    """All layers when the weights take under 60% of free memory, else the most that do."""
    layers = cfg.layers
    if cfg.weight_params() * 2 > 0.6 * free_bytes:
        per_layer = (cfg.weight_params(cfg.layers) - cfg.weight_params(0)) * 2 / cfg.layers
        layers = max(1, min(cfg.layers, int((0.6 * free_bytes - cfg.weight_params(0) * 2) // per_layer)))
    return min(layers, 4) if quick else layers


def decode_point(model, cfg, name, B, S, paged, csv, log, tp=1):
    import torch

    kvb = model.alloc_cache(B, S, paged=paged)
    toks = torch.randint(0, cfg.vocab * cfg.tp, (B,), device="cuda")
    graph = 1
    try:
        t, p10, p90 = time_graph(lambda: model.decode_step(toks, S), iters=20 if S * B < 2**18 else 10)
    except Exception as e:  # noqa: BLE001
        log(f"  graph capture failed ({str(e)[:120]}); eager timing")
        torch.cuda.synchronize()
        graph = 0
        t, p10, p90 = time_eager(lambda: model.decode_step(toks, S), iters=10)
    csv.row(model=name, batch=B, context=S, time_s=t, time_p10_s=p10, time_p90_s=p90, kv_bytes=kvb, layers=model.L,
            total_layers=cfg.layers, weight_bytes=cfg.weight_params(model.L) * 2, graph=graph,
            notes=model.moe_impl or "", cache="paged" if paged else "contiguous", tp=tp)
    log(f"  decode {'paged' if paged else 'contig'} B{B} S{S}: {t*1e3:.3f} ms (p10 {p10*1e3:.3f} p90 {p90*1e3:.3f}) "
        f"kv {kvb/1e9:.2f} GB")
    model.free_cache()


def prefill_point(model, cfg, name, P, csv, log, tp=1):
    import torch

    model.alloc_cache(1, P)
    toks = torch.randint(0, cfg.vocab * cfg.tp, (1, P), device="cuda")
    t, _, _ = time_eager(lambda: model.prefill(toks), iters=5 if P <= 4096 else 3)
    note = "sliding window ignored in prefill attention" if cfg.sliding_window and P > cfg.sliding_window else ""
    csv.row(model=name, batch=1, prompt=P, time_s=t, layers=model.L, total_layers=cfg.layers, notes=note, tp=tp)
    log(f"  prefill P{P}: {t*1e3:.2f} ms")
    model.free_cache()


def grid(cfg, quick):
    batches = [8] if quick else BATCHES
    contexts = [2048] if quick else CONTEXTS
    for S in contexts:
        for B in batches:
            yield B, S, False
            if pageable(cfg) and (quick or S in (2048, 8192, 32768)):
                yield B, S, True


def run(args):
    import torch

    from validation.common import Budget, CsvOut, guarded, log

    budget = Budget(args.budget_s)
    dec = CsvOut(os.path.join(args.out, "engine_decode.csv"), DEC_COLS)
    pre = CsvOut(os.path.join(args.out, "engine_prefill.csv"), PRE_COLS)
    models = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else MODELS)
    prompts = [512] if args.quick else [128, 512, 2048, 8192, 16384]
    for mi, name in enumerate(models):
        mb = Budget(budget.left() / max(1, len(models) - mi))
        cfg = guarded(f"config {name}", get_config, name, log)
        if cfg is None:
            continue
        free, _ = torch.cuda.mem_get_info()
        layers = fit_layers(cfg, free, args.quick)
        log(f"== {name}: {layers}/{cfg.layers} layers, weights {cfg.weight_params(layers)*2/1e9:.1f} GB, "
            f"budget {mb.left():.0f}s  ({cfg})")
        model = guarded(f"build {name}", Decoder, cfg, layers)
        if model is None:
            continue
        for P in prompts:
            if mb.ok(mb.seconds * 0.75):
                guarded(f"prefill {name} {P}", prefill_point, model, cfg, name, P, pre, log)
                torch.cuda.empty_cache()
        for B, S, paged in grid(cfg, args.quick):
            if not mb.ok(2):
                break
            free, _ = torch.cuda.mem_get_info()
            if cfg.kv_bytes(B, S + 16, layers) > free - 6 * 2**30:
                continue
            guarded(f"decode {name} B{B} S{S} paged={paged}", decode_point, model, cfg, name, B, S, paged, dec, log)
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=200)
    ap.add_argument("--models", default="")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    import torch

    torch.manual_seed(0)
    run(a)


if __name__ == "__main__":
    main()
