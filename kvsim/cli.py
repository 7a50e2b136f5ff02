"""``kvsim`` command line. Bad input prints one line naming the field and value, exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from kvsim.errors import KvsimError

GIB = 2**30


def _ints(text: str, field: str) -> list[int]:
    try:
        values = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise KvsimError("expected comma-separated positive integers", field=field, value=text) from None
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
    from kvsim.spec.hardware import hardware_names, load_hardware

    rows = []
    for name in hardware_names():
        hw = load_hardware(name)
        rows.append({"name": name, "display_name": hw.display_name, "memory_gib": round(hw.memory_bytes / GIB, 2),
                     "hbm_tb_per_s": hw.hbm_bandwidth_bytes_per_s / 1e12,
                     "bf16_tflops": (hw.peak_flops_per_s.get("bf16") or 0) / 1e12,
                     "fp8_tflops": (hw.peak_flops_per_s.get("fp8") or 0) / 1e12,
                     "nvlink_gb_per_s": hw.nvlink_bandwidth_bytes_per_s / 1e9,
                     "price_usd_per_hour": hw.price_per_gpu_hour_usd})
    _table(rows, args.json, list(rows[0]))


def cmd_methods(args: argparse.Namespace) -> None:
    from kvsim.kv import METHODS

    rows = [{"name": m.name, "stage": m.stage.name.lower(), "source": m.source,
             "params": ", ".join(f"{p.name}={'<required>' if p.default is None else p.default}" for p in m.params),
             "summary": m.summary, "example": m.example} for m in METHODS.values()]
    _table(rows, args.json, ["name", "stage", "params", "source", "summary"])


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

    model = load_model(args.model)
    hardware = load_hardware(args.hardware)
    layout = layout_for(model, args.method)
    return model, hardware, layout


def memory_report(args: argparse.Namespace) -> dict:
    from kvsim.memory import EngineMemoryConfig, plan_memory

    for field in ("context", "batch", "block_size", "max_num_batched_tokens", "max_num_seqs"):
        _positive(getattr(args, field), f"--{field.replace('_', '-')}")
    model, hardware, layout = _deployment(args)
    engine = EngineMemoryConfig(args.gpu_memory_utilization, args.block_size, args.max_num_batched_tokens,
                                args.max_num_seqs)
    plan = plan_memory(model, hardware, layout, args.tp, engine)
    ctx = args.context
    tiers = layout.bytes_by_tier(ctx, args.tp)
    all_ranks = args.tp  # every rank holds its share (or a replica) of the KV heads
    return {
        "model": model.name, "hardware": hardware.name, "method": "+".join(layout.methods), "tp": args.tp,
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
        "non_torch_bytes": plan.non_torch_bytes,
        "cuda_graph_bytes": plan.cuda_graph_bytes,
        "kv_cache_bytes": max(plan.kv_cache_bytes, 0.0),
        "block_size": engine.block_size,
        "block_bytes": plan.block_bytes,
        "num_gpu_blocks": plan.num_gpu_blocks,
        "kv_capacity_tokens": plan.kv_capacity_tokens,
        "max_concurrency": int(plan.max_concurrency(ctx)[0]),
        "max_context": plan.max_context(args.batch),
        "fits": plan.fits and int(plan.max_concurrency(ctx)[0]) >= args.batch,
        "reason": plan.reason if not plan.fits else (
            "fits" if int(plan.max_concurrency(ctx)[0]) >= args.batch else
            f"{args.batch} sequences of {ctx} tokens need more than the {plan.num_gpu_blocks} KV blocks"),
        "max_model_len": model.max_position_embeddings,
    }


def cmd_memory(args: argparse.Namespace) -> None:
    r = memory_report(args)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    print(f"{r['model']} on {r['hardware']} (TP {r['tp']}), KV method {r['method']}")
    print(f"  KV bytes per token      {r['kv_bytes_per_token']:12,.0f} B  (all ranks, at {r['context']} tokens;"
          f" GPU {r['kv_gpu_bytes_per_token']:,.0f}, host {r['kv_host_bytes_per_token']:,.0f})")
    print(f"  budget                  {g(r['budget_bytes'])}  per GPU")
    print(f"  weights                 {g(r['weight_bytes'])}")
    print(f"  activation peak         {g(r['activation_peak_bytes'])}")
    print(f"  non-torch + CUDA graphs {g(r['non_torch_bytes'] + r['cuda_graph_bytes'])}")
    print(f"  KV cache                {g(r['kv_cache_bytes'])}  = {r['num_gpu_blocks']:,} blocks of "
          f"{r['block_size']} tokens ({r['kv_capacity_tokens']:,} tokens)")
    print(f"  max concurrency         {r['max_concurrency']:,} sequences of {r['context']:,} tokens")
    print(f"  max context             {r['max_context']:,} tokens for {r['batch']} sequences")
    print(f"  fits                    {r['fits']}  ({r['reason']})")


# ---------------------------------------------------------------- predict

def cmd_predict(args: argparse.Namespace) -> None:
    from kvsim.cost import Batch, CostModel
    from kvsim.memory import plan_memory

    batches, contexts = _ints(args.batch, "--batch"), _ints(args.context, "--context")
    _positive(args.prompt, "--prompt")
    model, hardware, layout = _deployment(args)
    cost = CostModel(model, hardware, layout, args.tp, args.calibration)
    plan = plan_memory(model, hardware, layout, args.tp)
    points = []
    for b in batches:
        for c in contexts:
            step = cost.step(Batch(decode_context=np.full(b, c, dtype=np.int64)))
            fits = plan.fits and int(plan.max_concurrency(c)[0]) >= b
            point = {"batch": b, "context": c, "decode_step_s": step.total_s,
                     "tokens_per_s": b / step.total_s, "fits": fits,
                     "breakdown": step.breakdown, "bound": {o.name: o.bound for o in step.ops}}
            if not fits:
                point["reason"] = plan.reason if not plan.fits else \
                    f"{b} sequences of {c} tokens exceed the {plan.num_gpu_blocks} KV blocks"
            if args.prompt:
                pre = cost.step(Batch(prefill_tokens=np.full(b, args.prompt), prefill_context=np.zeros(b)))
                point["prefill_s"] = pre.total_s
                point["prefill_breakdown"] = pre.breakdown
            points.append(point)
    meta = f"calibration {cost.cal.kind} ({cost.cal.gpu}, {cost.cal.engine}){': ' + cost.cal.note if cost.cal.note else ''}"
    if args.json:
        print(json.dumps(points[0] if len(points) == 1 else points, indent=2))
        print(meta, file=sys.stderr)
        return
    print(f"{model.name} on {hardware.name} (TP {args.tp}), KV method {'+'.join(layout.methods)}; {meta}")
    print(f"{'batch':>6} {'context':>8} {'decode ms':>10} {'tok/s':>10} {'prefill ms':>11}  fits  largest terms")
    for p in points:
        top = sorted(p["breakdown"].items(), key=lambda kv: -kv[1])[:3]
        pre = f"{p['prefill_s'] * 1e3:11.2f}" if "prefill_s" in p else f"{'-':>11}"
        print(f"{p['batch']:>6} {p['context']:>8} {p['decode_step_s'] * 1e3:10.3f} {p['tokens_per_s']:10.0f} {pre}"
              f"  {'yes' if p['fits'] else 'NO ':4}  " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in top))


# ---------------------------------------------------------------- plots, run

def cmd_plot(args: argparse.Namespace) -> None:
    from kvsim import plots

    if args.what == "capacity":
        contexts = _ints(args.contexts, "--contexts") if args.contexts else None
        plots.capacity(args.model, args.hardware, [m for m in args.methods.split(",") if m], args.tp,
                       contexts, Path(args.out))
        print(f"wrote {args.out}")


def cmd_run(args: argparse.Namespace) -> None:
    from kvsim.scenario import load_scenario, run_scenario, write_outputs

    scenario = load_scenario(args.scenario, args.set or [])
    result = run_scenario(scenario, progress=not args.json and sys.stderr.isatty(),
                          skip_bad_rows=args.skip_bad_rows)
    if args.out:
        write_outputs(result, Path(args.out))
    if args.json:
        print(json.dumps(result.summary, indent=2))
    else:
        s = result.summary
        print(f"completed {s['completed']} requests in {s['duration_s']:.1f} s simulated; "
              f"{s['throughput_output_tokens_per_s']:.0f} output tok/s; TTFT p50 {s['ttft_s']['p50'] * 1e3:.0f} ms, "
              f"p99 {s['ttft_s']['p99'] * 1e3:.0f} ms; TPOT p50 {s['tpot_s']['p50'] * 1e3:.1f} ms; "
              f"goodput {s['goodput']}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from kvsim.calibrate import calibrate

    out = calibrate(args.gpu, Path(args.results) if args.results else None)
    print(f"wrote {out}")


def cmd_validate(args: argparse.Namespace) -> None:
    from kvsim.validate import validate

    report, summary = validate(args.gpu, args.calibration_from, Path(args.results) if args.results else None)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{'what':<9} {'model':<18} {'n':>4} {'median':>8} {'p90':>8} {'worst':>8}")
    for s in summary:
        print(f"{s['kind']:<9} {s['model']:<18} {s['n']:>4} {s['median_abs_err']:8.1%} {s['p90_abs_err']:8.1%} "
              f"{s['max_abs_err']:8.1%}")
    print(f"wrote {report}")


# ---------------------------------------------------------------- parser

def _deployment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="catalogue name, model YAML or HF config.json")
    p.add_argument("--hardware", required=True, help="GPU catalogue name or YAML")
    p.add_argument("--method", default="bf16", help="KV method spec, e.g. snapkv:budget=2048+kivi:bits=2")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvsim", description="KV-cache memory and serving-speed planner")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, helptext in (("models", cmd_models, "list the model catalogue"),
                               ("hardware", cmd_hardware, "list the GPU catalogue"),
                               ("methods", cmd_methods, "list KV methods and their parameters")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=fn)

    p = sub.add_parser("memory", help="memory plan: weights, activations, KV blocks, capacity")
    _deployment_args(p)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("predict", help="step times over a batch x context grid")
    _deployment_args(p)
    p.add_argument("--batch", required=True, help="comma-separated batch sizes")
    p.add_argument("--context", required=True, help="comma-separated context lengths")
    p.add_argument("--prompt", type=int, help="also price prefilling `batch` prompts of this length")
    p.add_argument("--calibration", help="profile path, or 'none' for the pure roofline")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("plot", help="figures")
    p.add_argument("what", choices=["capacity"])
    p.add_argument("--model", required=True)
    p.add_argument("--hardware", required=True)
    p.add_argument("--methods", default="bf16,fp8,kivi:bits=2,snapkv:budget=2048")
    p.add_argument("--contexts", help="comma-separated context lengths (default: 512..max, log-spaced)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("calibrate", help="fit a calibration profile from a GPU's kernel measurements")
    p.add_argument("--gpu", required=True, help="folder name under validation/results, e.g. h100-sxm")
    p.add_argument("--results", help="results root (default: validation/results of this checkout)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("validate", help="judge predictions on end-to-end measurements not used in fitting")
    p.add_argument("--gpu", required=True)
    p.add_argument("--calibration-from", help="GPU whose fitted profile to use (default: the same GPU)")
    p.add_argument("--results", help="results root (default: validation/results of this checkout)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="simulate a serving scenario")
    p.add_argument("scenario")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario field")
    p.add_argument("--out", help="folder for summary, per-request CSV, time series, Chrome trace")
    p.add_argument("--json", action="store_true")
    p.add_argument("--skip-bad-rows", action="store_true")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.func
    try:
        handler(args)
    except KvsimError as err:
        print(f"kvsim: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except BrokenPipeError:
        raise SystemExit(0) from None


if __name__ == "__main__":
    main()
