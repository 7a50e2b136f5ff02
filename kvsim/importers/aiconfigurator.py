"""Import measured kernel latencies from NVIDIA aiconfigurator's public kernel database.

The ``aiconfigurator-core`` package (PyPI, Apache-2.0) ships per-operator latencies measured with the
serving engines' own kernels under ``aiconfigurator_core/systems/data/<system>/<op>/<engine>/<version>/``
(parquet tables plus ``collection_meta.yaml``; latencies in milliseconds). Two imports:

**Calibration profiles** (``kvsim calibrate --from aiconfigurator --system h200_sxm --engine vllm``,
:func:`import_profile`): the engine's GEMM tables (bf16, and FP8 per-tensor where measured), decode
attention (``generation_attention``) and prefill attention (``context_attention``), the fused MoE
layer and the NCCL all-reduce are turned into roofline samples against the catalogue GPU's datasheet
ceilings and fitted with kvsim's own fitting code (:mod:`kvsim.calibrate`), so an imported profile is
the same kind of object as a measured one (``kind: imported``). The database has no element-wise
kernels and no engine-step overhead: those keep the labelled prior, and the profile says so.

**Collective tables** (``python -m kvsim.importers.aiconfigurator --system h100_sxm --gpu h100-sxm``):

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
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from kvsim.cost.calibration import PRIOR_FILE
from kvsim.errors import KvsimError
from kvsim.fileio import load_data_file, write_atomic

PACKAGE = "aiconfigurator-core"
MS = 1e-3  # the database's latencies are in milliseconds
# The database's system folder -> kvsim's catalogue name (the judge maps silicon-sample rows with it).
SYSTEMS = {"a100_sxm": "a100-sxm-80gb", "a30": "a30", "b200_sxm": "b200",
           "b300_sxm": "b300", "gb200": "gb200", "h100_pcie": "h100-pcie", "h100_sxm": "h100-sxm",
           "h200_sxm": "h200-sxm", "l4": "l4", "l40s": "l40s", "rtx_pro_6000_server": "rtx-pro-6000"}
ENGINES = ("vllm", "sglang", "trtllm")  # the database's engine folders kvsim imports
BF16_BYTES = 2
HEAD_DIM = 128  # attention rows imported: head_dim 128 (the catalogue's common head size), no window
# The database's MLA tables are DeepSeek-V3's shapes (its config.json): kv_lora_rank 512 and
# qk_rope_head_dim 64, so the absorbed kernel's qk dim is 576 and its vo dim 512.
MLA_QK_DIM, MLA_VO_DIM = 512 + 64, 512


def data_root() -> Path:
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


# The all-reduce tables' ``message_size`` counts ELEMENTS, not bytes: the NCCL collector logs
# ``size // bytes_per_element`` of nccl-tests' byte size (collector/network/collect_nccl.py), the
# custom all-reduce collector reduces tensors of ``message_size`` elements
# (collector/network/collect_all_reduce.py, get_input_shape_and_comm_size), and the SDK queries both
# with tokens x hidden ("count, not size in bytes", src/aiconfigurator/sdk/operations.py,
# CustomAllReduce.query, commit e9a5452ee). Both tables are 16-bit (bfloat16 / half).
ALLREDUCE_BYTES_PER_ELEMENT = BF16_BYTES


def _by_tp(rows: dict[str, list], match: dict[str, str], path: Path) -> dict[int, dict[str, list[float]]]:
    """Rows whose columns equal ``match``: TP degree -> message bytes and seconds, by size."""
    try:
        out: dict[int, dict[int, float]] = {}
        for i in range(len(rows["latency"])):
            if all(rows[col][i] == want for col, want in match.items()):
                by_size = out.setdefault(int(rows["num_gpus"][i]), {})
                msg_bytes = int(rows["message_size"][i]) * ALLREDUCE_BYTES_PER_ELEMENT
                by_size[msg_bytes] = float(rows["latency"][i]) * MS
    except KeyError as err:
        raise KvsimError(f"missing column {err}", file=str(path)) from None
    if not out:
        raise KvsimError(f"no all-reduce rows with {match}", file=str(path))
    return {tp: {"bytes": sorted(pts), "seconds": [pts[b] for b in sorted(pts)]} for tp, pts in sorted(out.items())}


def collectives(system: str, vllm_version: str | None = None, nccl_version: str | None = None,
                root: Path | None = None) -> dict:
    """The database's vLLM custom all-reduce (graph mode, bf16) and NCCL all-reduce (fp16) tables for
    ``system``; the newest version of each unless one is named."""
    root = root or data_root()
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


def _rows(path: Path) -> list[dict]:
    """A parquet table as a list of row mappings."""
    cols = _table(path)
    names = list(cols)
    try:
        return [dict(zip(names, vals, strict=True)) for vals in zip(*cols.values(), strict=True)]
    except ValueError as err:
        raise KvsimError(f"malformed table ({err})", file=str(path)) from None


def _col(r: dict, key: str, path: Path) -> Any:  # a table cell
    try:
        return r[key]
    except KeyError:
        raise KvsimError(f"missing column {key!r}", file=str(path)) from None


def _pick_kernel(rows: list[dict], path: Path, avoid: str = "") -> tuple[str, list[dict]]:
    """The kernel with the most rows (what the collector ran as the engine's default), and its rows."""
    counts = Counter(str(_col(r, "kernel_source", path)) for r in rows if not (avoid and avoid in r["kernel_source"]))
    if not counts:
        return "", []
    kernel = counts.most_common(1)[0][0]
    return kernel, [r for r in rows if r["kernel_source"] == kernel]


def _version_for(root: Path, system: str, op: str, engine: str, version: str | None) -> str | None:
    versions = _versions(root / system / op / engine)
    if version is None:
        return versions[-1] if versions else None
    return version if version in versions else None


def _span(values: list[float]) -> list[float]:
    return [float(min(values)), float(max(values))] if values else []


def _package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed: a database folder given with --database)"


def import_profile(system: str, engine: str = "vllm", version: str | None = None, gpu: str | None = None,
                   root: Path | None = None) -> dict:
    """A kvsim calibration profile (plain data) fitted on ``system``'s ``engine`` kernel tables in
    ``root`` (the database's ``systems/data``; default: the installed package's). ``version``: the
    engine version (default: the newest that has both GEMM and attention tables). A table with a
    missing column or a malformed value is one error naming its file."""
    root = root or data_root()
    try:
        return _import(system, engine, version, gpu, root)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        raise KvsimError(f"malformed database table ({type(err).__name__}: {err})", field="--system", value=system,
                         file=str(root)) from None


def _import(system: str, engine: str, version: str | None, gpu: str | None, root: Path) -> dict:
    from kvsim.calibrate import _fit, _fit_table, ring_fit  # noqa: PLC0415 - the fitting code (numpy) on demand
    from kvsim.spec.hardware import hardware_names, load_hardware, peak_flops  # noqa: PLC0415

    have = sorted(p.name for p in root.iterdir() if p.is_dir() and any(q.is_dir() for q in p.iterdir())) \
        if root.is_dir() else []
    if system not in have:
        raise KvsimError(f"not in the database (has: {', '.join(have) or 'nothing'})", field="--system", value=system,
                         file=str(root))
    engines = sorted(e for e in ENGINES
                     if _versions(root / system / "gemm" / e) or _versions(root / system / "attention" / e))
    if engine not in engines:
        raise KvsimError(f"no {system} kernels for this engine (has: {', '.join(engines) or 'none'})",
                         field="--engine", value=engine)
    attention_versions = _versions(root / system / "attention" / engine)
    both = [v for v in _versions(root / system / "gemm" / engine) if v in attention_versions]
    if version is not None and version not in both:
        raise KvsimError(f"no {system} {engine} GEMM and attention tables of this version (has: "
                         f"{', '.join(both) or 'none'}; GEMM {', '.join(_versions(root / system / 'gemm' / engine))}; "
                         f"attention {', '.join(_versions(root / system / 'attention' / engine))})",
                         field="--engine", value=f"{engine}=={version}")
    if not both:
        raise KvsimError(f"no {engine} version has both GEMM and attention tables", field="--system", value=system)
    version = version or both[-1]
    gpu = gpu or SYSTEMS.get(system)
    if gpu is None or gpu not in hardware_names():
        raise KvsimError(f"no catalogue GPU for this system: name one with --gpu (catalogue: "
                         f"{', '.join(hardware_names())})", field="--system", value=system)
    hw = load_hardware(gpu)
    bw = hw.hbm_bandwidth_bytes_per_s
    bf16 = peak_flops(hw, "bf16")
    fp8 = hw.peak_flops_per_s.get("fp8") or bf16
    tables: dict[str, dict] = {}

    def table(op: str, file: str, want: str | None = version) -> tuple[Path, list[dict]] | None:
        v = _version_for(root, system, op, engine, want)
        path = root / system / op / engine / (v or "") / file
        if v is None or not path.is_file():
            return None
        return path, _rows(path)

    def record(key: str, path: Path, kernel: str, used: list, **shapes: list[float]) -> None:
        tables[key] = {"file": str(path.relative_to(root.parent.parent)), "kernel": kernel, "rows_used": len(used),
                       **{k: v for k, v in shapes.items() if v}}

    # GEMMs: size = tokens (m), size2 = weight bytes (n x k); bytes = weight + activations in and out
    got = table("gemm", "gemm_perf.parquet")
    if got is None:
        raise KvsimError(f"missing gemm_perf.parquet for {engine} {version}", file=str(root / system / "gemm" / engine))
    path, rows = got
    gemm_ops: dict[str, dict] = {}
    for key, dtype, wbytes, peak in (("gemm", "bfloat16", BF16_BYTES, bf16), ("gemm.fp8", "fp8", 1, fp8)):
        kernel, sel = _pick_kernel([r for r in rows if _col(r, "gemm_dtype", path) == dtype], path)
        samples = []
        for r in sel:
            m, n, k, t = int(r["m"]), int(r["n"]), int(r["k"]), float(r["latency"]) * MS
            nbytes: float = n * k * wbytes + (m * k + m * n) * BF16_BYTES
            samples.append((float(m), float(n * k * wbytes), t, 2.0 * m * n * k / peak, nbytes / bw))
        if samples:
            gemm_ops[key] = _fit_table(samples, 0.8)
            record(key, path, kernel, samples, tokens=_span([s[0] for s in samples]),
                   weight_bytes=_span([s[1] for s in samples]))
    if "gemm" not in gemm_ops:
        raise KvsimError("no bfloat16 GEMM rows", file=str(path))

    def attention(file: str, op_name: str) -> tuple[Path, str, list[dict]]:
        got = table("attention", file)
        if got is None:
            raise KvsimError(f"missing {file} for {engine} {version}", file=str(root / system / "attention" / engine))
        path, rows = got
        # tables of older engine versions have no window_size column: no sliding window
        sel = [r for r in rows if _col(r, "kv_cache_dtype", path) == "bfloat16" and int(_col(r, "head_dim", path))
               == HEAD_DIM and int(r.get("window_size", 0)) == 0 and int(r["num_heads"]) % int(r["num_key_value_heads"])
               == 0 and int(r["num_heads"]) >= int(r["num_key_value_heads"])]
        kernel, sel = _pick_kernel(sel, path)
        if not sel:
            raise KvsimError(f"no bfloat16 {op_name} rows with head_dim {HEAD_DIM}", file=str(path))
        return path, kernel, sel

    # decode: one query per sequence over isl + step cached tokens (the cost model's terms)
    path, kernel, sel = attention("generation_attention_perf.parquet", "generation_attention")
    decode = []
    for r in sel:
        b, h, kvh = int(r["batch_size"]), int(r["num_heads"]), int(r["num_key_value_heads"])
        ctx = int(r["isl"]) + int(r["step"])
        nbytes = b * ctx * kvh * 2 * HEAD_DIM * BF16_BYTES
        flops = b * ctx * 2.0 * h * 2 * HEAD_DIM
        decode.append((float(nbytes), float(h // kvh), float(r["latency"]) * MS, flops / bf16, nbytes / bw))
    record("attention_decode", path, kernel, decode, kv_bytes=_span([d[0] for d in decode]),
           query_heads_per_kv_head=_span([d[1] for d in decode]))

    # prefill: causal attention over a fresh prompt of isl tokens (no cached prefix: step 0)
    path, kernel, sel = attention("context_attention_perf.parquet", "context_attention")
    prefill = []
    for r in (r for r in sel if int(r["step"]) == 0):
        b, h, kvh, n = int(r["batch_size"]), int(r["num_heads"]), int(r["num_key_value_heads"]), int(r["isl"])
        flops = b * 2.0 * h * 2 * HEAD_DIM * n * (n + 1) / 2
        nbytes = b * n * (h + kvh) * 2 * HEAD_DIM * BF16_BYTES
        prefill.append((float(n), float(r["latency"]) * MS, flops / bf16, nbytes / bw))
    record("attention_prefill", path, kernel, prefill, prompt_tokens=_span([p[0] for p in prefill]))

    ops = {**gemm_ops, "attention_decode": _fit_table(decode, 0.8), "attention_prefill": _fit(prefill, 0.6)}

    # MLA decode (DeepSeek's absorbed latent kernel), where the engine's table exists: num_heads
    # per rank x tp_size heads in all; the cost model's terms per cached token: the latent
    # (kv_lora_rank + rope dims) read once, 2 x heads x (qk + vo) FLOPs; size2 = all query heads
    got = table("mla", "generation_mla_perf.parquet")
    if got is not None:
        path, rows = got
        kernel, sel = _pick_kernel([r for r in rows if _col(r, "kv_cache_dtype", path) == "bfloat16"
                                    and _col(r, "mla_dtype", path) == "bfloat16"], path)
        mla = []
        for r in sel:
            b, heads, ctx = int(r["batch_size"]), int(r["num_heads"]), int(r["isl"]) + int(r["step"])
            nbytes = b * ctx * MLA_QK_DIM * BF16_BYTES
            flops = b * ctx * 2.0 * heads * (MLA_QK_DIM + MLA_VO_DIM)
            mla.append((float(nbytes), float(heads * int(r["tp_size"])), float(r["latency"]) * MS, flops / bf16,
                        nbytes / bw))
        if mla:
            ops["attention_decode.mla"] = _fit_table(mla, 0.8)
            record("attention_decode.mla", path, kernel, mla, kv_bytes=_span([m[0] for m in mla]),
                   query_heads=_span([m[1] for m in mla]))

    # MoE: the whole routed-expert layer (gate/up and down GEMMs, activation, routing), balanced
    # routing, no expert or tensor split; size = rows per touched expert, size2 = the touched experts'
    # bytes of one linear (the mean of gate/up and down) as stored, as the cost model looks them up.
    # Balanced routing spreads the tokens' top-k picks evenly, so tokens x top_k picks touch that many
    # experts (all of them once there are enough): at 16 tokens x top-8 every one of 128 experts, which
    # is why the rows take as long at 16 tokens as at 32 and 64 (H100 vLLM 0.24 bf16 Qwen3-235B TP 4:
    # 0.444 / 0.436 / 0.435 ms). Counting them as uniform-random routing (82 of 128 touched) charged
    # the time of 128 experts to 82's bytes and priced small decode batches up to 1.56x slow.
    # 16-bit for every engine; for vLLM also FP8 per tensor and FP8 128x128 blocks against the FP8 peak,
    # each table holding the kernel vLLM's MoE oracle chose in that version (kernel_source: H100 0.24,
    # FlashInfer CUTLASS for ModelOpt FP8 and Triton for block FP8, the algorithm kvsim's own fused-MoE
    # rows measure). Not for TensorRT-LLM or SGLang: their tables' most-rows FP8 kernel need not be the
    # one they decode with (TRT-LLM 1.3 on B200: DeepGEMM for blocks, whose priced DeepSeek-R1 decode
    # steps came out 2-5x slower than the public TRT-LLM runs; decided after seeing those rows).
    got = table("moe", "moe_perf.parquet", version) or table("moe", "moe_perf.parquet", None)
    if got is not None:
        path, rows = got
        formats = [("bfloat16", "gemm_grouped", BF16_BYTES, bf16)]
        if engine == "vllm":
            formats += [("fp8", "gemm_grouped.fp8", 1, fp8), ("fp8_block", "gemm_grouped.fp8_block", 1, fp8)]
        for dtype, key, weight_bytes, peak in formats:
            sel = [r for r in rows if _col(r, "moe_dtype", path) == dtype and r["distribution"] == "balanced"
                   and int(r["moe_tp_size"]) == 1 and int(r["moe_ep_size"]) == 1]
            kernel, sel = _pick_kernel(sel, path, avoid="nongated")
            moe = []
            for r in sel:
                tok, hid, inter = int(r["num_tokens"]), int(r["hidden_size"]), int(r["inter_size"])
                topk, experts = int(r["topk"]), int(r["num_experts"])
                active = float(min(experts, tok * topk))
                expert_bytes = 3 * hid * inter * weight_bytes
                nbytes = active * expert_bytes + tok * topk * (2 * hid + 3 * inter) * BF16_BYTES
                flops = 2.0 * tok * topk * 3 * hid * inter
                moe.append((tok * topk / active, active * expert_bytes / 2, float(r["latency"]) * MS, flops / peak,
                            nbytes / bw))
            if moe:
                ops[key] = _fit_table(moe, 0.8)
                record(key, path, kernel, moe, rows_per_expert=_span([m[0] for m in moe]),
                       expert_bytes=_span([m[1] for m in moe]))

    prior = load_data_file(PRIOR_FILE)
    ops["elementwise"] = prior["ops"]["elementwise"]
    ceilings = {"copy_bytes_per_s": bw, "bf16_flops_per_s": bf16, "fp8_flops_per_s": fp8}
    nccl_versions = _versions(root / system / "comm" / "nccl")
    if nccl_versions:
        path = root / system / "comm" / "nccl" / nccl_versions[-1] / "nccl_perf.parquet"
        found = [(tp, b, s) for tp, t in _by_tp(_table(path), {"op_name": "all_reduce", "nccl_dtype": "half"},
                                                  path).items() if tp > 1 for b, s in zip(t["bytes"], t["seconds"],
                                                                                           strict=True)]
        link = hw.nvlink_bandwidth_bytes_per_s or hw.pcie_bandwidth_bytes_per_s
        if found:
            ops["allreduce"], latency = ring_fit(found, link)
            ceilings["link_latency_s"] = float(f"{latency:.4g}")
            tables["allreduce"] = {"file": str(path.relative_to(root.parent.parent)), "kernel": "NCCL all_reduce half",
                                   "rows_used": len(found), "tp": sorted({f[0] for f in found}),
                                   "message_bytes": _span([f[1] for f in found])}
    if "allreduce" not in ops:
        ops["allreduce"] = prior["ops"]["allreduce"]
    missing = [k for k in ("gemm.fp8", "gemm_grouped", "attention_decode.mla", "allreduce") if k not in tables]
    package_version = _package_version()
    return {
        "gpu": gpu, "engine": engine, "kind": "imported", "engine_version": version,
        "source": f"{PACKAGE} {package_version} (Apache-2.0) systems/data/{system}, {engine} {version}, fitted by "
                  f"kvsim calibrate --from aiconfigurator",
        "imported": {"database": PACKAGE, "package_version": package_version, "system": system, "engine": engine,
                     "engine_version": version, "tables": tables},
        "fit": {"rows_used": {k: v["rows_used"] for k, v in tables.items()},
                "note": "ceilings are the catalogue GPU's datasheet values (efficiencies are relative to them); "
                        "elementwise and step_overhead_s are the labelled prior (the database has no element-wise "
                        "kernels or engine-step overhead)"
                        + (f"; not in the database, so from the prior or the bf16 GEMM curve: {', '.join(missing)}"
                           if missing else "")},
        "ceilings": ceilings, "ops": ops, "step_overhead_s": prior["step_overhead_s"],
    }


def write_profile(profile: dict, out_dir: Path) -> Path:
    """Write ``<gpu>.<engine>.yaml`` into ``out_dir`` (whole, with the user's umask)."""
    out = out_dir / f"{profile['gpu']}.{profile['engine']}.yaml"
    header = (f"# Imported by `kvsim calibrate --from aiconfigurator --system {profile['imported']['system']} "
              f"--engine {profile['engine']}=={profile['engine_version']}`: measured kernel latencies from the "
              f"database, fitted with kvsim's own code.\n")
    write_atomic(out, header + yaml.safe_dump(profile, sort_keys=False, width=110))
    return out


def parse_engine(text: str) -> tuple[str, str | None]:
    """``vllm`` or ``vllm==0.24.0``."""
    engine, _, version = text.partition("==")
    if engine not in ENGINES or (_ and not version):
        raise KvsimError(f"expected ENGINE or ENGINE==VERSION, ENGINE one of {', '.join(ENGINES)}", field="--engine",
                         value=text)
    return engine, version or None


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
