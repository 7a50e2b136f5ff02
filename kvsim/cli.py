"""``kvsim`` command line. Bad input prints one line naming the field and value, exit code 2."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from kvsim.errors import KvsimError

GIB = 2**30


def _ints(text: str, field: str) -> list[int]:
    try:
        numbers = [float(v) for v in text.split(",") if v.strip()]  # 1e3 is 1000; 2.9 is refused, not cut to 2
    except ValueError:
        raise KvsimError("expected comma-separated positive integers", field=field, value=text) from None
    if not all(x.is_integer() for x in numbers):
        raise KvsimError("expected comma-separated positive integers", field=field, value=text)
    values = [int(x) for x in numbers]
    if not values or any(v <= 0 for v in values):
        raise KvsimError("expected comma-separated positive integers", field=field, value=text)
    return values


def _positive(value: int | None, field: str) -> None:
    if value is not None and value <= 0:
        raise KvsimError("must be a positive integer", field=field, value=value)


# ---------------------------------------------------------------- catalogues

def cmd_models(args: argparse.Namespace) -> None:
    from kvsim.kv import layout_for
    from kvsim.spec.model import load_model, model_names

    rows = []
    for name in model_names():
        m = load_model(name)
        kinds = sorted({layer.attention + (f":{layer.window_tokens}" if layer.window_tokens else "")
                        for layer in m.layers})
        rows.append({"name": name, "layers": m.num_layers, "heads": m.attention.num_heads,
                     "kv_heads": m.attention.num_kv_heads, "head_dim": m.attention.head_dim,
                     "moe": f"{m.moe.num_experts}x top{m.moe.top_k}" if m.moe else "-",
                     "attention": ",".join(kinds), "kv_layers": len(m.kv_layers),
                     "bf16_kv_bytes_per_token": int(layout_for(m).gpu_bytes(1)[0]), "source": m.source})
    _table(rows, args.json, ["name", "layers", "heads", "kv_heads", "head_dim", "moe", "attention",
                             "kv_layers", "bf16_kv_bytes_per_token"])


def cmd_hardware(args: argparse.Namespace) -> None:
    from kvsim.cost.calibration import find_calibration
    from kvsim.spec.hardware import hardware_names, load_hardware

    rows = []
    for name in hardware_names():
        hw = load_hardware(name)
        cal = find_calibration(hw, engine=args.engine)
        rows.append({"name": name, "display_name": hw.display_name, "memory_gib": round(hw.memory_bytes / GIB, 2),
                     "hbm_tb_per_s": hw.hbm_bandwidth_bytes_per_s / 1e12,
                     "bf16_tflops": (hw.peak_flops_per_s.get("bf16") or 0) / 1e12,
                     "fp8_tflops": (hw.peak_flops_per_s.get("fp8") or 0) / 1e12,
                     "nvlink_gb_per_s": hw.nvlink_bandwidth_bytes_per_s / 1e9,
                     "peer_to_peer": {True: "yes", False: "no", None: "not known"}[hw.peer_to_peer],
                     "price_usd_per_hour": hw.price_per_gpu_hour_usd,
                     "price_read_on": hw.price_source.read_on if hw.price_source else None,
                     f"calibration ({args.engine})": cal.label})
    _table(rows, args.json, list(rows[0]))


METHODS_PROFILE_GPU = "h100-sxm"  # the GPU whose measured kernels `kvsim methods` reports


def cmd_methods(args: argparse.Namespace) -> None:
    from kvsim.cost.calibration import find_calibration
    from kvsim.cost.kernels import example_cost_label
    from kvsim.kv import METHODS
    from kvsim.spec.hardware import load_hardware

    cal = find_calibration(load_hardware(METHODS_PROFILE_GPU))
    rows = [{"name": m.name, "stage": m.stage.name.lower(), "source": m.source,
             "params": ", ".join(f"{p.name}={'<required>' if p.default is None else p.default}" for p in m.params),
             "summary": m.summary, "example": m.example, "alias_of": m.alias_of or "-",
             f"cost ({cal.gpu})": example_cost_label(m.name, cal)} for m in METHODS.values()]
    _table(rows, args.json, ["name", "stage", "params", "source", "summary", "alias_of", f"cost ({cal.gpu})"])


def _table(rows: list[dict], as_json: bool, columns: Sequence[str]) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in columns))


# ---------------------------------------------------------------- memory

def _deployment(args: argparse.Namespace):
    from kvsim.kv import layout_for
    from kvsim.spec.hardware import load_hardware
    from kvsim.spec.model import load_model
    from kvsim.spec.quant import weight_kernel, with_weights

    model = load_model(args.model)
    if args.weights is not None:
        model = with_weights(model, args.weights)
    hardware = load_hardware(args.hardware)
    weight_kernel(model, hardware)  # a precision the GPU cannot run is an error here
    layout = layout_for(model, args.method)
    return model, hardware, layout


def _parallel(args: argparse.Namespace):  # noqa: ANN202 - kvsim.spec.parallel.Parallel
    from kvsim.spec.parallel import Parallel

    return Parallel(args.data_parallel_size, args.enable_expert_parallel)


def _parallel_label(r: dict) -> str:
    """``TP 2`` or ``TP 2, DP 4, expert parallel`` for a report header."""
    dp = r.get("data_parallel_size")
    return f"TP {r['tp']}" + (f", DP {dp}" + (", expert parallel" if r["expert_parallel"] else "") if dp else "")


def memory_report(args: argparse.Namespace) -> dict:
    from kvsim.memory import EngineMemoryConfig, moe_workspace, plan_memory, vllm_batch_limits
    from kvsim.spec.model import check_context
    from kvsim.spec.parallel import Parallel

    for field in ("context", "batch", "block_size", "max_num_batched_tokens", "max_num_seqs"):
        _positive(getattr(args, field), f"--{field.replace('_', '-')}")
    if args.vllm_version is not None and not args.vllm_version.strip():  # unset is None; empty is a mistake
        raise KvsimError("expected a vLLM release, e.g. 0.12.0", field="--vllm-version", value=args.vllm_version)
    model, hardware, layout = _deployment(args)
    check_context(model, args.context)
    # what the user left unset, as `vllm serve` of the version sets it on this GPU (max_model_len: the model's)
    limits = vllm_batch_limits(args.vllm_version or "", hardware, model, model.max_position_embeddings,
                               args.max_num_batched_tokens, args.max_num_seqs)
    engine = EngineMemoryConfig(args.gpu_memory_utilization, args.block_size, limits.max_num_batched_tokens,
                                limits.max_num_seqs, args.vllm_version or "", args.enforce_eager,
                                None if args.cuda_graph_gib is None else args.cuda_graph_gib * GIB, args.sampler)
    par = _parallel(args)
    plan = plan_memory(model, hardware, layout, args.tp, engine, par)
    moe_kernel, moe_bytes = moe_workspace(model, hardware, args.tp, engine, par)
    ctx = args.context
    tiers = layout.bytes_by_tier(ctx, args.tp)
    concurrency, binding = int(plan.max_concurrency(ctx)[0]), plan.binding_tier(ctx)
    budgets = plan.offload_budget_bytes
    all_ranks = args.tp  # every rank holds its share (or a replica) of the KV heads
    return {
        "model": model.name, "hardware": hardware.name, "method": "+".join(layout.methods), "tp": args.tp,
        **({"data_parallel_size": par.dp, "expert_parallel": par.expert_parallel} if par != Parallel() else {}),
        "weights": model.weight_quant.precision if model.weight_quant else model.dtype,
        "vllm_rule": plan.rule.label, "vllm_rule_source": plan.rule.source, "sampler": engine.sampler,
        "engine_limits": limits.as_dict(),
        "context": ctx, "batch": args.batch,
        "kv_bytes_per_token": float(sum(t[0] for t in tiers.values())) * all_ranks / ctx,
        "kv_gpu_bytes_per_token": float(tiers["gpu"][0]) * all_ranks / ctx,
        "kv_host_bytes_per_token": float(tiers["host"][0]) * all_ranks / ctx,
        "prefill_peak_kv_bytes": float(layout.prefill_peak_gpu_bytes(ctx, args.tp)[0]),
        "total_memory_bytes": hardware.memory_bytes,
        "budget_bytes": plan.budget_bytes,
        "weight_bytes": plan.weights.total,
        "weight_breakdown_bytes": {k: v for k, v in vars(plan.weights).items()},
        "activation_peak_bytes": plan.activation_peak_bytes,
        # the part of the peak a MoE kernel's workspace holds through the sampler run, and the kernel
        "moe_workspace_bytes": moe_bytes, "moe_experts_kernel": moe_kernel,
        "non_torch_bytes": plan.non_torch_bytes, "non_torch_basis": plan.rule.non_torch_growth(args.tp, hardware)[1],
        "cuda_graph_bytes": plan.cuda_graph_bytes,
        "kv_cache_bytes": max(plan.kv_cache_bytes, 0.0),
        "block_size": engine.block_size,
        "block_bytes": plan.block_bytes,
        "num_gpu_blocks": plan.num_gpu_blocks,
        "kv_capacity_tokens": plan.kv_capacity_tokens(ctx),
        "host_budget_bytes": budgets["host"],
        "ssd_budget_bytes": budgets["ssd"],
        "max_concurrency": concurrency,
        "binding_tier": binding,
        "max_context": plan.max_context(args.batch),
        "fits": plan.fits and concurrency >= args.batch,
        "reason": plan.reason if not plan.fits else (
            "fits" if concurrency >= args.batch else
            f"{args.batch} sequences of {ctx} tokens need more than the {plan.num_gpu_blocks} KV blocks"
            if binding == "gpu" else
            f"{args.batch} sequences of {ctx} tokens need more than this GPU's {(budgets[binding] or 0) / GIB:.0f} GiB "
            f"share of {binding} memory (holds {concurrency})"),
        "max_model_len": model.max_position_embeddings,
    }


def cmd_memory(args: argparse.Namespace) -> None:
    r = memory_report(args)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    print(f"{r['model']} on {r['hardware']} ({_parallel_label(r)}), weights {r['weights']}, KV method {r['method']}")
    print(f"  memory rule             {r['vllm_rule']}; {r['sampler']} sampler")
    lim = r["engine_limits"]
    print(f"  engine step limits      {lim['max_num_batched_tokens']:,} tokens, {lim['max_num_seqs']:,} sequences "
          f"({lim['source']})")
    print(f"  KV bytes per token      {r['kv_bytes_per_token']:12,.0f} B  (all ranks, at {r['context']} tokens;"
          f" GPU {r['kv_gpu_bytes_per_token']:,.0f}, host {r['kv_host_bytes_per_token']:,.0f})")
    print(f"  budget                  {g(r['budget_bytes'])}  per GPU")
    print(f"  weights                 {g(r['weight_bytes'])}")
    kept = (f"  (of which {r['moe_workspace_bytes'] / GIB:.2f} GiB the {r['moe_experts_kernel']} MoE experts' "
            "workspace, kept through the sampler run)") if r["moe_workspace_bytes"] else ""
    print(f"  activation peak         {g(r['activation_peak_bytes'])}{kept}")
    print(f"  non-torch + CUDA graphs {g(r['non_torch_bytes'] + r['cuda_graph_bytes'])}  (non-torch: the rule's "
          f"{r['non_torch_basis']})")
    print(f"  KV cache                {g(r['kv_cache_bytes'])}  = {r['num_gpu_blocks']:,} blocks of "
          f"{r['block_size']} tokens ({r['kv_capacity_tokens']:,} tokens at {r['context']:,}-token context)")
    host = r["kv_host_bytes_per_token"] * r["context"] / r["tp"]
    if host:
        print(f"  host memory             {g(r['host_budget_bytes'])}  per GPU (host / GPUs per node); "
              f"{host / GIB:.2f} GiB per sequence")
    print(f"  max concurrency         {r['max_concurrency']:,} sequences of {r['context']:,} tokens "
          f"(bound by {r['binding_tier']} memory)")
    print(f"  max context             {r['max_context']:,} tokens for {r['batch']} sequences")
    print(f"  fits                    {r['fits']}  ({r['reason']})")


# ---------------------------------------------------------------- predict

def cmd_predict(args: argparse.Namespace) -> None:
    from kvsim.api import predict

    _positive(args.prompt, "--prompt")
    if args.context is None and args.prompt is None:
        raise KvsimError("give --context (price decode steps) and/or --prompt (price the prefill)", field="--context")
    model, hardware, layout = _deployment(args)
    par = _parallel(args)
    points = predict(model, hardware, _ints(args.batch, "--batch"),
                     _ints(args.context, "--context") if args.context else None, args.prompt, args.method,
                     args.tp, args.calibration, par.dp, par.expert_parallel)
    cal = points[0]["calibration"]
    note = f": {cal['note']}" if cal["note"] else ""
    meta = f"calibration {cal['label']}{note}"
    if args.json:
        print(json.dumps(points, indent=2))
        print(meta, file=sys.stderr)
        return
    label = _parallel_label({"tp": args.tp, "data_parallel_size": par.dp if par.dp > 1 or par.expert_parallel else None,
                             "expert_parallel": par.expert_parallel})
    print(f"{model.name} on {hardware.name} ({label}), KV method {'+'.join(layout.methods)}; {meta}")
    print(f"decode attention: {cal['decode_kernel']['label']}")
    if args.tp > 1:  # as `kvsim run` says it: which all-reduce, and whether a table or a model prices it
        print(f"note: all-reduce: {cal['allreduce']}")
    for note in cal["cost_notes"][1 if cal["decode_kernel"]["status"] != "measured" else 0:]:
        print(f"note: {note}")
    print(f"{'batch':>6} {'context':>8} {'decode ms':>10} {'tok/s':>10} {'prefill ms':>11}  fits  largest terms")
    for p in points:
        terms = p.get("breakdown") or p["prefill_breakdown"]
        top = sorted(terms.items(), key=lambda kv: -kv[1])[:3]
        pre = f"{p['prefill_s'] * 1e3:11.2f}" if "prefill_s" in p else f"{'-':>11}"
        decode = (f"{p['context']:>8} {p['decode_step_s'] * 1e3:10.3f} {p['tokens_per_s']:10.0f}"
                  if p["context"] is not None else f"{'-':>8} {'-':>10} {'-':>10}")
        print(f"{p['batch']:>6} {decode} {pre}"
              f"  {'yes' if p['fits'] else 'NO ':4}  " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in top))


# ---------------------------------------------------------------- plots, run

def _required(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if not getattr(args, name):
            raise KvsimError(f"`kvsim plot {args.what}` needs --{name.replace('_', '-')}", field=f"--{name}")


def cmd_plot(args: argparse.Namespace) -> None:
    from kvsim import plots

    plots.check_out(Path(args.out))
    methods = [m for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise KvsimError("expected at least one KV method", field="--methods", value=args.methods)
    contexts = _ints(args.contexts, "--contexts") if args.contexts else None
    if args.what == "capacity":
        _required(args, "model", "hardware")
        plots.capacity(args.model, args.hardware, methods, args.tp, contexts, Path(args.out))
    elif args.what == "capacity-grid":
        from kvsim.capacity import capacity_grid
        from kvsim.spec.hardware import load_hardware
        from kvsim.spec.model import load_model

        _required(args, "model", "hardware")
        models = [load_model(m) for m in args.model.split(",") if m]
        ctx = contexts or plots.default_contexts(max(m.max_position_embeddings for m in models))
        gpus = [load_hardware(h) for h in args.hardware.split(",") if h]
        grid = capacity_grid(models, methods, gpus, ctx, args.tp)
        plots.save(plots.capacity_curves(grid, args.tp), Path(args.out))
    elif args.what in ("latency", "goodput"):
        from kvsim import report
        from kvsim.sweep import read_results, swept_columns

        _required(args, "results")
        rows = [r for r in read_results(Path(args.results)) if r.get("status") == "ok"]
        if not rows:
            raise KvsimError("no finished points to plot", field="--results", value=args.results)
        if args.x and args.x not in rows[0]:
            raise KvsimError(f"not a column of results.csv (swept: {', '.join(swept_columns(rows))})",
                             field="--x", value=args.x)
        rate = args.x or report.rate_column(swept_columns(rows))
        if args.what == "latency":
            along = args.x or report.load_column(rows)
            fig = plots.latency_throughput(rows, report.series_columns(rows, along), along)
        else:
            if rate is None:
                raise KvsimError("no swept rate path: name the x axis with --x", field="--x")
            fig = plots.goodput_rate(rows, rate, report.series_columns(rows, rate))
        plots.save(fig, Path(args.out))
    elif args.what == "kv-usage":
        _required(args, "results")
        runs = {}
        for folder in args.results.split(","):
            path = Path(folder) / "timeseries.csv"
            if not path.is_file():
                raise KvsimError("no timeseries.csv (a `kvsim run --out` folder)", field="--results",
                                 value=folder)
            runs[Path(folder).name] = path
        plots.save(plots.kv_usage(runs), Path(args.out))
    elif args.what == "search":
        from kvsim.report import read_search

        _required(args, "results")
        path = Path(args.results) / "search.json"
        if not path.is_file():
            raise KvsimError("no search.json (a `kvsim search --out` folder)", field="--results", value=args.results)
        plots.save(plots.search_costs(read_search(path)), Path(args.out))
    elif args.what == "validation":
        from kvsim.cost.calibration import results_dir

        _required(args, "gpu")
        root = Path(args.validation_results) if args.validation_results else results_dir()
        plots.save(plots.predicted_measured(root / args.gpu), Path(args.out))
    print(f"wrote {args.out}")


# ---------------------------------------------------------------- sweeps, search, report

def _plan(args: argparse.Namespace):
    from kvsim.backends import check_backend
    from kvsim.sweep import expand, load_raw

    check_backend(args.backend, args.address, args.jobs)
    return expand(load_raw(args.scenario, args.set or []), args.scenario)


def cmd_sweep(args: argparse.Namespace) -> None:
    from kvsim.sweep import prepare_folder, run_sweep

    _positive(args.jobs, "--jobs")
    plan = _plan(args)
    if args.dry_run:
        for p in plan.points:
            print(f"{p.index:>5}  {p.key}  {p.label()}")
        print(f"{len(plan.points)} points, all valid")
        return
    if not args.out:
        raise KvsimError("needs --out DIR (or --dry-run)", field="--out")
    out = Path(args.out)
    prepare_folder(plan, out, args.force)
    outcome = run_sweep(plan, out, args.jobs, args.backend, args.address, args.retry_errors, args.keep_runs,
                        progress=not args.quiet)
    for note in outcome.notes:
        print(f"kvsim: note: {note}", file=sys.stderr)
    print(f"{outcome.total} points: {outcome.ran} run now, {outcome.skipped} already done, "
          f"{outcome.failed} failed; wrote {out / 'results.csv'}")


def _prices(items: list[str]) -> dict[str, float]:
    """``--price GPU=USD`` (per GPU-hour), repeatable."""
    from kvsim.spec.hardware import hardware_names

    out = {}
    for item in items:
        gpu, _, usd = item.partition("=")
        try:
            value = float(usd)
        except ValueError:
            value = float("nan")
        if gpu not in hardware_names() or not 0 < value < float("inf"):
            raise KvsimError("expected GPU=USD with a catalogue GPU and a positive price per GPU-hour",
                             field="--price", value=item)
        out[gpu] = value
    return out


def cmd_search(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from kvsim.fileio import write_atomic
    from kvsim.progress import Progress
    from kvsim.search import candidates, check_search_folder, rate_path, rate_unit, run_search, select_points

    _positive(args.jobs, "--jobs")
    if args.target_rate is not None and not 0 < args.target_rate < float("inf"):
        raise KvsimError("must be a finite positive rate", field="--target-rate", value=args.target_rate)
    if args.out:
        check_search_folder(Path(args.out), args.force)
    plan = _plan(args)
    points = select_points(plan, args.configs) if args.configs else list(plan.points)
    configs = len(candidates(plan, points))  # a bad sweep.search.space stops here, before any output
    if args.target_rate is not None and rate_path(points[0].raw, plan.search).endswith("rate_scale"):
        raise KvsimError("is requests per second, but sweep.search.rate_path is workload.rate_scale (a multiple of "
                         "the trace's rate): search workload.rate instead", field="--target-rate",
                         value=args.target_rate, file=args.scenario)
    synthetic = (points[0].raw.get("workload") or {}).get("synthetic") or {}
    if synthetic.get("num_requests") and not synthetic.get("duration_s"):
        print("kvsim: note: workload.synthetic.num_requests fixes the number of requests, so a high rate is "
              "a short burst, not a sustained load; give duration_s instead", file=sys.stderr)
    bar = Progress("search", not args.quiet, total=configs)
    results = run_search(plan, args.target_rate, args.jobs, args.backend, args.address, points,
                         on_done=lambda done, total: bar.update(done, 0), prices=_prices(args.price or []))
    bar.close()
    target = args.target_rate or plan.search.target_rate
    doc = {"scenario": args.scenario, "target_rate": target,
           "rate_path": rate_path(points[0].raw, plan.search),
           **plan.search.model_dump(exclude={"target_rate", "rate_path"}),
           "configs": [asdict(r) for r in results]}
    if args.out:
        write_atomic(Path(args.out) / "search.json", json.dumps(doc, indent=2))
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    unit = rate_unit(doc["rate_path"])
    disagg = sum(r.disaggregated for r in results)
    print(f"capacity search: {len(results)} configurations tried ({len(results) - disagg} aggregated, {disagg} "
          f"disaggregated), {sum(len(r.probes) for r in results)} simulations; goodput >= "
          f"{plan.search.min_goodput:.0%} of requests within both SLOs, rate knob {doc['rate_path']} ({unit}), "
          f"tolerance {plan.search.tolerance:.0%}" + (f", target {target:g} {unit}" if target else ""))
    rows = [{"rank": r.rank or "-", "config": r.label, "GPUs/copy": r.gpus_per_replica,
             "$/GPU-h": f"{r.price_per_gpu_hour_usd:.2f}" if r.price_per_gpu_hour_usd else "-",
             f"max rate ({unit})": f"{r.max_rate:.3g}", "copies": r.replicas or "-",
             "$/h": f"{r.cost_usd_per_hour:.2f}" if r.cost_usd_per_hour else "-",
             "calibration": r.calibration or "-"} for r in results]
    _table(rows, False, list(rows[0]))
    print("\nwhy:")
    for r in results:
        print(f"  {r.rank or '-':>3}  {r.label}: {r.verdict}")


def cmd_report(args: argparse.Namespace) -> None:
    from kvsim.fileio import check_writable
    from kvsim.report import write_report

    validation = None
    if args.validation:
        from kvsim.cost.calibration import results_dir

        root = Path(args.validation_results) if args.validation_results else results_dir()
        validation = root / args.validation
    if args.out:
        check_writable(Path(args.out), "--out", folder=False)
    out = write_report(Path(args.dir), Path(args.out) if args.out else None, validation)
    print(f"wrote {out}")


def cmd_run(args: argparse.Namespace) -> None:
    from kvsim.scenario import load_scenario, run_scenario, write_outputs
    from kvsim.scenario.outputs import check_run_folder

    scenario = load_scenario(args.scenario, args.set or [])
    if args.out:
        check_run_folder(Path(args.out), args.force)
    result = run_scenario(scenario, progress=not args.json and sys.stderr.isatty(),
                          skip_bad_rows=args.skip_bad_rows)
    if args.out:
        write_outputs(result, Path(args.out))
    if args.json:
        print(json.dumps(result.summary, indent=2))
    else:
        from kvsim.scenario.outputs import text_summary

        print(text_summary(result.summary))


def cmd_calibrate(args: argparse.Namespace) -> None:
    if args.source is not None:
        from kvsim.cost.calibration import user_calibration_dir
        from kvsim.importers.aiconfigurator import import_profile, parse_engine, write_profile

        if args.source != "aiconfigurator" or args.system is None:
            raise KvsimError("imports need --from aiconfigurator --system SYSTEM", field="--from", value=args.source)
        engine, version = parse_engine(args.engine)
        profile = import_profile(args.system, engine, version, args.gpu,
                                 Path(args.database) if args.database else None)
        print(f"wrote {write_profile(profile, Path(args.out) if args.out else user_calibration_dir())}")
        return
    from kvsim.calibrate import calibrate

    if not args.gpu:
        raise KvsimError("needs --gpu (a validation/results folder) or --from aiconfigurator", field="--gpu")
    out = calibrate(args.gpu, Path(args.results) if args.results else None)
    print(f"wrote {out}")


def cmd_validate(args: argparse.Namespace) -> None:
    from kvsim.validate import decode_target, validate

    if (args.gpu is None) == (args.serving is None):
        raise KvsimError("give exactly one of --gpu and --serving", field="kvsim validate",
                         value=[a for a in ("gpu", "serving") if getattr(args, a) is not None])
    if args.serving is not None:
        for flag, value in (("--leave-one-model-out", args.leave_one_model_out or None),
                            ("--calibration-from", args.calibration_from), ("--results", args.results)):
            if value is not None:
                raise KvsimError("judges a reference-engine folder: use it with --gpu, not --serving", field=flag,
                                 value=value)
        if args.calibration not in (None, "imported", "none") and not Path(args.calibration).is_file():
            # else every row would be counted as not expressible, each with the same missing file
            raise KvsimError("no such profile file", field="--calibration", value=args.calibration)
        from kvsim.judge_serving import find_silicon_sample

        _validate_serving(find_silicon_sample() if args.serving == "aiconfigurator" else Path(args.serving), args.json,
                          args.calibration, args.set or [], args.deployment, args.requests_per_client)
        return
    if args.calibration is not None:
        raise KvsimError("picks the profile the --serving rows run with; with --gpu, use --calibration-from",
                         field="--calibration", value=args.calibration)
    for flag, value in (("--deployment", args.deployment), ("--requests-per-client", args.requests_per_client)):
        if value is not None:
            raise KvsimError("says how the --serving rows' servers ran; a reference-engine folder has none",
                             field=flag, value=value)
    if args.set:
        raise KvsimError("--set overrides the scenarios of --serving rows; a reference-engine folder has none",
                         field="--set", value=args.set)

    results = Path(args.results) if args.results else None
    if args.leave_one_model_out:
        if args.calibration_from is not None:
            raise KvsimError("--leave-one-model-out refits on the GPU's own kernel rows; drop --calibration-from",
                             field="--calibration-from", value=args.calibration_from)
        from kvsim.lomo import leave_one_model_out

        report, tables = leave_one_model_out(args.gpu, results)
        if args.json:
            print(json.dumps(tables, indent=2))
            return
        for name, rows in tables.items():
            print(f"{name}:")
            _print_summary(rows)
        print(f"wrote {report}")
        return
    report, summary = validate(args.gpu, args.calibration_from, results)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    _print_summary(summary)
    target = decode_target(summary, args.gpu, args.calibration_from or args.gpu)
    if target is not None:
        print(target)
    print(f"wrote {report}")


def _print_summary(rows: list[dict]) -> None:
    """kvsim validate's table: errors over distinct configurations (``configs``) of ``points`` rows."""
    print(f"{'what':<13} {'model':<18} {'points':>6} {'configs':>7} {'median':>8} {'p90':>8} {'worst':>8}")
    for s in rows:
        print(f"{s['kind']:<13} {s['model']:<18} {s['points']:>6} {s['configs']:>7} {s['median_abs_err']:8.1%} "
              f"{s['p90_abs_err']:8.1%} {s['max_abs_err']:8.1%}")


def _validate_serving(path: Path, as_json: bool, calibration: str | None, sets: list[str],
                      deployment: str | None, requests_per_client: int | None) -> None:
    from kvsim.judge_serving import (
        DATED,
        DEFAULT_DEPLOYMENT,
        DUPLICATE_ROWS,
        RELEASES_FILE,
        SOURCE_COLUMN,
        UNRECORDED,
        deployment_named,
        error_table,
        is_bench_results,
        judge,
        repeat_spread,
    )
    from kvsim.memory import default_vllm_version

    # `vllm bench serve` results are the user's own runs: the engine's defaults and the run's recorded
    # flags, not aiconfigurator's generated deployment, unless asked
    deployment = deployment or ("engine-defaults" if is_bench_results(path) else DEFAULT_DEPLOYMENT)
    dep = deployment_named(deployment, requests_per_client)
    judged, skipped = judge(path, calibration, sets, deployment, requests_per_client)
    table = error_table(judged) if judged else []
    repeats = repeat_spread(judged)
    duplicates = skipped.pop(DUPLICATE_ROWS, 0)
    if as_json:
        print(json.dumps({"file": str(path), "deployment": {"name": dep.name, "assumed": dep.source,
                                                            "requests_per_client": dep.requests_per_client},
                          "overrides": sets, "groups": table, "repeats": repeats, "duplicate_rows": duplicates,
                          "not_expressible": dict(skipped),
                          "rows": [{"line": j.row.line, "engine": j.row.engine_label, "tp": j.row.tp,
                                    "isl": j.row.isl, "osl": j.row.osl,
                                    "concurrency": j.row.concurrency, "ttft_ms": j.row.ttft_ms,
                                    "predicted_ttft_ms": j.ttft_ms, "tpot_ms": j.row.tpot_ms,
                                    "predicted_tpot_ms": j.tpot_ms, "weights": j.weights,
                                    "max_num_batched_tokens": j.budget_tokens} for j in judged]}, indent=2))
        return
    print(f"{'gpu':<13} {'engine':<16} {'model':<18} {'prec':<11} {'tp':>3} {'rows':>5} {'configs':>7}   "
          f"{'TTFT median':>11} {'p90':>7} {'worst':>7}   {'TPOT median':>11} {'p90':>7} {'worst':>7}   calibration")
    for g in table:
        print(f"{g['gpu']:<13} {g['engine']:<16} {g['model']:<18} {g['precision']:<11} {g['tp'] or '':>3} "
              f"{g['rows']:>5} {g['configurations']:>7}   {g['ttft_median_abs_err']:11.1%} "
              f"{g['ttft_p90_abs_err']:7.1%} {g['ttft_max_abs_err']:7.1%}   {g['tpot_median_abs_err']:11.1%} "
              f"{g['tpot_p90_abs_err']:7.1%} {g['tpot_max_abs_err']:7.1%}   {g['calibration']}")
    for why, n in sorted(skipped.items()):
        print(f"not expressible ({n} rows): {why}")
    if duplicates:
        print(f"{duplicates} rows repeat an earlier row whole, results included: each run is judged once")
    if repeats:
        print(f"{repeats['configurations']} configurations are measured more than once with different results; "
              f"the measurements of one configuration differ by a median {repeats['ttft_median_spread']:.1%} in TTFT "
              f"(p90 {repeats['ttft_p90_spread']:.1%}, largest {repeats['ttft_max_spread']:.1%}) and "
              f"{repeats['tpot_median_spread']:.1%} in TPOT (p90 {repeats['tpot_p90_spread']:.1%}, largest "
              f"{repeats['tpot_max_spread']:.1%}): no prediction can be expected to agree with the file more closely")
    print(f"deployment {dep.name} (assumed, the rows do not record it): {dep.source}")
    if own := sum(1 for j in judged if j.row.num_requests):
        print(f"{own} rows record their request count (column num_requests) and ran that many requests")
    if not any(s.startswith("engine.vllm_version=") for s in sets):
        if any(j.row.dated_version for j in judged):
            print(f"engine version {DATED}X: the row records no release (no version, or a nightly build) but the day "
                  f"it was measured ({SOURCE_COLUMN} measured=); it ran as X, the newest vLLM release published by "
                  f"then (PyPI release dates, {RELEASES_FILE}), an inference: the run may have used an older release")
        if any(not j.row.engine_version for j in judged):
            print(f"engine version {UNRECORDED}: the row records none; it ran with vLLM {default_vllm_version()}'s "
                  "memory rule and engine-step host time (kvsim's default version)")
    if sets:
        print(f"every row ran with --set {' '.join(sets)} (an assumption about the measured servers, not their "
              "recorded settings)")


# ---------------------------------------------------------------- parser

def _deployment_args(p: argparse.ArgumentParser, weights_choices: Sequence[str]) -> None:
    p.add_argument("--model", required=True, help="catalogue name, model YAML or HF config.json")
    p.add_argument("--hardware", required=True, help="GPU catalogue name or YAML")
    p.add_argument("--method", default="bf16", help="KV method spec, e.g. snapkv:budget=2048+kivi:bits=2")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--data-parallel-size", "--dp", type=int, default=1,
                   help="vLLM --data-parallel-size: ranks of --tp GPUs, each with its own batch and KV cache; a MoE "
                        "model's experts spread over all of them")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="vLLM --enable-expert-parallel: whole experts per GPU over data-parallel-size x tp GPUs")
    p.add_argument("--weights", choices=weights_choices, default=None,
                   help="serve the weights in this precision (default: as the checkpoint stores them)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends each option's default to its help, unless the help already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        shown = "unset" if action.default is None else str(action.default).replace("%", "%%")
        return f"{text} (default: {shown})".lstrip()


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments get one line and exit 2, as every other bad input does (argparse's own error
    prints the whole usage block first); the line names the command whose --help lists the options."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"kvsim: error: {message} (see `{self.prog} --help`)\n")


class _DefaultsParser(_OneLineParser):
    """A subcommand parser whose help shows every option's default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # ArgumentParser's own
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from kvsim import __version__
    from kvsim.judge_serving import DEPLOYMENTS
    from kvsim.memory import SAMPLERS, VLLM_DEFAULTS, default_vllm_version
    from kvsim.spec.quant import WEIGHTS_CHOICES

    parser = _OneLineParser(prog="kvsim", description="KV-cache memory and serving-speed planner")
    parser.add_argument("--version", action="version", version=f"kvsim {__version__}")
    # every subcommand's help shows each option's default
    sub = parser.add_subparsers(dest="command", required=True,
                                parser_class=_DefaultsParser)
    for name, fn, helptext in (("models", cmd_models, "list the model catalogue"),
                               ("hardware", cmd_hardware, "list the GPU catalogue"),
                               ("methods", cmd_methods, "list KV methods and their parameters")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        if name == "hardware":
            p.add_argument("--engine", default="vllm", choices=["vllm", "sglang", "trtllm"],
                           help="engine kind whose imported profiles to show (default: vllm)")
        p.set_defaults(func=fn)

    p = sub.add_parser("memory", help="memory plan: weights, activations, KV blocks, capacity")
    _deployment_args(p, WEIGHTS_CHOICES)
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=1, help="concurrent sequences")
    # vLLM's defaults, as for a scenario's engine: section (kvsim.memory.VLLM_DEFAULTS)
    p.add_argument("--gpu-memory-utilization", type=float, default=VLLM_DEFAULTS.gpu_memory_utilization,
                   help="fraction of GPU memory the engine may use")
    p.add_argument("--block-size", type=int, default=VLLM_DEFAULTS.block_size, help="tokens per KV block")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per engine step (default: what `vllm serve` of the version uses on the GPU, "
                        "kvsim/data/vllm_batch_defaults.yaml)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="sequences per engine step (default: as --max-num-batched-tokens)")
    p.add_argument("--vllm-version", default=None,
                   help="size memory by this vLLM version's rule (kvsim/data/vllm_memory.yaml; default: "
                        f"{default_vllm_version()})")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (nothing to charge for them)")
    p.add_argument("--sampler", choices=SAMPLERS, default="native",
                   help="the sampler's top-k/top-p implementation: vLLM's own, or FlashInfer's (0.10.2-0.11 "
                        "wherever FlashInfer is installed, as in vLLM's images; 0.12+ with "
                        "VLLM_USE_FLASHINFER_SAMPLER=1)")
    p.add_argument("--cuda-graph-gib", type=float, default=None,
                   help="CUDA-graph memory vLLM >= 0.20 measures and charges (its 'Estimated CUDA graph memory')")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("predict", help="step times over a batch x context grid")
    _deployment_args(p, WEIGHTS_CHOICES)
    p.add_argument("--batch", required=True, help="comma-separated batch sizes")
    p.add_argument("--context", help="comma-separated context lengths (decode steps; omit to price the prefill "
                   "alone)")
    p.add_argument("--prompt", type=int, help="also price prefilling `batch` prompts of this length")
    p.add_argument("--calibration", help="profile path, or 'none' for the pure roofline")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("plot", help="figures",
                       description="capacity: one model on one GPU (also KV bytes and memory breakdown); "
                       "capacity-grid: models x GPUs panels, a line per method; latency, goodput: from a "
                       "sweep folder (--results); kv-usage: from `kvsim run --out` folders (--results A,B); "
                       "search: the cost of each configuration from a `kvsim search --out` folder (--results); "
                       "validation: predicted vs measured for --gpu")
    p.add_argument("what", choices=["capacity", "capacity-grid", "latency", "goodput", "kv-usage", "search",
                                    "validation"])
    p.add_argument("--model", help="catalogue name (capacity-grid: comma-separated)")
    p.add_argument("--hardware", help="GPU name (capacity-grid: comma-separated)")
    p.add_argument("--methods", default="bf16,fp8,kivi:bits=2,snapkv:budget=2048", help="comma-separated KV methods")
    p.add_argument("--contexts", help="comma-separated context lengths (default: 512..max, log-spaced)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--results", help="sweep folder (latency, goodput), run folders (kv-usage) or search folder")
    p.add_argument("--x", help="goodput: the swept column on the x axis (default: the swept rate)")
    p.add_argument("--gpu", help="validation: folder under validation/results")
    p.add_argument("--validation-results", help="validation results root (default: validation/results)")
    p.add_argument("--out", required=True, help="image file (.png, .svg or .pdf)")
    p.set_defaults(func=cmd_plot)

    def sweep_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("scenario", help="scenario YAML with a sweep: section")
        q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a base scenario field")
        q.add_argument("--jobs", type=int, help="parallel points (default: every core given to this process)")
        q.add_argument("--backend", choices=["local", "ray"], default="local",
                       help="local processes, or a Ray cluster")
        q.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
        q.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    p = sub.add_parser("sweep", help="run every point of a scenario's sweep: section")
    sweep_args(p)
    p.add_argument("--out", help="results folder (resumable)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the points, run nothing")
    p.add_argument("--retry-errors", action="store_true", help="rerun points that failed in an earlier run")
    p.add_argument("--keep-runs", action="store_true", help="also write each point's run folder under runs/")
    p.add_argument("--force", action="store_true", help="discard another sweep's results in --out")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("search",
                       help="highest rate each configuration sustains within its SLOs; cheapest one")
    sweep_args(p)
    p.add_argument("--target-rate", type=float, help="requests per second to serve (a trace's too)")
    p.add_argument("--price", action="append", metavar="GPU=USD",
                   help="price per GPU-hour replacing the catalogue's (repeatable; also sweep.search.prices)")
    p.add_argument("--configs", nargs="+", metavar="SEL", help="only these points: indices and/or PATH=VALUE")
    p.add_argument("--out", help="folder for search.json (read by kvsim report)")
    p.add_argument("--force", action="store_true", help="replace an earlier search.json in --out")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("report", help="self-contained HTML report of a sweep folder")
    p.add_argument("dir", help="sweep folder (kvsim sweep --out)")
    p.add_argument("--out", help="HTML file (default: DIR/report.html)")
    p.add_argument("--validation", metavar="GPU",
                   help="add predicted vs measured from validation/results/GPU")
    p.add_argument("--validation-results", help="validation results root (default: validation/results)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("calibrate", help="fit a calibration profile from a GPU's kernel measurements")
    p.add_argument("--gpu", help="folder name under validation/results, e.g. h100-sxm (with --from: the catalogue "
                                 "GPU the profile is for; default: the system's)")
    p.add_argument("--results", help="results root (default: validation/results of this checkout)")
    p.add_argument("--from", dest="source", choices=["aiconfigurator"],
                   help="import from a kernel database instead (needs kvsim[aic]): aiconfigurator")
    p.add_argument("--system", help="with --from: the database's system, e.g. h200_sxm")
    p.add_argument("--database", help="with --from: the database's systems/data folder (default: the installed "
                                      "aiconfigurator-core's)")
    p.add_argument("--engine", default="vllm", help="with --from: vllm, sglang or trtllm, optionally ==VERSION")
    p.add_argument("--out", help="with --from: folder to write GPU.ENGINE.yaml into (default: "
                                 "$KVSIM_CALIBRATION_DIR, else ~/.local/share/kvsim/calibration)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("validate", help="judge predictions on end-to-end measurements not used in fitting")
    p.add_argument("--gpu", help="reference-engine results folder under validation/results, e.g. h100-sxm")
    p.add_argument("--serving", metavar="FILE",
                   help="judge closed-loop serving on real engine measurements (aiconfigurator silicon-sample "
                        "format, e.g. ../shared/data/measured/vllm_h100_qwen3-32b_closed_loop.csv; or `vllm bench "
                        "serve --save-result` JSON files, one or a folder, with --metadata gpu=... "
                        "vllm_version=...: docs/vllm-bench.md); 'aiconfigurator': the installed package's "
                        "systems/silicon_sample.csv")
    p.add_argument("--calibration-from", help="GPU whose fitted profile to use (default: the same GPU), or "
                                              "'imported': the GPU's profile imported from a kernel database")
    p.add_argument("--leave-one-model-out", action="store_true",
                   help="with --gpu: refit without each engine model's kernel shapes and judge that model "
                        "(writes report_lomo.md)")
    p.add_argument("--deployment", choices=list(DEPLOYMENTS),
                   help="with --serving: how the measured servers ran (default aiconfigurator: the engine flags and "
                        "request count of aiconfigurator's generated benchmarks; engine-defaults, the default for "
                        "`vllm bench serve` results: each engine's default flags); docs/vllm-bench.md")
    p.add_argument("--requests-per-client", type=int,
                   help="with --serving: the closed-loop run's length (default: the deployment's; the rows do "
                        "not record it)")
    p.add_argument("--calibration", help="with --serving: 'imported' (the imported profile even where kvsim "
                                         "measured the GPU), 'none' or a profile path (default: each row's GPU)")
    p.add_argument("--results", help="results root (default: validation/results of this checkout)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="with --serving: override a field of every row's scenario, e.g. "
                        "engine.max_num_batched_tokens=2048 (a hypothesis about how the servers ran)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="simulate a serving scenario")
    p.add_argument("scenario")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario field")
    p.add_argument("--out", help="folder for summary, per-request CSV, time series, Chrome trace")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip malformed trace rows (counted) instead of stopping")
    p.add_argument("--force", action="store_true", help="replace an earlier run's files in --out")
    p.set_defaults(func=cmd_run)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that cleanup (pool shutdown, a sweep's
    result tables) runs on the way out."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.func
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if getattr(args, "out", None) is not None and not args.out.strip():
            # an empty --out would be the current folder (Path("")), or skipped where --out is optional
            raise KvsimError("expected a path", field="--out", value=args.out)
        handler(args)
    except KvsimError as err:
        print(f"kvsim: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except BrokenPipeError:
        raise SystemExit(0) from None
    except KeyboardInterrupt:
        print("kvsim: interrupted (a sweep keeps its finished points: run it again to resume)", file=sys.stderr)
        raise SystemExit(130) from None
    except Terminated:
        print("kvsim: terminated (a sweep keeps its finished points: run it again to resume)", file=sys.stderr)
        raise SystemExit(143) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
