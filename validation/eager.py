"""Decode steps of the reference engine run eagerly (every kernel launched from Python, as vLLM's
--enforce-eager runs its model) beside the same step replayed from one CUDA graph, in the same
process on the same cache: how far a step launched kernel by kernel falls behind its kernels' GPU
time on this GPU and host CPU. Not read by calibration: kvsim prices an --enforce-eager step at its
kernels and labels it a lower bound (kvsim/cost/model.py EAGER_NOTE); this part measures how low
that bound is on kvsim's own engine (whose Python per kernel is not vLLM's).

  python3 validation/eager.py --out DIR --budget-s 120 [--quick] [--models a,b]

Appends engine_decode_eager.csv: model, batch, context, layers, total_layers, graph_s, eager_s (medians;
eager over EAGER_ITERS steps after one warm-up), eager_p10_s, eager_p90_s.
"""
from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from validation.common import part_args  # noqa: E402
from validation.engine import fit_layers, time_eager, time_graph  # noqa: E402
from validation.engine_model import Decoder, get_config  # noqa: E402

COLS = ["model", "batch", "context", "layers", "total_layers", "graph_s", "eager_s", "eager_p10_s", "eager_p90_s"]
# Dense GQA (32 and 28 layers), a small model (phi-3-mini: 32 layers of 3072), a MoE (24 layers)
MODELS = ["llama-3-8b", "qwen2.5-7b", "phi-3-mini", "qwen1.5-moe-a2.7b"]
QUICK_MODELS = ["llama-3-8b"]
BATCHES = [1, 8, 32, 128]
CONTEXT = 2048
EAGER_ITERS = 20


def point(model, name, batch, csv):
    import torch

    cfg = model.cfg
    model.alloc_cache(batch, CONTEXT)
    toks = torch.randint(0, cfg.vocab, (batch,), device=model.dev)

    def step():
        return model.sample(model.decode_step(toks, CONTEXT))

    graph_s = time_graph(step)[0]
    eager_s, p10, p90 = time_eager(step, iters=EAGER_ITERS)
    model.free_cache()
    csv.row(model=name, batch=batch, context=CONTEXT, layers=model.L, total_layers=cfg.layers, graph_s=graph_s,
            eager_s=eager_s, eager_p10_s=p10, eager_p90_s=p90)
    return graph_s, eager_s


def main():
    ap = part_args(120)
    ap.add_argument("--models", default="")
    a = ap.parse_args()
    import torch

    from validation.common import Budget, CsvOut, guarded, log

    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(0)
    budget = Budget(a.budget_s)
    csv = CsvOut(os.path.join(a.out, "engine_decode_eager.csv"), COLS)
    models = a.models.split(",") if a.models else (QUICK_MODELS if a.quick else MODELS)
    for name in models:
        if not budget.ok(10):
            log(f"eager: budget spent before {name}")
            break
        cfg = guarded(f"config {name}", get_config, name, log)
        if cfg is None:
            continue
        free, _ = torch.cuda.mem_get_info()
        model = guarded(f"build {name}", Decoder, cfg, fit_layers(cfg, free, a.quick))
        if model is None:
            continue
        for batch in BATCHES[:2] if a.quick else BATCHES:
            if not budget.ok(3):
                break
            times = guarded(f"eager {name} B{batch}", point, model, name, batch, csv)
            if times is not None:
                log(f"  {name} B{batch} S{CONTEXT}: graph {times[0] * 1e3:.3f} ms, eager {times[1] * 1e3:.3f} ms "
                    f"({times[1] / times[0]:.2f}x)")
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
