"""Fit the time between GPU steps of vLLM without async scheduling (<= 0.12) on real vLLM runs.

The development set (../shared/data/measured/vllm_h100_qwen3-32b_closed_loop.csv: vLLM 0.12.0,
Qwen3-32B bf16, H100 SXM, TP 2/4/8, 8-128 closed-loop clients) is predicted with the engine loop's
prior host time (kvsim/cost/execution.py); in that mode each step takes GPU + host time, so what the
measured TPOT adds per step is host time kvsim misses. It is fitted as a + b x clients (the running
sequences of a closed loop), least squares on the relative TPOT error, and added to the prior:
fixed_s = prior fixed + a, per_sequence_s = prior per sequence + b. TP-independent on purpose (one
fixed and one per-sequence part; the per-TP fits differ mostly in the fixed part). Writes
kvsim/data/vllm_host_step.yaml, which kvsim reads for vLLM < 0.13.

    .venv/bin/python scripts/fit_host_step.py [--measured FILE] [--check]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import kvsim.cost.execution as execution
from kvsim import judge_serving
from kvsim.fileio import write_or_check_fit
from kvsim.memory import parse_version

ROOT = Path(__file__).resolve().parents[1]
DEV_SET = ROOT.parent / "shared" / "data" / "measured" / "vllm_h100_qwen3-32b_closed_loop.csv"
OUT = ROOT / execution.HOST_FIT_FILE


def fit(measured: Path) -> dict:
    """The fitted host step (plain data, 4 significant digits) from ``measured``, priced with the prior."""
    saved = execution.sync_host_fit
    execution.sync_host_fit = lambda: None  # type: ignore[assignment] - price with the prior
    try:
        judged, _ = judge_serving.judge(measured)
    finally:
        execution.sync_host_fit = saved
    rows = [j for j in judged if j.row.backend == "vllm" and j.row.version
            and parse_version(j.row.version) < execution.SYNC_UNTIL]
    if len(rows) < 3:
        raise SystemExit(f"{measured}: {len(rows)} vLLM rows without async scheduling; need at least 3")
    measured_s = np.array([j.row.tpot_ms for j in rows]) * 1e-3
    gap_s = measured_s - np.array([j.tpot_ms for j in rows]) * 1e-3
    clients = np.array([j.row.concurrency for j in rows], dtype=float)
    a = np.stack([np.ones_like(clients), clients], axis=1) / measured_s[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(a, gap_s / measured_s, rcond=None)
    fixed, per_seq = (float(f"{v:.4g}") for v in (execution.HOST_FIXED_S + alpha, execution.HOST_PER_SEQUENCE_S + beta))
    shown = measured.name  # the file's name only: the fit must not depend on where the data folder is
    tps = sorted({j.row.tp for j in rows})
    return {"sync": {
        "fixed_s": fixed, "per_sequence_s": per_seq,
        "source": (f"fitted on real vLLM runs ({shown}: {len(rows)} rows, vLLM "
                   f"{', '.join(sorted({j.row.version for j in rows}))}, TP {'/'.join(map(str, tps))}): "
                   f"{fixed * 1e3:.3g} ms + {per_seq * 1e6:.3g} us per sequence between GPU steps "
                   "(scripts/fit_host_step.py)"),
        "fit": {"rows": len(rows), "deployment": judge_serving.DEFAULT_DEPLOYMENT,
                "prior_fixed_s": float(f"{execution.HOST_FIXED_S:.4g}"),
                "prior_per_sequence_s": execution.HOST_PER_SEQUENCE_S,
                "added_fixed_s": float(f"{alpha:.4g}"), "added_per_sequence_s": float(f"{beta:.4g}")}}}


HEADER = ("# vLLM's time between GPU steps without async scheduling (vLLM < 0.13), fitted by\n"
          "# scripts/fit_host_step.py on real vLLM measurements; kvsim/cost/execution.py reads it.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--measured", type=Path, default=DEV_SET)
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed fit is not a fresh one")
    a = ap.parse_args()
    write_or_check_fit(OUT, HEADER, fit(a.measured), a.check)


if __name__ == "__main__":
    main()
