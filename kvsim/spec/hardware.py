"""GPUs: the frozen ``HardwareSpec`` and its strict YAML catalogue (``kvsim/data/hardware/``).

One YAML file per GPU, named after its catalogue name. Every figure is in SI units (bytes,
bytes/s, FLOP/s, seconds) and every YAML file cites the datasheet or log each number came from.
Peaks are DENSE tensor-core rates (NVIDIA datasheets quote "with sparsity", twice as high).
``memory_bytes`` is what the device reports to CUDA/HIP (``torch.cuda.get_device_properties``
``total_memory``), not the marketing capacity.

Users bring their own GPU with a YAML file of the same schema: ``load_hardware("my_gpu.yaml")``.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from kvsim.errors import KvsimError, schema_error, unknown_name
from kvsim.fileio import load_data_yaml, read_yaml_file

# GPU prices (``price_per_gpu_hour_usd``) come from ONE kind of source, so a ranking by cost compares
# like with like (issue 12): Lambda's on-demand list price per GPU-hour, from its public instance
# page, for the 8-GPU instance where Lambda offers one (an HGX node, what a TP 8 deployment rents),
# else its only instance of that GPU. Each priced YAML names the instance and the date it was read
# (``price_source``). A GPU Lambda does not list carries no price: kvsim search says so and takes
# --price GPU=USD or sweep.search.prices, rather than mixing in another kind of source.
PRICE_SOURCE_URL = "https://lambda.ai/instances"
PRICE_SOURCE = f"Lambda on-demand list price per GPU-hour, {PRICE_SOURCE_URL}"

# Architecture families: a GPU without its own kernel calibration borrows its family's.
Family = Literal["ampere", "hopper", "ada", "blackwell", "cdna3"]


@dataclass(frozen=True)
class HostSpec:
    """The default host machine, used by methods that offload KV cache to CPU memory or NVMe."""

    memory_bytes: int
    nvme_read_bytes_per_s: float
    nvme_write_bytes_per_s: float
    note: str
    nvme_bytes: int | None = None  # NVMe capacity for KV; None: not given (SSD-tier plans are refused)


@dataclass(frozen=True)
class Source:
    """A document a catalogue entry's numbers come from, and which numbers it gave."""

    url: str
    note: str


@dataclass(frozen=True)
class PriceSource:
    """Where a GPU's price per GPU-hour was read: the page, the date (ISO) and the offer."""

    url: str
    read_on: str
    offer: str


@dataclass(frozen=True)
class HardwareSpec:
    """One GPU model: capacity, bandwidths, dense peaks and a default host."""

    name: str
    display_name: str
    vendor: str
    family: Family
    memory_bytes: int
    sm_count: int  # streaming multiprocessors (AMD: compute units), as CUDA/ROCm report multiProcessorCount
    hbm_bandwidth_bytes_per_s: float
    peak_flops_per_s: Mapping[str, float | None]
    pcie_bandwidth_bytes_per_s: float
    nvlink_bandwidth_bytes_per_s: float
    # Whether a node's GPUs can address each other's memory (CUDA peer access): over NVLink where the GPU
    # has it, else over PCIe, which the driver grants on data-center boards and refuses on GeForce ones.
    # vLLM's custom all-reduce needs it, and NCCL without it stages every hop through host memory (its SHM
    # transport). None: not recorded, so a PCIe group's all-reduce is priced without it and labelled so.
    peer_to_peer: bool | None
    interconnect_latency_s: float
    max_gpus_per_node: int
    price_per_gpu_hour_usd: float | None
    sources: tuple[Source, ...]
    host: HostSpec
    price_source: PriceSource | None = None  # None: unpriced, or a user YAML that gives no source


_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class _Peaks(BaseModel):
    model_config = _STRICT
    fp32: float | None = Field(gt=0)
    tf32: float | None = Field(gt=0)
    bf16: float | None = Field(gt=0)
    fp16: float | None = Field(gt=0)
    fp8: float | None = Field(gt=0)
    int8: float | None = Field(gt=0)


class _Host(BaseModel):
    model_config = _STRICT
    memory_bytes: int = Field(gt=0)
    nvme_read_bytes_per_s: float = Field(gt=0)
    nvme_write_bytes_per_s: float = Field(gt=0)
    note: str
    nvme_bytes: int | None = Field(default=None, gt=0)


class _Source(BaseModel):
    model_config = _STRICT
    url: str = Field(min_length=1)
    note: str


class _PriceSource(BaseModel):
    model_config = _STRICT
    url: str = Field(min_length=1)
    read_on: datetime.date = Field(strict=False)  # ISO date; YAML reads 2026-09-20 as a date
    offer: str = Field(min_length=1)


class _Hardware(BaseModel):
    """The YAML schema; validated strictly (no unknown keys, no string-to-number coercion)."""

    model_config = _STRICT
    name: str = Field(min_length=1)
    display_name: str = Field(min_length=1)
    vendor: str = Field(min_length=1)
    family: Family
    memory_bytes: int = Field(gt=0)
    sm_count: int = Field(gt=0)
    hbm_bandwidth_bytes_per_s: float = Field(gt=0)
    peak_flops_per_s: _Peaks
    pcie_bandwidth_bytes_per_s: float = Field(gt=0)
    nvlink_bandwidth_bytes_per_s: float = Field(ge=0)
    peer_to_peer: bool | None  # a required key; null says "not known"
    interconnect_latency_s: float = Field(gt=0)
    max_gpus_per_node: int = Field(gt=0)
    price_per_gpu_hour_usd: float | None = Field(gt=0)
    price_source: _PriceSource | None = None
    sources: list[_Source] = Field(min_length=1)
    host: _Host

    @field_validator("peer_to_peer")
    @classmethod
    def _nvlink_reaches_its_peers(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        if info.data.get("nvlink_bandwidth_bytes_per_s", 0) > 0 and value is not True:
            raise ValueError("an NVLink GPU reaches its peers' memory over NVLink: must be true")
        return value


def _catalogue_dir() -> Traversable:
    # importlib.resources works from a checkout and from an installed wheel alike.
    return files("kvsim") / "data" / "hardware"


def hardware_names() -> list[str]:
    """Sorted names of the GPUs in the built-in catalogue."""
    return sorted(p.name.removesuffix(".yaml") for p in _catalogue_dir().iterdir()
                  if p.name.endswith(".yaml"))


def _parse(raw: dict, file: str) -> HardwareSpec:
    try:
        hw = _Hardware.model_validate(raw)
    except ValidationError as err:
        raise schema_error(err, file, what="a GPU hardware YAML: see kvsim/data/hardware/*.yaml") from None
    return HardwareSpec(
        name=hw.name,
        display_name=hw.display_name,
        vendor=hw.vendor,
        family=hw.family,
        memory_bytes=hw.memory_bytes,
        sm_count=hw.sm_count,
        hbm_bandwidth_bytes_per_s=hw.hbm_bandwidth_bytes_per_s,
        peak_flops_per_s=MappingProxyType(hw.peak_flops_per_s.model_dump()),
        pcie_bandwidth_bytes_per_s=hw.pcie_bandwidth_bytes_per_s,
        nvlink_bandwidth_bytes_per_s=hw.nvlink_bandwidth_bytes_per_s,
        peer_to_peer=hw.peer_to_peer,
        interconnect_latency_s=hw.interconnect_latency_s,
        max_gpus_per_node=hw.max_gpus_per_node,
        price_per_gpu_hour_usd=hw.price_per_gpu_hour_usd,
        sources=tuple(Source(s.url, s.note) for s in hw.sources),
        host=HostSpec(**hw.host.model_dump()),
        price_source=None if hw.price_source is None else
        PriceSource(hw.price_source.url, hw.price_source.read_on.isoformat(), hw.price_source.offer),
    )


def load_hardware(name_or_path: str) -> HardwareSpec:
    """Load a GPU by catalogue name (e.g. ``"h100-sxm"``) or from a YAML file of the same schema.

    Raises KvsimError naming the field, value and file for any invalid entry, and suggesting the
    closest catalogue names for an unknown one.
    """
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path or "\\" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise KvsimError("no such hardware file", field="hardware", value=name_or_path)
        return _parse(read_yaml_file(path, "a GPU hardware YAML"), str(path))
    if name_or_path not in hardware_names():
        raise unknown_name("GPU", name_or_path, hardware_names(), field="hardware")
    entry = _catalogue_dir() / f"{name_or_path}.yaml"
    return _parse(load_data_yaml(entry.read_text(encoding="utf-8")), str(entry))


def peak_flops(hw: HardwareSpec, dtype: str) -> float:
    """Dense peak FLOP/s (OP/s for int8) of ``hw`` in ``dtype``; KvsimError if it has no such unit."""
    if dtype not in hw.peak_flops_per_s:
        raise unknown_name("dtype", dtype, hw.peak_flops_per_s, field="dtype")
    peak = hw.peak_flops_per_s[dtype]
    if peak is None:
        raise KvsimError(f"{hw.display_name} ({hw.name}) has no {dtype} unit; use one of "
                         f"{', '.join(k for k, v in hw.peak_flops_per_s.items() if v is not None)}",
                         field="dtype", value=dtype)
    return peak
