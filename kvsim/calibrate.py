"""Fit a calibration profile from kernel-level GPU measurements (``kvsim calibrate``).

Reads, from ``validation/results/<gpu>/``: ``ceilings.json`` (copy bandwidth, GEMM rates, host
link, disk), ``gemm.csv``, ``attention_decode.csv``, ``attention_prefill.csv`` and
``elementwise.csv`` (schemas in validation/README.md). Writes ``calibration_reference.yaml``.
The end-to-end engine measurements (``engine_*.csv``) are never read here: they are what
``kvsim validate`` judges the fitted model on.

For every kernel row the roofline at efficiency 1 gives ``t_c = FLOPs / peak`` and
``t_m = bytes / copy bandwidth``; the achieved efficiency is ``max(t_c, t_m) / (time - floor)``,
attributed to compute or memory by whichever bound is larger. Efficiencies are medians per
power-of-two size bucket; the floor is the smallest time minus its roofline time.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from kvsim.cost.calibration import OP_KINDS, results_dir
from kvsim.errors import KvsimError
from kvsim.fileio import write_atomic

# Which decode-attention rows describe the production bf16 path (the fastest measured bf16 kernel
# per shape), and which rows give each method's kernel (their bytes include scales and residuals).
BF16_DECODE = ("triton_bf16", "sdpa_gqa", "sdpa_fold", "triton_bf16_tune")


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return [r for r in csv.DictReader(f) if r.get("time_s") not in (None, "", "nan")]


def _ceilings(folder: Path) -> dict:
    path = folder / "ceilings.json"
    if not path.is_file():
        raise KvsimError("no ceilings.json: run validation/run_all.py on the GPU first", field="gpu",
                         value=folder.name, file=str(path))
    c = json.loads(path.read_text())
    out = {"copy_bytes_per_s": float(c["copy"]["bw_Bps"]),
           "bf16_flops_per_s": float(c["gemm_bf16"]["rate_flops"])}
    if "gemm_fp8" in c:
        out["fp8_flops_per_s"] = float(c["gemm_fp8"]["rate_flops"])
    if "host" in c:
        out["h2d_bytes_per_s"] = float(c["host"]["h2d_pinned_Bps"])
    disk = c.get("disk", {})
    if disk.get("read_Bps"):
        out["disk_read_bytes_per_s"] = float(disk["read_Bps"])
    return out


def _fit(samples: list[tuple[float, float, float, float]], default: float) -> dict:
    """samples: (size, time_s, t_compute, t_memory). Returns a curve dict."""
    if not samples:
        return {"size": [1], "compute": [default], "memory": [default], "floor_s": 0.0}
    floor = max(0.0, min(t - max(tc, tm) for _, t, tc, tm in samples))
    floor = min(floor, 0.5 * min(t for _, t, _, _ in samples))
    comp: dict[int, list[float]] = defaultdict(list)
    mem: dict[int, list[float]] = defaultdict(list)
    for size, t, tc, tm in samples:
        eff = max(tc, tm) / max(t - floor, 1e-12)
        bucket = int(round(np.log2(max(size, 1.0))))
        (comp if tc >= tm else mem)[bucket].append(min(eff, 1.5))
    buckets = sorted(set(comp) | set(mem))

    def series(d: dict[int, list[float]]) -> list[float]:
        known = sorted(d)
        if not known:
            return [default] * len(buckets)
        values = [float(np.median(d[b])) for b in known]
        return [float(np.interp(b, known, values)) for b in buckets]

    return {"size": [float(2.0**b) for b in buckets], "compute": [round(v, 4) for v in series(comp)],
            "memory": [round(v, 4) for v in series(mem)], "floor_s": float(f"{floor:.3g}")}


def _fit_table(samples: list[tuple[float, float, float, float, float]], default: float) -> dict:
    """samples: (size, size2, time_s, t_compute, t_memory). One efficiency row per distinct size2
    (GEMM: weight bytes of one measured matrix shape), all rows on the same size buckets."""
    by_size2: dict[float, list[tuple[float, float, float, float]]] = defaultdict(list)
    for size, size2, t, tc, tm in samples:
        by_size2[size2].append((size, t, tc, tm))
    if not by_size2:
        return _fit([], default)
    rows = {s2: _fit(rows, default) for s2, rows in sorted(by_size2.items())}
    sizes = sorted({s for r in rows.values() for s in r["size"]})
    x = np.log2(sizes)

    def on_grid(r: dict, key: str) -> list[float]:
        return [round(float(v), 4) for v in np.interp(x, np.log2(r["size"]), r[key])]

    return {"size": sizes, "size2": list(rows), "compute": [on_grid(r, "compute") for r in rows.values()],
            "memory": [on_grid(r, "memory") for r in rows.values()], "floor_s": 0.0}


def fit_profile(folder: Path) -> dict:
    """Calibration mapping fitted from one GPU's kernel measurements."""
    ceil = _ceilings(folder)
    bw, bf16 = ceil["copy_bytes_per_s"], ceil["bf16_flops_per_s"]
    used: dict[str, int] = {}

    # bf16 GEMMs; the weight matrix is n x k (its bytes are the table's second axis)
    gemm = [(float(r["m"]), float(r["n"]) * float(r["k"]) * 2, float(r["time_s"]), float(r["flops"]) / bf16,
             float(r["bytes"]) / bw) for r in _rows(folder / "gemm.csv") if r["dtype"] == "bf16"]
    used["gemm.csv"] = len(gemm)

    decode_rows = _rows(folder / "attention_decode.csv")
    best: dict[tuple, float] = {}
    for r in decode_rows:
        if r["method"] in BF16_DECODE:
            key = (r["batch"], r["q_heads"], r["kv_heads"], r["head_dim"], r["context"])
            best[key] = min(best.get(key, float("inf")), float(r["time_s"]))
    by_key = {(r["batch"], r["q_heads"], r["kv_heads"], r["head_dim"], r["context"]): r
              for r in decode_rows if r["method"] in BF16_DECODE}
    decode = [(float(by_key[k]["bytes_read"]), t, float(by_key[k]["flops"]) / bf16,
               float(by_key[k]["bytes_read"]) / bw) for k, t in best.items()]
    used["attention_decode.csv (bf16 rows)"] = len(decode)

    prefill = [(float(r["prompt"]), float(r["time_s"]), float(r["flops"]) / bf16, 0.0)
               for r in _rows(folder / "attention_prefill.csv")]
    used["attention_prefill.csv"] = len(prefill)

    ew_best: dict[tuple, float] = {}
    for r in _rows(folder / "elementwise.csv"):
        key = (r["op"], r["tokens"], r["hidden"])
        ew_best[key] = min(ew_best.get(key, float("inf")), float(r["time_s"]))
    ew_bytes = {(r["op"], r["tokens"], r["hidden"]): float(r["bytes"]) for r in _rows(folder / "elementwise.csv")}
    elementwise = [(ew_bytes[k], t, 0.0, ew_bytes[k] / bw) for k, t in ew_best.items()]
    used["elementwise.csv (best impl)"] = len(elementwise)

    ops = {"gemm": _fit_table(gemm, 0.8), "attention_decode": _fit(decode, 0.8),
           "attention_prefill": _fit(prefill, 0.6), "elementwise": _fit(elementwise, 0.7)}
    # No multi-GPU measurements on this machine: the all-reduce curve stays at the prior's values.
    prior = yaml.safe_load((Path(__file__).parent / "data" / "calibration_prior.yaml").read_text())
    ops["allreduce"] = prior["ops"]["allreduce"]
    meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
    return {
        "gpu": folder.name, "engine": "reference", "kind": "measured",
        "source": f"kvsim calibrate on validation/results/{folder.name} ({meta.get('gpu_name', '?')}, driver "
                  f"{meta.get('driver', '?')}, torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}, "
                  f"{meta.get('date_utc', '?')})",
        "fit": {"rows_used": used, "note": "allreduce curve from the prior (no multi-GPU data)"},
        "ceilings": ceil, "ops": {k: ops[k] for k in OP_KINDS},
        "step_overhead_s": prior["step_overhead_s"],
    }


def calibrate(gpu: str, results: Path | None = None) -> Path:
    """Fit and write ``validation/results/<gpu>/calibration_reference.yaml``; returns its path."""
    folder = (results or results_dir()) / gpu
    if not folder.is_dir():
        raise KvsimError("no measurements for this GPU", field="gpu", value=gpu, file=str(folder))
    profile = fit_profile(folder)
    out = folder / "calibration_reference.yaml"
    header = "# Fitted by `kvsim calibrate` from kernel measurements; engine_*.csv are NOT used (validation).\n"
    write_atomic(out, header + yaml.safe_dump(profile, sort_keys=False, width=110))
    return out
