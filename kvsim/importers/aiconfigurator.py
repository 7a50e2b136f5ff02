"""Import measured collective latencies from NVIDIA aiconfigurator's public kernel database.

The ``aiconfigurator-core`` package (PyPI, Apache-2.0) ships per-operator latencies measured with the
serving engines' own kernels under ``aiconfigurator_core/systems/data/<system>/<op>/<engine>/<version>/``
(parquet tables plus ``collection_meta.yaml``). This module reads its all-reduce tables:

* ``comm/vllm/<version>/custom_allreduce_perf.parquet``: vLLM's custom all-reduce
  (``kernel_source`` ``vLLM_custom_graph``: captured in a CUDA graph, as vLLM runs decode), and
* ``comm/nccl/<version>/nccl_perf.parquet``: NCCL all-reduce (``op_name`` ``all_reduce``),

and returns them as plain data (message bytes -> seconds per TP degree) for
``kvsim/data/collectives/<gpu>.yaml``, which kvsim reads at run time without the package.
``python -m kvsim.importers.aiconfigurator --system h100_sxm --gpu h100-sxm`` writes that file.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

import yaml

from kvsim.errors import KvsimError
from kvsim.fileio import write_atomic

PACKAGE = "aiconfigurator-core"
MS = 1e-3  # the database's latencies are in milliseconds


def _data_root() -> Path:
    try:
        import aiconfigurator_core  # noqa: PLC0415 - optional dependency (kvsim[aic])
    except ImportError:
        raise KvsimError(f"needs the {PACKAGE} package: pip install 'kvsim[aic]'", field="--from",
                         value="aiconfigurator") from None
    return Path(aiconfigurator_core.__file__).parent / "systems" / "data"


def _versions(folder: Path) -> list[str]:
    return sorted((p.name for p in folder.iterdir() if p.is_dir()), key=_version_key) if folder.is_dir() else []


def _version_key(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else x for x in v.replace("rc", ".").replace("post", ".").split("."))


def _table(path: Path) -> dict[str, list]:
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415 - optional dependency (comes with kvsim[aic])
    except ImportError:
        raise KvsimError("reading the database needs pyarrow: pip install 'kvsim[aic]'", field="--from",
                         value="aiconfigurator") from None
    try:
        return pq.read_table(path).to_pydict()
    except (OSError, ValueError) as err:
        raise KvsimError(f"not a readable parquet table ({err})", file=str(path)) from None


def _by_tp(rows: dict[str, list], match: dict[str, str], path: Path) -> dict[int, dict[str, list[float]]]:
    """Rows whose columns equal ``match``: TP degree -> message bytes and seconds, by size."""
    try:
        out: dict[int, dict[int, float]] = {}
        for i in range(len(rows["latency"])):
            if all(rows[col][i] == want for col, want in match.items()):
                by_size = out.setdefault(int(rows["num_gpus"][i]), {})
                by_size[int(rows["message_size"][i])] = float(rows["latency"][i]) * MS
    except KeyError as err:
        raise KvsimError(f"missing column {err}", file=str(path)) from None
    if not out:
        raise KvsimError(f"no all-reduce rows with {match}", file=str(path))
    return {tp: {"bytes": sorted(pts), "seconds": [pts[b] for b in sorted(pts)]} for tp, pts in sorted(out.items())}


def collectives(system: str, vllm_version: str | None = None, nccl_version: str | None = None,
                root: Path | None = None) -> dict:
    """The database's vLLM custom all-reduce (graph mode, bf16) and NCCL all-reduce (fp16) tables for
    ``system``; the newest version of each unless one is named."""
    root = root or _data_root()
    comm = root / system / "comm"
    if not comm.is_dir():
        known = sorted(p.name for p in root.iterdir() if (p / "comm").is_dir())
        raise KvsimError(f"no collective measurements for this system (known: {', '.join(known)})",
                         field="--system", value=system)
    out: dict = {"system": system}
    for key, sub, file, version, match in (
            ("custom_allreduce", "vllm", "custom_allreduce_perf.parquet", vllm_version,
             {"kernel_source": "vLLM_custom_graph", "allreduce_dtype": "bfloat16"}),
            ("nccl_allreduce", "nccl", "nccl_perf.parquet", nccl_version,
             {"op_name": "all_reduce", "nccl_dtype": "half"})):
        versions = _versions(comm / sub)
        if not versions:
            continue
        if version is not None and version not in versions:
            raise KvsimError(f"not in the database (has {', '.join(versions)})", field=f"{sub} version", value=version)
        chosen = version or versions[-1]
        path = comm / sub / chosen / file
        rows = _table(path)
        out[key] = {"version": chosen, "file": f"systems/data/{system}/comm/{sub}/{chosen}/{file}",
                    "tp": _by_tp(rows, match, path)}
    if len(out) == 1:
        raise KvsimError("no vLLM custom or NCCL all-reduce tables", field="--system", value=system)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system", required=True, help="database system, e.g. h100_sxm")
    p.add_argument("--gpu", required=True, help="kvsim catalogue name, e.g. h100-sxm")
    p.add_argument("--vllm-version", help="default: the newest in the database")
    p.add_argument("--nccl-version", help="default: the newest in the database")
    p.add_argument("--out", help="default: kvsim/data/collectives/GPU.yaml of this checkout")
    args = p.parse_args(argv)
    try:
        data = collectives(args.system, args.vllm_version, args.nccl_version)
    except KvsimError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    data = {"gpu": args.gpu, "source": f"{PACKAGE} {importlib.metadata.version(PACKAGE)} (Apache-2.0), "
                                      "imported by kvsim.importers.aiconfigurator", **data}
    default = Path(__file__).resolve().parents[1] / "data" / "collectives" / f"{args.gpu}.yaml"
    out = Path(args.out) if args.out else default
    write_atomic(out, yaml.safe_dump(data, sort_keys=False, width=120, default_flow_style=None))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
