"""Fit a calibration profile from kernel-level GPU measurements (``kvsim calibrate``).

Reads, from ``validation/results/<gpu>/``: ``ceilings.json``, ``gemm.csv``, ``attention_decode.csv``,
``attention_prefill.csv``, ``elementwise.csv``, and ``allreduce.csv`` from the same GPU's multi-GPU
folders (``<gpu>-x<N>/``). Writes ``calibration_reference.yaml``. The reference engine's end-to-end
measurements (``engine_*.csv``) are never read here: they are what ``kvsim validate`` judges.

For every kernel row the roofline at efficiency 1 gives ``t_c = FLOPs / peak`` and
``t_m = bytes / copy bandwidth`` (for decode attention, exactly the terms the cost model scales,
from ``CostModel.decode_attention_roofline`` on the layout the row measured); the achieved
efficiency is ``max(t_c, t_m) / (time - floor)``, attributed to compute or memory by whichever bound
is larger. Efficiencies are medians per power-of-two size bucket; the floor is the smallest time
minus its roofline time. Decode kernels are fitted per family (kvsim.cost.model.decode_family) on
half of the measured shapes; the other half is held out for ``kvsim validate``'s speed-ups.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from kvsim import measured
from kvsim.cost.calibration import (
    FP32_GEMM_CURVE,
    GROUPED_MM_CURVE,
    OP_KINDS,
    PRIOR_FILE,
    REFERENCE_SUFFIX,
    Calibration,
    calibration_from_dict,
    results_dir,
)
from kvsim.cost.model import CostModel, decode_family
from kvsim.errors import KvsimError
from kvsim.fileio import load_data_file, write_atomic
from kvsim.spec.hardware import HardwareSpec, load_hardware
from kvsim.spec.quant import EXPERT_GEMMS, FP8_BLOCK_CURVE, MACHETE_CURVE, MXFP4_BITS, MXFP4_HOPPER_CURVE, W4A16_CURVE

Sample = tuple[float, float, float, float]  # size, time_s, t_compute, t_memory
MIN_EFFICIENCY = 1e-4  # a kernel whose time is all floor; keeps the curve strictly positive


def _fit(samples: list[Sample], default: float, floor: float | None = None) -> dict:
    """A 1-D efficiency curve from roofline samples, above a floor: by default the fastest kernel's
    time above its roofline (launch and tail of a tiny kernel)."""
    if not samples:
        return {"size": [1], "compute": [default], "memory": [default], "floor_s": 0.0}
    if floor is None:
        fastest = min(samples, key=lambda smp: smp[1])
        floor = max(0.0, fastest[1] - max(fastest[2], fastest[3]))
    comp: dict[int, list[float]] = defaultdict(list)
    mem: dict[int, list[float]] = defaultdict(list)
    for size, t, tc, tm in samples:
        eff = max(tc, tm) / max(t - floor, 1e-12)
        bucket = int(round(np.log2(max(size, 1.0))))
        (comp if tc >= tm else mem)[bucket].append(float(np.clip(eff, MIN_EFFICIENCY, 1.5)))
    buckets = sorted(set(comp) | set(mem))

    def series(d: dict[int, list[float]]) -> list[float]:
        known = sorted(d)
        if not known:
            return [default] * len(buckets)
        values = [float(np.median(d[b])) for b in known]
        return [float(f"{np.interp(b, known, values):.4g}") for b in buckets]

    return {"size": [float(2.0**b) for b in buckets], "compute": series(comp), "memory": series(mem),
            "floor_s": float(f"{floor:.3g}")}


def _fit_table(samples: list[tuple[float, float, float, float, float]], default: float) -> dict:
    """samples: (size, size2, time_s, t_compute, t_memory). One efficiency row per distinct size2
    (GEMM: weight bytes of one measured matrix shape), all rows on the same size buckets."""
    by_size2: dict[float, list[Sample]] = defaultdict(list)
    for size, size2, t, tc, tm in samples:
        by_size2[size2].append((size, t, tc, tm))
    if not by_size2:
        return _fit([], default)
    # one floor for the table (a row may hold a single sample, whose whole excess its own floor
    # would absorb): the fastest kernel's time above its roofline
    fastest = min((smp for group in by_size2.values() for smp in group), key=lambda smp: smp[1])
    floor = max(0.0, fastest[1] - max(fastest[2], fastest[3]))
    fitted = {s2: _fit(group, default, floor) for s2, group in sorted(by_size2.items())}
    sizes = sorted({s for r in fitted.values() for s in r["size"]})
    x = np.log2(sizes)

    def on_grid(r: dict, key: str) -> list[float]:
        return [float(f"{v:.4g}") for v in np.interp(x, np.log2(r["size"]), r[key])]

    return {"size": sizes, "size2": list(fitted), "compute": [on_grid(r, "compute") for r in fitted.values()],
            "memory": [on_grid(r, "memory") for r in fitted.values()], "floor_s": float(f"{floor:.3g}")}


def unit_calibration(hw: HardwareSpec, ceil: dict) -> Calibration:
    """The measured ceilings at efficiency 1 and no floors: prices a kernel's roofline terms."""
    one = {"size": [1], "compute": [1.0], "memory": [1.0], "floor_s": 0.0}
    return calibration_from_dict({"gpu": hw.name, "kind": "roofline", "ceilings": ceil,
                                  "ops": dict.fromkeys(OP_KINDS, one)}, hw, "<unit>")


def _decode_samples(folder: Path, hw: HardwareSpec, ceil: dict,
                    keep: measured.RowFilter) -> tuple[dict[str, list[tuple]], int]:
    """Roofline samples (bytes per layer, query heads per KV head, time, t_c, t_m) per decode-kernel
    family, from the calibration half of the shapes."""
    unit = unit_calibration(hw, ceil)
    kernel_rows = measured.decode_rows(folder, keep)
    held = measured.held_out_rows(kernel_rows)
    samples: dict[str, list[tuple]] = defaultdict(list)
    engine: dict[str, list[tuple]] = defaultdict(list)  # vLLM's own kernels (measured.VLLM_DECODE_KERNELS)
    used = 0
    for r in kernel_rows:
        if r.layers != 1 or r in held:
            continue  # multi-layer steps validate the layout arithmetic; held-out shapes validate speed-ups
        layout = r.layout()
        cost = CostModel(r.model(), hw, layout, 1, unit)
        t_c, t_m, nbytes = cost.decode_attention_roofline(np.full(r.batch, r.context))
        into = engine if r.method in measured.VLLM_DECODE_KERNELS else samples
        into[decode_family(layout)].append((nbytes, cost.query_group, r.time_s, t_c, t_m))
        used += 1
    # a family vLLM's own kernel was measured for is priced on it; kvsim's stand-in keeps its own curve,
    # which the reference engine runs (Calibration.for_reference_engine)
    for family, own in engine.items():
        if family in samples:
            samples[family + REFERENCE_SUFFIX] = samples.pop(family)
        samples[family] = own
    return samples, used


def _allreduce_fit(folder: Path, hw: HardwareSpec) -> tuple[dict | None, float | None, list[str]]:
    """The all-reduce terms from the GPU's multi-GPU folders (graph-captured, as the engine runs
    them): the ring hop latency (the smallest all-reduce over its 2(tp-1) hops) and the link
    bandwidth efficiency per message size above it (the cost model's terms)."""
    link = hw.nvlink_bandwidth_bytes_per_s or hw.pcie_bandwidth_bytes_per_s
    found: list[tuple[int, float, float]] = []
    sources = []
    for sibling in sorted(folder.parent.glob(f"{folder.name}-x*")):
        rows = [(int(r["tp"]), float(r["bytes"]), float(r["time_s"]))
                for r in measured.rows(sibling / "allreduce.csv") if r.get("mode", "graph") == "graph"]
        found += rows
        if rows:
            sources.append(f"{sibling.name}/allreduce.csv ({len(rows)} rows)")
    if not found:
        return None, None, sources
    curve, latency = ring_fit(found, link)
    return curve, latency, sources


def ring_fit(found: list[tuple[int, float, float]], link_bytes_per_s: float) -> tuple[dict, float]:
    """The ring all-reduce terms from (tp, message bytes, seconds) measurements: the hop latency
    (the smallest all-reduce over its 2(tp-1) hops) and the link bandwidth efficiency per size."""
    latency = min(t / (2 * (tp - 1)) for tp, _, t in found)
    samples = [(msg, t - 2 * (tp - 1) * latency, 0.0, 2.0 * (tp - 1) / tp * msg / link_bytes_per_s)
               for tp, msg, t in found]
    return _fit([s for s in samples if s[1] > 0], 0.5, floor=0.0), latency


def fit_profile(folder: Path, keep: measured.RowFilter = measured.keep_all) -> dict:
    """Calibration mapping fitted from one GPU's kernel measurements (the rows ``keep`` keeps)."""

    def rows(name: str) -> list[dict]:
        return measured.rows(folder / name, keep)

    hw = load_hardware(measured.base_gpu(folder.name))
    ceil = measured.ceilings(folder)
    bw, bf16 = ceil["copy_bytes_per_s"], ceil["bf16_flops_per_s"]
    used: dict[str, int] = {}

    # bf16 GEMMs; the weight matrix is n x k (its bytes are the table's second axis)
    gemm = [(float(r["m"]), float(r["n"]) * float(r["k"]) * 2, float(r["time_s"]), float(r["flops"]) / bf16,
             float(r["bytes"]) / bw) for r in rows("gemm.csv") if r["dtype"] == "bf16"]
    used["gemm.csv (bf16)"] = len(gemm)
    # quantized-weight GEMM paths (kvsim.spec.quant.weight_kernel): fp8 W8A8 against the FP8 ceiling; weight
    # bytes as stored
    fp8 = ceil.get("fp8_flops_per_s")
    fp32 = hw.peak_flops_per_s.get("fp32")  # datasheet: no fp32 ceiling is measured
    # FP8 W8A8: vLLM's own kernel where a run measured it (validation/vllm_gemm.py: CUTLASS cutlass_scaled_mm
    # with per-tensor scales, dtype fp8_cutlass), else torch._scaled_mm (cuBLAS, dtype fp8), which vLLM does not
    # run on Hopper. On the H100 the two agree within 5% in median at most row counts, CUTLASS up to 1.6x
    # slower at 192-384 rows (run h100-call26); its per-token x per-channel rows (fp8_cutlass_rowwise,
    # compressed-tensors FP8-dynamic) run 0-5% slower than per-tensor and are not fitted apart.
    fp8_dtype = "fp8_cutlass" if any(r["dtype"] == "fp8_cutlass" for r in rows("gemm.csv")) else "fp8"
    quantized = {
        "gemm.fp8": [(float(r["m"]), float(r["n"]) * float(r["k"]), float(r["time_s"]), float(r["flops"]) / fp8,
                      float(r["bytes"]) / bw)
                     for r in rows("gemm.csv") if r["dtype"] == fp8_dtype and fp8],
        # block FP8 (validation/vllm_gemm.py: cutlass_scaled_mm with 128 x 128 weight-block and 1 x 128
        # activation-group scales, rows padded to 4 as vLLM's padded_cutlass does) against the FP8 ceiling,
        # weights as stored (their fp32 block scales are 1/4096 of them)
        FP8_BLOCK_CURVE: [(float(r["m"]), float(r["n"]) * float(r["k"]), float(r["time_s"]), float(r["flops"]) / fp8,
                           float(r["bytes"]) / bw)
                          for r in rows("gemm.csv") if r["dtype"] == "fp8_cutlass_block" and fp8],
        # fp32 GEMMs (routers vLLM runs in fp32, validation/gemm.py --part fp32_router) against the datasheet
        # FP32 peak (no fp32 ceiling is measured; the cost model prices them at the same peak)
        FP32_GEMM_CURVE: [(float(r["m"]), float(r["n"]) * float(r["k"]) * 4, float(r["time_s"]),
                           float(r["flops"]) / fp32, float(r["bytes"]) / bw)
                          for r in rows("gemm.csv") if r["dtype"] == "fp32" and fp32],
        # W4A16 in Marlin (validation/gemm.py --part marlin: IST-DASLab's kernel, the design of vLLM's Marlin
        # kernels, which run AWQ checkpoints on every GPU and GPTQ / compressed-tensors ones before Hopper)
        # against the bf16 ceiling (its fp16 MMA has the same peak), weights as it stores them. gemm.csv's
        # other W4A16 rows time kernels vLLM does not run and are not fitted: torch's tinygemm (dtype w4a16)
        # levels off at 29.5 TFLOP/s on an H200, so a 1k-token gpt-oss-120b prefill cost 259 ms there when it
        # was fitted; kvsim's Triton stand-in (dtype w4a16_dq, validation/kernels/w4a16.py) streams the weights
        # at 35-45% of the H100's read ceiling at 1-16 rows (run h100-call8). A profile without Marlin rows
        # keeps the labelled prior (kvsim/cost/model.py).
        # (a row's bytes: the weights as stored, then the fp16 rows in and out)
        W4A16_CURVE: [(float(r["m"]), float(r["bytes"]) - 2 * float(r["m"]) * (float(r["n"]) + float(r["k"])),
                       float(r["time_s"]), float(r["flops"]) / bf16, float(r["bytes"]) / bw)
                      for r in rows("gemm.csv") if r["dtype"] == "w4a16_marlin"],
        # W4A16 in Machete (validation/vllm_gemm.py: vLLM's CUTLASS mixed-input kernel, what it runs for GPTQ and
        # compressed-tensors 4-bit checkpoints on compute capability 9.0, kvsim.spec.quant.weight_kernel) against
        # the bf16 ceiling, weights as stored (4 bits and a bf16 scale per 128): 1.2-1.3x Marlin's time at
        # 1-16 rows, about half of it from 512 rows on (run h100-call26)
        MACHETE_CURVE: [(float(r["m"]), float(r["bytes"]) - 2 * float(r["m"]) * (float(r["n"]) + float(r["k"])),
                         float(r["time_s"]), float(r["flops"]) / bf16, float(r["bytes"]) / bw)
                        for r in rows("gemm.csv") if r["dtype"] == "w4a16_machete"],
    }

    # routed experts: rows per touched expert x the touched experts' weight bytes as stored (scales
    # included). 16-bit: the fused-MoE kernel vLLM runs (fused_moe.csv) and torch._grouped_mm, which the
    # reference engine runs (gemm_grouped.csv), against the bf16 ceiling; FP8 per-tensor and 128x128
    # blocks through the fused-MoE kernel against the FP8 ceiling.
    def experts(r: dict, elem_bytes: float, peak: float) -> tuple[float, float, float, float, float]:
        return (float(r["tokens"]) * float(r["top_k"]) / float(r["active_experts"]),
                float(r["active_experts"]) * float(r["n"]) * float(r["k"]) * elem_bytes, float(r["time_s"]),
                float(r["flops"]) / peak, float(r["bytes"]) / bw)

    grouped_mm = [experts(r, 2, bf16) for r in rows("gemm_grouped.csv")]
    used["gemm_grouped.csv"] = len(grouped_mm)
    moe = rows("fused_moe.csv")  # tiling comparisons (params src=...) are not read (measured.rows)
    grouped = {"gemm_grouped": [experts(r, 2, bf16) for r in moe if r["mode"] == "bf16"]}
    grouped.update({f"gemm_grouped.{mode}": [experts(r, 1, fp8) for r in moe if r["mode"] == mode]
                    if fp8 else [] for mode in ("fp8", "fp8_block")})
    # MXFP4 experts in vLLM's own Hopper kernel (validation/oai_moe.py: triton_kernels matmul_ogs, weights
    # upcast to bf16 in the kernel) against the bf16 ceiling, weights at MXFP4's bits with their scales;
    # gate/up (layer .w13) and down (.w2) apart
    for expert_gemm, label in zip(EXPERT_GEMMS, (".w13", ".w2"), strict=True):
        grouped[f"{MXFP4_HOPPER_CURVE}.{expert_gemm}"] = [experts(r, MXFP4_BITS / 8, bf16) for r in moe
                                                    if r["mode"] == "mxfp4" and r["layer"].endswith(label)]

    decode, used["attention_decode.csv (calibration shapes)"] = _decode_samples(folder, hw, ceil, keep)

    # prefill attention: vLLM's own FlashAttention 3 where a run measured it (validation/vllm_prefill.py, method
    # vllm_fa3); torch's SDPA, which the reference engine runs, is then attention_prefill.reference
    # (Calibration.for_reference_engine). On the H100 the two agree within a few percent from 1k tokens on,
    # FA3 slower below 512 (run h100-call27)
    by_kernel: dict[str, list[tuple]] = defaultdict(list)
    for r in rows("attention_prefill.csv"):
        by_kernel[r["method"]].append((float(r["prompt"]), float(r["time_s"]), float(r["flops"]) / bf16, 0.0))
    prefill = by_kernel.pop("vllm_fa3", []) or by_kernel.pop("sdpa", [])
    prefill_reference = by_kernel.pop("sdpa", [])
    if by_kernel:
        raise KvsimError(f"unknown methods {', '.join(sorted(by_kernel))} (known: sdpa, vllm_fa3)", field="method",
                         value=sorted(by_kernel), file=str(folder / "attention_prefill.csv"))
    used["attention_prefill.csv"] = len(prefill)
    if prefill_reference:
        used["attention_prefill.csv (sdpa, the stand-in)"] = len(prefill_reference)

    ew_best: dict[tuple, tuple[float, float]] = {}
    for r in rows("elementwise.csv"):
        key = (r["op"], r["tokens"], r["hidden"])
        t = float(r["time_s"])
        if key not in ew_best or t < ew_best[key][0]:
            ew_best[key] = (t, float(r["bytes"]))
    elementwise = [(b, t, 0.0, b / bw) for t, b in ew_best.values()]
    used["elementwise.csv (fastest kernel per shape)"] = len(elementwise)

    ops = {"gemm": _fit_table(gemm, 0.8), "attention_decode": _fit_table(decode.pop("dense", []), 0.8),
           # the dense stand-in, where vLLM's FlashAttention 3 decode was measured (_decode_samples)
           **({"attention_decode" + REFERENCE_SUFFIX: _fit_table(decode.pop("dense" + REFERENCE_SUFFIX), 0.8)}
              if "dense" + REFERENCE_SUFFIX in decode else {}),
           "attention_prefill": _fit(prefill, 0.6), "elementwise": _fit(elementwise, 0.7)}
    if prefill_reference:
        ops["attention_prefill" + REFERENCE_SUFFIX] = _fit(prefill_reference, 0.6)
    ops.update({f"attention_decode.{family}": _fit_table(s, 0.8) for family, s in sorted(decode.items())})
    if grouped_mm:
        ops[GROUPED_MM_CURVE] = _fit_table(grouped_mm, 0.8)
    for name, samples in quantized.items():
        if samples or name not in (FP32_GEMM_CURVE, W4A16_CURVE, MACHETE_CURVE, FP8_BLOCK_CURVE):  # where measured
            used[f"gemm.csv ({fp8_dtype if name == 'gemm.fp8' else name.split('.', 1)[1]})"] = len(samples)
        if samples:
            ops[name] = _fit_table(samples, 0.8)
    for name, samples in grouped.items():
        used[f"fused_moe.csv ({name.split('.', 1)[1] if '.' in name else 'bf16'})"] = len(samples)
        if samples:
            ops[name] = _fit_table(samples, 0.8)
    prior = load_data_file(PRIOR_FILE)
    allreduce, latency, sources = _allreduce_fit(folder, hw)
    ops["allreduce"] = allreduce or prior["ops"]["allreduce"]
    if latency is not None:
        ceil["link_latency_s"] = float(f"{latency:.4g}")
    note = ("allreduce from " + ", ".join(sources)) if sources else "allreduce curve from the prior (no multi-GPU data)"
    meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
    return {
        "gpu": folder.name, "engine": "reference", "kind": "measured",
        "source": f"kvsim calibrate on validation/results/{folder.name} ({meta.get('gpu_name', '?')}, driver "
                  f"{meta.get('driver', '?')}, torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}, "
                  f"{meta.get('date_utc', '?')})",
        "fit": {"rows_used": used, "note": note},
        "ceilings": ceil, "ops": ops,
        "step_overhead_s": prior["step_overhead_s"],
    }


# Fits that have no prior to fall back on: without their rows the profile would be invented.
REQUIRED_FITS = ("gemm.csv (bf16)", "attention_decode.csv (calibration shapes)", "attention_prefill.csv",
                 "elementwise.csv (fastest kernel per shape)")


def calibrate(gpu: str, results: Path | None = None) -> Path:
    """Fit and write ``validation/results/<gpu>/calibration_reference.yaml``; returns its path."""
    folder = (results or results_dir()) / gpu
    if not folder.is_dir():
        raise KvsimError("no measurements for this GPU", field="gpu", value=gpu, file=str(folder))
    try:
        profile = fit_profile(folder)
    except (KeyError, ValueError, TypeError, ZeroDivisionError, json.JSONDecodeError, UnicodeDecodeError) as err:
        # The measurement files are written by validation/run_all.py; anything else is damage.
        raise KvsimError(f"damaged measurement files ({type(err).__name__}: {err})", field="gpu", value=gpu,
                         file=str(folder)) from None
    empty = [name for name in REQUIRED_FITS if not profile["fit"]["rows_used"][name]]
    if empty:
        raise KvsimError(f"no measured rows in {', '.join(empty)}: nothing to fit, no profile written",
                         field="gpu", value=gpu, file=str(folder))
    out = folder / "calibration_reference.yaml"
    header = "# Fitted by `kvsim calibrate` from kernel measurements; engine_*.csv are NOT used (validation).\n"
    write_atomic(out, header + yaml.safe_dump(profile, sort_keys=False, width=110))
    return out
