"""Tensor-parallel all-reduce as vLLM runs it, priced from measured latency tables.

vLLM reduces a tensor-parallel group's hidden states with its custom all-reduce when it can, and
with NCCL otherwise (``vllm/distributed/device_communicators/cuda_communicator.py``; the rule is
``CustomAllreduce.should_custom_ar`` in ``custom_all_reduce.py``): the group size must be one the
kernel supports (2, 4, 6 or 8), the GPUs must be fully connected by NVLink (two GPUs may also use
PCIe peer-to-peer; custom all-reduce is disabled without P2P access), and the message must be at
most ``max_size`` (8 MiB by default). Whether a PCIe GPU has peer access is the catalogue's
``peer_to_peer``; without it NCCL stages every hop through host memory (:func:`host_staging`). The
custom kernel chooses one-shot or two-shot by size itself, so its measured latency per (TP, bytes)
already includes that choice.

Latencies come from ``kvsim/data/collectives/<gpu>.yaml``, written by
:mod:`kvsim.importers.aiconfigurator` from NVIDIA aiconfigurator's public database (vLLM's custom
kernel captured in a CUDA graph, as vLLM runs decode, and NCCL). Between measured sizes the time is
interpolated in log-log; above the largest, it grows in proportion to the bytes (bandwidth-bound).
A GPU without tables of its own borrows those of a catalogue GPU on the same NVLink fabric
(:func:`borrowed_collectives`); a GPU or TP degree without any table is priced by the calibrated ring model
instead, and the cost model says so (:attr:`AllReducePricing.source`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache
from types import MappingProxyType

import numpy as np

from kvsim.errors import KvsimError
from kvsim.fileio import data_file, load_data_file
from kvsim.spec.hardware import HardwareSpec

# vllm/distributed/device_communicators/custom_all_reduce.py: _SUPPORTED_WORLD_SIZES and the
# default max_size (8192 * 1024 bytes).
CUSTOM_WORLD_SIZES = (2, 4, 6, 8)
CUSTOM_MAX_BYTES = 8 * 2**20
# csrc/custom_all_reduce.cuh (REDUCE_CASE): two GPUs always run the one-stage kernel (each reads every peer's
# whole buffer and reduces); a fully connected group runs it below 512 KiB at up to 4 GPUs and below 256 KiB
# at up to 8, else the two-stage kernel (reduce-scatter, then all-gather)
ONE_STAGE_BELOW_BYTES = ((4, 512 * 2**10), (8, 256 * 2**10))


def custom_one_stage(tp: int, msg_bytes: np.ndarray) -> np.ndarray:
    """Whether vLLM's custom all-reduce runs its one-stage kernel for each message of a TP group."""
    if tp == 2:
        return np.ones(np.shape(msg_bytes), dtype=bool)
    limit = next((below for size, below in ONE_STAGE_BELOW_BYTES if tp <= size), 0)
    return np.asarray(msg_bytes) < limit


@dataclass(frozen=True)
class LatencyTable:
    """Measured seconds of one all-reduce at increasing message sizes (one TP degree)."""

    log2_bytes: np.ndarray
    log2_seconds: np.ndarray

    def seconds(self, msg_bytes: np.ndarray) -> np.ndarray:
        lb = np.log2(np.maximum(msg_bytes, 1.0))
        t = np.exp2(np.interp(lb, self.log2_bytes, self.log2_seconds))
        top = self.log2_bytes[-1]
        # past the largest measured message the transfer is bandwidth-bound: time grows with bytes
        return np.where(lb > top, np.exp2(self.log2_seconds[-1] + lb - top), t)


@dataclass(frozen=True)
class Collectives:
    """One GPU's measured all-reduce tables (TP degree -> table) and where they came from."""

    gpu: str
    custom: MappingProxyType  # vLLM custom all-reduce, CUDA-graph mode
    nccl: MappingProxyType
    source: str


@dataclass(frozen=True)
class HostStaging:
    """NCCL's all-reduce on one PCIe host without peer access (every hop staged through host memory, its SHM
    transport) and with it, same GPUs, same sizes: ``kvsim/data/collectives/host_staged_pcie.yaml``."""

    staged: LatencyTable
    direct: LatencyTable
    source: str

    def slowdown(self, msg_bytes: np.ndarray) -> np.ndarray:
        """How much longer a call of each size takes staged than direct (about 1 for latency-bound messages,
        1.43 for bandwidth-bound ones on that host)."""
        return self.staged.seconds(msg_bytes) / self.direct.seconds(msg_bytes)


@cache
def host_staging() -> HostStaging:
    """The shipped measurement of NCCL with and without peer access on one PCIe host."""
    where = "kvsim/data/collectives/host_staged_pcie.yaml"
    data = load_data_file(where)
    return HostStaging(_table(data.get("host_staged") or {}, f"{where}: host_staged"),
                       _table(data.get("peer_to_peer") or {}, f"{where}: peer_to_peer"),
                       f"{data.get('source', where)} ({data.get('system', '')})")


@dataclass(frozen=True)
class AllReducePricing:
    """How a cost model prices one all-reduce call of a TP group."""

    custom: LatencyTable | None  # used for messages up to CUSTOM_MAX_BYTES
    nccl: LatencyTable | None  # used above (None: the calibrated ring model)
    source: str
    custom_ok: bool = False  # the group runs vLLM's custom kernel up to CUSTOM_MAX_BYTES, with a table or not
    staging: HostStaging | None = None  # PCIe without peer access: the ring model's NCCL runs staged

    def seconds(self, msg_bytes: np.ndarray, ring_s: np.ndarray, custom_s: np.ndarray | None = None) -> np.ndarray:
        """Per-call seconds; ``ring_s`` is the calibrated ring model's time, used where no table applies (slowed
        as measured where NCCL stages through host memory), and ``custom_s`` the model of vLLM's custom kernel
        (:func:`custom_one_stage`'s stages on the calibrated link), used where the group runs that kernel and has
        no table of it."""
        if self.nccl is not None:
            big = self.nccl.seconds(msg_bytes)
        else:
            big = ring_s if self.staging is None else ring_s * self.staging.slowdown(msg_bytes)
        small = self.custom.seconds(msg_bytes) if self.custom is not None else custom_s if self.custom_ok else None
        return big if small is None else np.where(msg_bytes <= CUSTOM_MAX_BYTES, small, big)


def _table(data: dict, where: str) -> LatencyTable:
    try:
        b = np.asarray(data["bytes"], dtype=float)
        s = np.asarray(data["seconds"], dtype=float)
    except (KeyError, TypeError, ValueError) as err:
        raise KvsimError(f"needs bytes and seconds lists ({err})", field=where, value=None) from None
    if len(b) < 2 or b.shape != s.shape or not (np.all(np.diff(b) > 0) and np.all(s > 0) and np.all(np.isfinite(s))):
        raise KvsimError("bytes must increase, seconds be positive and finite, two points at least", field=where,
                         value=None)
    return LatencyTable(np.log2(b), np.log2(s))


@cache
def load_collectives(gpu: str) -> Collectives | None:
    """The shipped tables of catalogue GPU ``gpu`` (None: none imported)."""
    where = f"kvsim/data/collectives/{gpu}.yaml"
    if not data_file(where).is_file():
        return None
    data = load_data_file(where)
    tables = {}
    for key in ("custom_allreduce", "nccl_allreduce"):
        part = data.get(key) or {}
        tables[key] = MappingProxyType({int(tp): _table(t, f"{where}: {key}.tp.{tp}")
                                        for tp, t in (part.get("tp") or {}).items()})
    versions = ", ".join(f"{k} {data[k]['version']}" for k in ("custom_allreduce", "nccl_allreduce") if k in data)
    return Collectives(gpu, tables["custom_allreduce"], tables["nccl_allreduce"],
                       f"{data.get('source', where)}: {data.get('system', gpu)} ({versions})")


def _interconnect(hw: HardwareSpec) -> tuple:
    return hw.family, hw.nvlink_bandwidth_bytes_per_s, hw.pcie_bandwidth_bytes_per_s, hw.max_gpus_per_node


def borrowed_collectives(hw: HardwareSpec) -> Collectives | None:
    """The tables of another catalogue GPU on the same NVLink fabric (same family, NVLink and PCIe bandwidth and
    GPUs per node: the A100 SXM4 40 GB and 80 GB share the HGX A100 board), labelled so; None for a PCIe-only
    GPU, whose peer-to-peer access (which decides how NCCL moves data) the catalogue does not record."""
    from kvsim.spec.hardware import hardware_names, load_hardware

    if hw.nvlink_bandwidth_bytes_per_s <= 0:
        return None
    for name in hardware_names():
        tables = load_collectives(name) if name != hw.name else None
        if tables is not None and _interconnect(load_hardware(name)) == _interconnect(hw):
            return replace(tables, source=f"{tables.source}, borrowed from {name} (same family and NVLink)")
    return None


def vllm_allreduce(hw: HardwareSpec, tp: int) -> AllReducePricing:
    """vLLM's all-reduce for a TP group of ``hw`` GPUs (see the module docstring)."""
    if tp == 1:
        return AllReducePricing(None, None, "no all-reduce at TP 1")
    tables = load_collectives(hw.name) or borrowed_collectives(hw)
    # NVLink (nvlink_bandwidth_bytes_per_s > 0) connects every GPU of the catalogue's NVLink systems; over PCIe
    # vLLM runs its custom kernel on two GPUs with peer access only (CustomAllreduce.__init__: "not supported on
    # more than two PCIe-only GPUs", and _can_p2p)
    pcie = hw.nvlink_bandwidth_bytes_per_s <= 0
    custom_ok = tp in CUSTOM_WORLD_SIZES and (not pcie or (tp == 2 and hw.peer_to_peer is True))
    custom = tables.custom.get(tp) if tables is not None and custom_ok else None
    nccl = tables.nccl.get(tp) if tables is not None else None
    staging = host_staging() if pcie and hw.peer_to_peer is not True and nccl is None else None
    parts = []
    if custom_ok:
        parts.append("vLLM custom all-reduce " + ("(measured table)" if custom else
                                                  "(no table: its one-/two-stage kernels on the calibrated link)")
                     + f" up to {CUSTOM_MAX_BYTES // 2**20} MiB"
                     + (" (two PCIe GPUs with peer access)" if pcie else ""))
    if nccl:
        parts.append("NCCL (measured table)")
    elif staging is None:
        parts.append("NCCL (ring model fitted on kvsim's NCCL runs)")
    else:
        why = ("no peer-to-peer access on this GPU" if hw.peer_to_peer is False else
               "peer-to-peer access not recorded for this GPU (catalogue peer_to_peer: null), so priced without it")
        parts.append(f"NCCL through host memory ({why}): the ring model slowed as one host measured it staged "
                     f"against direct, {staging.source}")
    if pcie and tp == 2 and hw.peer_to_peer is None and staging is None:  # else the staging label says it
        parts.append("peer-to-peer access not recorded for this GPU: no custom kernel assumed")
    src = "; ".join(parts) + (f"; tables: {tables.source}" if tables is not None and (custom or nccl) else "")
    return AllReducePricing(custom, nccl, src, custom_ok, staging)
