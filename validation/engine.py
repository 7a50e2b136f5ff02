"""Reference-engine measurements (what kvsim validate judges end-to-end predictions against):
decode-step time over batch x context grids on a contiguous and on a paged cache (a block table
of 16-token pages), prefill time over prompt lengths, each step captured in one CUDA graph (per
prompt length, per context), and the exact KV bytes of every point. The decoder runs the kernels a
serving engine runs (engine_model.Decoder lists them). Models too big for the GPU run truncated
(fewer layers; `layers` and `total_layers` record it so predictions use the same count). Writes
engine_decode.csv and engine_prefill.csv (tp = 1).

  python3 validation/engine.py --out DIR --budget-s 170 [--quick] [--models a,b]
"""
from __future__ import annotations

import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from validation.common import part_args  # noqa: E402
from validation.engine_model import Decoder, get_config  # noqa: E402

# Columns are only ever appended (kvsim validate reads these files by name).
DEC_COLS = ["model", "batch", "context", "time_s", "time_p10_s", "time_p90_s", "kv_bytes", "layers", "total_layers",
            "weight_bytes", "graph", "notes", "cache", "tp", "kv_alloc_bytes"]
PRE_COLS = ["model", "batch", "prompt", "time_s", "layers", "total_layers", "notes", "tp", "graph", "time_p10_s",
            "time_p90_s"]
# Four dense shapes (MHA, GQA x2, MQA x2, head_dim 96), a sliding window, two MoE and one MLA model.
MODELS = ["llama-3-8b", "llama-2-7b", "qwen2.5-7b", "falcon-7b", "phi-3-mini", "gemma-2b", "mistral-7b",
          "qwen1.5-moe-a2.7b", "deepseek-v2-lite", "mixtral-8x7b"]
# --quick: every path on a few layers: GQA, MQA with 71 heads + head_dim 64 + GELU MLP, head_dim 96 +
# a sliding window shorter than the context and the prompt (ring, skipped cache slots), MoE, MLA + MoE.
QUICK_MODELS = ["llama-3-8b", "falcon-7b", "phi-3-mini", "qwen1.5-moe-a2.7b", "deepseek-v2-lite"]
BATCHES = [1, 4, 16, 64, 128, 256]
CONTEXTS = ([512, 2048, 8192, 32768], [1024, 4096, 16384])  # coarse grid first: a short budget still spans it
PROMPTS = [128, 512, 2048, 8192, 16384]
QUICK = dict(batches=[1, 8], contexts=([1000, 2048],), prompts=[256, 3000])  # off page and window boundaries
# Tensor-parallel runs and their tp=1 baseline (run_tp.py): a smaller grid, the same points.
TP_GRID = dict(batches=[1, 16, 64, 256], contexts=([2048, 32768], [512, 8192]), prompts=[128, 2048, 8192])
HEADROOM_BYTES = 6 * 2**30  # activations, graph pools and partials beside the cache
MAX_FAILURES = 3  # in a row: the model's remaining points are skipped (a systematic fault costs little budget)
TIMED_S = 0.1  # replay time per point (10 replays of a 10 ms step; p10-p90 spread was ~0.3%), >= min_iters


def time_graph(step, agree=lambda t: t, min_iters=5, target_s=TIMED_S):
    """Median/p10/p90 seconds of CUDA-graph replays of step(): one eager warm-up on a side stream
    (Triton compiles, cuBLAS picks its kernels), capture, one replay to size the run, then
    min_iters..20 timed replays. `agree` maps the sizing time to one all ranks share (TP: the slowest), so every
    rank replays its collectives the same number of times."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    ts = [_replay_s(g)]
    iters = int(min(20, max(min_iters, target_s / max(agree(ts[0]), 1e-6))))
    ts = [_replay_s(g) for _ in range(iters)]
    del g
    return quantiles(ts)


def _replay_s(g) -> float:
    import torch

    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3


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
    """The paged Triton kernel serves every attention but MLA (its latent kernel reads a contiguous cache)."""
    return cfg.mla is None


def fit_layers(cfg, free_bytes, quick):
    """All layers when the weights take under 60% of free memory, else the most that do."""
    layers = cfg.layers
    if cfg.weight_params() * 2 > 0.6 * free_bytes:
        per_layer = (cfg.weight_params(cfg.layers) - cfg.weight_params(0)) * 2 / cfg.layers
        layers = max(1, min(cfg.layers, int((0.6 * free_bytes - cfg.weight_params(0) * 2) // per_layer)))
    return min(layers, 2) if quick else layers


def plan(cfg, quick, grid="full"):
    """Points in priority order: ("prefill", prompt) for each prompt length, then
    ("decode", batch, context, paged) over the coarse contexts, then the fine ones."""
    g = QUICK if quick else TP_GRID if grid == "tp" else dict(batches=BATCHES, contexts=CONTEXTS, prompts=PROMPTS)
    for P in g["prompts"]:
        yield ("prefill", P)
    for group in g["contexts"]:
        for S in group:
            for B in g["batches"]:
                yield ("decode", B, S, False)
                if pageable(cfg):
                    yield ("decode", B, S, True)


def fits(cfg, layers, point, free_bytes) -> bool:
    """The point's cache (paged: up to a page more per sequence) beside HEADROOM_BYTES."""
    if point[0] == "prefill":
        return cfg.kv_bytes(1, point[1] + 16, layers) < free_bytes - HEADROOM_BYTES
    return cfg.kv_bytes(point[1], point[2] + 16, layers) < free_bytes - HEADROOM_BYTES


def decode_row(model, name, B, S, paged, agree=lambda t: t, eager_ok=True):
    """One decode point as an engine_decode.csv row (the step graph-captured; eager timing only
    when capture fails and `eager_ok`)."""
    import torch

    cfg = model.cfg
    kvb, alloc = model.alloc_cache(B, S, paged=paged)
    toks = torch.randint(0, cfg.vocab * cfg.tp, (B,), device=model.dev)
    (t, p10, p90), graph = _timed(lambda: model.sample(model.decode_step(toks, S)), agree, eager_ok, "decode",
                                  eager_iters=10)
    model.free_cache()
    return dict(model=name, batch=B, context=S, time_s=agree(t), time_p10_s=agree(p10), time_p90_s=agree(p90),
                kv_bytes=kvb, kv_alloc_bytes=alloc, layers=model.L, total_layers=cfg.layers,
                weight_bytes=cfg.weight_params(model.L) * 2, graph=graph, notes=model.moe_impl or "",
                cache="paged" if paged else "contiguous", tp=cfg.tp)


def _timed(step, agree, eager_ok, what, eager_iters, **graph_kw):
    """(median, p10, p90) of a graph-captured step, and 1; eager timing and 0 when capture fails
    and eager timing is allowed (a TP run must capture on every rank alike)."""
    import torch

    try:
        return time_graph(step, agree, **graph_kw), 1
    except Exception as e:  # noqa: BLE001
        if not eager_ok:
            raise
        print(f"  {what} graph capture failed ({str(e)[:120]}); eager timing", flush=True)
        torch.cuda.synchronize()
        return time_eager(step, iters=eager_iters), 0


def prefill_row(model, name, P, agree=lambda t: t, eager_ok=True):
    """One prompt of P tokens (batch 1) as an engine_prefill.csv row, graph-captured at this length."""
    import torch

    cfg = model.cfg
    model.alloc_cache(1, P)
    toks = torch.randint(0, cfg.vocab * cfg.tp, (1, P), device=model.dev)
    (t, p10, p90), graph = _timed(lambda: model.sample(model.prefill(toks)), agree, eager_ok, "prefill",
                                  eager_iters=3, min_iters=3)
    model.free_cache()
    note = "sliding window ignored in prefill attention" if cfg.sliding_window and P > cfg.sliding_window else ""
    return dict(model=name, batch=1, prompt=P, time_s=agree(t), time_p10_s=agree(p10), time_p90_s=agree(p90),
                layers=model.L, total_layers=cfg.layers, notes=note, tp=cfg.tp, graph=graph)


def describe(row) -> str:
    if "prompt" in row:
        return f"prefill P{row['prompt']}: {row['time_s']*1e3:.2f} ms graph={row['graph']}"
    return (f"decode {row['cache'][:6]} B{row['batch']} S{row['context']}: {row['time_s']*1e3:.3f} ms "
            f"(p10 {row['time_p10_s']*1e3:.3f} p90 {row['time_p90_s']*1e3:.3f}) kv {row['kv_bytes']/1e9:.2f} GB "
            f"(alloc {row['kv_alloc_bytes']/1e9:.2f})")


def run(args):
    import torch

    from validation.common import Budget, CsvOut, guarded, log

    budget = Budget(args.budget_s)
    out = {"decode": CsvOut(os.path.join(args.out, "engine_decode.csv"), DEC_COLS),
           "prefill": CsvOut(os.path.join(args.out, "engine_prefill.csv"), PRE_COLS)}
    models = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else MODELS)
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
        done = skipped = failed = 0
        for point in plan(cfg, args.quick, args.grid):
            free, _ = torch.cuda.mem_get_info()
            if not fits(cfg, layers, point, free):
                continue
            if not mb.ok(2) or failed >= MAX_FAILURES:
                skipped += 1
                continue
            fn = prefill_row if point[0] == "prefill" else decode_row
            row = guarded(f"{name} {point}", fn, model, name, *point[1:])
            torch.cuda.empty_cache()
            failed = 0 if row is not None else failed + 1
            if row is not None:
                out[point[0]].row(**row)
                log("  " + describe(row))
                done += 1
        log(f"  {name}: {done} points in {mb.seconds - mb.left():.0f}s, {skipped} skipped (budget or "
            f"{MAX_FAILURES} failures in a row)")
        del model
        torch.cuda.empty_cache()


def main():
    ap = part_args(200)
    ap.add_argument("--models", default="")
    ap.add_argument("--grid", choices=["full", "tp"], default="full", help="tp: the tensor-parallel runs' points")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    import torch

    torch.manual_seed(0)
    t0 = time.time()
    run(a)
    print(f"engine: {time.time() - t0:.0f}s of {a.budget_s:.0f}s", flush=True)


if __name__ == "__main__":
    main()
