"""kvsim's measured fused-MoE GEMM rows against what the GPU's imported profile prices for the same
bytes and rows per expert: the imported curve is aiconfigurator's timing of vLLM's whole FusedMoE layer
(routing, quantization and both GEMMs; balanced routing), fitted per byte, so the ratio says how much
slower (> 1) or faster vLLM's layer is than kvsim's stand-in kernel at equal work, by token band.
Rows with params src=... (tiling comparisons) are left out, as calibration leaves them out
(kvsim.measured.rows).

    .venv/bin/python scripts/moe_kernel_vs_imported.py [--gpu h200-sxm] [--mode fp8_block]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from kvsim import measured
from kvsim.cost.calibration import find_calibration
from kvsim.spec.hardware import load_hardware

BANDS = ((16, "1-16"), (128, "32-128"), (1024, "256-1,024"), (1 << 30, "2k+"))
CURVES = {"bf16": ("gemm_grouped", "bf16"), "fp8": ("gemm_grouped.fp8", "fp8"),
          "fp8_block": ("gemm_grouped.fp8_block", "fp8")}
ELEMENT_BYTES = {"bf16": 2, "fp8": 1, "fp8_block": 1}


def priced_s(cal, mode: str, r: dict) -> float:
    """The profile's time for one measured row's GEMM (kvsim.cost.model._gemm_rows' arithmetic)."""
    curve_name, peak = CURVES[mode]
    curve, c = cal.ops[curve_name], cal.ceilings
    tokens, top_k, active = int(r["tokens"]), int(r["top_k"]), int(r["active_experts"])
    weight_bytes = active * int(r["n"]) * int(r["k"]) * ELEMENT_BYTES[mode]
    ce, me = curve.eff_many(np.array([max(tokens * top_k / active, 1.0)]), np.array([float(weight_bytes)]))
    return max(float(r["flops"]) / (c.flops_per_s[peak] * ce[0]),
               float(r["bytes"]) / (c.copy_bytes_per_s * me[0])) + curve.floor_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", default="h200-sxm")
    ap.add_argument("--mode", default="fp8_block", choices=list(CURVES))
    a = ap.parse_args()
    hw = load_hardware(a.gpu)
    own, imported = find_calibration(hw), find_calibration(hw, "imported")
    path = Path(__file__).resolve().parents[1] / "validation" / "results" / a.gpu / "fused_moe.csv"
    rows = [r for r in measured.rows(path) if r["mode"] == a.mode]  # as calibration reads them: no src= rows
    bands: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        band = next(name for top, name in BANDS if int(r["tokens"]) <= top)
        t = float(r["time_s"])
        bands.setdefault(band, []).append((priced_s(own, a.mode, r) / t, priced_s(imported, a.mode, r) / t))
    print(f"{a.gpu} {a.mode}: profile price / measured time of kvsim's fused-MoE rows ({path.name}), median")
    print(f"{'tokens':10s} {'rows':>5s} {'own':>6s} {'imported':>9s}")
    for _, name in BANDS:
        if name in bands:
            v = bands[name]
            print(f"{name:10s} {len(v):5d} {statistics.median(x for x, _ in v):6.2f} "
                  f"{statistics.median(y for _, y in v):9.2f}")


if __name__ == "__main__":
    main()
