"""Fit the CPU time an eager (``--enforce-eager``) decode step spends launching its kernels, per decoder layer.

validation/eager.py (run part ``eager``) times the reference engine's decode step launched kernel by kernel
beside the same step replayed from its CUDA graph (validation/results/h100-sxm/engine_decode_eager.csv).
Where the eager step takes at least 1.5x the graph's, the GPU waits on the launches and the step time is the
launching: eager time / layers, the median over those rows of dense models. The reference engine's MoE layer
is not fitted: it routes in PyTorch ops (about 1.1 ms a layer launched, Qwen1.5-MoE), where vLLM runs fused
routing and expert kernels, so kvsim prices every layer at the dense rate, a floor for an MoE layer.
Writes kvsim/data/eager_launch.yaml, which
kvsim/cost/execution.py reads for ``engine.enforce_eager``. Only PyTorch's launch path of kvsim's reference
engine was measured: vLLM's own per-layer Python is likely more (its public eager runs measured TPOT 1.7-4.3x
a CUDA-graph run's, vllm-project/vllm-omni issue 7960), and the host CPU sets either.

    .venv/bin/python scripts/fit_eager_launch.py [--check]
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from kvsim.cost.execution import EAGER_FIT_FILE
from kvsim.fileio import write_or_check_fit
from kvsim.validate import engine_model

ROOT = Path(__file__).resolve().parents[1]
MEASURED = Path("validation/results/h100-sxm/engine_decode_eager.csv")
OUT = ROOT / EAGER_FIT_FILE
LAUNCH_BOUND = 1.5  # eager / graph at or above which the step is the launching (the GPU work hides below)


def fit() -> dict:
    """The fitted launch time per layer (plain data, 4 significant digits) from MEASURED."""
    rows = list(csv.DictReader((ROOT / MEASURED).open(encoding="utf-8")))
    per_layer = [float(r["eager_s"]) / int(r["layers"]) for r in rows
                 if float(r["eager_s"]) >= LAUNCH_BOUND * float(r["graph_s"])
                 and engine_model(r["model"], int(r["layers"])).moe is None]
    if not per_layer:
        raise SystemExit(f"{MEASURED}: no launch-bound rows of a dense model")
    layer_s = float(f"{np.median(per_layer):.4g}")
    runs = sorted({r["run"] for r in rows})
    return {"eager": {
        "layer_s": layer_s,
        "source": (f"kvsim's reference engine launching its decode kernels eagerly on an H100 host ({MEASURED}, run "
                   f"{', '.join(runs)}: {len(per_layer)} launch-bound rows of dense models): {layer_s * 1e3:.3g} ms "
                   "per decoder layer, MoE layers at the same rate (a floor: they launch more kernels) "
                   "(scripts/fit_eager_launch.py)"),
        "fit": {"launch_bound_ratio": LAUNCH_BOUND, "rows": len(per_layer)}}}


HEADER = ("# CPU time of launching an eager decode step's kernels, per decoder layer, fitted by\n"
          "# scripts/fit_eager_launch.py on kvsim's reference engine; kvsim/cost/execution.py reads it.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed fit is not a fresh one")
    a = ap.parse_args()
    write_or_check_fit(OUT, HEADER, fit(), a.check)


if __name__ == "__main__":
    main()
