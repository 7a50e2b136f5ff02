"""kvsim against NVIDIA aiconfigurator's own predictor, on the same real measurements.

For every row kvsim's serving judge predicted (the JSON of ``kvsim validate --serving FILE --json``),
this asks aiconfigurator-core's aggregated-serving model for the same configuration
(``BaseBackend.run_agg``: its per-operation database for the row's GPU and engine, the database version
aiconfigurator calls "current", with the token budget of kvsim's run of the row, its deployment's, as
``ctx_tokens``) and reports both tools' absolute TTFT and TPOT errors over the rows both priced. A row
aiconfigurator cannot price (a model whose config.json it does not ship, a database it lacks, a run that
is not a closed loop) is counted with its reason, never dropped in silence.

Both tools get the same configuration: GPU, engine, TP and the MoE/attention-DP layout, weights and KV
precisions as the row labels them (an FP8-labelled row's KV cache as the judge's deployment stores it: FP8
under the aiconfigurator deployment), clients as its batch size, input and output lengths. Each uses its
own default kernels (kvsim: its measured profile on H100/H200, the imported aiconfigurator tables
elsewhere). Needs kvsim[aic].

    .venv/bin/kvsim validate --serving ../shared/data/measured/vllm_h100_qwen3-32b_closed_loop.csv \
        --json > /tmp/dev.json
    .venv/bin/python scripts/versus_aiconfigurator.py /tmp/dev.json
    .venv/bin/kvsim validate --serving aiconfigurator --json > /tmp/judge.json   # about 8 minutes
    .venv/bin/python scripts/versus_aiconfigurator.py /tmp/judge.json            # about 20 seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from kvsim.importers.aiconfigurator import data_root
from kvsim.judge_serving import FP8_BLOCK_LABELS, FP8_WEIGHTS, STAND_INS, Row, deployment_named, read_rows


@cache
def _shipped_models() -> dict[str, str]:
    """The HF ids whose config.json aiconfigurator-core ships (model_configs/<org>--<name>_config.json), by
    their lower-case spelling."""
    ids = [p.name.removesuffix("_config.json").replace("--", "/", 1)
           for p in (data_root().parent.parent / "model_configs").glob("*_config.json")]
    return {i.lower(): i for i in ids}


def shipped_name(model: str) -> str:
    """The HF id under which aiconfigurator-core ships ``model``'s config.json (it fetches any other from
    the Hub, which this sandbox cannot reach), matched without case: a later release of the same shapes
    stands for its base one as in kvsim's judge (STAND_INS: DeepSeek-R1-0528 for DeepSeek-R1), and Meta's
    Llama 3.1 releases are shipped under their old "Meta-Llama-3.1-*" names, the base model's config standing
    for the Instruct one and for NVIDIA's FP8 re-release (same shapes; an FP8-labelled row's weights are FP8
    whichever config is read)."""
    shipped = _shipped_models()
    org, name = model.lower().split("/", 1)
    for suffix, base in STAND_INS:
        if name.endswith(suffix):
            name = name.removesuffix(suffix) + base
    llama = f"meta-llama/meta-{name.removesuffix('-fp8').removesuffix('-instruct')}"
    return shipped.get(f"{org}/{name}") or shipped.get(llama) or model


def aic_predict(row: Row, budget_tokens: int, fp8_rows_fp8_kv: bool, cache: dict) -> tuple[float, float] | str:
    """(TTFT ms, TPOT ms) from aiconfigurator's run_agg for one row, or why it cannot price it."""
    from aiconfigurator_core.sdk import common, config
    from aiconfigurator_core.sdk.backends.factory import get_backend
    from aiconfigurator_core.sdk.models import get_model
    from aiconfigurator_core.sdk.perf_database import get_database

    key = (row.system, row.backend)
    if key not in cache:
        try:  # aiconfigurator's own default: the "current" database version of the GPU and engine
            cache[key] = get_database(row.system, row.backend, "current")
        except Exception as e:  # noqa: BLE001 - counted by reason
            cache[key] = f"no {row.backend} database for {row.system}: {type(e).__name__}"
    if isinstance(cache[key], str):
        return cache[key]
    # weights as the row labels them: FP8 per-tensor on a 16-bit checkpoint (quantized on load), else the
    # checkpoint's own format, which aiconfigurator infers from its config.json as for its own estimates
    # (block-FP8 releases, gpt-oss's MXFP4); an FP8 row's KV cache as the judge's deployment stores it
    fp8 = row.precision in FP8_WEIGHTS
    fp8_kv = fp8_rows_fp8_kv and (fp8 or row.precision in FP8_BLOCK_LABELS)
    mc = config.ModelConfig(tp_size=row.tp, gemm_quant_mode=common.GEMMQuantMode.fp8 if fp8 else None,
                            moe_quant_mode=common.MoEQuantMode.fp8 if fp8 else None,
                            kvcache_quant_mode=common.KVCacheQuantMode.fp8 if fp8_kv else None,
                            # a row that records no MoE layout ran vLLM's default, experts TP-sharded over every GPU
                            moe_tp_size=row.moe_tp or (None if row.moe_ep else row.tp * max(row.dp, 1)),
                            moe_ep_size=row.moe_ep or (None if row.moe_tp else 1),
                            attention_dp_size=max(row.dp, 1))
    try:
        model = get_model(shipped_name(row.model), mc, row.backend)
        backend = get_backend(row.backend)  # a fresh backend: its result cache is keyed without the model
        rc = config.RuntimeConfig(batch_size=row.concurrency // max(row.dp, 1), isl=row.isl, osl=row.osl)
        df = backend.run_agg(model, cache[key], rc, ctx_tokens=budget_tokens).get_summary_df()
    except Exception as e:  # noqa: BLE001 - aiconfigurator's refusals are counted by reason
        return f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    return float(df["ttft"].iloc[0]), float(df["tpot"].iloc[0])


def _stats(errs: list[float]) -> tuple[float, float]:
    """(median, p90) of the absolute errors; p90 is the sorted value at 0.9 x (n - 1), rounded down."""
    a = sorted(abs(e) for e in errs)
    return statistics.median(a), a[int(0.9 * (len(a) - 1))]


@dataclass(frozen=True)
class Comparison:
    # (system, engine) -> per row (kvsim TTFT, kvsim TPOT, aiconfigurator TTFT, aiconfigurator TPOT) signed errors
    errors: dict[tuple[str, str], list[tuple[float, float, float, float]]]
    refused: Counter[str]  # "engine: why aiconfigurator cannot price it" -> rows
    rows: list[dict]  # every row both priced: measured and predicted times

    def table(self) -> list[tuple[str, str, int, tuple[float, float], tuple[float, float], tuple[float, float],
                                  tuple[float, float]]]:
        """Per (system, engine), then all: runs and (median, p90) absolute error of kvsim's TTFT,
        aiconfigurator's TTFT, kvsim's TPOT, aiconfigurator's TPOT."""
        groups = sorted(self.errors.items()) + [(("all", ""), [e for v in self.errors.values() for e in v])]
        return [(system, engine, len(errs), *(_stats([e[i] for e in errs]) for i in (0, 2, 1, 3)))
                for (system, engine), errs in groups if errs]


def compare(path: Path, deployment: str, kvsim: list[tuple[int, float, float, int]]) -> Comparison:
    """aiconfigurator's prediction for every row of ``path`` kvsim predicted (line, TTFT ms, TPOT ms, the
    token budget of kvsim's run: aiconfigurator's ``ctx_tokens``), judged under ``deployment`` (which
    says how an FP8 row's KV cache was stored). A run that is not a closed loop (a
    burst of requests sent at once, or at a rate) is counted, not priced: run_agg models a steady closed
    loop of ``batch_size`` requests."""
    logging.disable(logging.WARNING)  # aiconfigurator logs every interpolation
    rows = {r.line: r for r in read_rows(path)}
    fp8_kv = deployment_named(deployment).fp8_checkpoint_kv == "fp8"
    cache: dict = {}
    errors: dict[tuple[str, str], list[tuple[float, float, float, float]]] = defaultdict(list)
    refused: Counter[str] = Counter()
    out = []
    for line, ttft_ms, tpot_ms, budget_tokens in kvsim:
        row = rows[line]
        if row.num_requests == row.concurrency or row.request_rate is not None:
            refused[f"{row.backend}: not a closed loop (every request sent at once, or at a rate)"] += 1
            continue
        got = aic_predict(row, budget_tokens, fp8_kv, cache)
        if isinstance(got, str):
            refused[f"{row.backend}: {got}"] += 1
            continue
        errors[(row.system, row.backend)].append(tuple(
            (p - m) / m for p, m in ((ttft_ms, row.ttft_ms), (tpot_ms, row.tpot_ms), (got[0], row.ttft_ms),
                                     (got[1], row.tpot_ms))))
        out.append({"line": line, "ttft_ms": row.ttft_ms, "tpot_ms": row.tpot_ms, "kvsim_ttft_ms": ttft_ms,
                    "kvsim_tpot_ms": tpot_ms, "aiconfigurator_ttft_ms": got[0], "aiconfigurator_tpot_ms": got[1]})
    return Comparison(dict(errors), refused, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("judge_json", help="kvsim validate --serving FILE --json output (any deployment)")
    ap.add_argument("--json", help="also write every row's four predictions here")
    a = ap.parse_args()
    judged = json.loads(Path(a.judge_json).read_text())
    path = Path(judged["file"])
    kvsim = [(j["line"], j["predicted_ttft_ms"], j["predicted_tpot_ms"], j["max_num_batched_tokens"])
             for j in judged["rows"]]
    c = compare(path, judged["deployment"]["name"], kvsim)
    print(f"{path.name}: {len(c.rows)} of {len(judged['rows'])} judged rows priced by both "
          "(absolute error, median / p90)")
    print("| system | engine | runs | kvsim TTFT | aiconfigurator TTFT | kvsim TPOT | aiconfigurator TPOT |")
    print("|---|---|---|---|---|---|---|")
    for system, engine, n, *cols in c.table():
        print(f"| {system} | {engine} | {n} | " + " | ".join(f"{100 * m:.1f}% / {100 * p:.1f}%" for m, p in cols)
              + " |")
    for reason, n in c.refused.most_common():
        print(f"not priced by aiconfigurator: {n} rows: {reason}")
    if a.json:
        Path(a.json).write_text(json.dumps(c.rows, indent=1))


if __name__ == "__main__":
    main()
