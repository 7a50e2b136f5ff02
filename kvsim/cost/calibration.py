"""Calibration profiles: per GPU and engine, the ceilings and efficiency curves the roofline uses.

File format (YAML or JSON), documented in docs/calibration.md:

    gpu: h100-sxm                 # catalogue name
    engine: reference             # reference (validation/engine.py) or vllm
    kind: measured                # measured | imported | borrowed | prior
    source: validation/results/h100-sxm/... (what it was fitted on)
    engine_version: "0.24.0"      # imported profiles: the serving engine's version the kernels ran in
    imported: {...}               # imported profiles: database, package version, system, tables used
    ceilings:                     # measured on the same machine; missing ones fall back to datasheet
      copy_bytes_per_s: 3.0e12
      bf16_flops_per_s: 7.9e14
      fp8_flops_per_s: 1.3e15
      h2d_bytes_per_s: 5.0e10
      disk_read_bytes_per_s: 2.0e9
      link_latency_s: 4.3e-6      # one all-reduce ring hop (measured: smallest all-reduce / 2(tp-1))
    ops:                          # efficiency vs log2(size), relative to the ceilings above
      gemm:              {size: [1, 16, 4096], size2: [1.0e+6, 1.0e+8],   # tokens x weight bytes
                          compute: [[...], [...]], memory: [[...], [...]], floor_s: 0.0}
      gemm.fp8:          {...}    # optional: GEMMs of FP8 weights (else ``gemm``), same axes
      attention_decode:  {...}    # size: KV bytes read by one kernel (the dense bf16/fp16 kernel),
                                  # size2: query heads per KV head (GQA group; MLA: all heads)
      attention_decode.kivi.k2v2: {...}  # optional, per decode kernel (kvsim.cost.model.decode_family):
                                    # a method's own kernel; one without a curve uses attention_decode
      attention_prefill: {...}    # size: prompt tokens
      elementwise:       {...}    # size: bytes moved
      allreduce:         {...}    # size: message bytes (memory = fraction of link bandwidth)
      gemm_grouped:      {...}    # optional: routed experts' grouped GEMM, size = rows per touched
                                  # expert, size2 = touched experts' weight bytes (else ``gemm``)
      gemm_grouped.fp8_block: {...}  # optional: the same for FP8 experts in vLLM's fused-MoE kernel,
                                  # gemm_grouped.fp8 (per-tensor scales) or .fp8_block (128x128 blocks);
                                  # without one, FP8 experts use gemm.fp8 and the run says so
      gemm.fp8:          {...}    # optional, per quantized-weight GEMM path (kvsim.spec.quant.weight_kernel):
                                  # gemm.fp8, gemm.int8 (W8A8 at that peak), gemm.w8a16, gemm.w4a16
                                  # (dequantizing kernels at the bf16 peak); without one, the bf16 curve
                                  # is used and the run labels it a prior
    # A curve with ``size2`` is a table: one row of efficiencies (over ``size``) per ``size2`` value,
    # interpolated bilinearly in log2 of both. GEMM efficiency depends on the token count AND on the
    # weight matrix (a 1 MB router streams far below HBM bandwidth; a 100 MB projection near it).
    step_overhead_s: 2.0e-5       # per engine step (scheduling, launch of the step's graph)

Looked up by GPU name, in this order (docs/calibration.md):

1. measured: ``validation/results/<gpu>/calibration_reference.yaml`` (kvsim's own kernel runs);
2. imported for the scenario's engine kind: ``kvsim/data/calibration/<gpu>.<engine>.yaml`` (shipped),
   then ``<gpu>.<engine>.yaml`` in the user directory (``$KVSIM_CALIBRATION_DIR``, default
   ``$XDG_DATA_HOME/kvsim/calibration``), where ``kvsim calibrate --from aiconfigurator`` writes;
3. borrowed: the profile of a measured (else imported) GPU of the same family, ceilings scaled by
   datasheet ratios;
4. the shipped prior (kvsim/data/calibration_prior.yaml), labelled so.

An imported profile has no curve for kvsim's KV-method kernels (KIVI, eviction, sharing...): each is
derived from the measured profile (:func:`_derived_method_curves`) and labelled so.

An installed wheel carries a copy of each measured profile under ``kvsim/_catalog/calibration/``,
found first.
"""

from __future__ import annotations

import bisect
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache, cached_property
from pathlib import Path
from types import MappingProxyType
from typing import overload

import numpy as np

from kvsim.errors import KvsimError
from kvsim.fileio import load_data_file, read_yaml_file
from kvsim.spec.hardware import HardwareSpec, hardware_names, load_hardware

PRIOR_FILE = "kvsim/data/calibration_prior.yaml"  # the prior every curve falls back to
OP_KINDS = ("gemm", "attention_decode", "attention_prefill", "elementwise", "allreduce")
# Routed experts in 16 bits: ``gemm_grouped`` is the kernel vLLM runs (its Triton fused-MoE algorithm,
# validation/kernels/fused_moe.py, fused_moe.csv); torch._grouped_mm, which the reference engine runs
# (validation/engine_model.py _moe; gemm_grouped.csv), is its own curve, priced only when judging that
# engine (Calibration.for_reference_engine).
GROUPED_MM_CURVE = "gemm_grouped.grouped_mm"
# A decode-attention curve fitted from kvsim's stand-in kernel where the profile also measured vLLM's own
# kernel of the family (kvsim.measured.VLLM_DECODE_KERNELS): ``attention_decode.mla`` prices vLLM's
# FlashMLA, ``attention_decode.mla.reference`` the reference engine's Triton kernel
# (Calibration.for_reference_engine); likewise FlashAttention 3 for ``attention_decode``,
# ``attention_decode.fp8`` and ``attention_prefill``.
REFERENCE_SUFFIX = ".reference"
# fp32 GEMMs (the routers vLLM runs in fp32), at the FP32 peak: validation/gemm.py --part fp32_router
FP32_GEMM_CURVE = "gemm.fp32"
# Curves the cost model reads as tables over a second axis (weight bytes; query heads per KV head).
TABLE_OPS = ("gemm", "attention_decode")
# A profile may calibrate each decode-attention kernel separately, keyed by the method that decides it
# (kvsim.cost.model.decode_family): ``attention_decode.<method name>`` or ``attention_decode.mla``.


def is_engine_kernel(ops: Mapping[str, object], curve: str) -> bool:
    """Whether decode curve ``curve`` of a profile's ``ops`` prices vLLM's own kernel: the stand-in of its
    family was kept apart as ``*.reference`` (kvsim calibrate does so where vLLM's kernel was measured). A
    cache-precision variant only vLLM's kernel measured (attention_decode.mla.k8v8) has no stand-in of its
    own, so its family's curve (attention_decode.mla) decides."""
    family = ".".join(curve.split(".", 2)[:2])
    return any(c + REFERENCE_SUFFIX in ops for c in (curve, family))


@dataclass(frozen=True)
class Curve:
    """Efficiency (0..1.5] against log2(size), linearly interpolated and clamped at the ends; with
    ``log2_size2`` a table (one row per size2 value), interpolated bilinearly."""

    log2_size: tuple[float, ...]
    compute: tuple  # floats, or one tuple of floats per size2 value
    memory: tuple
    floor_s: float
    log2_size2: tuple[float, ...] = ()

    @overload
    def eff(self, size: float) -> tuple[float, float]: ...
    @overload
    def eff(self, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...  # (a 0-d array gives floats)

    def eff(self, size: float | np.ndarray) -> tuple[float, float] | tuple[np.ndarray, np.ndarray]:
        """Efficiencies of a 1-D curve (a table is read with ``eff_many`` or sliced with ``at``)."""
        if np.ndim(size) == 0:  # the simulator's common case: plain floats, no numpy round trip
            return self._eff_scalar(float(size))
        xs, comp, mem = self._arrays
        x = np.log2(np.maximum(size, 1.0))
        return np.interp(x, xs, comp), np.interp(x, xs, mem)

    def _eff_scalar(self, size: float) -> tuple[float, float]:
        xs = self.log2_size
        x = math.log2(max(size, 1.0))
        if x <= xs[0]:
            return self.compute[0], self.memory[0]
        if x >= xs[-1]:
            return self.compute[-1], self.memory[-1]
        i = bisect.bisect_right(xs, x) - 1
        w = (x - xs[i]) / (xs[i + 1] - xs[i])
        return (self.compute[i] + w * (self.compute[i + 1] - self.compute[i]),
                self.memory[i] + w * (self.memory[i + 1] - self.memory[i]))

    @cached_property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.asarray(self.log2_size), np.asarray(self.compute, dtype=float), np.asarray(self.memory, dtype=float)

    def at(self, size2: float) -> Curve:
        """The 1-D curve of a table at one ``size2`` (rows blended as ``eff`` does); a 1-D curve is
        returned as it is. A model prices one GQA group, so it slices its decode table once."""
        if not self.log2_size2:
            return self
        xs = np.asarray([2.0**x for x in self.log2_size])
        comp, mem = self.eff_many(xs, np.full(xs.shape, size2))
        return Curve(self.log2_size, tuple(float(v) for v in comp), tuple(float(v) for v in mem), self.floor_s)

    def eff_many(self, size: np.ndarray, size2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``eff`` for arrays of (size, size2) pairs in one vectorized pass (the cost model prices
        every GEMM of a step at once)."""
        if not self.log2_size2:
            return self.eff(np.asarray(size, dtype=float))
        x = np.log2(np.maximum(size, 1.0))
        y = np.log2(np.maximum(size2, 1.0))
        ix, wx = _bracket(np.asarray(self.log2_size), x)
        iy, wy = _bracket(np.asarray(self.log2_size2), y)
        out = []
        for table in self._tables:
            lo = table[iy, ix] * (1 - wx) + table[iy, ix + 1] * wx
            hi = table[iy + 1, ix] * (1 - wx) + table[iy + 1, ix + 1] * wx
            out.append(lo * (1 - wy) + hi * wy)
        return out[0], out[1]

    @cached_property
    def _tables(self) -> tuple[np.ndarray, np.ndarray]:
        """compute and memory tables padded to at least 2 x 2 (a single row or column repeated)."""
        def pad(rows: tuple) -> np.ndarray:
            t = np.asarray(rows, dtype=float)
            return np.repeat(np.repeat(t, 2 if t.shape[0] == 1 else 1, 0), 2 if t.shape[1] == 1 else 1, 1)

        return pad(self.compute), pad(self.memory)


def _bracket(grid: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left grid index and weight of each ``x`` for linear interpolation, clamped at the ends."""
    if len(grid) == 1:
        return np.zeros(np.shape(x), dtype=np.int64), np.zeros(np.shape(x))
    x = np.clip(x, grid[0], grid[-1])
    i = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, len(grid) - 2)
    return i, (x - grid[i]) / (grid[i + 1] - grid[i])


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float
    flops_per_s: MappingProxyType  # dtype -> FLOP/s (bf16, fp8, fp32)
    h2d_bytes_per_s: float
    disk_read_bytes_per_s: float
    link_latency_s: float  # one ring hop of a tensor-parallel all-reduce


@dataclass(frozen=True)
class Calibration:
    gpu: str
    engine: str
    kind: str  # measured | prior | borrowed | roofline
    source: str
    ceilings: Ceilings
    ops: MappingProxyType  # op kind -> Curve
    step_overhead_s: float
    note: str = ""
    engine_version: str = ""  # imported: the engine version the database's kernels ran in
    # op curve -> how it was derived (not fitted): an imported profile's KV-method kernels
    derived: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    database: str = ""  # imported: the database and its package version

    def for_reference_engine(self) -> Calibration:
        """This profile as the reference engine runs its kernels: 16-bit routed experts on
        torch._grouped_mm and decode attention on kvsim's stand-in kernels (``*.reference`` curves) where
        the profile measured them (else unchanged)."""
        swaps = {k.removesuffix(REFERENCE_SUFFIX): c for k, c in self.ops.items() if k.endswith(REFERENCE_SUFFIX)}
        if GROUPED_MM_CURVE in self.ops:
            swaps["gemm_grouped"] = self.ops[GROUPED_MM_CURVE]
        return replace(self, ops=MappingProxyType({**self.ops, **swaps})) if swaps else self

    @property
    def label(self) -> str:
        """Where the numbers come from, in a few words (summaries, sweep rows, search rankings)."""
        if self.kind == "measured":
            return f"measured ({self.gpu}, kvsim validation runs)"
        if self.kind == "imported":
            return f"imported ({self.database}, {self.engine} {self.engine_version})"
        if self.kind == "borrowed":
            return self.note.split(";")[0]
        return self.kind


def _curve(data: dict, where: str) -> Curve:
    try:
        size = [float(v) for v in data["size"]]
        size2 = [float(v) for v in data.get("size2", [])]
        if size2:  # one row per size2 value
            rows_c = [[float(v) for v in row] for row in data["compute"]]
            rows_m = [[float(v) for v in row] for row in data["memory"]]
        else:
            rows_c, rows_m = [[float(v) for v in data["compute"]]], [[float(v) for v in data["memory"]]]
        floor = float(data.get("floor_s", 0.0))
    except (KeyError, TypeError, ValueError) as err:
        raise KvsimError(f"needs size, compute, memory lists ({err})", field=where, value=data) from None
    if (not size or len(rows_c) != max(1, len(size2)) or len(rows_m) != len(rows_c)
            or any(len(r) != len(size) for r in rows_c + rows_m)):
        raise KvsimError("compute and memory need one value per size (one row per size2)", field=where,
                         value=data)
    flat = [v for r in rows_c + rows_m for v in r]
    if any(not 0 < v <= 1.5 for v in flat) or any(not 0 < s < math.inf for s in size + size2) \
            or not 0 <= floor < math.inf:
        raise KvsimError("efficiencies must be in (0, 1.5], sizes positive, floor_s >= 0", field=where, value=data)
    order = np.argsort(size)
    order2 = np.argsort(size2) if size2 else np.array([0])

    def sort(rows: list[list[float]]) -> list[tuple[float, ...]]:
        return [tuple(rows[k][i] for i in order) for k in order2]

    comp_s, mem_s = sort(rows_c), sort(rows_m)
    return Curve(tuple(float(np.log2(size[i])) for i in order),
                 tuple(comp_s) if size2 else comp_s[0], tuple(mem_s) if size2 else mem_s[0], floor,
                 tuple(float(np.log2(size2[k])) for k in order2) if size2 else ())


def calibration_from_dict(data: dict, hw: HardwareSpec, file: str) -> Calibration:
    known = {"gpu", "engine", "kind", "source", "ceilings", "ops", "step_overhead_s", "note", "fit",
             "engine_version", "imported"}
    for key in data:
        if key not in known:
            raise KvsimError("unknown key", field=key, value=data[key], file=file)
    c = data.get("ceilings") or {}
    if not isinstance(c, dict):
        raise KvsimError("expected a mapping of ceilings", field="ceilings", value=c, file=file)
    peaks = {k: v for k, v in hw.peak_flops_per_s.items() if v}

    def ceiling(key: str, default: float) -> float:
        try:
            value = float(c.get(key, default))
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise KvsimError("must be a finite number >= 0", field=f"ceilings.{key}", value=c.get(key), file=file)
        return value

    flops = {"bf16": ceiling("bf16_flops_per_s", peaks.get("bf16", 0.0)),
             "fp8": ceiling("fp8_flops_per_s", peaks.get("fp8", peaks.get("bf16", 0.0))),
             "int8": ceiling("int8_flops_per_s", peaks.get("int8", peaks.get("bf16", 0.0))),
             "fp32": ceiling("fp32_flops_per_s", peaks.get("fp32", 0.0))}
    ceilings = Ceilings(ceiling("copy_bytes_per_s", hw.hbm_bandwidth_bytes_per_s),
                        MappingProxyType(flops),
                        ceiling("h2d_bytes_per_s", hw.pcie_bandwidth_bytes_per_s),
                        ceiling("disk_read_bytes_per_s", hw.host.nvme_read_bytes_per_s),
                        ceiling("link_latency_s", hw.interconnect_latency_s))
    ops = data.get("ops") or {}
    if not isinstance(ops, dict):
        raise KvsimError("expected a mapping of op curves", field="ops", value=ops, file=file)
    missing = [k for k in OP_KINDS if k not in ops]
    if missing:
        raise KvsimError(f"missing op curves: {', '.join(missing)}", field="ops", value=sorted(ops), file=file)
    from kvsim.kv import METHODS  # noqa: PLC0415 - kvsim.kv imports nothing from here; avoids a cycle at load
    from kvsim.spec.quant import GEMM_PATH_CURVES, GROUPED_PATH_CURVES  # noqa: PLC0415 - with the import above

    known_ops = (set(OP_KINDS) | {f"attention_decode.{f}" for f in (*METHODS, "mla")}
                 | {"gemm_grouped", GROUPED_MM_CURVE, FP32_GEMM_CURVE} | set(GEMM_PATH_CURVES)
                 | set(GROUPED_PATH_CURVES))
    for key in ops:
        base = key.removesuffix(REFERENCE_SUFFIX)
        if base not in known_ops and re.sub(r"\.k[\d.]+v[\d.]+$", "", base) not in known_ops:
            raise KvsimError(f"unknown op curve (known: {', '.join(sorted(known_ops))})", field=f"ops.{key}",
                             value=key, file=file)
    for key, curve in ops.items():
        if isinstance(curve, dict) and curve.get("size2") and not key.startswith(TABLE_OPS):
            raise KvsimError(f"only {', '.join(TABLE_OPS)} curves may be tables (size2)", field=f"ops.{key}.size2",
                             value=curve["size2"], file=file)
    try:
        curves = {k: _curve(v, f"ops.{k}") for k, v in ops.items()}
    except KvsimError as err:
        raise KvsimError(str(err), file=file) from None
    overhead = data.get("step_overhead_s", 0.0)
    if isinstance(overhead, bool) or not isinstance(overhead, (int, float)) or not 0 <= overhead < math.inf:
        raise KvsimError("must be a finite number >= 0", field="step_overhead_s", value=overhead, file=file)
    return Calibration(str(data.get("gpu", hw.name)), str(data.get("engine", "reference")),
                       str(data.get("kind", "measured")), str(data.get("source", file)), ceilings,
                       MappingProxyType(curves), float(overhead),
                       str(data.get("note", "")), str(data.get("engine_version", "")),
                       database=_database(data.get("imported"), file))


def _database(imported: object, file: str) -> str:
    if imported is None:
        return ""
    if not isinstance(imported, dict) or not {"database", "package_version"} <= set(imported):
        raise KvsimError("expected a mapping with database and package_version", field="imported", value=imported,
                         file=file)
    return f"{imported['database']} {imported['package_version']}"


def _read(path: Path) -> dict:
    if not path.is_file():
        raise KvsimError("no such calibration profile", field="--calibration", value=str(path))
    return read_yaml_file(path, "a calibration profile (YAML or JSON)")


_CHECKOUT_RESULTS = Path(__file__).resolve().parents[2] / "validation" / "results"
# Fitted profiles copied into an installed wheel (pyproject.toml force-include); absent in a checkout.
_PACKAGED_PROFILES = Path(__file__).resolve().parents[1] / "_catalog" / "calibration"
# Engine kinds whose kernel databases a profile can be imported from (``engine.kind``).
ENGINE_KINDS = ("vllm", "sglang", "trtllm")
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "data" / "calibration"


def results_dir() -> Path:
    """validation/results of the checkout: the kernel measurements ``kvsim calibrate``, ``validate``
    and ``plot validation`` read. An installed package ships only the fitted profiles, so without a
    checkout this is one line saying so."""
    if not _CHECKOUT_RESULTS.is_dir():
        raise KvsimError("needs a checkout's validation/results (an installed kvsim ships only the fitted "
                         "calibration profiles); name a results folder with --results (kvsim report, plot: "
                         "--validation-results)")
    return _CHECKOUT_RESULTS


def profile_path(gpu: str, engine: str) -> Path | None:
    """The fitted profile of ``gpu`` for ``engine``: the wheel's packaged copy first, else the
    checkout's (where `kvsim calibrate` writes it); None when neither exists."""
    for root in (_PACKAGED_PROFILES, _CHECKOUT_RESULTS):
        path = root / gpu / f"calibration_{engine}.yaml"
        if path.is_file():
            return path
    return None


def user_calibration_dir() -> Path:
    """Where imported profiles are written and looked up after the shipped ones:
    ``$KVSIM_CALIBRATION_DIR``, else ``$XDG_DATA_HOME/kvsim/calibration`` (``~/.local/share``)."""
    explicit = os.environ.get("KVSIM_CALIBRATION_DIR")
    if explicit:
        return Path(explicit).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home).expanduser() / "kvsim" / "calibration"


def imported_profile_path(gpu: str, engine: str) -> Path | None:
    """The imported profile of ``gpu`` for engine kind ``engine``: shipped first, then the user's."""
    for root in (SHIPPED_DIR, user_calibration_dir()):
        path = root / f"{gpu}.{engine}.yaml"
        if path.is_file():
            return path
    return None


def roofline(hw: HardwareSpec) -> Calibration:
    """Pure roofline: datasheet peaks, efficiency 1, no floors (``--calibration none``)."""
    one = {"size": [1], "compute": [1.0], "memory": [1.0], "floor_s": 0.0}
    data = {"gpu": hw.name, "engine": "roofline", "kind": "roofline", "source": "datasheet peaks",
            "ops": dict.fromkeys(OP_KINDS, one)}
    return calibration_from_dict(data, hw, "<roofline>")


@cache
def _prior_data() -> dict:
    return load_data_file(PRIOR_FILE)


def borrow_profile(cal: Calibration, donor: HardwareSpec, hw: HardwareSpec) -> Calibration:
    """A donor GPU's profile moved to ``hw``: ceilings scaled by datasheet ratios."""
    def ratio(a: float | None, b: float | None) -> float:
        return (a / b) if a and b else 1.0

    c = cal.ceilings
    flops = {k: v * ratio(hw.peak_flops_per_s.get(k), donor.peak_flops_per_s.get(k)) for k, v in c.flops_per_s.items()}
    ceilings = Ceilings(c.copy_bytes_per_s * ratio(hw.hbm_bandwidth_bytes_per_s, donor.hbm_bandwidth_bytes_per_s),
                        MappingProxyType(flops),
                        c.h2d_bytes_per_s * ratio(hw.pcie_bandwidth_bytes_per_s, donor.pcie_bandwidth_bytes_per_s),
                        hw.host.nvme_read_bytes_per_s,
                        c.link_latency_s * ratio(hw.interconnect_latency_s, donor.interconnect_latency_s))
    what = f"{cal.kind}, {cal.engine} {cal.engine_version}".strip()
    return replace(cal, gpu=hw.name, kind="borrowed", ceilings=ceilings,
                   note=f"borrowed from {donor.name} ({what}); ceilings scaled by datasheet ratios")


def _measured(gpu: str) -> Calibration | None:
    path = profile_path(gpu, "reference")
    return _load_measured(path, gpu) if path is not None else None


@cache
def _load_measured(path: Path, gpu: str) -> Calibration:
    return calibration_from_dict(_read(path), load_hardware(gpu), str(path))


def _measured_gpus() -> list[str]:
    return [name for name in hardware_names() if profile_path(name, "reference") is not None]


def _derived_method_curves(cal: Calibration) -> Calibration:
    """An imported profile's KV-method decode kernels (the databases have none): each method kernel's
    measured efficiency relative to the bf16 decode kernel, on a GPU where kvsim measured both,
    applied point by point to the imported bf16 decode curve (same sizes, same GQA rows)."""
    donors = [c for c in map(_measured, _measured_gpus()) if c is not None]
    if not donors:
        return cal
    donor = donors[0]
    # each method kernel's efficiency relative to the bf16 kernel of its own kind: vLLM's FlashAttention 3 for
    # vLLM's kernels (FP8 FlashAttention 3, FlashMLA), kvsim's Triton bf16 kernel (attention_decode.reference
    # where vLLM's dense kernel was measured) for kvsim's Triton method kernels
    dense = cal.ops["attention_decode"]
    stand_in = donor.ops.get("attention_decode" + REFERENCE_SUFFIX, donor.ops["attention_decode"])
    xs = np.exp2(np.asarray(dense.log2_size))
    ys = np.exp2(np.asarray(dense.log2_size2)) if dense.log2_size2 else np.array([1.0])
    gx, gy = np.meshgrid(xs, ys)
    ops, derived = dict(cal.ops), dict(cal.derived)
    for key, curve in donor.ops.items():
        if not key.startswith("attention_decode.") or key in ops or key.endswith(REFERENCE_SUFFIX):
            continue  # (a stand-in kept for the reference engine is no method kernel)
        base = donor.ops["attention_decode"] if is_engine_kernel(donor.ops, key) else stand_in
        mc, mm = (np.asarray(v).reshape(gx.shape) for v in curve.eff_many(gx.ravel(), gy.ravel()))
        bc, bm = (np.asarray(v).reshape(gx.shape) for v in base.eff_many(gx.ravel(), gy.ravel()))
        ic, im = (np.asarray(v).reshape(gx.shape) for v in dense.eff_many(gx.ravel(), gy.ravel()))
        comp = np.clip(ic * mc / bc, 1e-4, 1.5)
        mem = np.clip(im * mm / bm, 1e-4, 1.5)
        rows = lambda t: tuple(tuple(float(v) for v in r) for r in t)  # noqa: E731
        ops[key] = Curve(dense.log2_size, rows(comp) if dense.log2_size2 else tuple(float(v) for v in comp[0]),
                         rows(mem) if dense.log2_size2 else tuple(float(v) for v in mem[0]),
                         dense.floor_s + max(0.0, curve.floor_s - base.floor_s), dense.log2_size2)
        kernels = "vLLM's kernels" if is_engine_kernel(donor.ops, key) else "kvsim's Triton kernels"
        derived[key] = (f"{key.split('.', 1)[1]} kernel: its efficiency relative to bf16 decode attention as "
                        f"measured on {donor.gpu} ({kernels}), applied to the imported bf16 decode curve")
    return replace(cal, ops=MappingProxyType(ops), derived=MappingProxyType(derived))


def _scaled(effs: tuple, factor: float) -> tuple:
    """A curve's efficiencies (a row, or a table of rows) times ``factor``, within the curves' (0, 1.5]."""
    return tuple(_scaled(v, factor) if isinstance(v, tuple) else min(float(v) * factor, 1.5) for v in effs)


def _twins(hw: HardwareSpec) -> list[tuple[str, Calibration]]:
    """Measured profiles of other GPUs with ``hw``'s compute (family, SM count and bf16 peak: the H200 is
    the H100 SXM's GH100 with more and faster HBM)."""
    out = []
    for name in _measured_gpus():
        donor, twin = _measured(name), load_hardware(name)
        if (donor is not None and name != hw.name and (twin.family, twin.sm_count, twin.peak_flops_per_s.get("bf16"))
                == (hw.family, hw.sm_count, hw.peak_flops_per_s.get("bf16"))):
            out.append((name, donor))
    return out


def _compute_twin_curves(cal: Calibration, hw: HardwareSpec) -> Calibration:
    """What a measured profile lacks and a measured twin GPU (``_twins``) measured:

    * the MXFP4 expert curves (kvsim.spec.quant.MXFP4_HOPPER_CURVE), at the donor's kernel times: its
      efficiencies are rescaled by the two GPUs' ceilings so a GEMM costs here what it cost there. The
      rule rests on the kernel running far below HBM bandwidth wherever it was measured
      (validation/oai_moe.py on an H100: 0.1-2.7 TB/s of 3.2), which also holds on the H200's faster memory;
    * vLLM's own decode kernel of a family (a donor curve whose stand-in is kept as ``*.reference``:
      FlashMLA, validation/flashmla.py), at the donor's efficiencies against this GPU's ceilings (the
      kernel reads the cache at a share of HBM bandwidth), this GPU's stand-in kept for the reference engine."""
    from kvsim.spec.quant import EXPERT_GEMMS, MXFP4_HOPPER_CURVE  # noqa: PLC0415 - quant imports nothing here

    ops, derived = dict(cal.ops), dict(cal.derived)
    keys = [f"{MXFP4_HOPPER_CURVE}.{g}" for g in EXPERT_GEMMS]
    twins = _twins(hw)
    if not all(k in ops for k in keys):
        for name, donor in twins:
            if not all(k in donor.ops for k in keys):
                continue
            mem = donor.ceilings.copy_bytes_per_s / cal.ceilings.copy_bytes_per_s
            comp = donor.ceilings.flops_per_s["bf16"] / cal.ceilings.flops_per_s["bf16"]
            for k in keys:
                c = donor.ops[k]
                ops[k] = replace(c, compute=_scaled(c.compute, comp), memory=_scaled(c.memory, mem))
                derived[k] = (f"{name}'s measured kernel times (same family, SM count and bf16 peak; the kernel runs "
                              f"far below HBM bandwidth)")
            break
    for name, donor in twins:  # the first twin that measured vLLM's kernel of a family gives it
        for ref in [k for k in donor.ops if k.endswith(REFERENCE_SUFFIX) and k not in ops]:
            key = ref.removesuffix(REFERENCE_SUFFIX)
            if key in derived:
                continue
            if key in ops:
                ops[ref] = ops[key]
            # the family's curve and its cache-precision variants (attention_decode.mla.k8v8: FlashMLA with an
            # FP8 cache), which only vLLM's kernel measured: this GPU has none of its own. Only the family's
            # own widths: attention_decode's other families (fp8, kivi, mla) are not its variants
            variant = re.compile(re.escape(key) + r"\.k[\d.]+v[\d.]+")
            for k in (key, *(v for v in donor.ops if variant.fullmatch(v) and v not in ops)):
                ops[k] = donor.ops[k]
                derived[k] = (f"vLLM's own kernel as measured on {name} (same family, SM count and bf16 peak), at "
                              f"its efficiencies against this GPU's ceilings")
    return replace(cal, ops=MappingProxyType(ops), derived=MappingProxyType(derived))


def _imported(hw: HardwareSpec, engine: str) -> Calibration | None:
    """The imported profile of a catalogue GPU (moved to ``hw``'s numbers if they differ)."""
    path = imported_profile_path(hw.name, engine)
    if path is None:
        return None
    if hw.name not in hardware_names():  # a user's GPU with its own imported profile
        return _derived_method_curves(calibration_from_dict(_read(path), hw, str(path)))
    stock = load_hardware(hw.name)
    cal = _load_imported(path, path.stat().st_mtime_ns, hw.name)
    return cal if stock == hw else borrow_profile(cal, stock, hw)


@cache
def _load_imported(path: Path, mtime_ns: int, gpu: str) -> Calibration:
    """A catalogue GPU's imported profile with its derived method curves, parsed once per file
    version (a sweep or the judge builds thousands of cost models on the same few profiles)."""
    return _derived_method_curves(calibration_from_dict(_read(path), load_hardware(gpu), str(path)))


def find_calibration(hw: HardwareSpec, spec: str | None = None, engine: str = "vllm") -> Calibration:
    """``spec``: None (look up by GPU: measured, imported for ``engine``, borrowed, prior), 'none'
    (pure roofline), 'imported' (the imported profile even where a measured one exists), or a path."""
    if engine not in ENGINE_KINDS:
        raise KvsimError(f"unknown engine kind (known: {', '.join(ENGINE_KINDS)})", field="engine.kind",
                         value=engine)
    if spec is not None:
        if spec.lower() == "none":
            return roofline(hw)
        if spec.lower() == "imported":
            cal = _imported(hw, engine)
            if cal is None:
                have = sorted(p.name for p in (*SHIPPED_DIR.glob("*.yaml"), *user_calibration_dir().glob("*.yaml")))
                raise KvsimError(f"no imported profile for {hw.name} and engine {engine} (have: {', '.join(have)})",
                                 field="calibration", value=spec)
            return cal
        cal = calibration_from_dict(_read(Path(spec)), hw, spec)
        return _derived_method_curves(cal) if cal.kind == "imported" else cal
    own = profile_path(hw.name, "reference")
    if own is not None:
        stock = load_hardware(hw.name) if hw.name in hardware_names() else hw
        cal = _compute_twin_curves(calibration_from_dict(_read(own), stock, str(own)), stock)
        # A user's GPU YAML that keeps a catalogue name but changes its numbers is a different GPU:
        # its own numbers win, so the measured profile is moved to it like any borrowed one.
        return cal if stock == hw else borrow_profile(cal, stock, hw)
    imported = _imported(hw, engine)
    if imported is not None:
        return imported
    for name in _measured_gpus():
        donor = load_hardware(name)
        if donor.family == hw.family:
            measured = _measured(name)
            assert measured is not None  # _measured_gpus lists the GPUs with a measured profile
            return borrow_profile(measured, donor, hw)
    for name in hardware_names():
        donor = load_hardware(name)
        cal = _imported(donor, engine) if donor.family == hw.family and name != hw.name else None
        if cal is not None:
            return borrow_profile(cal, donor, hw)
    prior = calibration_from_dict(_prior_data(), hw, PRIOR_FILE)
    return replace(prior, gpu=hw.name, kind="prior",
                   note="PRIOR: no measured or imported profile for this GPU family yet; efficiencies are a "
                        "labelled prior, not a measurement")
