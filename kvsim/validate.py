"""Judge the cost model on GPU measurements it was not fitted to (``kvsim validate``).

End to end: the reference engine's decode steps and prefills (``engine_decode.csv``,
``engine_prefill.csv``) and its allocated KV bytes. Per method: each decode-attention kernel's
speed-up over the bf16 kernel at the same shape (``attention_decode.csv`` rows of methods other
than bf16, which calibration never reads). Writes ``report.md``, ``validation.csv`` and
``predicted_vs_measured.png`` into ``validation/results/<gpu>/``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import yaml

from kvsim.cost import Batch, CostModel
from kvsim.cost.calibration import Calibration, borrow_profile, calibration_from_dict, results_dir
from kvsim.errors import KvsimError
from kvsim.fileio import write_atomic
from kvsim.kv import layout_for
from kvsim.spec.hardware import load_hardware
from kvsim.spec.model import ModelSpec, load_model, model_from_dict

VALIDATION_MODELS = Path(__file__).resolve().parents[1] / "validation" / "models"


@dataclass(frozen=True)
class Point:
    kind: str  # decode | prefill | kv_bytes | speedup
    model: str
    detail: str
    measured: float
    predicted: float

    @property
    def error(self) -> float:
        return (self.predicted - self.measured) / self.measured


def engine_model(name: str, layers: int) -> ModelSpec:
    """The model the reference engine ran: catalogue or validation/models/, first ``layers`` layers."""
    path = VALIDATION_MODELS / f"{name}.yaml"
    model = load_model(str(path)) if path.is_file() else load_model(name)
    return replace(model, layers=model.layers[:layers])


def attention_model(q_heads: int, kv_heads: int, head_dim: int, mla: bool = False) -> ModelSpec:
    """A one-layer model with a given attention shape (for kernel-level predictions)."""
    attention = {"num_heads": q_heads, "num_kv_heads": kv_heads, "head_dim": head_dim, "v_head_dim": head_dim}
    if mla:  # the kernel's latent (512) + RoPE key (64), DeepSeek-V2/V3 shapes
        attention.update(head_dim=192, v_head_dim=128, num_kv_heads=q_heads,
                         mla={"kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                              "v_head_dim": 128})
    return model_from_dict({
        "name": f"attn-{q_heads}-{kv_heads}-{head_dim}", "dtype": "bfloat16", "hidden_size": q_heads * head_dim,
        "vocab_size": 1, "tie_word_embeddings": True, "max_position_embeddings": 1 << 20,
        "source": {"config": "synthetic", "hf_repo": "none"}, "attention": attention,
        "mlp": {"intermediate_size": 1}, "layers": [{"repeat": 1, "pattern": ["mla" if mla else "full"]}]})


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def engine_points(folder: Path, gpu: str, cal: Calibration) -> list[Point]:
    hw = load_hardware(gpu)
    points: list[Point] = []
    cache: dict[tuple[str, int], tuple[ModelSpec, CostModel]] = {}

    def model_cost(name: str, layers: int) -> tuple[ModelSpec, CostModel]:
        if (name, layers) not in cache:
            m = engine_model(name, layers)
            cache[(name, layers)] = (m, CostModel(m, hw, layout_for(m), 1, cal))
        return cache[(name, layers)]

    for r in _read(folder / "engine_decode.csv"):
        if not r.get("time_s"):
            continue
        m, cost = model_cost(r["model"], int(r["layers"]))
        b, c = int(r["batch"]), int(r["context"])
        label = f"b={b} ctx={c} L={r['layers']}"
        points.append(Point("decode", r["model"], label, float(r["time_s"]),
                            cost.step_time_s(Batch(decode_context=np.full(b, c)))))
        if r.get("kv_bytes"):  # contiguous cache: context + 1 slots per sequence (capped by a window)
            points.append(Point("kv_bytes", r["model"], label, float(r["kv_bytes"]),
                                float(b * layout_for(m).gpu_bytes(c + 1)[0])))
    for r in _read(folder / "engine_prefill.csv"):
        if not r.get("time_s"):
            continue
        _, cost = model_cost(r["model"], int(r["layers"]))
        b, p = int(r["batch"]), int(r["prompt"])
        points.append(Point("prefill", r["model"], f"b={b} prompt={p} L={r['layers']}", float(r["time_s"]),
                            cost.step_time_s(Batch(prefill_tokens=np.full(b, p), prefill_context=np.zeros(b)))))
    return points


# Kernel rows -> the kvsim method they implement (params come from the row).
def _method_spec(kernel: str, params: dict[str, str]) -> str | None:
    if kernel.startswith("triton_fp8"):
        return "fp8"
    if kernel.startswith("triton_kivi") or kernel.startswith("kivi_"):
        kb, vb = params.get("kbits", params.get("bits")), params.get("vbits", params.get("bits"))
        g, r = params.get("group", "32"), params.get("residual", "128")
        if kb is None or vb is None:
            return None
        return f"kivi:bits={kb},group={g},residual={r}" if kb == vb else \
            f"asymkv:k_bits={kb},v_bits={vb},group={g},residual={r}"
    if kernel.startswith("triton_evict") and "budget" in params:
        return f"snapkv:budget={params['budget']},window=1"
    return None


def speedup_points(folder: Path, gpu: str, cal: Calibration) -> list[Point]:
    rows = _read(folder / "attention_decode.csv")
    hw = load_hardware(gpu)
    bf16: dict[tuple, float] = {}
    for r in rows:
        if r["method"] in ("triton_bf16", "sdpa_gqa", "sdpa_fold") and r.get("time_s"):
            key = (r["batch"], r["q_heads"], r["kv_heads"], r["head_dim"], r["context"])
            bf16[key] = min(bf16.get(key, float("inf")), float(r["time_s"]))
    points = []
    for r in rows:
        params = dict(p.split("=", 1) for p in r.get("params", "").split(";") if "=" in p)
        spec = _method_spec(r["method"], params)
        key = (r["batch"], r["q_heads"], r["kv_heads"], r["head_dim"], r["context"])
        if spec is None or key not in bf16 or not r.get("time_s"):
            continue
        m = attention_model(int(r["q_heads"]), int(r["kv_heads"]), int(r["head_dim"]))
        batch = Batch(decode_context=np.full(int(r["batch"]), int(r["context"])))

        def attn_s(method: str) -> float:
            step = CostModel(m, hw, layout_for(m, method), 1, cal).step(batch)
            return next(o.seconds for o in step.ops if o.name == "attention.decode")

        points.append(Point("speedup", spec, f"b={r['batch']} ctx={r['context']} {r['method']}",
                            bf16[key] / float(r["time_s"]), attn_s("bf16") / attn_s(spec)))
    return points


def _summary(points: list[Point]) -> list[dict]:
    out = []
    for kind in ("decode", "prefill", "kv_bytes", "speedup"):
        sel = [p for p in points if p.kind == kind]
        for model in sorted({p.model for p in sel}) + ["all"]:
            errs = np.abs([p.error for p in sel if model in ("all", p.model)])
            if len(errs):
                out.append({"kind": kind, "model": model, "n": len(errs), "median_abs_err": float(np.median(errs)),
                            "p90_abs_err": float(np.percentile(errs, 90)), "max_abs_err": float(errs.max())})
    return out


def _plot(points: list[Point], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    for ax, kind, unit in zip(axes, ("decode", "prefill", "speedup"), ("s", "s", "x"), strict=True):
        sel = [p for p in points if p.kind == kind]
        for model in sorted({p.model for p in sel}):
            xs = [p.measured for p in sel if p.model == model]
            ys = [p.predicted for p in sel if p.model == model]
            ax.scatter(xs, ys, s=12, label=model)
        if sel:
            lo = min(min(p.measured, p.predicted) for p in sel)
            hi = max(max(p.measured, p.predicted) for p in sel)
            ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
            if kind != "speedup":
                ax.set_xscale("log")
                ax.set_yscale("log")
            ax.legend(fontsize=7)
        ax.set_xlabel(f"measured ({unit})")
        ax.set_ylabel(f"predicted ({unit})")
        ax.set_title({"decode": "decode step", "prefill": "prefill",
                      "speedup": "decode-attention speed-up over bf16"}[kind])
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def validate(gpu: str, calibration_from: str | None = None, results: Path | None = None) -> tuple[Path, list[dict]]:
    """Predict ``gpu``'s measurements with the profile fitted on ``calibration_from`` (default: the
    same GPU); write the report. Returns its path and the summary rows."""
    root = results or results_dir()
    folder = root / gpu
    donor = calibration_from or gpu
    profile_path = root / donor / "calibration_reference.yaml"
    if not profile_path.is_file():
        raise KvsimError("no fitted profile: run `kvsim calibrate --gpu` first", field="calibration_from",
                         value=donor, file=str(profile_path))
    cal = calibration_from_dict(yaml.safe_load(profile_path.read_text()), load_hardware(donor), str(profile_path))
    if donor != gpu:  # another GPU's efficiencies, this GPU's datasheet ratios
        cal = borrow_profile(cal, load_hardware(donor), load_hardware(gpu))
    points = engine_points(folder, gpu, cal) + speedup_points(folder, gpu, cal)
    if not points:
        raise KvsimError("no engine or kernel measurements to validate", field="gpu", value=gpu, file=str(folder))
    summary = _summary(points)
    suffix = "" if donor == gpu else f"_from_{donor}"
    lines = [f"# Validation on {gpu}{' with the profile fitted on ' + donor if donor != gpu else ''}", "",
             f"Profile: `{profile_path.relative_to(root.parent.parent)}` ({cal.kind}). Measurements judged: "
             "reference-engine decode steps and prefills, allocated KV bytes, and each method kernel's "
             "decode-attention speed-up over bf16; none of them was used in fitting.", "",
             "| what | model | n | median abs error | p90 | worst |", "|---|---|---|---|---|---|"]
    lines += [f"| {s['kind']} | {s['model']} | {s['n']} | {s['median_abs_err']:.1%} | {s['p90_abs_err']:.1%} | "
              f"{s['max_abs_err']:.1%} |" for s in summary]
    lines += ["", f"![predicted vs measured](predicted_vs_measured{suffix}.png)", "",
              f"Regenerate: `kvsim validate --gpu {gpu}" + (f" --calibration-from {donor}`" if donor != gpu else "`")]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["kind", "model", "detail", "measured", "predicted", "error"])
    for p in points:
        w.writerow([p.kind, p.model, p.detail, f"{p.measured:.6g}", f"{p.predicted:.6g}", f"{p.error:.4f}"])
    write_atomic(folder / f"validation{suffix}.csv", buf.getvalue())
    write_atomic(folder / f"predicted_vs_measured{suffix}.png", _plot(points, f"{gpu}: predicted vs measured"))
    report = folder / f"report{suffix}.md"
    write_atomic(report, "\n".join(lines) + "\n")
    return report, summary
