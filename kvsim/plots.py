"""Figures. Nothing imports this module but the CLI; matplotlib renders off-screen (Agg)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kvsim.fileio import write_atomic  # noqa: E402
from kvsim.kv import layout_for  # noqa: E402
from kvsim.memory import GIB, plan_memory  # noqa: E402
from kvsim.spec.hardware import load_hardware  # noqa: E402
from kvsim.spec.model import load_model  # noqa: E402


def default_contexts(max_tokens: int) -> np.ndarray:
    """Log-spaced context lengths from 512 to the model's maximum."""
    top = max(1024, max_tokens)
    return np.unique(np.geomspace(512, top, 48).astype(np.int64))


def capacity(model_name: str, hardware_name: str, methods: Sequence[str], tp: int,
             contexts: Sequence[int] | None, out: Path) -> None:
    """Most concurrent sequences against context (log axes), KV bytes per token, and the memory
    breakdown of one GPU, one line / bar per method."""
    model, hw = load_model(model_name), load_hardware(hardware_name)
    ctx = np.asarray(contexts if contexts else default_contexts(model.max_position_embeddings), dtype=np.int64)
    fig, (ax_cap, ax_bpt, ax_bar) = plt.subplots(1, 3, figsize=(17, 6),
                                                 gridspec_kw={"width_ratios": [1.2, 1.2, 1]})
    parts = {"weights": [], "activations": [], "non-torch": [], "KV cache": []}
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
    buf = io.BytesIO()
    fig.savefig(buf, format=out.suffix.lstrip(".") or "png", dpi=110)
    plt.close(fig)
    write_atomic(out, buf.getvalue())
