"""Figures. Imported only where a figure is drawn (the CLI, ``kvsim report``, ``kvsim validate``), as
matplotlib is slow to import; it renders off-screen (Agg)."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import matplotlib.axis
import matplotlib.lines
import matplotlib.patches
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kvsim.capacity import CapacityGrid  # noqa: E402
from kvsim.errors import KvsimError  # noqa: E402
from kvsim.fileio import check_writable, read_csv_rows, write_atomic  # noqa: E402
from kvsim.kv import layout_for  # noqa: E402
from kvsim.memory import GIB, plan_memory  # noqa: E402
from kvsim.spec.hardware import load_hardware  # noqa: E402
from kvsim.spec.model import check_context, load_model  # noqa: E402


def render(fig: plt.Figure, fmt: str = "png", dpi: int = 110) -> bytes:
    """The figure as PNG (or SVG/PDF) bytes; closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


FORMATS = ("png", "svg", "pdf")


def check_out(out: Path) -> None:
    """Refuse an image path that cannot be written, before any figure is drawn."""
    if out.suffix.lstrip(".").lower() not in ("", *FORMATS):
        raise KvsimError(f"unsupported image format; use {', '.join('.' + f for f in FORMATS)} (no suffix: PNG)",
                         field="--out", value=str(out))
    check_writable(out, "--out", folder=False)


def save(fig: plt.Figure, out: Path) -> None:
    """Write the figure whole or not at all; the format follows the file suffix (default PNG)."""
    check_out(out)
    write_atomic(out, render(fig, out.suffix.lstrip(".").lower() or "png"))


def default_contexts(max_tokens: int) -> np.ndarray:
    """Log-spaced context lengths from 512 to the model's maximum."""
    top = max(1024, max_tokens)
    return np.unique(np.geomspace(512, top, 48).astype(np.int64))


def capacity(model_name: str, hardware_name: str, methods: Sequence[str], tp: int,
             contexts: Sequence[int] | None, out: Path) -> None:
    """Most concurrent sequences against context (log axes), KV bytes per token, and the memory
    breakdown of one GPU, one line / bar per method."""
    model, hw = load_model(model_name), load_hardware(hardware_name)
    for c in contexts or ():
        check_context(model, c, "--contexts")
    ctx = np.asarray(contexts if contexts else default_contexts(model.max_position_embeddings), dtype=np.int64)
    fig, (ax_cap, ax_bpt, ax_bar) = plt.subplots(1, 3, figsize=(17, 6),
                                                 gridspec_kw={"width_ratios": [1.2, 1.2, 1]})
    parts: dict[str, list[float]] = {"weights": [], "activations": [], "non-torch": [], "KV cache": []}
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ("-", "v"), ("--", "x")]
    for i, spec in enumerate(methods):
        line, marker = styles[i % len(styles)]
        style = {"ls": line, "marker": marker, "markersize": 3, "label": spec}  # identical curves stay visible
        layout = layout_for(model, spec)
        plan = plan_memory(model, hw, layout, tp)
        conc = plan.max_concurrency(ctx).astype(float)
        conc[conc <= 0] = np.nan
        ax_cap.plot(ctx, conc, **style)
        per_token = sum(layout.bytes_by_tier(ctx, tp).values()) * tp / ctx
        ax_bpt.plot(ctx, per_token / 1024, **style)
        parts["weights"].append(plan.weights.total / GIB)
        parts["activations"].append(plan.activation_peak_bytes / GIB)
        parts["non-torch"].append((plan.non_torch_bytes + plan.cuda_graph_bytes) / GIB)
        parts["KV cache"].append(max(plan.kv_cache_bytes, 0) / GIB)
    for ax in (ax_cap, ax_bpt):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens per sequence)")
        ax.grid(True, which="both", alpha=0.3)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=8)
    ax_cap.set_ylabel("max concurrent sequences")
    ax_cap.set_title(f"Capacity: {model.name} on {hw.name}, TP {tp}")
    ax_bpt.set_ylabel("resident KV per token (KiB, all ranks, all tiers)")
    ax_bpt.set_title("KV bytes per token")
    bottom = np.zeros(len(methods))
    x = np.arange(len(methods))
    for name, values in parts.items():
        ax_bar.bar(x, values, bottom=bottom, label=name)
        bottom += np.asarray(values)
    ax_bar.axhline(hw.memory_bytes / GIB, color="k", ls="--", lw=1, label="device memory")
    ax_bar.set_xticks(x, list(methods), rotation=30, ha="right", fontsize=8)
    ax_bar.set_ylabel("GiB per GPU")
    ax_bar.set_title("Memory breakdown (one GPU)")
    ax_bar.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=3)
    fig.tight_layout()
    save(fig, out)


# ---------------------------------------------------------------- figures from sweeps and runs

_PERCENTILES = (("p50", "-", "o"), ("p90", "--", "s"), ("p99", ":", "^"))


def _series(rows: Sequence[Mapping], by: Sequence[str], names: bool = True) -> dict[str, list[Mapping]]:
    """Rows grouped by the values of ``by`` (label "path=value, ...", or the values alone when
    ``names`` is false), in first-seen order."""
    groups: dict[str, list[Mapping]] = {}
    for r in rows:
        label = ", ".join(f"{c}={r.get(c)}" if names else str(r.get(c)) for c in by) or "all points"
        groups.setdefault(label, []).append(r)
    return groups


def _distinct_style(i: int) -> dict:
    """Line style, marker and width of series ``i``: earlier series are drawn wider, so identical
    curves (fp8 and cla:factor=2 hold the same bytes) stay visible one inside the other."""
    line, marker = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ("-", "v"), ("--", "x"))[i % 6]
    return {"ls": line, "marker": marker, "markersize": max(3.0, 6.0 - 0.6 * i),
            "lw": max(1.0, 3.0 - 0.45 * i)}


def _log_axis(axis: matplotlib.axis.Axis, decades: float = 3.0) -> None:
    """Log scale with plain-number labels at 1, 2, 5 x 10^k (no 3 x 10^0 style labels); only at
    10^k when the axis spans more than three decades, so labels never collide."""
    (axis.axes.set_xscale if axis is axis.axes.xaxis else axis.axes.set_yscale)("log")
    subs = (1.0,) if decades > 3.0 else (1.0, 2.0, 5.0)
    axis.set_major_locator(matplotlib.ticker.LogLocator(subs=subs))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _colors(n: int) -> list:
    """n distinct colours: the default cycle up to 10, tab20 up to 20 (more repeat)."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return cycle[:n] if n <= len(cycle) else [plt.get_cmap("tab20")(i % 20) for i in range(n)]


def _legend_below(fig: plt.Figure, handles: list, labels: list[str], title: str) -> None:
    """One shared legend under the axes, in as many columns as fit, so long labels never clip."""
    ncol = max(1, min(len(labels), 3 if max(map(len, labels), default=0) > 30 else 5))
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, fontsize=8,
               title=title, title_fontsize=8, frameon=False)


def capacity_curves(grid: CapacityGrid, tp: int) -> plt.Figure:
    """Most concurrent sequences against context, one panel per (model, GPU), one line per method
    (from the vectorized :func:`kvsim.capacity.capacity_grid`)."""
    n_models, n_gpus = len(grid.models), len(grid.gpus)
    fig, axes = plt.subplots(n_models, n_gpus, figsize=(4.6 * n_gpus + 0.5, 3.6 * n_models + 0.6),
                             squeeze=False, sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lines: dict[str, matplotlib.lines.Line2D] = {}
    for i, model in enumerate(grid.models):
        for g, gpu in enumerate(grid.gpus):
            ax = axes[i][g]
            for j, method in enumerate(grid.methods):
                conc = grid.max_concurrency[i, j, g].astype(float)
                conc[conc <= 0] = np.nan  # does not fit or the method does not apply: no point
                line, = ax.plot(grid.contexts, conc, color=colors[j % len(colors)],
                                markevery=max(1, len(grid.contexts) // 12), **_distinct_style(j))
                lines.setdefault(method, line)
            ax.set_xscale("log", base=2)
            _log_axis(ax.yaxis)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{model} on {gpu}, TP {tp}", fontsize=9)
            if g == 0:
                ax.set_ylabel("max concurrent sequences")
            if i == n_models - 1:
                ax.set_xlabel("context length (tokens per sequence)")
    fig.tight_layout()
    _legend_below(fig, list(lines.values()), list(lines), "KV method")
    return fig


def latency_throughput(rows: Sequence[Mapping], series_by: Sequence[str],
                       order_by: str | None = None) -> plt.Figure:
    """Output throughput against TTFT and TPOT percentiles (ms), one colour per series of sweep
    points, one line style per percentile."""
    fig, (ax_ttft, ax_tpot) = plt.subplots(1, 2, figsize=(13, 5))
    groups = _series(rows, series_by)
    colors = _colors(len(groups))
    handles, labels = [], []
    for k, (label, pts) in enumerate(groups.items()):
        key = order_by or "throughput_output_tokens_per_s"
        pts = sorted(pts, key=lambda r: r.get(key) or 0)
        x = [r.get("throughput_output_tokens_per_s") for r in pts]
        color = colors[k % len(colors)]
        for ax, metric in ((ax_ttft, "ttft_s"), (ax_tpot, "tpot_s")):
            for pct, ls, marker in _PERCENTILES:
                values = [r.get(f"{metric}.{pct}") for r in pts]
                y = [1e3 * v if isinstance(v, (int, float)) else np.nan for v in values]
                line, = ax.plot(x, y, color=color, ls=ls, marker=marker, markersize=4)
                if ax is ax_ttft and pct == "p50":
                    handles.append(line)
                    labels.append(label)
    for ax, name in ((ax_ttft, "time to first token"), (ax_tpot, "time per output token")):
        ax.set_xlabel("output throughput (tokens/s)")
        ax.set_ylabel(f"{name} (ms)")
        _log_axis(ax.yaxis)
        ax.grid(True, which="both", alpha=0.3)
    style = [matplotlib.lines.Line2D([], [], color="0.3", ls=ls, marker=m) for _, ls, m in _PERCENTILES]
    ax_tpot.legend(style, [p for p, _, _ in _PERCENTILES], title="percentile", fontsize=8, loc="upper left")
    ax_ttft.set_title("TTFT against throughput")
    ax_tpot.set_title("TPOT against throughput")
    fig.tight_layout()
    _legend_below(fig, handles, labels, "sweep series")
    return fig


def goodput_rate(rows: Sequence[Mapping], rate_col: str, series_by: Sequence[str],
                 goodput_col: str = "goodput", threshold: float | None = None,
                 rate_unit: str = "requests/s", names: bool = True,
                 legend_title: str = "sweep series") -> plt.Figure:
    """Goodput (fraction of requests within both SLOs) against the offered rate, one line per series."""
    fig, ax = plt.subplots(figsize=(8, 5))
    groups = _series(rows, series_by, names)
    colors = _colors(len(groups))
    handles, labels = [], []
    for k, (label, pts) in enumerate(groups.items()):
        pts = sorted((r for r in pts if isinstance(r.get(rate_col), (int, float))), key=lambda r: r[rate_col])
        y = [v if isinstance(v := r.get(goodput_col), (int, float)) else np.nan for r in pts]
        line, = ax.plot([r[rate_col] for r in pts], y, color=colors[k], **_distinct_style(k))
        handles.append(line)
        labels.append(label)
    if threshold is not None:
        ax.axhline(threshold, color="k", ls="--", lw=1)
        ax.annotate(f"SLO target {threshold:g}", (0.01, threshold), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(0, 4), fontsize=8)
    ax.set_xlabel(f"offered load: {rate_col} ({rate_unit})")
    ax.set_ylabel("goodput (fraction of requests within TTFT and TPOT SLOs)")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(True, alpha=0.3)
    ax.set_title("Goodput against offered load")
    fig.tight_layout()
    _legend_below(fig, handles, labels, legend_title)
    return fig


def search_costs(search: Mapping) -> plt.Figure:
    """A capacity search's ranking (``search.json``): the cost of serving the target rate (else the
    cost per unit of rate) per configuration, cheapest at the top, a colour per kind of deployment
    and swept configuration, each bar labelled with its copies x GPUs and what limits one copy.
    Configurations without a cost (do not fit, no price) are listed with their reason."""
    configs = list(search["configs"])
    target = search.get("target_rate")
    key = "cost_usd_per_hour" if target else "usd_per_hour_per_rate"
    ranked = [c for c in configs if c.get(key) is not None]
    unranked = [c for c in configs if c.get(key) is None]

    def group(c: Mapping) -> str:
        base = c["label"].removesuffix(c.get("deployment", "")).rstrip(", ")
        kind = ("disaggregated" if c.get("disaggregated") else "aggregated") if c.get("deployment") else ""
        return ", ".join(part for part in (kind, base) if part) or "configuration"

    groups = list(dict.fromkeys(group(c) for c in ranked))
    colors = dict(zip(groups, _colors(len(groups)), strict=True))
    rows = len(ranked) + len(unranked)
    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.27 * rows))
    y = np.arange(len(ranked))
    ax.barh(y, [c[key] for c in ranked], color=[colors[group(c)] for c in ranked])
    unit = "x trace rate" if str(search.get("rate_path")).endswith("rate_scale") else "req/s"
    for i, c in enumerate(ranked):
        copies = f"{c['replicas']} x {c['gpus_per_replica']} GPUs, " if target else ""
        ax.annotate(f"  {copies}{c['max_rate']:.3g} {unit} per copy ({c['limit']})", (c[key], i),
                    va="center", fontsize=7)
    for j, c in enumerate(unranked):
        ax.annotate(f"{c['label']}: {c['verdict'][:90]}", (0, len(ranked) + j), va="center", fontsize=7,
                    color="0.4")
    ax.set_yticks(list(y) + list(range(len(ranked), rows)),
                  [f"#{c['rank']} {c.get('deployment') or c['label']}" for c in ranked] + [""] * len(unranked),
                  fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.45 * max((c[key] for c in ranked), default=1.0))
    ax.set_xlabel(f"USD per hour for {target:g} {unit}" if target else f"USD per hour per {unit}")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(f"kvsim search: {search.get('scenario', '')}, {len(configs)} configurations")
    handles = [matplotlib.patches.Patch(color=colors[g]) for g in groups]
    fig.tight_layout()
    _legend_below(fig, handles, groups, "deployment, configuration")
    return fig


PredictedMeasured = tuple[str, str, float, float]  # kind, model, measured, predicted (kvsim.validate.Point)


def predicted_measured(folder: Path) -> plt.Figure:
    """Predicted against measured from a GPU's ``validation*.csv`` (written by ``kvsim validate``),
    one marker per profile: :func:`predicted_measured_figure`."""
    files = sorted(folder.glob("validation*.csv"))
    if not files:
        raise KvsimError("no validation*.csv: run `kvsim validate --gpu` first", field="gpu",
                         value=folder.name, file=str(folder))
    profiles = {}
    for path in files:
        rows = read_csv_rows(path, "a validation CSV (kvsim validate)", ("kind", "model", "measured", "predicted"))
        profile = path.stem.removeprefix("validation").removeprefix("_from_") or "own profile"
        profiles[profile] = [(r["kind"], r["model"], _positive_number(r["measured"], "measured", path),
                              _positive_number(r["predicted"], "predicted", path)) for r in rows]
    return predicted_measured_figure(profiles, f"{folder.name}: predicted against measured")


def predicted_measured_figure(profiles: Mapping[str, Sequence[PredictedMeasured]], title: str) -> plt.Figure:
    """Predicted against measured, points not used in fitting: decode step, prefill, KV bytes and
    per-method decode-attention speed-up, with y = x and +-25%. One marker per profile (named in the
    legend when there are several), one colour per model (or method); tensor-parallel runs (kind
    ``decode tp=N``) share their kind's panel as series of their own. ``kvsim validate`` draws its
    points with one profile; ``kvsim plot validation`` overlays every profile of a GPU."""
    panels = (("decode", "decode step (ms)", 1e3, "Decode step (reference engine)"),
              ("prefill", "prefill (ms)", 1e3, "Prefill (reference engine)"),
              ("kv_bytes", "allocated KV (GiB)", 1 / 2**30, "Allocated KV cache"),
              ("speedup", "attention speed-up over bf16 (x)", 1.0, "Decode-attention speed-up per method"))
    fig, axes = plt.subplots(2, 2, figsize=(12, 10))
    markers = "osD^v"
    for ax, (kind, label, scale, panel_title) in zip(axes.flat, panels, strict=True):
        values = []
        for f_i, (profile, points) in enumerate(profiles.items()):
            series: dict[str, list[tuple[float, float]]] = {}
            for k, model, meas, pred in points:
                if k.split()[0] == kind:  # "decode tp=2" -> the decode panel, series "model (tp=2)"
                    name = model + (f" ({k.split()[1]})" if " " in k else "")
                    series.setdefault(name, []).append((meas * scale, pred * scale))
            names = sorted(series)
            for name, color in zip(names, _colors(len(names)), strict=True):
                ax.scatter(*zip(*series[name], strict=True), s=18, marker=markers[f_i % len(markers)], color=color,
                           label=name if len(profiles) == 1 else f"{name} ({profile})")
                values += [v for pair in series[name] for v in pair]
        if values:
            lo, hi = min(values) * 0.8, max(values) * 1.25
            ref = np.geomspace(lo, hi, 50)
            ax.plot(ref, ref, "k-", lw=1, label="y = x")
            ax.fill_between(ref, ref / 1.25, ref * 1.25, color="0.5", alpha=0.15, label="within 25%")
            decades = float(np.log10(hi / lo))
            _log_axis(ax.xaxis, decades)
            _log_axis(ax.yaxis, decades)
            # the speed-up panel lists many methods: keep its legend in the empty lower right
            ax.legend(fontsize=6 if kind == "speedup" else 7, loc="lower right" if kind == "speedup" else "upper left")
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.set_title(panel_title)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{title} (points not used in fitting)")
    fig.tight_layout()
    return fig


def _positive_number(text: str, column: str, path: Path) -> float:
    """A cell that must be a finite positive number (the axes are logarithmic)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise KvsimError("expected a finite positive number", field=column, value=text, file=str(path))
    return value


def _read_columns(path: Path) -> dict[str, np.ndarray]:
    rows = read_csv_rows(path, "a run's timeseries.csv (kvsim run --out)")
    if not rows:
        raise KvsimError("empty time series", field="timeseries", file=str(path))
    out = {}
    for c in rows[0]:
        try:
            out[c] = np.array([float(r[c]) if r[c] != "" else np.nan for r in rows])
        except ValueError:
            continue  # a text column
    return out


def kv_usage(runs: Mapping[str, Path]) -> plt.Figure:
    """KV-cache usage (% of the GPU blocks) and running/waiting sequences over simulated time, one
    colour per run (a ``kvsim run --out`` folder's ``timeseries.csv``), one line per replica."""
    fig, (ax_kv, ax_seq) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = _colors(len(runs))
    handles, labels = [], []
    for k, (label, path) in enumerate(runs.items()):
        cols = _read_columns(path)
        need = ("time_s", "blocks_used", "blocks_cached_free", "blocks_free", "running", "waiting")
        missing = [c for c in need if c not in cols]
        if missing:
            raise KvsimError(f"time series lacks {', '.join(missing)}", field="timeseries",
                             value=sorted(cols), file=str(path))
        replica = cols.get("replica", np.zeros_like(cols["time_s"]))
        total = cols["blocks_used"] + cols["blocks_cached_free"] + cols["blocks_free"]
        usage = 100 * cols["blocks_used"] / np.maximum(total, 1)
        for rep in np.unique(replica):
            sel = replica == rep
            t = cols["time_s"][sel]
            line, = ax_kv.plot(t, usage[sel], color=colors[k], lw=1.1, drawstyle="steps-post")
            ax_seq.plot(t, cols["running"][sel], color=colors[k], lw=1.1, drawstyle="steps-post")
            ax_seq.plot(t, cols["waiting"][sel], color=colors[k], lw=1.1, ls=":", drawstyle="steps-post")
        handles.append(line)
        labels.append(label)
    ax_kv.set_ylabel("KV cache in use (% of GPU blocks)")
    ax_kv.set_ylim(0, 105)
    ax_seq.set_ylabel("sequences per replica")
    style = [matplotlib.lines.Line2D([], [], color="0.3", ls=ls) for ls in ("-", ":")]
    ax_seq.legend(style, ["running", "waiting"], fontsize=8, loc="upper left")
    for ax, title in ((ax_kv, "KV-cache usage"), (ax_seq, "Running and waiting sequences")):
        ax.set_xlabel("simulated time (s)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    _legend_below(fig, handles, labels, "run")
    return fig
