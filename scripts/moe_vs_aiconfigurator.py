"""kvsim's routed-expert time per MoE layer against vLLM's own fused-MoE kernel as NVIDIA measured it
(aiconfigurator-core's systems/data/<system>/moe/vllm/<version>/moe_perf.parquet, Triton kernel
sources only), for Qwen3-235B-A22B and Qwen3-30B-A3B shards at TP 1-8 in bf16, FP8 and FP8 blocks.

kvsim's side: the decode step's gemm.experts + moe_routing + activation (+ moe_act_quant for FP8 experts)
terms divided by the MoE layers (every layer of these models is one), as the database times the whole
layer. The database routes 'balanced' (every expert gets the same count), kvsim a random router's
expected touched experts: the two agree once every expert is touched, so only token
counts >= 64 (64 x top-8 pairs over 128 experts) are compared. Needs kvsim[aic].

    .venv/bin/python scripts/moe_vs_aiconfigurator.py [--system h100_sxm] [--version 0.24.0]
"""
from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

import pyarrow.parquet as pq

from kvsim.api import predict
from kvsim.importers.aiconfigurator import data_root
from kvsim.spec.model import load_model
from kvsim.spec.quant import with_weights

MODELS = (("qwen3-235b-a22b", (2, 4, 8)), ("qwen3-30b-a3b", (1, 2)))
DTYPES = (("bf16", "bfloat16", False), ("fp8", "fp8", False), ("fp8", "fp8_block", True))
# From 64 tokens: the database's rows route tokens "balanced" (every expert gets an equal share, so 16 tokens
# x top-8 touch all 128 experts), kvsim prices uniform-random routing (16 tokens touch 82 of them on average):
# at 4-32 tokens the two read up to 1.56x different expert weights, which is not the kernel's doing; from 64
# tokens both touch nearly every expert (random: 126 of 128).
TOKENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


def compare(system: str, version: str) -> list[tuple[str, int, str, list[float]]]:
    """(model, tp, database dtype, kvsim / measured time of one MoE layer at each of TOKENS present)."""
    gpu = {"h100_sxm": "h100-sxm", "h200_sxm": "h200-sxm"}[system]
    path = data_root() / system / "moe" / "vllm" / version / "moe_perf.parquet"
    rows = [r for r in pq.read_table(path).to_pylist() if "triton" in r["kernel_source"] or
            r["kernel_source"] == "vllm_fused_moe"]
    out = []
    for name, tps in MODELS:
        base = load_model(name)
        moe = base.moe
        assert moe is not None
        for weights, dtype, blocks in DTYPES:
            m = with_weights(base, weights)
            if blocks:
                assert m.weight_quant is not None
                m = replace(m, weight_quant=replace(m.weight_quant, block_scaled=True))
            layers = sum(1 for layer in m.layers if layer.moe)
            for tp in tps:
                tab = {r["num_tokens"]: r["latency"] * 1e-3 for r in rows
                       if r["hidden_size"] == base.hidden_size and r["inter_size"] == moe.expert_intermediate_size
                       and r["num_experts"] == moe.num_experts and r["distribution"] == "balanced"
                       and r["moe_ep_size"] == 1 and r["moe_tp_size"] == tp and r["moe_dtype"] == dtype}
                got = []
                for t in (t for t in TOKENS if t in tab):
                    b = predict(m, gpu, t, 16, tp=tp)[0]["breakdown"]
                    got.append((b["gemm.experts"] + b["moe_routing"] + b["activation"] + b.get("moe_act_quant", 0.0))
                               / layers / tab[t])
                if got:
                    out.append((name, tp, dtype, got))
    return out


def summary(found: list[tuple[str, int, str, list[float]]]) -> dict[str, tuple[float, float, int]]:
    """Per database dtype: (median, worst absolute error, points)."""
    out = {}
    for dtype in ("bfloat16", "fp8", "fp8_block"):
        err = [abs(r - 1) for _, _, d, rs in found if d == dtype for r in rs]
        if err:
            out[dtype] = (statistics.median(err), max(err), len(err))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--system", default="h100_sxm")
    ap.add_argument("--version", default="0.24.0")
    a = ap.parse_args()
    found = compare(a.system, a.version)
    print(f"kvsim / vLLM {a.version} fused-MoE ({a.system}, aiconfigurator moe_perf): one MoE layer's time, "
          "tokens " + ", ".join(map(str, TOKENS)))
    for name, tp, dtype, got in found:
        print(f"  {name} TP {tp} {dtype:9s} " + " ".join(f"{r:.2f}" for r in got))
    for dtype, (med, worst, n) in summary(found).items():
        print(f"{dtype}: median |error| {med:.1%}, worst {worst:.1%} ({n} points)")


if __name__ == "__main__":
    main()
