"""kvsim's MLA attention block of one decode step against vLLM's own as NVIDIA measured it
(aiconfigurator-core's systems/data/<system>/mla/vllm/<version>/mla_generation_module_perf.parquet:
DeepSeek-V3's whole attention module, ``DeepseekV2MLAAttention.forward`` from the input projections to
o_proj, FP8 block-quantized weights, in a CUDA graph), for DeepSeek-R1 (DeepSeek-V3's shapes) at TP 1,
2, 4 and 8 (128 / 64 / 32 / 16 query heads per rank), every batch and KV length the table holds, with a
bf16 KV cache (the table's FLASH_ATTN_MLA rows: it holds no FlashMLA row with a bf16 cache) and an FP8
one (FLASHMLA rows).

kvsim's side: the decode step's gemm.attention + attention.decode + kv_write + rope terms divided by
the layers (every layer of DeepSeek-V3 is an MLA layer), whether or not the whole model fits the GPUs
(one layer is what is compared); the latent norms (q_a_layernorm,
kv_a_layernorm) are not priced apart by kvsim and are in the module's time. Needs kvsim[aic].

    .venv/bin/python scripts/mla_vs_aiconfigurator.py [--system h100_sxm] [--version 0.24.0] [--calibration imported]
"""

from __future__ import annotations

import argparse
import statistics

import pyarrow.parquet as pq

from kvsim.api import predict
from kvsim.importers.aiconfigurator import SYSTEMS, data_root
from kvsim.spec.model import load_model

MODEL = "deepseek-r1"  # DeepSeek-V3's shapes, which the database's MLA module rows time
TERMS = ("gemm.attention", "attention.decode", "kv_write", "rope")
KV = (("bf16", "bfloat16", "FLASH_ATTN_MLA"), ("fp8", "fp8", "FLASHMLA"))
BATCHES = (1, 4, 16, 64, 256)
CONTEXTS = (512, 4096, 16384)


def compare(system: str, version: str, calibration: str | None) -> list[tuple[int, str, int, int, float]]:
    """(tp, kv cache, batch, context, kvsim / measured time of one layer's attention block)."""
    path = data_root() / system / "mla" / "vllm" / version / "mla_generation_module_perf.parquet"
    table = {(r["num_heads"], r["kv_cache_dtype"], r["kernel_source"], r["batch_size"], r["step"]): r["latency"] * 1e-3
             for r in pq.read_table(path).to_pylist() if r["gemm_type"] == "fp8_block"}
    spec = load_model(MODEL)
    heads, layers = spec.attention.num_heads, spec.num_layers  # every layer of DeepSeek-V3 is an MLA layer
    out = []
    for tp in (1, 2, 4, 8):
        for method, kv, source in KV:
            for ctx in CONTEXTS:
                have = [b for b in BATCHES if (heads // tp, kv, source, b, ctx) in table]
                if not have:
                    continue
                for r in predict(MODEL, SYSTEMS[system], have, ctx, method=method, tp=tp, calibration=calibration):
                    mine = sum(r["breakdown"].get(t, 0.0) for t in TERMS) / layers
                    out.append((tp, method, r["batch"], ctx, mine / table[(heads // tp, kv, source, r["batch"], ctx)]))
    return out


GROUPS = (("batch <= 16", lambda b: b <= 16), ("batch >= 64", lambda b: b >= 64))


def summary(found: list[tuple[int, str, int, int, float]]) -> dict[str, tuple[float, float, float, int]]:
    """Per batch group (GROUPS): (median, lowest, highest ratio, points)."""
    out = {}
    for label, sel in GROUPS:
        ratios = [r for _, _, b, _, r in found if sel(b)]
        if ratios:
            out[label] = (statistics.median(ratios), min(ratios), max(ratios), len(ratios))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--system", default="h100_sxm")
    ap.add_argument("--version", default="0.24.0")
    ap.add_argument("--calibration", help="'imported', or a profile path (default: the GPU's own)")
    a = ap.parse_args()
    found = compare(a.system, a.version, a.calibration)
    print(f"kvsim / vLLM {a.version} MLA module ({a.system}, aiconfigurator mla_generation_module_perf), "
          f"{MODEL}, fp8_block weights; batches {', '.join(map(str, BATCHES))}")
    for tp in (1, 2, 4, 8):
        for method, _, _ in KV:
            for ctx in CONTEXTS:
                got = [f"{r:.2f}" for t, m, _, c, r in found if (t, m, c) == (tp, method, ctx)]
                if got:
                    print(f"  TP {tp} {method:4s} KV {ctx:6d}: " + " ".join(got))
    for label, (med, lo, hi, n) in summary(found).items():
        print(f"{label}: median ratio {med:.2f}, range {lo:.2f}-{hi:.2f} ({n} points)")


if __name__ == "__main__":
    main()
