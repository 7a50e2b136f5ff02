"""Judge kvsim on real serving-engine measurements (``kvsim validate --serving FILE``).

The file is in the format of NVIDIA aiconfigurator's public silicon samples (one row per closed-loop
benchmark run: backend and version, HF model id, system, precision, input and output lengths,
concurrency ``batch_size``, parallelism, and the client's mean TTFT and TPOT in ms); see
``../shared/data/measured/README.md``. Each row kvsim can express is simulated as the benchmark ran
it: ``batch_size`` clients in a closed loop (:mod:`kvsim.serve.closed_loop`), fixed lengths, and the
engine settings and request count of a :class:`Deployment` (by default the one aiconfigurator's own
generator writes for its benchmarks); the mean TTFT and TPOT are compared with the measured ones.
Rows kvsim cannot express yet are counted with the reason, never dropped in silence. Nothing here is
fitted: the file is only ever read to judge.
"""

from __future__ import annotations

import csv
import datetime
import functools
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from kvsim.errors import KvsimError

# Columns the judge reads (the silicon-sample header; extra columns are ignored).
COLUMNS = ("backend", "backend_version", "model_path", "system", "precision", "gemm_quant_mode", "moe_quant_mode",
           "isl", "osl", "batch_size", "tp_size", "pp_size", "attention_dp_size", "moe_tp_size", "moe_ep_size",
           "silicon_ttft_ms", "silicon_tpot_ms")
# Precision columns of an unquantized run (bf16 or fp16 weights and KV, no quantization mode).
UNQUANTIZED = ("", "bf16", "fp16")
# FP8 weights with per-tensor scales on every linear (gemm_quant_mode fp8; moe_quant_mode fp8, or
# none for a dense model). The rows do not say how the KV cache was stored: that is the
# deployment's (Deployment.fp8_checkpoint_kv), and the table groups these rows apart.
FP8_WEIGHTS = ("fp8+fp8+fp8", "fp8+fp8")
# A 4-bit floating-point label (precision fp4, gemm and MoE modes nvfp4). On a model whose only
# release is an MXFP4 checkpoint (gpt-oss: openai/gpt-oss-*'s config.json quantization_config
# quant_method mxfp4) the row ran that checkpoint: aiconfigurator's own model of gpt-oss is its
# "native data format" w4a16_mxfp4 (aic-core sdk/common.py, MoEQuantMode; sdk/models/helpers.py maps
# quant_algo mxfp4 to it), and vLLM on Hopper has no NVFP4 kernel to run. Such rows run with the
# checkpoint's own weights; on any other model the label names an NVFP4 quantization the rows do not
# identify, and they are counted as not expressible.
FP4_LABEL = "fp4+nvfp4+nvfp4"
# FP8 labels whose gemm or MoE mode is 128x128 blocks. Such a row, and an FP8_WEIGHTS one, runs its
# checkpoint as stored where that checkpoint is a block-FP8 release whose config.json aiconfigurator-core
# ships (model_configs/<org>--<name>_config.json: e.g. Qwen/Qwen3-235B-A22B-FP8, quantization_config fp8
# with weight_block_size [128, 128], which vLLM serves with block-scaled kernels whatever the row's label);
# an FP8_WEIGHTS row of a 16-bit checkpoint is FP8 quantized on load (per-tensor scales).
FP8_BLOCK_LABELS = ("fp8+fp8_block+fp8_block", "fp8+fp8+fp8_block", "fp8+fp8_block")
# 4-bit integer weights, 16-bit activations (aiconfigurator's GEMMQuantMode int4_wo, "w4a16": an AWQ or
# GPTQ checkpoint of a dense model): the scenario's weights int4 (kvsim.spec.quant: vLLM's Marlin W4A16)
INT4_LABEL = "int4+int4_wo"
# Optional column: the run's `vllm serve` flags other than the model and its parallelism (tp_size,
# moe_ep_size and attention_dp_size hold those), as the source printed them. Each flag kvsim models
# becomes the scenario's engine setting of that name (value flags take the next word, parsed as the
# type; switches set True), overriding the deployment's; a row with any other flag is counted as not
# expressible, never run without it.
SERVE_FLAGS_COLUMN = "serve_flags"
# Optional column: the server's sampler (native or flashinfer: kvsim.memory SAMPLERS), where the source
# shows which one ran (e.g. FlashInfer installed under vLLM 0.10.2-0.11); empty: native
SAMPLER_COLUMN = "sampler"
# The reason counted for a row that repeats an earlier one whole, results included (the public sample lists
# some runs in two of its source files): judged once, not twice.
DUPLICATE_ROWS = "the same run listed again (every column alike, results included): judged once"
SERVE_FLAGS: dict[str, tuple[str, type]] = {
    "--async-scheduling": ("async_scheduling", bool),
    "--enforce-eager": ("enforce_eager", bool),
    "--max-num-batched-tokens": ("max_num_batched_tokens", int),
    "--max-num-seqs": ("max_num_seqs", int),
    "--max-model-len": ("max_model_len", int),
    "--gpu-memory-utilization": ("gpu_memory_utilization", float),
}


@dataclass(frozen=True)
class Deployment:
    """How the measured servers were started and driven. The rows record neither the engines' flags
    nor how many requests the client sent, so this is an assumption, named in every report."""

    name: str
    requests_per_client: int  # closed-loop requests each client sends (all of them measured)
    # the token budget the engine's flags set: None for the engine's default, else
    # isl + headroom (+ max_batch_size where the engine's flag leaves the decode rows out of it),
    # rounded up to the engine's granule
    budget_headroom_tokens: int | None
    budget_adds_batch: dict[str, bool]  # engine -> whether its budget flag adds max_batch_size
    budget_granule_tokens: dict[str, int]  # engine -> the granule its budget is rounded up to
    model_len_headroom_tokens: int  # max_model_len = isl + osl + this
    fp8_checkpoint_kv: str  # the KV method (kvsim.kv) an FP8-weight row's server stored its cache with
    settings: str  # the engine settings above, in words
    # SGLang rows measured on or after this day ran with --enable-mixed-chunk (None: none did, SGLang's default)
    sglang_mixed_chunk_from: datetime.date | None = None

    @property
    def source(self) -> str:
        """What every report says the rows were assumed to run with."""
        return f"{self.settings}, {self.requests_per_client} requests per client"

    def engine(self, row: Row) -> dict:
        """The scenario's ``engine`` settings this deployment gives ``row``'s server."""
        mixed = (row.backend == "sglang" and self.sglang_mixed_chunk_from is not None
                 and row.measured_on is not None and row.measured_on >= self.sglang_mixed_chunk_from)
        if self.budget_headroom_tokens is None:
            return {"max_model_len": row.isl + row.osl + self.model_len_headroom_tokens}
        per_rank = row.concurrency // row.dp  # aiconfigurator's batch_size: one attention-DP rank's
        budget = row.isl + self.budget_headroom_tokens + (per_rank if self.budget_adds_batch[row.backend] else 0)
        granule = self.budget_granule_tokens.get(row.backend, 1)
        return {"max_num_batched_tokens": -(-budget // granule) * granule, "max_num_seqs": per_rank,
                "cudagraph_capture_sizes": list(range(1, per_rank + 1)),
                "max_model_len": row.isl + row.osl + self.model_len_headroom_tokens,
                **({"enable_mixed_chunk": True} if mixed else {})}


DEPLOYMENTS = {
    # The deployment aiconfigurator's generator writes for a benchmark, and its benchmark client
    # (ai-dynamo/aiconfigurator @095f58a, src/aiconfigurator/generator/rule_plugin/benchmark/*.rule; the
    # vLLM rule's budget is the same in the generator's first vLLM rule, 95ddf241a of 2025-12-04):
    # - token budget max_batch_size + isl + 1500: vLLM --max-num-batched-tokens (vllm.rule "agg
    #   max_num_tokens"), TensorRT-LLM max_num_tokens rounded up to tokens_per_block (32, trtllm.rule);
    #   SGLang --max-prefill-tokens isl + 1500 with --enable-mixed-chunk (sglang.rule), whose decode
    #   rows count against it (PrefillAdder: rem_input_tokens - mixed_with_decode_tokens, SGLang
    #   managers/schedule_policy.py); kvsim's scheduler chunks the last prompt where SGLang waits;
    # - --max-num-seqs / max_batch_size = batch_size; max_model_len = isl + osl + 1500; CUDA graphs
    #   captured at every batch size 1..batch_size (cuda_graph_batch_sizes, vLLM --cudagraph-capture-sizes);
    # - an FP8 checkpoint's KV cache in FP8: aiconfigurator infers kvcache_quant_mode fp8 from an fp8
    #   quant_algo (aic-core sdk/models/helpers.py, _infer_quant_modes_from_raw_config) and the
    #   generator passes it on as --kv-cache-dtype (generator/module_bridge.py, kv_cache_dtype);
    # - SGLang --enable-mixed-chunk (sglang.rule "agg enable_mixed_chunk = true") reached SGLang only from
    #   aiconfigurator commit 07a377923 of 2026-01-19 ("fix sglang enable mixed chunk": until then the
    #   generator's parameter map spelled it enable_mix_chunk, so the flag was never written): SGLang rows
    #   measured from that day run with it, earlier or undated ones with SGLang's default (a prefill batch
    #   runs alone, kvsim.serve.policy);
    # - client (backend_templates/benchmark/bench_run.sh.j2): aiperf --concurrency c --num-requests
    #   c x 20 (BENCH_MULTI_ROUND, 50 before 2026-03-17) after c x 2 warm-up requests. aiperf waits for
    #   every warm-up response before profiling (its docs/tutorials/warmup.md), so the measured
    #   requests start as c simultaneous sends, as kvsim's closed loop does; the warm server matters
    #   to a GPU, not to kvsim.
    # The silicon rows are aiconfigurator's benchmark database; that they ran this generator's output
    # is an inference (its silicon-alignment guide: "AIC-generated deploys pass an explicit list"),
    # not recorded in the rows.
    "aiconfigurator": Deployment(
        "aiconfigurator", 20, 1500, {"vllm": True, "trtllm": True, "sglang": False}, {"trtllm": 32}, 1500, "fp8",
        "aiconfigurator's generated benchmark deployment: token budget batch_size + isl + 1500 (SGLang: "
        "isl + 1500), max_num_seqs batch_size, CUDA graphs at batch sizes 1..batch_size, max_model_len "
        "isl + osl + 1500, FP8 checkpoints with an FP8 KV cache, SGLang --enable-mixed-chunk on runs measured "
        "from 2026-01-19", datetime.date(2026, 1, 19)),
    # Each engine's defaults (vLLM 8,192 tokens per step on an H100; kv_cache_dtype auto, the
    # activations' bf16), the longest request's length as max_model_len, and 10 requests per client
    # (vLLM's benchmark sends --num-prompts, 1,000 by default: a fixed multiple of the concurrency
    # keeps every run past its first wave of simultaneous prompts by the same share).
    "engine-defaults": Deployment(
        "engine-defaults", 10, None, {}, {}, 0, "bf16",
        "the engines' default flags (a bf16 KV cache), max_model_len isl + osl"),
}
DEFAULT_DEPLOYMENT = "aiconfigurator"
# The engine column of a row that records no backend_version and no measurement date (the scenario
# then runs with kvsim's default vLLM version's rules, which every report names).
UNRECORDED = "?"
# The engine column's mark of a version inferred from the measurement date (Row.engine_version).
DATED = "~"
# The public silicon samples name each row's upstream file in a column the judge does not otherwise
# read; many give the day it was measured there as "measured=YYYY-MM-DD..." (aiconfigurator-core
# systems/silicon_sample.csv, column silicon_data_source).
SOURCE_COLUMN = "silicon_data_source"
_MEASURED = re.compile(r"(?:^|[;\s])measured=([^;\sT]+)")
RELEASES_FILE = "kvsim/data/vllm_releases.yaml"


@functools.cache
def _vllm_releases() -> tuple[tuple[str, str], ...]:
    """(publication date, version) of every vLLM release RELEASES_FILE lists, oldest first."""
    from kvsim.fileio import load_data_file

    data = load_data_file(RELEASES_FILE)
    # by day, then by version where one day saw two releases (0.10.1 and 0.10.1.1 were a day apart)
    return tuple(sorted(((str(d), str(v)) for v, d in data["released"].items()),
                        key=lambda dv: (dv[0], tuple(int(p) for p in dv[1].split(".")))))


def _is_release(version: str) -> bool:
    """Whether ``version`` names a release (digits and dots: 0.19.0), not a build (nightly-5b8c30d6...)."""
    return bool(version) and all(part.isdigit() for part in version.split("."))


def vllm_release_on(day: datetime.date) -> str | None:
    """The newest vLLM release published on or before ``day`` (RELEASES_FILE), None before the first."""
    published = [v for d, v in _vllm_releases() if d <= day.isoformat()]
    return published[-1] if published else None


def deployment_named(name: str, requests_per_client: int | None = None) -> Deployment:
    """The deployment ``name``, run for ``requests_per_client`` requests per client if given."""
    if name not in DEPLOYMENTS:
        raise KvsimError(f"must be one of {', '.join(DEPLOYMENTS)}", field="--deployment", value=name)
    if requests_per_client is None:
        return DEPLOYMENTS[name]
    if requests_per_client < 1:
        raise KvsimError("must be at least 1", field="--requests-per-client", value=requests_per_client)
    return replace(DEPLOYMENTS[name], requests_per_client=requests_per_client)


@dataclass(frozen=True)
class Row:
    """One measured run."""

    line: int
    backend: str
    version: str
    model: str  # HF repository id
    system: str
    precision: str
    isl: int
    osl: int
    concurrency: int  # clients of the closed loop: batch_size x attention_dp_size
    tp: int
    ttft_ms: float
    tpot_ms: float
    other_parallelism: str  # pipeline or unknown parallelism, disaggregation ("" when none)
    # Attention-DP ranks and the MoE layout (aiconfigurator's ModelConfig, aiconfigurator_core
    # sdk/config.py lines 26-28 and 84-144: tp_size x attention_dp_size = moe_tp_size x moe_ep_size,
    # the attention width equal to the experts' width for a MoE model); 0: the column is empty or 0
    dp: int = 1
    moe_tp: int = 0
    moe_ep: int = 0
    measured_on: datetime.date | None = None  # the day the row was measured, where its source column says
    # requests the client sent, where the row records it (optional column num_requests, e.g. `vllm bench
    # serve --num-prompts`); None: the deployment's requests per client x concurrency
    num_requests: int | None = None
    serve_flags: str = ""  # the run's `vllm serve` flags (SERVE_FLAGS_COLUMN), "" where not recorded
    sampler: str = ""  # SAMPLER_COLUMN: the server's sampler, "" where not recorded (native)
    # a `vllm bench serve` result's --request-rate (None: inf, every request at once) and --burstiness
    request_rate: float | None = None
    burstiness: float = 1.0

    @property
    def engine_flags(self) -> dict:
        """The scenario engine settings of the row's serve flags (serve_flag_settings; {} where the
        row records none)."""
        settings = serve_flag_settings(self.serve_flags)
        return settings if isinstance(settings, dict) else {}

    def requests(self, deployment: Deployment) -> int:
        """Requests the run sends: the row's own count, else the deployment's."""
        return self.num_requests or deployment.requests_per_client * self.concurrency

    @property
    def dated_version(self) -> str | None:
        """For a vLLM row that records no release version (none, or a nightly build's name) but its
        measurement day: the newest vLLM release published by then (an inference: the run may have used
        an older release; a nightly holds that release's code and later commits); else None."""
        if self.backend != "vllm" or _is_release(self.version) or self.measured_on is None:
            return None
        return vllm_release_on(self.measured_on)

    @property
    def engine_version(self) -> str:
        """The version the row is run as: the recorded release, else the dated one, else what it records
        ("": kvsim's default version; a build name kvsim cannot key a rule by is refused)."""
        return self.dated_version or self.version

    @property
    def engine_label(self) -> str:
        """The report's engine column: the recorded version, ~ the dated one, or UNRECORDED."""
        dated = self.dated_version
        return f"{self.backend} {DATED + dated if dated else self.version or UNRECORDED}"

    @property
    def layout(self) -> str:
        """The row's TP, DP and MoE columns as the file gives them."""
        return f"tp_size={self.tp}, attention_dp_size={self.dp}, moe_tp_size={self.moe_tp}, moe_ep_size={self.moe_ep}"


@dataclass(frozen=True)
class Judged:
    row: Row
    catalogue_model: str
    hardware: str
    ttft_ms: float
    tpot_ms: float
    calibration: str  # where the GPU's profile came from (Calibration.label)
    weights: str  # the precision the run's weights were served in (a run summary's scenario.weights)
    budget_tokens: int  # the run's token budget a step (its resolved max_num_batched_tokens)

    @property
    def ttft_error(self) -> float:
        return (self.ttft_ms - self.row.ttft_ms) / self.row.ttft_ms

    @property
    def tpot_error(self) -> float:
        return (self.tpot_ms - self.row.tpot_ms) / self.row.tpot_ms


def read_rows(path: Path) -> list[Row]:
    """The file's rows (a silicon-sample CSV; a `vllm bench serve` result JSON, or a folder of them:
    read_bench_results); a missing column or a malformed value is one error naming file, line and field."""
    if is_bench_results(path):
        return read_bench_results(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise KvsimError(f"cannot read: {err}", field="--serving", value=str(path)) from None
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise KvsimError(f"not a serving-measurement file: missing columns {', '.join(missing)}", file=str(path))
    rows = []
    for i, r in enumerate(reader, start=2):
        # a disaggregated run (mode=disagg) has separate prefill and decode workers and no
        # aggregated batch_size or tp_size (1 stands in): it is read, and counted as not expressible
        disagg = r.get("mode") == "disagg"
        try:
            # attention_dp_size empty: not used. 0 is not read as "not used": the public gb200 rows
            # with attention_dp_size=0 run more clients than batch_size says (their ids), so their
            # parallelism is unknown and they are counted as not expressible
            dp = 1 if disagg or r["attention_dp_size"] == "" else int(r["attention_dp_size"])
            moe_tp, moe_ep = (0, 0) if disagg else (int(r["moe_tp_size"] or 0), int(r["moe_ep_size"] or 0))
            unknown = ([f"pp_size={r['pp_size']}"] if r["pp_size"] not in ("", "1") else []) + (
                ["attention_dp_size=0"] if dp == 0 else [])
            measured = _MEASURED.search(r.get(SOURCE_COLUMN) or "")
            row = Row(i, r["backend"], r["backend_version"], r["model_path"], r["system"],
                      "+".join(v for v in (r["precision"], r["gemm_quant_mode"], r["moe_quant_mode"]) if v),
                      int(r["isl"]), int(r["osl"]),
                      # batch_size is per attention-DP rank: the vLLM rows' ids name the client's
                      # concurrency, batch_size x attention_dp_size (e.g. minimaxm2_5_b300_vllm_fp8_agg_
                      # 1024x1024_c512_cfg734: batch_size 128, attention_dp_size 4)
                      1 if disagg else int(r["batch_size"]) * max(dp, 1),
                      1 if disagg else int(r["tp_size"]),
                      float(r["silicon_ttft_ms"]), float(r["silicon_tpot_ms"]),
                      "disaggregated prefill and decode workers (mode=disagg)" if disagg else ", ".join(unknown),
                      max(dp, 1), moe_tp, moe_ep,
                      _measured_day(measured.group(1), i, path) if measured else None,
                      int(r["num_requests"]) if r.get("num_requests") else None,
                      (r.get(SERVE_FLAGS_COLUMN) or "").strip(), (r.get(SAMPLER_COLUMN) or "").strip())
        except (TypeError, ValueError, KeyError) as err:
            raise KvsimError(f"line {i}: malformed value ({type(err).__name__}: {err})", file=str(path)) from None
        if min(row.isl, row.osl, row.concurrency, row.tp, row.num_requests or 1) < 1 or not (0 < row.ttft_ms < math.inf
                                                                     and 0 < row.tpot_ms < math.inf):
            raise KvsimError(f"line {i}: lengths, concurrency, TP and num_requests must be >= 1, times finite and > 0",
                             file=str(path))
        rows.append(row)
    if not rows:
        raise KvsimError("no measurement rows", file=str(path))
    return rows


def serve_flag_settings(flags: str) -> dict | str:
    """The engine settings of ``vllm serve`` flags (SERVE_FLAGS), or why kvsim cannot run them: a flag
    it does not model, a value flag without its value, or a value of the wrong type."""
    words = flags.split()
    out: dict = {}
    i = 0
    while i < len(words):
        flag, _, inline = words[i].partition("=")
        if flag not in SERVE_FLAGS:
            return f"serve flag {flag}: kvsim does not model it"
        key, kind = SERVE_FLAGS[flag]
        if kind is bool:
            if inline:  # a switch: `--flag=false` would be read as on
                return f"serve flag {words[i]}: a switch takes no value"
            out[key] = True
            i += 1
            continue
        value = inline or (words[i + 1] if i + 1 < len(words) else "")
        try:
            out[key] = kind(value)
        except ValueError:
            return f"serve flag {flag}: value {value!r} is not a {kind.__name__}"
        i += 1 if inline else 2
    return out


# `vllm bench serve --save-result` writes one JSON per run (vllm/benchmarks/serve.py: the client's
# settings, then the metrics). What the server was, it does not record: the run gives it as
# `--metadata KEY=VALUE` entries, which the JSON keeps at its top level. Required: gpu (a catalogue name or
# silicon-sample system), vllm_version; optional: tp (default 1), precision (a silicon-sample label,
# default 16-bit: a quantized checkpoint must say it), serve_flags, sampler.
BENCH_METADATA_REQUIRED = ("gpu", "vllm_version")


def is_bench_results(path: Path) -> bool:
    """Whether ``path`` names `vllm bench serve` result JSONs (a .json file, or a folder of them)."""
    return path.is_dir() or path.suffix == ".json"


def read_bench_results(path: Path) -> list[Row]:
    """The runs of a `vllm bench serve --save-result` JSON, or of every *.json in a folder (sorted): one
    row each, its lengths the run's means (total tokens over completed requests), its clients
    --max-concurrency (else every request at once), with --request-rate and --burstiness as sent. A
    missing or malformed field is one error naming the file and the field."""
    import json

    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise KvsimError("no *.json `vllm bench serve` results in this folder", field="--serving", value=str(path))
    rows = []
    for i, f in enumerate(files, start=1):
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise KvsimError(f"cannot read a `vllm bench serve` result: {err}", file=str(f)) from None
        if not isinstance(d, dict):
            raise KvsimError("not a `vllm bench serve` result (expected a JSON object)", file=str(f))
        for key in ("model_id", "completed", "total_input_tokens", "total_output_tokens", "mean_ttft_ms",
                    "mean_tpot_ms", *BENCH_METADATA_REQUIRED):
            if d.get(key) in (None, ""):
                hint = (" (record it with `vllm bench serve --metadata KEY=VALUE`)"
                        if key in BENCH_METADATA_REQUIRED else "")
                raise KvsimError(f"missing{hint}", field=key, value=None, file=str(f))
        try:
            done = int(d["completed"])
            rate = d.get("request_rate", "inf")
            rate = None if rate in ("inf", None) or float(rate) == math.inf else float(rate)
            clients = int(d["max_concurrency"]) if d.get("max_concurrency") else done
            row = Row(i, "vllm", str(d["vllm_version"]), str(d["model_id"]), str(d["gpu"]),
                      str(d.get("precision", "")), round(int(d["total_input_tokens"]) / done),
                      round(int(d["total_output_tokens"]) / done), clients, int(d.get("tp", 1)),
                      float(d["mean_ttft_ms"]), float(d["mean_tpot_ms"]), "", num_requests=done,
                      serve_flags=str(d.get("serve_flags", "")).strip(), sampler=str(d.get("sampler", "")).strip(),
                      request_rate=rate, burstiness=float(d.get("burstiness", 1.0)))
        except (TypeError, ValueError, ZeroDivisionError) as err:
            raise KvsimError(f"malformed value ({type(err).__name__}: {err})", file=str(f)) from None
        if min(row.isl, row.osl, row.concurrency, row.tp) < 1 or not (0 < row.ttft_ms < math.inf
                                                                      and 0 < row.tpot_ms < math.inf):
            raise KvsimError("lengths, concurrency and tp must be >= 1, times finite and > 0", file=str(f))
        rows.append(row)
    return rows


def _measured_day(text: str, line: int, path: Path) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise KvsimError(f"line {line}: measured= must be a date YYYY-MM-DD", field=SOURCE_COLUMN, value=text,
                         file=str(path)) from None


@functools.cache
def _catalogue_models() -> dict[str, str]:
    """HF repository id (lower case) -> catalogue name."""
    from kvsim.spec.model import load_model, model_names

    out = {}
    for name in model_names():
        repo = load_model(name).source.split(" ")[0].lower()
        out[repo] = name
        # an -Instruct, -FP8 or -AWQ release has its base model's architecture (the same config.json
        # shapes); only the weights' values (and, for -FP8 and -AWQ, their precision: the row's) differ
        out.setdefault(f"{repo}-instruct", name)
        out.setdefault(f"{repo}-fp8", name)
        out.setdefault(f"{repo}-awq", name)
        # NVIDIA's ModelOpt FP8 releases of a model (e.g. nvidia/Llama-3.1-8B-Instruct-FP8: the same
        # config.json shapes plus a quantization_config)
        base = repo.split("/", 1)[-1]
        out.setdefault(f"nvidia/{base}-fp8", name)
        out.setdefault(f"nvidia/{base}-instruct-fp8", name)
        # Qwen's 2507 releases of Qwen3 keep their base model's shapes and raise only the context
        # (max_position_embeddings 262,144, rope_theta 5e6), which the judged rows' max_model_len
        # never reaches: Qwen3-235B-A22B-Instruct-2507 has 94 layers, 64 query / 4 KV heads, 128
        # experts with 8 active, 235B / 22B parameters, as Qwen3-235B-A22B (its model card, copied in
        # akash-network/awesome-akash Qwen3-235B-A22B-Instruct-2507-FP8/README.md)
        if repo.startswith("qwen/qwen3-"):
            for release in ("instruct-2507", "thinking-2507"):
                out.setdefault(f"{repo}-{release}", name)
                out.setdefault(f"{repo}-{release}-fp8", name)
        if repo == "deepseek-ai/deepseek-r1":  # its 0528 update (STAND_INS)
            out.setdefault(f"{repo}-0528", name)
    return out


# Releases whose config.json aiconfigurator-core does not ship, and the shipped release that stands for
# it (same shapes and the same quantization):
# - Qwen's 2507 releases of Qwen3 keep their base model's shapes (_catalogue_models); Qwen's FP8 releases
#   of Qwen3 quantize in 128x128 blocks (the shipped Qwen3-235B-A22B-FP8 and Qwen3-32B-FP8 configs:
#   quantization_config fp8, weight_block_size [128, 128]);
# - DeepSeek-R1-0528 is "Incremental updated to DeepSeek-R1" (LM Studio's model page of its GGUF release,
#   copied in JoseAdrianRodriguezGonzalez/Llm-Component en/lmstudio-community__DeepSeek-R1-0528-GGUF/
#   README.md), the same 61-layer DeepseekV3ForCausalLM (Thireus' GGUF recipes of DeepSeek-R1-0528 name
#   blocks 0-60), released in DeepSeek-R1's FP8 blocks.
STAND_INS = (("-instruct-2507-fp8", "-fp8"), ("-thinking-2507-fp8", "-fp8"), ("deepseek-r1-0528", "deepseek-r1"))


# kvsim's own copies of the quantized releases' config.json files the public judged file needs (so it
# judges the same without aiconfigurator-core; kvsim/data/checkpoints/README.md)
CHECKPOINTS = "kvsim/data/checkpoints"


def _shipped_config(row: Row) -> Path | None:
    """The config.json of ``row``'s checkpoint (<org>--<name>_config.json, the HF file of that release,
    else that of its STAND_INS release) from kvsim's CHECKPOINTS, else where aiconfigurator-core ships it
    (model_configs/), else None."""
    if "/" not in row.model:
        return None
    from kvsim.fileio import data_file

    folders = [Path(str(data_file(CHECKPOINTS)))]
    try:
        import aiconfigurator_core  # noqa: PLC0415 - optional dependency (kvsim[aic])

        folders.append(Path(aiconfigurator_core.__file__).parent / "model_configs")
    except ImportError:
        pass
    model = row.model.lower()
    names = [model] + [model[: -len(tail)] + stand_in for tail, stand_in in STAND_INS if model.endswith(tail)]
    for name in names:  # the release's own config first, then its stand-in's; kvsim's copy before the package's
        for folder in folders:
            if name in (shipped := _shipped_configs(folder)):
                return shipped[name]
    return None


@functools.cache
def _shipped_configs(folder: Path) -> dict[str, Path]:
    """HF repository id (lower case) -> its config.json in aiconfigurator-core's model_configs."""
    return {p.name.removesuffix("_config.json").replace("--", "/", 1).lower(): p
            for p in folder.glob("*_config.json")}


def _shipped_quant(path: Path) -> dict | None:
    """kvsim's weight_quantization mapping of a shipped config.json (None: a 16-bit checkpoint)."""
    from kvsim.fileio import read_json_file
    from kvsim.spec.quant import quant_from_hf

    config = read_json_file(path, "a Hugging Face config.json")
    return quant_from_hf(config, str(path)) if isinstance(config, dict) else None


def _block_fp8_checkpoint(row: Row) -> str | None:
    """The config.json of ``row``'s checkpoint where it is a block-FP8 release with an FP8 label and
    aiconfigurator-core ships its config (FP8_BLOCK_LABELS), else None."""
    path = _shipped_config(row) if row.precision in FP8_WEIGHTS + FP8_BLOCK_LABELS else None
    wq = _shipped_quant(path) if path else None
    return str(path) if wq is not None and wq["precision"] == "fp8" and wq.get("block_scaled") else None


def _uncatalogued(row: Row) -> tuple[str | None, str]:
    """(config.json to run, "") for a model outside the catalogue whose checkpoint's config
    aiconfigurator-core ships, kvsim models whole (no assumed layer type) and whose quantization the
    row's label agrees with (16-bit labels: a 16-bit checkpoint; FP8 labels: an FP8 or 16-bit one);
    else (None, why not)."""
    import warnings

    from kvsim.spec.model import load_model

    path = _shipped_config(row)
    if path is None:
        return None, f"model {row.model} not in the catalogue"
    wq = _shipped_quant(path)
    fp8_label = row.precision in FP8_WEIGHTS + FP8_BLOCK_LABELS
    if not ((wq is None and (row.precision in UNQUANTIZED or row.precision in FP8_WEIGHTS))
            or (wq is not None and fp8_label and wq["precision"] == "fp8")):
        return None, (f"model {row.model} not in the catalogue; its config.json ({path.name}) holds "
                      f"{wq['precision'] if wq else '16-bit'} weights, the row's label {row.precision or 'bf16'}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an assumed layer type is not a model kvsim can stand behind
            load_model(str(path))
    except (KvsimError, UserWarning) as err:
        return None, f"model {row.model} not in the catalogue; its config.json: {str(err).split(': ', 1)[-1][:80]}"
    return str(path), ""


def _native_mxfp4(name: str) -> bool:
    """Whether the catalogue model ``name``'s checkpoint is MXFP4 (FP4_LABEL)."""
    from kvsim.spec.model import load_model

    wq = load_model(name).weight_quant
    return wq is not None and wq.precision == "mxfp4"


@dataclass(frozen=True)
class Checkpoint:
    """The checkpoint a row ran, as kvsim runs it."""

    model: str  # a catalogue name, or the path of the release's shipped config.json
    name: str  # what the tables call it: the catalogue name, else the release's name
    weights: str | None  # the scenario's weights (bf16, fp8); None: the checkpoint's own, as stored


@functools.cache  # asked for each row by _why_not and judge: its shipped config is read once
def _checkpoint(row: Row) -> Checkpoint | str:
    """The checkpoint ``row`` ran, else why kvsim cannot run it. In this order:
    - an FP8 label on a block-FP8 release whose config.json aiconfigurator-core ships (or that of its
      STAND_INS release): that config, with its 128x128-block weights (FP8_BLOCK_LABELS);
    - the FP4 label, or a 16-bit one, on a catalogue model whose only release is MXFP4: its own weights
      (FP4_LABEL; vLLM loads that checkpoint as stored);
    - INT4_LABEL on a dense catalogue model (or its -AWQ release): int4 weights (W4A16);
    - any other quantized label: not expressible;
    - a catalogue model (or its -Instruct / -FP8 / NVIDIA FP8 release): bf16 weights, or FP8 with
      per-tensor scales for an FP8 label (FP8_WEIGHTS: quantized on load if the checkpoint is 16-bit);
    - a model outside the catalogue whose config.json is shipped, modelled whole and agreeing with the
      label (_uncatalogued): that config, with the label's weights."""
    name = _catalogue_models().get(row.model.lower())
    block = _block_fp8_checkpoint(row)
    release = row.model.split("/")[-1].lower()  # how the tables name a model outside the catalogue
    if block is not None:
        if name is None:  # outside the catalogue: only a release kvsim models whole
            path, why = _uncatalogued(row)
            if path is None:
                return why
        return Checkpoint(block, name or release, None)
    if name is not None and _native_mxfp4(name) and row.precision in (FP4_LABEL, *UNQUANTIZED):
        # its only release is MXFP4: a 16-bit label (e.g. a row that records no quantization) ran it too
        return Checkpoint(name, name, None)
    from kvsim.spec.model import load_model

    if row.precision == INT4_LABEL and name is not None and load_model(name).moe is None:
        return Checkpoint(name, name, "int4")
    if row.precision not in UNQUANTIZED + FP8_WEIGHTS:
        return (f"quantized weights or KV ({row.precision}): only bf16, per-tensor FP8, native MXFP4 (gpt-oss), "
                "block-FP8 releases whose config.json aiconfigurator-core ships and W4A16 dense models are modelled")
    weights = "fp8" if row.precision in FP8_WEIGHTS else "bf16"
    if name is not None:
        return Checkpoint(name, name, weights)
    path, why = _uncatalogued(row)
    return why if path is None else Checkpoint(path, release, weights)


def find_silicon_sample() -> Path:
    """The silicon-sample file shipped in the installed ``aiconfigurator-core`` (``--serving aiconfigurator``)."""
    try:
        import aiconfigurator_core  # noqa: PLC0415 - optional dependency (kvsim[aic])
    except ImportError:
        raise KvsimError("needs the aiconfigurator-core package: pip install 'kvsim[aic]'", field="--serving",
                         value="aiconfigurator") from None
    path = Path(aiconfigurator_core.__file__).parent / "systems" / "silicon_sample.csv"
    if not path.is_file():
        raise KvsimError("the installed package has no systems/silicon_sample.csv", field="--serving",
                         value="aiconfigurator", file=str(path))
    return path


def _gpu(system: str) -> str:
    """The catalogue name of a silicon-sample ``system`` (the importer's mapping, else the same name)."""
    from kvsim.importers.aiconfigurator import SYSTEMS

    return SYSTEMS.get(system, system.replace("_", "-"))


def _why_not(row: Row, gpus: set[str]) -> str | None:
    """Why kvsim cannot express ``row`` yet (None: it can)."""
    from kvsim.cost.calibration import ENGINE_KINDS

    if row.other_parallelism:
        return f"parallelism kvsim does not model yet ({row.other_parallelism})"
    flags = serve_flag_settings(row.serve_flags)
    if isinstance(flags, str):
        return flags
    if flags and row.backend != "vllm":
        return f"serve flags on {row.backend}: the column holds `vllm serve` flags"
    if (row.dp > 1 or row.moe_ep > 1) and row.backend != "vllm":
        # SGLang's and TensorRT-LLM's DP attention and EP are their own layouts (and schedulers)
        return f"attention-DP or expert-parallel layout on {row.backend} ({row.layout}): kvsim models vLLM's"
    if row.backend not in ENGINE_KINDS:
        return f"engine {row.backend} (kvsim imports kernels of {', '.join(ENGINE_KINDS)})"
    checkpoint = _checkpoint(row)
    if isinstance(checkpoint, str):
        return checkpoint
    if _gpu(row.system) not in gpus:
        return f"GPU {row.system} not in the catalogue"
    return _why_not_layout(row, checkpoint.model)


def _why_not_layout(row: Row, model: str) -> str | None:
    """Why kvsim cannot express the row's attention-DP and MoE layout (None: it can).

    aiconfigurator's columns (aiconfigurator_core sdk/config.py: ``ModelConfig`` lines 16-28,
    ``resolve_moe_parallelism`` lines 84-144): ``tp_size`` is the attention's TP degree,
    ``attention_dp_size`` the attention-DP ranks, and for a MoE model the experts are laid out over
    the same GPUs, ``tp_size x attention_dp_size = moe_tp_size x moe_ep_size``. vLLM's experts span
    all ``tp x dp`` GPUs either as whole experts (``--enable-expert-parallel``: EP size = tp x dp,
    so moe_tp_size 1) or TP-sharded (the default: moe_tp_size = tp x dp, moe_ep_size 1)
    (kvsim.spec.parallel). Those two layouts are expressed; every other is refused with its reason.
    A dense model has no experts: its MoE columns describe nothing and are not read.
    """
    from kvsim.spec.hardware import load_hardware
    from kvsim.spec.model import load_model

    moe = load_model(model).moe is not None
    if not moe and row.moe_ep > 1:
        return f"moe_ep_size={row.moe_ep} on dense model {row.model}"
    if moe and (row.moe_tp, row.moe_ep) == (0, 0):
        if row.dp > 1:  # vLLM's default would TP-shard the experts; the row does not say it ran so
            return f"MoE layout not stated with attention-DP ({row.layout})"
    elif moe and 0 in (row.moe_tp, row.moe_ep):
        return f"MoE layout not stated whole ({row.layout})"
    elif moe and row.tp * row.dp != row.moe_tp * row.moe_ep:
        # aiconfigurator refuses such a configuration (resolve_moe_parallelism, sdk/config.py 133-140)
        return (f"inconsistent row: tp_size x attention_dp_size = {row.tp * row.dp} but moe_tp_size x moe_ep_size "
                f"= {row.moe_tp * row.moe_ep} (aiconfigurator requires them equal)")
    elif moe and row.moe_tp > 1 and row.moe_ep > 1:
        return f"MoE layout moe_tp_size={row.moe_tp} x moe_ep_size={row.moe_ep}: vLLM shards experts all-TP or all-EP"
    node = load_hardware(_gpu(row.system)).max_gpus_per_node
    if row.tp * row.dp > node:
        return (f"multi-node: tp_size x attention_dp_size = {row.tp * row.dp} GPUs, more than one {row.system} "
                f"node's {node} (kvsim models single-node DP and EP)")
    return None


def _scenario(row: Row, checkpoint: Checkpoint, hardware: str, calibration: str | None,  # noqa: ANN202 - a Scenario
              deployment: Deployment, sets: Sequence[str] = ()):
    from kvsim.scenario import scenario_from_dict
    from kvsim.scenario.load import apply_sets

    raw = {"name": f"line{row.line}", "model": checkpoint.model, "hardware": hardware, "tp": row.tp,
           "calibration": calibration,
           # the closed loop's SLOs are not judged; any positive targets will do
           "slo": {"ttft_s": 1.0, "tpot_s": 1.0},
           # the row's engine picks the kernel database of the GPU's imported profile (the
           # scheduler stays vLLM-like for every engine)
           "engine": {"kind": row.backend, **deployment.engine(row),
                      # vLLM's --data-parallel-size and --enable-expert-parallel (EP size = tp x dp):
                      # moe_ep_size = tp_size x attention_dp_size (moe_tp_size 1) is expert
                      # parallelism, moe_tp_size = tp_size x attention_dp_size the default TP-sharded
                      # experts (_why_not refuses every other layout)
                      **({"data_parallel_size": row.dp} if row.dp > 1 else {}),
                      **({"expert_parallel": True} if row.moe_ep > 1 else {}),
                      # a vLLM row's version keys the memory rule and the engine step's host time (a row
                      # that records none runs as kvsim's default version, which the report names)
                      **({"vllm_version": row.engine_version} if row.backend == "vllm" and row.engine_version
                         else {}),
                      # the row's own `vllm serve` flags and sampler, over the deployment's assumptions
                      **row.engine_flags, **({"sampler": row.sampler} if row.sampler else {})},
           **({} if checkpoint.weights is None else {"weights": checkpoint.weights}),
           **({"method": deployment.fp8_checkpoint_kv} if row.precision in FP8_WEIGHTS + FP8_BLOCK_LABELS else {}),
           "workload": {"closed_loop": {"concurrency": row.concurrency,
                                        "num_requests": row.requests(deployment),
                                        **({"request_rate": row.request_rate, "burstiness": row.burstiness}
                                           if row.request_rate is not None else {}),
                                        "input": {"kind": "fixed", "tokens": row.isl},
                                        "output": {"kind": "fixed", "tokens": row.osl}}}}
    # --set overrides: a hypothesis about how the measured servers ran (e.g. a smaller token budget),
    # applied to every row after the defaults above
    return scenario_from_dict(apply_sets(raw, sets, "--set"), f"{row.model} line {row.line}")


def judge(path: Path, calibration: str | None = None, sets: Sequence[str] = (),
          deployment: str = DEFAULT_DEPLOYMENT,
          requests_per_client: int | None = None) -> tuple[list[Judged], Counter[str]]:
    """Predict every expressible row; count the others by reason. ``calibration``: as a scenario's
    (None: each row's GPU profile for the row's engine; 'imported': the imported one even where kvsim
    measured the GPU). ``sets``: ``KEY=VALUE`` scenario overrides for every row, after the
    ``deployment``'s settings (a malformed one is an error, not a row kvsim cannot run).
    ``requests_per_client``: the run's length instead of the deployment's."""
    dep = deployment_named(deployment, requests_per_client)
    from kvsim.spec.hardware import hardware_names

    rows = read_rows(path)
    gpus = set(hardware_names())
    judged: list[Judged] = []
    skipped: Counter[str] = Counter()
    checked = not sets
    # one simulation per configuration: its first row's prediction (or why kvsim cannot run it) serves
    # every other measurement of it; a row listed again whole (e.g. in two source files) is judged once
    outcome: dict[Row, Judged | str] = {}
    seen: set[Row] = set()
    for row in rows:
        whole = replace(row, line=0)  # the row as a run: every column but its place in the file
        if whole in seen:
            skipped[DUPLICATE_ROWS] += 1
            continue
        seen.add(whole)
        why = _why_not(row, gpus)
        if why is not None:
            skipped[why] += 1
            continue
        config = configuration(row)
        if config not in outcome:
            checkpoint = _checkpoint(row)
            assert isinstance(checkpoint, Checkpoint)  # _why_not refused the row otherwise
            if not checked:  # the first expressible row: a bad override raises here, once
                _scenario(row, checkpoint, _gpu(row.system), calibration, dep, sets)
                checked = True
            outcome[config] = _judge_row(row, checkpoint, calibration, dep, sets)
        first = outcome[config]
        if isinstance(first, str):
            skipped[first] += 1
        else:
            judged.append(replace(first, row=row))
    return judged, skipped


def _judge_row(row: Row, checkpoint: Checkpoint, calibration: str | None, deployment: Deployment,
               sets: Sequence[str]) -> Judged | str:
    """kvsim's prediction of the row, or why kvsim cannot run it."""
    from kvsim.scenario import run_scenario

    hardware = _gpu(row.system)
    try:
        s = run_scenario(_scenario(row, checkpoint, hardware, calibration, deployment, sets),
                         record_steps=False).summary
    except KvsimError as err:  # e.g. the model does not fit this GPU at this TP
        why = str(err).split(": ", 1)[-1]
        if checkpoint.model.endswith(".json"):  # the shipped config.json's name, not its install path
            why = why.replace(checkpoint.model, Path(checkpoint.model).name)
        return f"kvsim cannot run it: {why[:90]}"
    if s["completed"] != row.requests(deployment):
        reasons = ", ".join(k for k, v in s["rejected"]["by_reason"].items() if v)
        return f"kvsim rejects the requests: {reasons}"
    return Judged(row, checkpoint.name, hardware, s["ttft_s"]["mean"] * 1e3, s["tpot_s"]["mean"] * 1e3,
                  s["scenario"]["calibration"]["label"], s["scenario"]["weights"],
                  s["scenario"]["engine_limits"]["max_num_batched_tokens"])


def configuration(row: Row) -> Row:
    """What a run was, less what it measured: two rows alike here are the same configuration measured
    twice (or listed twice), and kvsim predicts them alike."""
    return replace(row, line=0, ttft_ms=0.0, tpot_ms=0.0)


def repeat_spread(judged: Sequence[Judged]) -> dict | None:
    """How the file's own repeat measurements disagree: over the configurations it measures more than
    once with different results, each one's spread (largest / smallest - 1) of TTFT and of TPOT, their
    median, p90 and largest. No prediction can be expected to agree with a file more closely than its
    repeats agree with each other; None where no configuration is measured twice."""
    results: dict[Row, set[tuple[float, float]]] = {}
    for j in judged:
        results.setdefault(configuration(j.row), set()).add((j.row.ttft_ms, j.row.tpot_ms))
    repeated = [v for v in results.values() if len(v) > 1]
    if not repeated:
        return None
    out: dict = {"configurations": len(repeated)}
    for i, metric in enumerate(("ttft", "tpot")):
        spread = np.array([max(m[i] for m in v) / min(m[i] for m in v) - 1 for v in repeated])
        out[f"{metric}_median_spread"] = float(np.median(spread))
        out[f"{metric}_p90_spread"] = float(np.percentile(spread, 90))
        out[f"{metric}_max_spread"] = float(spread.max())
    return out


def error_table(judged: list[Judged]) -> list[dict]:
    """Median, p90 and worst absolute error of TTFT and TPOT per (GPU, engine, model, precision, TP),
    then over all rows."""
    groups: dict[tuple, list[Judged]] = {}
    for j in judged:
        key = (j.hardware, j.row.engine_label, j.catalogue_model,
               j.row.precision or "bf16", j.row.tp, j.calibration)
        groups.setdefault(key, []).append(j)
        groups.setdefault(("all", "", "", "", 0, ""), []).append(j)
    out = []
    for key in sorted(groups, key=lambda k: (k[0] == "all", k)):
        js = groups[key]
        entry = dict(zip(("gpu", "engine", "model", "precision", "tp", "calibration"), key, strict=True))
        entry["rows"] = len(js)
        entry["configurations"] = len({configuration(j.row) for j in js})
        for metric in ("ttft", "tpot"):
            errs = np.abs([getattr(j, f"{metric}_error") for j in js])
            entry[f"{metric}_median_abs_err"] = float(np.median(errs))
            entry[f"{metric}_p90_abs_err"] = float(np.percentile(errs, 90))
            entry[f"{metric}_max_abs_err"] = float(errs.max())
            entry[f"{metric}_mean_signed_err"] = float(np.mean([getattr(j, f"{metric}_error") for j in js]))
        out.append(entry)
    return out
