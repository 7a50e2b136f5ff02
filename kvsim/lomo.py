"""Leave-one-model-out judging (``kvsim validate --gpu G --leave-one-model-out``).

For each model the reference engine ran on one GPU, refit the calibration without any kernel row
measured at that model's shapes, then judge that model's engine rows with it. The headline
(``kvsim validate``) fits on every kernel row, including rows measured at the judged models' own
GEMM and attention shapes; this says how much of its accuracy is interpolation at known shapes.

A kernel row is the model's (measured at its shapes) when, at TP 1:

- gemm.csv: its weight matrix (n, k) is one of the model's dense weights, output x input features
  (kvsim.spec.linears: attention, MLP, shared experts, router) or its LM head (vocabulary x hidden);
- gemm_grouped.csv, fused_moe.csv: (n, k) is one of its routed experts' weights;
- attention_decode.csv, attention_prefill.csv: (q_heads, kv_heads, head_dim) is its attention shape
  as the kernel benchmarks write it (MLA: heads, 1, latent + RoPE dims);
- elementwise.csv: its params name the model, or a model whose element-wise ops have the same
  shapes (same hidden size, MLP width (a routed expert's for MoE) and attention shape).

Other models sharing a shape lose it too: leaving out mistral-7b removes llama-3-8b's GEMMs and
element-wise rows (their layers are identical) and the (32, 8, 128) attention rows, the only
shape attention_prefill.csv was measured at (its fit is then left empty).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvsim import measured
from kvsim.calibrate import REQUIRED_FITS, fit_profile
from kvsim.cost.calibration import calibration_from_dict, results_dir
from kvsim.errors import KvsimError
from kvsim.fileio import write_atomic
from kvsim.spec.hardware import load_hardware
from kvsim.spec.linears import layer_linears
from kvsim.spec.model import ModelSpec
from kvsim.validate import Point, engine_model, engine_points, summary, summary_lines

ENGINE_FILES = ("engine_decode.csv", "engine_prefill.csv")


@dataclass(frozen=True)
class ModelShapes:
    """The kernel shapes one model runs at TP 1 (see the module docstring)."""

    model: str
    gemm_nk: frozenset[tuple[int, int]]  # dense weights and LM head: (output, input) features
    grouped_nk: frozenset[tuple[int, int]]  # routed experts' weights: (output, input) features
    attention: tuple[int, int, int]  # q_heads, kv_heads, head_dim
    elementwise: tuple  # the shapes its element-wise ops depend on (compared between models)


def attention_shape(m: ModelSpec) -> tuple[int, int, int]:
    """The (q_heads, kv_heads, head_dim) kernel benchmarks write for the model (kvsim.measured.
    attention_model builds the reverse; MLA rows store the latent plus the RoPE key as one head)."""
    a = m.attention
    if a.mla is not None:
        return a.num_heads, 1, a.mla.kv_lora_rank + a.mla.qk_rope_head_dim
    return a.num_heads, a.num_kv_heads, a.head_dim


def model_shapes(m: ModelSpec) -> ModelShapes:
    linears = {lin for layer in m.layers for lin in layer_linears(m, layer)}
    dense = {(lin.out_features, lin.in_features) for lin in linears if lin.role != "experts"}
    experts = {(lin.out_features, lin.in_features) for lin in linears if lin.role == "experts"}
    mlp_width = m.moe.expert_intermediate_size if m.moe else m.intermediate_size  # silu_and_mul's width
    return ModelShapes(m.name, frozenset(dense | {(m.vocab_size, m.hidden_size)}), frozenset(experts),
                       attention_shape(m), (m.hidden_size, mlp_width, attention_shape(m)))


def _named_model(params: str) -> str:
    """The model an element-wise row's params name (``...;model=llama-3-8b``), '' if none."""
    fields = dict(kv.split("=", 1) for kv in params.split(";") if "=" in kv)
    return fields.get("model", "")


@dataclass(frozen=True)
class LeaveOut:
    """The row filter that leaves out one model's shapes (kvsim.measured.RowFilter)."""

    shapes: ModelShapes
    same_elementwise: frozenset[str]  # models named in elementwise.csv whose element-wise shapes are its own

    def __call__(self, file: str, row: dict) -> bool:
        s = self.shapes
        if file == "gemm.csv":
            return (int(row["n"]), int(row["k"])) not in s.gemm_nk
        if file in ("gemm_grouped.csv", "fused_moe.csv"):
            return (int(row["n"]), int(row["k"])) not in s.grouped_nk
        if file in ("attention_decode.csv", "attention_prefill.csv"):
            return (int(row["q_heads"]), int(row["kv_heads"]), int(row["head_dim"])) != s.attention
        if file == "elementwise.csv":
            return _named_model(row.get("params", "")) not in self.same_elementwise
        return True


def leave_out(folder: Path, m: ModelSpec) -> LeaveOut:
    shapes = model_shapes(m)
    named = {_named_model(r.get("params", "")) for r in measured.rows(folder / "elementwise.csv")} - {""}
    same = {name for name in named if name == m.name or model_shapes(engine_model(name, 1)).elementwise
            == shapes.elementwise}
    return LeaveOut(shapes, frozenset(same))


def _left_out(folder: Path, keep: LeaveOut) -> dict[str, int]:
    files = ("gemm.csv", "gemm_grouped.csv", "fused_moe.csv", "attention_decode.csv", "attention_prefill.csv",
             "elementwise.csv")
    return {f: len(measured.rows(folder / f)) - len(measured.rows(folder / f, keep)) for f in files}


@dataclass(frozen=True)
class ModelRefit:
    model: str
    left_out: dict[str, int]  # kernel rows left out, per file
    empty_fits: tuple[str, ...]  # fits left with no row (their curve is the fit's default efficiency)
    points: tuple[Point, ...]  # the model's engine rows judged with the refit profile


def leave_one_model_out(gpu: str, results: Path | None = None) -> tuple[Path, dict[str, list[dict]]]:
    """Refit without each engine model's shapes, judge that model; write ``report_lomo.md``.
    Returns its path and the summaries {"headline": fitted on every row, "lomo": per-model refits},
    both over the same engine rows (TP 1)."""
    folder = (results or results_dir()) / gpu
    if not all((folder / f).is_file() for f in ENGINE_FILES):
        raise KvsimError("no engine measurements to judge (engine_decode.csv, engine_prefill.csv)", field="gpu",
                         value=gpu, file=str(folder))
    hw = load_hardware(measured.base_gpu(gpu))
    single = [r for f in ENGINE_FILES for r in measured.rows(folder / f) if int(r.get("tp") or 1) == 1]
    models = sorted({(r["model"], int(r["layers"])) for r in single})
    full = calibration_from_dict(fit_profile(folder), hw, f"{folder}/<all kernel rows>")
    headline: list[Point] = []
    refits = []
    for name in sorted({n for n, _ in models}):
        layers = max(n_layers for n, n_layers in models if n == name)
        keep = leave_out(folder, engine_model(name, layers))
        profile = fit_profile(folder, keep)
        cal = calibration_from_dict(profile, hw, f"{folder}/<without {name}'s shapes>")
        empty = tuple(f for f in REQUIRED_FITS if not profile["fit"]["rows_used"][f])
        judged = [p for p in engine_points(folder, gpu, cal, name) if " " not in p.kind and p.kind != "kv_bytes"]
        headline += [p for p in engine_points(folder, gpu, full, name) if " " not in p.kind and p.kind != "kv_bytes"]
        refits.append(ModelRefit(name, _left_out(folder, keep), empty, tuple(judged)))
    out = {"headline": summary(headline), "lomo": summary([p for r in refits for p in r.points])}
    report = folder / "report_lomo.md"
    write_atomic(report, "\n".join(_lines(gpu, refits, out)) + "\n")
    return report, out


def _lines(gpu: str, refits: list[ModelRefit], out: dict[str, list[dict]]) -> list[str]:
    def stat(rows: list[dict], kind: str, model: str) -> str:
        s = next((s for s in rows if s["kind"] == kind and s["model"] == model), None)
        return "-" if s is None else \
            f"{s['median_abs_err']:.1%} / {s['p90_abs_err']:.1%} / {s['max_abs_err']:.1%} ({s['configs']})"

    lines = [f"# Leave-one-model-out on {gpu}", "",
             "For each model, the calibration is refitted without any kernel row measured at that model's "
             "shapes (GEMM weights, grouped-GEMM experts, attention heads, element-wise ops; kvsim/lomo.py "
             "defines them), then that model's reference-engine rows (TP 1) are judged. Headline: the fit on "
             "every kernel row, judged on the same rows. Errors: median / p90 / worst abs error (distinct "
             "configurations).", "",
             "| model | decode, headline | decode, model left out | prefill, headline | prefill, model left out "
             "| kernel rows left out (gemm, grouped, fused MoE, decode attn, prefill attn, element-wise) "
             "| fits left empty |",
             "|---|---|---|---|---|---|---|"]
    def cells(model: str) -> str:
        return " | ".join(stat(out[which], kind, model)
                          for kind in ("decode", "prefill") for which in ("headline", "lomo"))

    for r in refits:
        lines.append(f"| {r.model} | {cells(r.model)} | {', '.join(str(n) for n in r.left_out.values())} | "
                     f"{', '.join(r.empty_fits) or '-'} |")
    lines.append(f"| **all (pooled)** | {cells('all')} | | |")
    lines += ["", "A fit left empty takes its default efficiency (kvsim/calibrate.py), as a GPU without those "
              "measurements would.", "", "## Left-one-model-out, all statistics", ""]
    lines += summary_lines(out["lomo"])
    lines += ["", f"Regenerate: `kvsim validate --gpu {gpu} --leave-one-model-out`"]
    return lines
