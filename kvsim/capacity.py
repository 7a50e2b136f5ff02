"""Analytic capacity over models x methods x GPUs x contexts, vectorized.

One KV layout per (model, method) and one weight/activation count per model; everything per GPU
and per context is numpy broadcasting, so the whole catalogue sweeps in about a second.
The numbers equal ``MemoryPlan.max_concurrency`` point by point (tests check it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvsim.errors import KvsimError
from kvsim.kv import layout_for
from kvsim.memory import EngineMemoryConfig, engine_overheads, weight_bytes
from kvsim.spec.hardware import HardwareSpec
from kvsim.spec.linears import check_tp
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
                  contexts: Sequence[int], tp: int = 1, engine: EngineMemoryConfig | None = None) -> CapacityGrid:
    engine = engine or EngineMemoryConfig()
    ctx = np.asarray(contexts, dtype=np.int64)
    if ctx.size == 0 or np.any(ctx <= 0):
        raise KvsimError("contexts must be positive", field="contexts", value=list(contexts))
    bs = engine.block_size
    budgets = np.array([engine.gpu_memory_utilization * g.memory_bytes for g in gpus])
    conc = np.full((len(models), len(methods), len(gpus), ctx.size), -1, dtype=np.int64)
    per_token = np.full((len(models), len(methods), ctx.size), np.nan)
    kv_cache = np.zeros((len(models), len(gpus)))
    for i, model in enumerate(models):
        check_tp(model, tp)
        o = engine_overheads(model, tp, engine)
        fixed = weight_bytes(model, tp).total + o.activation_peak_bytes + o.non_torch_bytes + o.cuda_graph_bytes
        kv_cache[i] = budgets - fixed
        for j, spec in enumerate(methods):
            try:
                layout = layout_for(model, spec)
            except KvsimError:
                continue  # the method does not apply to this model (stays -1)
            block_bytes = float(layout.gpu_bytes(bs, tp, block_size=bs)[0])
            seq = np.ceil(layout.gpu_bytes(ctx, tp, block_size=bs) / block_bytes - 1e-9)
            blocks = np.where(kv_cache[i] > 0, kv_cache[i] // block_bytes, 0)  # [gpu]
            conc[i, j] = (blocks[:, None] // np.maximum(seq, 1)[None, :]).astype(np.int64)
            per_token[i, j] = sum(layout.bytes_by_tier(ctx, tp).values()) * tp / ctx
    return CapacityGrid(tuple(m.name for m in models), tuple(methods), tuple(g.name for g in gpus), ctx, conc,
                        per_token, kv_cache)
