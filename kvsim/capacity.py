"""Analytic capacity over models x methods x GPUs x contexts, vectorized.

One memory plan per model (``kvsim.memory.plan_memory``), given each method's layout and moved to
each GPU; the contexts are one numpy pass per (model, method). The numbers are
``MemoryPlan.max_concurrency`` point by point (a property test checks it over random settings).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from kvsim.errors import KvsimError
from kvsim.kv import layout_for
from kvsim.memory import EngineMemoryConfig, activation_peak_bytes, plan_memory
from kvsim.spec.hardware import HardwareSpec
from kvsim.spec.model import ModelSpec


@dataclass(frozen=True)
class CapacityGrid:
    """max_concurrency[model, method, gpu, context] (-1 where the method does not apply)."""

    models: tuple[str, ...]
    methods: tuple[str, ...]
    gpus: tuple[str, ...]
    contexts: np.ndarray
    max_concurrency: np.ndarray
    kv_bytes_per_token: np.ndarray  # [model, method, context], all ranks, all tiers
    kv_cache_bytes: np.ndarray  # [model, gpu], per GPU (negative: weights do not fit)

    def rows(self) -> list[dict]:
        out = []
        for i, m in enumerate(self.models):
            for j, k in enumerate(self.methods):
                for g, gpu in enumerate(self.gpus):
                    for c, ctx in enumerate(self.contexts):
                        out.append({"model": m, "method": k, "hardware": gpu, "context": int(ctx),
                                    "max_concurrency": int(self.max_concurrency[i, j, g, c]),
                                    "kv_bytes_per_token": float(self.kv_bytes_per_token[i, j, c])})
        return out


def capacity_grid(models: Sequence[ModelSpec], methods: Sequence[str], gpus: Sequence[HardwareSpec],
                  contexts: Sequence[int] | np.ndarray, tp: int = 1,
                  engine: EngineMemoryConfig | None = None) -> CapacityGrid:
    """Every point is ``MemoryPlan.max_concurrency`` of the one planner (``kvsim.memory.plan_memory``):
    the plan is sized once per (model, GPU) (the profiling peak depends on the GPU: its SM count and
    cuBLAS workspace) and given each method's layout, so every engine setting (non-torch memory, CUDA
    graphs, ...) counts here exactly as it does in ``kvsim memory``."""
    ctx = np.asarray(contexts, dtype=np.int64)
    if ctx.size == 0 or np.any(ctx <= 0):
        raise KvsimError("contexts must be positive", field="contexts", value=list(contexts))
    conc = np.full((len(models), len(methods), len(gpus), ctx.size), -1, dtype=np.int64)
    per_token = np.full((len(models), len(methods), ctx.size), np.nan)
    kv_cache = np.zeros((len(models), len(gpus)))
    for i, model in enumerate(models):
        first = plan_memory(model, gpus[0], layout_for(model), tp, engine)
        # each GPU with its own step limits where the engine leaves them to vLLM's per-GPU defaults
        engines = [(engine or EngineMemoryConfig()).resolved(model, g) for g in gpus]
        bases = [replace(first, hardware=g, engine=e, activation_peak_bytes=activation_peak_bytes(
            model, g, tp, e, first.parallel)) for g, e in zip(gpus, engines, strict=True)]
        kv_cache[i] = [b.kv_cache_bytes for b in bases]
        for j, spec in enumerate(methods):
            try:
                layout = layout_for(model, spec)
            except KvsimError:
                continue  # the method does not apply to this model (stays -1)
            plan = replace(bases[0], layout=layout)
            seq = np.maximum(plan.blocks_for(ctx), 1)
            # MemoryPlan.num_gpu_blocks on each GPU (the page size does not depend on the GPU)
            blocks = (np.where(kv_cache[i] > 0, kv_cache[i] // plan.block_bytes, 0) if plan.block_bytes > 0
                      else np.zeros(len(gpus))).astype(np.int64)
            conc[i, j] = blocks[:, None] // seq[None, :]
            tiers = layout.bytes_by_tier(ctx, tp)
            if any(np.any(b > 0) for tier, b in tiers.items() if tier != "gpu"):  # host/NVMe bound it too
                conc[i, j] = [replace(b, layout=layout).max_concurrency(ctx) for b in bases]
            per_token[i, j] = sum(tiers.values()) * tp / ctx
    return CapacityGrid(tuple(m.name for m in models), tuple(methods), tuple(g.name for g in gpus), ctx, conc,
                        per_token, kv_cache)
