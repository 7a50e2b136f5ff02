"""Files a run writes with ``--out DIR``, each whole or not at all: ``summary.json``,
``requests.csv`` (one row per request), ``timeseries.csv`` (KV blocks, running and waiting
requests over time) and ``trace.json`` (engine steps as a Chrome trace, for Perfetto)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from kvsim.errors import KvsimError
from kvsim.fileio import check_writable, umask, write_atomic
from kvsim.scenario.run import RunResult
from kvsim.serve import metrics

REQUEST_CSV = ("request_id", "arrival_s", "input_tokens", "image_tokens", "output_tokens", "generated_tokens",
               "user_id", "session_id", "replica", "status", "scheduled_s", "ttft_s", "tpot_s", "e2e_s",
               "prefix_hit_tokens", "doc_ssd_tokens", "cross_user_hit", "preemptions")


def _fmt(x: float) -> str:
    return "" if not np.isfinite(x) else repr(float(x))


def requests_csv(result: RunResult) -> str:
    rec = result.simulation.recorder
    cols = rec.arrays()
    order = np.argsort(np.frombuffer(rec.requests["request_id"], dtype=np.int64), kind="stable")
    users = [rec.users[i] for i in order]
    sessions = [rec.sessions[i] for i in order]
    done = cols["status"] == metrics.STATUSES.index(metrics.COMPLETED)
    nan = np.full(len(done), np.nan)
    ttft = np.where(done, cols["first_token_s"] - cols["arrival_s"], nan)
    e2e = np.where(done, cols["finish_s"] - cols["arrival_s"], nan)
    sched = np.where(cols["scheduled_s"] >= 0, cols["scheduled_s"], nan)  # queueing: scheduled_s - arrival_s
    multi = done & (cols["generated_tokens"] > 1)
    gaps = np.maximum(cols["generated_tokens"] - 1, 1)
    tpot = np.where(multi, (cols["finish_s"] - cols["first_token_s"]) / gaps, nan)
    out = io.StringIO()
    out.write(",".join(REQUEST_CSV) + "\n")
    for i in range(len(done)):
        out.write(",".join((
            str(cols["request_id"][i]), repr(float(cols["arrival_s"][i])), str(cols["input_tokens"][i]),
            str(cols["image_tokens"][i]), str(cols["output_tokens"][i]), str(cols["generated_tokens"][i]),
            users[i] or "", "" if sessions[i] is None else str(sessions[i]), str(cols["replica"][i]),
            metrics.STATUSES[cols["status"][i]], _fmt(sched[i]), _fmt(ttft[i]), _fmt(tpot[i]), _fmt(e2e[i]),
            str(cols["prefix_hit_tokens"][i]), str(cols["doc_ssd_tokens"][i]),
            str(int(cols["cross_user_hit"][i])), str(cols["preemptions"][i]))) + "\n")
    return out.getvalue()


def timeseries_csv(result: RunResult) -> str:
    series = result.simulation.recorder.series
    names = [name for name, _ in metrics.SERIES_COLUMNS]
    rows = zip(*(series[n] for n in names), strict=True)
    return ",".join(names) + "\n" + "".join(",".join(map(str, row)) + "\n" for row in rows)


def chrome_trace(result: RunResult) -> str:
    """Engine steps as complete events (one track per replica) and KV blocks as counters."""
    rec = result.simulation.recorder
    st, se = rec.steps, rec.series
    events: list[dict] = [{"name": "process_name", "ph": "M", "pid": r.index,
                           "args": {"name": f"replica {r.index}"}} for r in result.simulation.replicas]
    step_rows = zip(*(st[n] for n, _ in metrics.STEP_COLUMNS), strict=True)
    for rep, start, end, steps, ptok, pseq, dseq in step_rows:
        name = "prefill+decode" if ptok and dseq else "prefill" if ptok else "decode" if dseq else "swap"
        events.append({"name": name if steps == 1 else f"decode x{steps}", "ph": "X", "pid": rep, "tid": 0,
                       "ts": start * 1e6, "dur": (end - start) * 1e6,
                       "args": {"steps": steps, "prefill_tokens": ptok, "prefill_seqs": pseq,
                                "decode_seqs": dseq}})
    series_rows = zip(*(se[n] for n, _ in metrics.SERIES_COLUMNS), strict=True)
    for t, rep, used, cached, free, running, waiting in series_rows:
        events.append({"name": "kv_blocks", "ph": "C", "pid": rep, "ts": t * 1e6,
                       "args": {"used": used, "cached_free": cached, "free": free}})
        events.append({"name": "requests", "ph": "C", "pid": rep, "ts": t * 1e6,
                       "args": {"running": running, "waiting": waiting}})
    return json.dumps({"traceEvents": events, "displayTimeUnit": "ms"})


RUN_FILES = ("summary.json", "requests.csv", "timeseries.csv", "trace.json")


def check_run_folder(out: Path, force: bool) -> None:
    """Before a run: ``out`` must be writable and new, empty, or (with ``force``) an earlier run's
    folder; a folder holding anything else is never replaced."""
    check_writable(out, "--out", folder=True)
    if not out.is_dir():
        return
    present = sorted(p.name for p in out.iterdir())
    # a file of another name, or a folder under a run file's name (a user's trace.json/), is not kvsim's
    # to replace
    foreign = [name for name in present if name not in RUN_FILES or not (out / name).is_file()]
    if foreign:
        raise KvsimError(f"holds files that are not a `kvsim run` output ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); give a new or empty folder",
                         field="--out", value=str(out))
    if present and not force:
        raise KvsimError("holds an earlier run's files; add --force to replace them", field="--out",
                         value=str(out))


def write_outputs(result: RunResult, out: Path) -> None:
    """Write summary.json, requests.csv, timeseries.csv and trace.json into ``out`` as one set: they
    are written into a new sibling folder that then takes the place of ``out``, so an interrupted
    run never leaves new files beside old ones."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    try:
        write_atomic(staging / "summary.json", json.dumps(result.summary, indent=2) + "\n")
        write_atomic(staging / "requests.csv", requests_csv(result))
        write_atomic(staging / "timeseries.csv", timeseries_csv(result))
        write_atomic(staging / "trace.json", chrome_trace(result))
        staging.chmod(0o777 & ~umask())  # mkdtemp makes it 0700
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / out.name)
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _ms(stats: dict) -> str:
    if stats["p50"] is None:
        return "-"
    return "  ".join(f"{k} {stats[k] * 1e3:,.1f} ms" for k in ("p50", "p90", "p99"))


def _rate_line(summary: dict) -> str:
    w = summary["workload"]
    if w["offered_rate_per_s"] is None:
        return "  offered rate: fewer than two arrivals apart in time"
    line = f"  offered {w['offered_rate_per_s']:,.3g} req/s"
    if "trace_native_rate_per_s" in w:
        line += f" (the trace's own {w['trace_native_rate_per_s']:,.3g} req/s x rate scale {w['rate_scale']:.3g})"
    return line


def _limits_line(lim: dict) -> str:
    return (f"  engine steps of at most {lim['max_num_batched_tokens']:,} tokens and {lim['max_num_seqs']:,} "
            f"sequences, chunked prefill {'on' if lim['enable_chunked_prefill'] else 'off'} ({lim['source']})")


def _goodput_line(summary: dict) -> str:
    if summary["slo"] is None:
        return "  goodput not computed: the scenario has no slo: section"
    return (f"  goodput {summary['goodput']:.1%} of requests within TTFT {summary['slo']['ttft_s'] * 1e3:g} ms "
            f"and TPOT {summary['slo']['tpot_s'] * 1e3:g} ms ({summary['goodput_requests_per_s']:,.2f} req/s)")


def text_summary(summary: dict) -> str:
    """The summary as a few lines for a terminal (what ``kvsim run`` prints without --json)."""
    sc, rej = summary["scenario"], summary["rejected"]
    reasons = ", ".join(f"{k} {v:,}" for k, v in rej["by_reason"].items() if v)
    dis = summary.get("disaggregation")
    replicas = (f"{dis['prefill']['replicas']} prefill + {dis['decode']['replicas']} decode instance(s)" if dis
                else f"{sc['replicas']} replica(s)")
    if sc.get("data_parallel_size"):
        replicas += (f" of {sc['data_parallel_size']} DP ranks"
                     + (", expert parallel" if sc["expert_parallel"] else ""))
    lines = [
        f"{sc['name']}: {sc['model']} on {sc['hardware']} (TP {sc['tp']}) x {replicas}, "
        f"KV {sc['method']}; calibration {sc['calibration']['kind']} ({sc['calibration']['gpu']})",
        f"  decode attention: {sc['calibration']['decode_kernel']['label']}",
        f"  requests {summary['requests']:,}: completed {summary['completed']:,}, rejected {rej['total']:,}"
        + (f" ({reasons})" if reasons else "")
        + (f", unfinished {summary['unfinished']:,}" if summary.get("unfinished") else ""),
        _rate_line(summary),
        f"  simulated {summary['duration_s']:,.1f} s: {summary['throughput_output_tokens_per_s']:,.0f} "
        f"output tok/s, {summary['throughput_requests_per_s']:,.2f} req/s, "
        f"{summary['engine_steps']:,} engine steps",
        f"  TTFT  {_ms(summary['ttft_s'])}",
        f"  TPOT  {_ms(summary['tpot_s'])}",
        f"  ITL   {_ms(summary['itl_s'])}",
        f"  E2E   {_ms(summary['e2e_s'])}",
        _goodput_line(summary),
        f"  KV {summary['num_gpu_blocks']:,} blocks of {summary['block_size']} tokens per replica, peak "
        f"{summary['kv_peak_used_fraction']:.0%} used; {summary['preemptions']:,} preemptions; prefix hit "
        f"rate {summary['prefix_hit_rate']:.1%}",
        _limits_line(summary["scenario"]["engine_limits"]),
    ]
    if dis:
        pre, dec = dis["prefill"], dis["decode"]
        lines.append(f"  disaggregated: {pre['replicas']} prefill x TP {pre['tp']} ({pre['hardware']}), "
                     f"{dec['replicas']} decode x TP {dec['tp']} ({dec['hardware']}); "
                     f"KV transfer {_ms(dis['kv_transfer_s'])}, "
                     f"{dis['kv_transfer_bytes'] / 2**30:,.1f} GiB moved, link {dis['link_utilisation']:.0%} busy")
    side = summary.get("side_channel")
    if side and side["auc"] is not None:
        lines.append(f"  side channel ({side['policy']} sharing): {side['cross_user_hit_requests']:,} "
                     "requests hit another user's prefix; TTFT tells them from misses with AUC "
                     f"{side['auc']:.2f}")
    elif side:
        lines.append(f"  side channel ({side['policy']} sharing): {side.get('note', '')}")
    lines += [f"  note: {n}" for n in summary.get("notes", [])]
    if "track_record" in summary:
        lines.append(f"  track record: {summary['track_record']['note']}")
    return "\n".join(lines)
