"""Running a scenario: build the deployment (model, GPU, KV layout, memory plan, cost model), open
the workload as a lazy stream, simulate, and summarise."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from kvsim.errors import DoesNotFit, KvsimError
from kvsim.progress import Progress
from kvsim.scenario.load import Scenario, resolve_path
from kvsim.scenario.overload import overload, overload_note
from kvsim.scenario.schema import ClosedLoopSpec, SessionsSpec, SLOSpec, SyntheticSpec
from kvsim.serve import metrics
from kvsim.serve.closed_loop import ClosedLoop
from kvsim.serve.disagg import DisaggSimulation, Link
from kvsim.serve.engine import Deployment, Simulation
from kvsim.serve.replica import EngineConfig, Replica
from kvsim.serve.sequence import BlockTables
from kvsim.serve.workload import ReadStats, Request, limit, mean_rate_per_s, renumber, scale_rate, time_window

GIB = 2**30


@dataclass
class RunResult:
    """A finished run: the JSON-able ``summary`` and what ``write_outputs`` writes."""

    scenario: Scenario
    summary: dict
    simulation: Simulation | DisaggSimulation


def _with_file(err: KvsimError, file: str, field: str | None = None) -> KvsimError:
    """An error raised by a loader, restated against the scenario: its file, and the scenario key
    (``field``) instead of the loader's own argument name."""
    if err.file is not None:
        return err
    text = str(err)
    if err.field is not None:
        text = text.removeprefix(f"{err.field}={err.value!r}: ")
    return KvsimError(text, field=field or err.field, value=err.value, file=file)


def _catalogue_arg(text: str, scenario: Scenario) -> str:
    """Catalogue names pass through; a path is resolved against the scenario's folder."""
    if "/" in text or text.endswith((".yaml", ".yml", ".json")):
        return str(resolve_path(text, scenario))
    return text


def deployment(scenario: Scenario, side: str | None = None) -> Deployment:
    """Model, KV layout, memory plan and cost model of one replica; ``side`` ("prefill", "decode"):
    an instance of that side of the scenario's disaggregation (its tp and hardware)."""
    from kvsim.cost.calibration import find_calibration
    from kvsim.cost.execution import vllm_execution
    from kvsim.cost.model import CostModel
    from kvsim.kv import layout_for
    from kvsim.memory import GIB, EngineMemoryConfig, plan_memory, vllm_batch_limits
    from kvsim.spec.hardware import load_hardware
    from kvsim.spec.model import load_model
    from kvsim.spec.parallel import Parallel
    from kvsim.spec.quant import weight_kernel, with_weights

    spec, file = scenario.spec, scenario.file
    e = spec.engine
    tp, gpu = spec.tp, spec.hardware
    if side is not None:
        assert spec.disaggregation is not None
        s = getattr(spec.disaggregation, side)
        tp, gpu = s.tp or tp, s.hardware or gpu
    try:
        model = load_model(_catalogue_arg(spec.model, scenario))
        if spec.weights is not None:
            model = with_weights(model, spec.weights, file)
        hardware = load_hardware(_catalogue_arg(gpu, scenario))
        weight_kernel(model, hardware, file)
        layout = layout_for(model, spec.method, file)
        max_len = e.max_model_len or model.max_position_embeddings
        if max_len > model.max_position_embeddings:
            raise KvsimError(f"exceeds {model.name}'s context of {model.max_position_embeddings} tokens",
                             field="max_model_len", value=max_len)
        limits = vllm_batch_limits(e.vllm_version or "", hardware, model, max_len, e.max_num_batched_tokens,
                                   e.max_num_seqs, e.enable_chunked_prefill)
        memory = EngineMemoryConfig(e.gpu_memory_utilization, e.block_size, limits.max_num_batched_tokens,
                                    limits.max_num_seqs, e.vllm_version or "", e.enforce_eager,
                                    None if e.cuda_graph_gib is None else e.cuda_graph_gib * GIB, e.sampler)
        par = Parallel(e.data_parallel_size, e.expert_parallel)
        if side is not None and par != Parallel():
            raise KvsimError("data parallelism and expert parallelism are not modelled with disaggregation",
                             field="engine.data_parallel_size", value=e.data_parallel_size, file=file)
        plan = plan_memory(model, hardware, layout, tp, memory, par)
        execution = vllm_execution(hardware, tp, limits.max_num_seqs, limits.max_num_batched_tokens,
                                   e.vllm_version or "", e.cudagraph_capture_sizes, e.enforce_eager,
                                   e.async_scheduling)
    except KvsimError as err:
        engine_key = err.field in ("vllm_version", "cuda_graph_gib", "gpu_memory_utilization", "data_parallel_size",
                                   "expert_parallel", "max_model_len", "max_num_batched_tokens", "async_scheduling",
                                   "sampler", "block_size")
        side_key = f"disaggregation.{side}.{err.field}" if side and err.field in ("hardware", "tp") else None
        raise _with_file(err, file, f"engine.{err.field}" if engine_key else side_key) from None
    cal = spec.calibration
    try:
        if cal is not None and cal.lower() not in ("none", "imported"):
            cal = str(resolve_path(cal, scenario))
        cost = CostModel(model, hardware, layout, tp, find_calibration(hardware, cal, e.kind), execution, par)
    except KvsimError as err:
        raise _with_file(err, file, "calibration") from None
    if not plan.fits and e.num_gpu_blocks_override is None:
        if side is not None:
            raise DoesNotFit(f"{side} instance {plan.reason}", field=f"disaggregation.{side}.tp", value=tp,
                             file=file)
        raise DoesNotFit(plan.reason, field="model", value=spec.model, file=file)
    return Deployment(layout, plan, cost, max_len, e.num_gpu_blocks_override or plan.num_gpu_blocks, limits)


# ---------------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------------

# A workload builder's own names for scenario keys, where they differ (an ArrivalProcess's rate and cv)
_CLOSED_LOOP_NAMES = {"rate": "request_rate"}
_SYNTHETIC_NAMES = {"cv": "arrival_cv"}


def _workload_error(err: KvsimError, scenario: Scenario) -> KvsimError:
    """An error of a workload builder (a synthetic stream, a closed loop, a trace reader) restated against
    the scenario: its file, and the scenario key of the argument it names."""
    w, name = scenario.spec.workload, err.field
    if err.file is not None or name is None:
        return _with_file(err, scenario.file)
    if name == "rate_scale" and w.rate is not None:  # the scale that workload.rate asked for
        return KvsimError(str(err).removeprefix(f"{name}={err.value!r}: "), field="workload.rate", value=w.rate,
                          file=scenario.file)
    key = {"path": "workload.trace", "rate_scale": "workload.rate_scale"}.get(name)
    loop, synthetic = _CLOSED_LOOP_NAMES.get(name, name), _SYNTHETIC_NAMES.get(name, name)
    if w.closed_loop is not None and loop in ClosedLoopSpec.model_fields:
        key = f"workload.closed_loop.{loop}"
    elif w.synthetic is not None and synthetic in SessionsSpec.model_fields:
        key = f"workload.synthetic.sessions.{synthetic}"
    elif w.synthetic is not None and synthetic in SyntheticSpec.model_fields:
        key = f"workload.synthetic.{synthetic}"
    return _with_file(err, scenario.file, key)


def _length(spec, scenario: Scenario):  # noqa: ANN001, ANN202 - LengthSpec -> LengthDist
    from kvsim.serve.synthetic import LengthDist

    if spec.kind == "fixed":
        dist = LengthDist.fixed(spec.tokens)
    elif spec.kind == "empirical":
        dist = LengthDist.from_trace(resolve_path(spec.trace, scenario), spec.which)
    elif spec.p50 is not None:
        dist = LengthDist.lognormal_quantiles(spec.p50, spec.p90)
    else:
        dist = LengthDist.lognormal(spec.mean, spec.sigma)
    if spec.max_tokens is not None:
        dist = replace(dist, max_tokens=spec.max_tokens)
    return dist


def _synthetic(scenario: Scenario, max_model_len: int) -> Iterator[Request]:
    from kvsim.serve.synthetic import ArrivalProcess, SessionSpec, SharedPrefix, synthetic_requests
    from kvsim.serve.traces import trace_lengths

    spec = scenario.spec
    s = spec.workload.synthetic
    assert s is not None
    sessions = shared = paired = None
    if s.sessions is not None:
        ss = s.sessions
        sessions = SessionSpec(turns=_length(ss.turns, scenario),
                               follow_up=_length(ss.follow_up, scenario) if ss.follow_up else None,
                               think_mean_s=ss.think_mean_s, think_cv=ss.think_cv,
                               max_input_tokens=ss.max_input_tokens or max_model_len)
    if s.shared_prefix is not None:
        shared = SharedPrefix(s.shared_prefix.tokens, s.shared_prefix.num_users, s.shared_prefix.num_prompts)
    if s.paired_lengths_from is not None:
        paired = trace_lengths(resolve_path(s.paired_lengths_from, scenario))
    try:
        return synthetic_requests(
            ArrivalProcess(s.rate, s.arrival_cv),
            _length(s.input, scenario) if s.input else None, _length(s.output, scenario) if s.output else None,
            seed=spec.seed, n=s.num_requests, duration_s=s.duration_s, sessions=sessions, shared_prefix=shared,
            block_tokens=spec.engine.block_size, paired_lengths=paired)
    except KvsimError as err:
        if err.field != "max_input_tokens" or s.sessions is None or s.sessions.max_input_tokens is not None:
            raise
        # not in the file: say where the value came from
        text = str(err).removeprefix(f"{err.field}={err.value!r}: ")
        raise KvsimError(f"{text} (unset, it is the context length, engine.max_model_len)",
                         field="workload.synthetic.sessions.max_input_tokens", value=err.value,
                         file=scenario.file) from None


def _with_images(stream: Iterator[Request], image_tokens: int) -> Iterator[Request]:
    for r in stream:
        yield replace(r, image_tokens=r.image_tokens + image_tokens)


def trace_rate_per_s(scenario: Scenario, trace: Path) -> float:
    """The trace's own request rate over the scenario's window and request limit (a pass over the
    trace before the run, to turn ``workload.rate`` into a rate scale)."""
    from kvsim.serve.traces import read_trace

    w = scenario.spec.workload
    arrivals = np.fromiter((r.arrival_s for r in read_trace(
        trace, w.format, prefix_block_tokens=w.prefix_block_tokens, skip_bad_rows=True, stats=ReadStats(quiet=True),
        seed=scenario.spec.seed, start_s=w.start_s, end_s=w.end_s, max_requests=w.max_requests)), dtype=float)
    rate = mean_rate_per_s(arrivals)
    if rate is None:
        raise KvsimError("the trace window has fewer than two arrivals apart in time: no rate to scale",
                         field="workload.rate", value=w.rate, file=scenario.file)
    return rate


def workload(scenario: Scenario, dep: Deployment, skip_bad_rows: bool,
             stats: ReadStats) -> tuple[Iterator[Request], Path | None]:
    """The request stream (lazy) and the trace path it reads, if any."""
    from kvsim.serve.synthetic import ArrivalProcess
    from kvsim.serve.traces import read_trace

    w, file = scenario.spec.workload, scenario.file
    trace = None
    stream: Iterator[Request]  # a closed loop, a trace or the synthetic generator
    try:
        if w.closed_loop is not None:
            c = w.closed_loop
            # vllm bench serve --burstiness b: Gamma gaps of shape b, i.e. coefficient of variation 1/sqrt(b)
            schedule = (None if c.request_rate is None
                        else ArrivalProcess.gamma(c.request_rate, 1.0 / math.sqrt(c.burstiness)))
            stream = ClosedLoop(c.concurrency, c.num_requests, _length(c.input, scenario), _length(c.output, scenario),
                                random_range_ratio=c.random_range_ratio, seed=scenario.spec.seed, schedule=schedule,
                                round_trip_s=c.round_trip_ms / 1e3, round_trip=c.round_trip_distribution,
                                dataset_entries=c.dataset_entries, dataset_sampling=c.dataset_sampling,
                                think_s=c.think_ms / 1e3, think=c.think_distribution)
        elif w.trace is not None:
            trace = resolve_path(w.trace, scenario)
            if not trace.exists():
                raise KvsimError("no such trace file or folder", field="workload.trace", value=str(trace),
                                 file=file)
            stats.rate_scale = w.rate_scale if w.rate is None else w.rate / trace_rate_per_s(scenario, trace)
            stream = read_trace(
                trace, w.format, prefix_block_tokens=w.prefix_block_tokens, skip_bad_rows=skip_bad_rows,
                stats=stats, seed=scenario.spec.seed, rate_scale=stats.rate_scale, start_s=w.start_s,
                end_s=w.end_s, max_requests=w.max_requests)
        else:
            stream = _synthetic(scenario, dep.max_model_len)
            if w.start_s > 0 or w.end_s is not None:
                stream = time_window(stream, w.start_s, math.inf if w.end_s is None else w.end_s)
            stream = renumber(limit(scale_rate(stream, w.rate_scale), w.max_requests))
    except KvsimError as err:
        raise _workload_error(err, scenario) from None
    if w.images_per_request:
        vision = dep.layout.model.vision
        if vision is None:
            raise KvsimError(f"{dep.layout.model.name} has no vision tower",
                             field="workload.images_per_request", value=w.images_per_request, file=file)
        stream = _with_images(stream, w.images_per_request * vision.image_tokens)
    return stream, trace


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------

def engine_config(scenario: Scenario, dep: Deployment, tables: BlockTables,
                  check: bool = False) -> EngineConfig:
    e = scenario.spec.engine
    if e.enable_mixed_chunk is not None and e.kind != "sglang":
        raise KvsimError(f"is SGLang's --enable-mixed-chunk: set it with engine.kind sglang, not {e.kind}",
                         field="engine.enable_mixed_chunk", value=e.enable_mixed_chunk, file=scenario.file)
    return EngineConfig(
        max_num_seqs=dep.limits.max_num_seqs, max_num_batched_tokens=dep.limits.max_num_batched_tokens,
        enable_chunked_prefill=dep.limits.enable_chunked_prefill,
        prefix_caching=e.enable_prefix_caching and tables.token_paged,
        preemption=e.preemption, swap_space_bytes=e.swap_space_gib * GIB,
        doc_kv_from_ssd=dep.layout.runtime.doc_kv_from_ssd, fast_forward=e.fast_forward, check=check,
        scheduling_policy=e.scheduling_policy,
        async_scheduling=dep.cost.execution is not None and dep.cost.execution.host.overlapped,
        prefill_alone=e.kind == "sglang" and not e.enable_mixed_chunk)


def simulation(scenario: Scenario, *, check: bool = False,
               record_steps: bool = True) -> Simulation | DisaggSimulation:
    """The scenario's replicas and router, ready to :meth:`~Simulation.run` a stream."""
    spec = scenario.spec
    if spec.disaggregation is not None:
        return _disaggregated(scenario, check, record_steps)
    dep = deployment(scenario)
    tables = BlockTables(dep.plan)
    cfg = engine_config(scenario, dep, tables, check)
    return Simulation(dep, cfg, spec.replicas, spec.router,
                      timeseries_interval_s=spec.output.timeseries_interval_s, record_steps=record_steps,
                      tables=tables)


def _disaggregated(scenario: Scenario, check: bool, record_steps: bool) -> DisaggSimulation:
    """Prefill and decode instances, each side with its own tp, hardware, memory plan and cost model."""
    spec = scenario.spec
    d = spec.disaggregation
    assert d is not None
    pre, dec = deployment(scenario, "prefill"), deployment(scenario, "decode")
    pre_tables, dec_tables = BlockTables(pre.plan), BlockTables(dec.plan)
    need = int(dec.plan.blocks_for(dec.max_model_len)[0])
    if dec.num_gpu_blocks < need:
        # vLLM refuses to start an engine whose KV cache cannot hold one max_model_len request
        # (vllm/v1/core/kv_cache_utils.py, check_enough_kv_cache_memory); a decode instance must.
        raise KvsimError(f"a decode instance's KV cache holds {dec.num_gpu_blocks:,} blocks, fewer than the "
                         f"{need:,} one request of max_model_len ({dec.max_model_len:,} tokens) needs; raise its tp "
                         "or lower engine.max_model_len", field="disaggregation.decode.tp",
                         value=d.decode.tp or spec.tp, file=scenario.file)
    # a decode instance never prefills: SGLang's prefill-alone batching does not apply there
    dec_cfg = replace(engine_config(scenario, dec, dec_tables, check), prefix_caching=False, doc_kv_from_ssd=False,
                      prefill_alone=False)
    # gigabits per second (NIC ratings) -> bytes per second
    link = Link(d.link.bandwidth_gbps * 1e9 / 8, d.link.latency_us * 1e-6)
    return DisaggSimulation(pre, dec, engine_config(scenario, pre, pre_tables, check), dec_cfg, d.prefill.replicas,
                            d.decode.replicas, link, spec.router,
                            timeseries_interval_s=spec.output.timeseries_interval_s, record_steps=record_steps,
                            prefill_tables=pre_tables, decode_tables=dec_tables)


def run_scenario(scenario: Scenario, progress: bool = False, skip_bad_rows: bool = False, *,
                 check: bool = False, record_steps: bool = True) -> RunResult:
    """Simulate ``scenario``. ``progress`` draws a bar on stderr; ``skip_bad_rows`` skips malformed
    trace rows (counted in the summary) instead of stopping; ``check`` asserts the engine's
    invariants every step (slow; for tests); ``record_steps=False`` skips the Chrome trace rows."""
    sim = simulation(scenario, check=check, record_steps=record_steps)
    stats = ReadStats()
    stream, trace = workload(scenario, sim.dep, skip_bad_rows, stats)
    bar = Progress("kvsim run", progress)
    try:
        sim.run(stream, (lambda sim_s, arrived: bar.status(f"{sim_s:,.1f} s simulated, {arrived:,} requests"))
                if progress else None)
    except KvsimError as err:
        if trace is not None and err.file is not None and err.file.startswith(str(trace)):
            raise _bad_rows(scenario, trace, err) from None
        # the workload stream is drawn as the run reads it, so its errors surface here: restate them
        # against the scenario
        raise _workload_error(err, scenario) from None
    finally:
        bar.close()
    return RunResult(scenario, summarize(scenario, sim, stats), sim)


def _bad_rows(scenario: Scenario, trace: Path, first: KvsimError) -> KvsimError:
    """The run stopped at the trace's error ``first``: if a malformed row, count every malformed row (a
    second, skipping pass, which logs nothing: it skips none of the run's) to report the first few and
    the total."""
    from kvsim.serve.traces import read_trace

    w = scenario.spec.workload
    stats = ReadStats(quiet=True)
    try:
        for _ in read_trace(trace, w.format, prefix_block_tokens=w.prefix_block_tokens, skip_bad_rows=True,
                            stats=stats):
            pass
    except KvsimError:
        pass  # every row was bad (the count below says so), or the file is (its header): the count is 0
    if not stats.bad_rows:
        return first
    return KvsimError(stats.summary(str(trace), skipped=False) + "; the run stopped (pass --skip-bad-rows to "
                      "skip them)", field="workload.trace", value=w.trace, file=scenario.file)


def _share(ok: np.ndarray, total: int) -> float:
    return float(ok.sum()) / total if total else 0.0


def _rates(scenario: Scenario, arrival_s: np.ndarray, rate_scale: float) -> dict:
    """The offered request rate (measured on the arrivals) and, for a trace, its own rate."""
    offered = mean_rate_per_s(arrival_s)
    out: dict = {"offered_rate_per_s": offered}
    if scenario.spec.workload.trace is not None:
        out["rate_scale"] = rate_scale
        out["trace_native_rate_per_s"] = offered / rate_scale if offered is not None else None
    return out


NO_SLO_NOTE = "no slo: section, so goodput and SLO attainment are not computed (add slo: ttft_s, tpot_s)"


def _goodput(slo: SLOSpec | None, ttft: np.ndarray, tpot: np.ndarray, arrived: int, duration: float) -> dict:
    """Goodput: the fraction of all requests (rejected ones included) within both SLOs, and their
    rate; None without SLOs (no default targets: a made-up SLO would be a silent wrong answer)."""
    if slo is None:
        return dict.fromkeys(("goodput", "goodput_requests_per_s", "slo", "slo_attainment"))
    ok_ttft, ok_tpot = ttft <= slo.ttft_s, tpot <= slo.tpot_s
    good = int((ok_ttft & ok_tpot).sum())
    return {"goodput": good / arrived if arrived else 0.0,
            "goodput_requests_per_s": good / duration if duration else 0.0,
            "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
            "slo_attainment": {"ttft": _share(ok_ttft, arrived), "tpot": _share(ok_tpot, arrived),
                               "both": _share(ok_ttft & ok_tpot, arrived)}}


DISAGG_NOTE = ("disaggregated: TTFT is the prefill instance's first token; vLLM's own P/D proxy streams from the "
               "decode instance, whose first token also waits for the KV transfer (disaggregation.kv_transfer_s); "
               "the KV keys (num_gpu_blocks, kv_capacity_tokens, kv_peak_used_fraction) are the decode instances'")

# A closed loop's TTFT is how each client's cycle splits between waiting for the other clients' prefills
# and decoding, which depends on how tightly their requests bunch: kvsim's exact schedule keeps the first
# wave's order, and the real vLLM closed-loop runs it is judged on bunch differently (README, "TTFT: what
# the development set rules out": the cycle and TPOT agree, TTFT does not).
CLOSED_LOOP_NOTE = ("closed loop: TTFT is how each client's cycle splits between waiting for other prompts' "
                    "prefills and decoding, and depends on how tightly the clients' requests bunch; judged "
                    "against real vLLM closed-loop benchmarks it is kvsim's least certain output, while the cycle "
                    "and TPOT agree (README 'Accuracy against real vLLM')")

# Engine kinds other than vLLM take their kernel times from that engine's imported profile, but
# everything around the kernels stays vLLM's (kvsim.scenario.schema.EngineSpec.kind), except SGLang's
# prefill batches (kvsim.serve.policy).
OTHER_ENGINE_NOTE = ("engine kind {kind}: kernel times from {kind}'s imported profile where the calibration has "
                     "them; {scheduler}, memory planner and time between steps are vLLM's ({kind}'s own "
                     "{unmodelled} are not modelled: judged against public {kind} runs, TTFT can be far off, "
                     "README 'Accuracy against real vLLM')")
OTHER_ENGINE_SCHEDULER = {
    "sglang": ("the scheduler (but for SGLang's prefill batches, which run alone unless "
               "engine.enable_mixed_chunk)", "token reservation for running requests and cache eviction order"),
    "trtllm": ("the scheduler", "admission and batching")}


def _peak_used(replicas: list[Replica], blocks: int) -> float:
    return max(r.peak_used_blocks for r in replicas) / blocks


def _disagg_summary(scenario: Scenario, sim: DisaggSimulation, duration: float) -> dict:
    from kvsim.cost.model import calibration_summary

    spec = scenario.spec
    d = spec.disaggregation
    assert d is not None

    def side(name: str, dep: Deployment, reps: list[Replica]) -> dict:
        s = getattr(d, name)
        return {"replicas": s.replicas, "tp": s.tp or spec.tp, "hardware": s.hardware or spec.hardware,
                "calibration": calibration_summary(dep.cost),
                "num_gpu_blocks": dep.num_gpu_blocks, "kv_peak_used_fraction": _peak_used(reps, dep.num_gpu_blocks),
                "engine_steps": sum(r.steps for r in reps), "preemptions": sum(r.preemptions for r in reps)}

    return {"prefill": side("prefill", sim.prefill, sim.prefill_replicas),
            "decode": side("decode", sim.decode, sim.decode_replicas),
            "link": {"bandwidth_gbps": d.link.bandwidth_gbps, "latency_us": d.link.latency_us},
            **sim.transfer_summary(duration)}


def summarize(scenario: Scenario, sim: Simulation | DisaggSimulation, read_stats: ReadStats) -> dict:
    """The run's summary (JSON-able; the same scenario and seed give the same numbers)."""
    from kvsim import track_record
    from kvsim.cost.model import calibration_summary
    from kvsim.engines import unshipped
    from kvsim.spec.parallel import Parallel

    spec, cfg, dep = scenario.spec, sim.cfg, sim.dep
    cols = sim.recorder.arrays()
    status = cols["status"]
    done = status == metrics.STATUSES.index(metrics.COMPLETED)
    arrival, first, finish = cols["arrival_s"][done], cols["first_token_s"][done], cols["finish_s"][done]
    generated = cols["generated_tokens"][done]
    ttft, e2e = first - arrival, finish - arrival
    multi = generated > 1
    tpot = (finish[multi] - first[multi]) / (generated[multi] - 1)
    duration = sim.end_s
    tpot_all = np.zeros(len(ttft))
    tpot_all[multi] = tpot
    hits = cols["prefix_hit_tokens"][done]
    prompts = (cols["input_tokens"] + cols["image_tokens"])[done]
    rejected = {s: int((status == i).sum()) for i, s in enumerate(metrics.STATUSES)
                if s not in (metrics.COMPLETED, metrics.UNFINISHED)}
    cal = dep.cost.cal
    binding = dep.plan.binding_tier(dep.max_model_len)
    summary: dict = {
        "scenario": {"name": spec.name or Path(scenario.file).stem, "model": spec.model,
                     "hardware": spec.hardware, "method": "+".join(dep.layout.methods) or spec.method,
                     "tp": spec.tp, "replicas": spec.replicas, "router": spec.router, "seed": spec.seed,
                     "weights": (wq.precision if (wq := dep.plan.model.weight_quant) else dep.plan.model.dtype),
                     **({"data_parallel_size": spec.engine.data_parallel_size,
                         "expert_parallel": spec.engine.expert_parallel}
                        if dep.plan.parallel != Parallel() else {}),
                     "memory_rule": dep.plan.rule.label,
                     "engine_limits": dep.limits.as_dict(),
                     "calibration": calibration_summary(dep.cost)},
        "requests": sim.arrived,
        "completed": int(done.sum()),
        "rejected": {"total": sum(rejected.values()), "by_reason": rejected},
        "unfinished": int((status == metrics.STATUSES.index(metrics.UNFINISHED)).sum()),
        "truncated_outputs": sim.admission.truncated,
        "duration_s": duration,
        "num_gpu_blocks": dep.num_gpu_blocks,
        "block_size": spec.engine.block_size,
        "kv_capacity_tokens": dep.plan.kv_capacity_tokens(dep.max_model_len, dep.num_gpu_blocks),
        "kv_binding_tier": binding,
        "max_model_len": dep.max_model_len,
        "throughput_output_tokens_per_s": float(generated.sum()) / duration if duration else 0.0,
        "throughput_requests_per_s": float(done.sum()) / duration if duration else 0.0,
        "ttft_s": metrics.stats(ttft),
        "tpot_s": metrics.stats(tpot),
        "e2e_s": metrics.stats(e2e),
        "itl_s": metrics.weighted_stats(np.frombuffer(sim.recorder.itl_s), np.frombuffer(sim.recorder.itl_weight)),
        "preemptions": sim.preemptions,
        "prefix_caching": cfg.prefix_caching,
        "prefix_hit_rate": float(hits.sum() / prompts.sum()) if prompts.sum() else 0.0,
        **_goodput(spec.slo, ttft, tpot_all, sim.arrived, duration),
        "engine_steps": sim.steps,
        "kv_peak_used_fraction": _peak_used(sim.replicas, dep.num_gpu_blocks),
    }
    if isinstance(sim, DisaggSimulation):
        summary["kv_peak_used_fraction"] = _peak_used(sim.decode_replicas, dep.num_gpu_blocks)
        summary["disaggregation"] = _disagg_summary(scenario, sim, duration)
    if cfg.doc_kv_from_ssd:
        summary["doc_ssd_tokens"] = int(cols["doc_ssd_tokens"][done].sum())
    if spec.replicas * spec.engine.data_parallel_size > 1:  # replicas, or the DP ranks of each
        summary["per_replica"] = [
            {"completed": int((cols["replica"][done] == r.index).sum()), "preemptions": r.preemptions,
             "engine_steps": r.steps, "kv_peak_used_blocks": r.peak_used_blocks} for r in sim.replicas]
    if cfg.prefix_caching:
        summary["side_channel"] = metrics.side_channel(dep.layout.runtime.prefix_sharing, ttft, hits,
                                                       cols["cross_user_hit"][done].astype(bool))
    summary["workload"] = _rates(scenario, cols["arrival_s"], read_stats.rate_scale)
    ttft_all = np.where(done, cols["first_token_s"] - cols["arrival_s"], np.inf)
    summary["overload"] = overload(cols["arrival_s"], ttft_all, np.where(done, cols["finish_s"], np.nan))
    if read_stats.bad_rows:
        summary["bad_rows"] = {"skipped": read_stats.bad_rows, "examples": list(read_stats.bad_examples)}
    notes = []
    if spec.engine.enable_prefix_caching and not cfg.prefix_caching:
        notes.append("prefix caching is off: this KV layout is not paged by token blocks (compression, "
                     "quantization windows or tiers change what a block holds), so blocks cannot be shared")
    if not cfg.enable_chunked_prefill and cfg.max_num_batched_tokens < dep.max_model_len:
        notes.append(f"chunked prefill is off and max_num_batched_tokens ({cfg.max_num_batched_tokens:,}) is below "
                     f"max_model_len ({dep.max_model_len:,}): as in vLLM, no sequence grows past "
                     f"{cfg.max_num_batched_tokens:,} tokens (longer prompts are rejected, outputs stop there)")
    if spec.tp > 1 and dep.cost.allreduce is not None:  # vllm_execution prices the all-reduce
        notes.append(f"all-reduce: {dep.cost.allreduce.source}")
    if cal.kind in ("prior", "borrowed"):
        notes.append(cal.note)
    notes.extend(dep.cost.notes)
    notes += [n for n in dep.cost.cost_notes if not n.startswith("decode attention:")]  # that one has its own line
    if binding != "gpu":
        held = int(dep.plan.max_concurrency(dep.max_model_len)[0])
        notes.append(f"{binding} memory binds: this GPU's share holds {held:,} sequences of max_model_len "
                     f"({dep.max_model_len:,} tokens); the simulator admits by GPU blocks, so more concurrent long "
                     f"sequences than that are not checked against {binding} memory")
    if isinstance(sim, DisaggSimulation):
        notes.append(DISAGG_NOTE)
        pre = sim.prefill.cost
        if pre.cal.label != cal.label:  # the keys above describe the decode side; say where the prefill's come from
            notes.append(f"prefill instances: calibration {pre.cal.label}"
                         + (f"; {pre.cal.note}" if pre.cal.kind in ("prior", "borrowed") else ""))
            notes += [f"prefill instances: {n}" for n in pre.notes if n not in dep.cost.notes]
    if spec.slo is None:
        notes.append(NO_SLO_NOTE)
    if summary["overload"] and summary["overload"]["overloaded"]:
        notes.append(overload_note(summary["overload"], read_stats.rate_scale if spec.workload.trace else None))
    if spec.workload.closed_loop is not None:
        notes.append(CLOSED_LOOP_NOTE)
    if spec.engine.kind != "vllm":
        scheduler, unmodelled = OTHER_ENGINE_SCHEDULER[spec.engine.kind]
        notes.append(OTHER_ENGINE_NOTE.format(kind=spec.engine.kind, scheduler=scheduler, unmodelled=unmodelled))
    missing = unshipped(spec.engine.kind, dep.layout.methods)
    if missing:
        notes.append(f"KV method {', '.join(missing)} is not a feature {spec.engine.kind} ships: the run prices it "
                     f"on {spec.engine.kind}'s kernels as a what-if")
    if notes:
        summary["notes"] = notes
    # how far kvsim's answers have been from real engines on this model, GPU and engine (kvsim.track_record)
    summary["track_record"] = track_record.records().entry(dep.plan.hardware.name, spec.engine.kind,
                                                           dep.plan.model.name, summary["scenario"]["weights"])
    return summary
