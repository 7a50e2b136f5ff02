"""gpt-oss-120b's decode layer as validation/vllm_layer.py measured it (layer_step.csv: the layers in one CUDA
graph, and each kernel alone) against kvsim's price of the same terms: which terms kvsim gets wrong, and
whether a step costs the sum of its kernels.

Per (TP, batch) it prints, per layer: the measured step (variants ``c``, vLLM's _C norms and rotary embedding,
and ``compiled``, torch.compile's), the sum of the kernels timed alone, and for each kvsim term its price
next to the kernels that run it. The all-reduce, host time, lm_head and sampling are not in a layer and not
compared. kvsim's ``norm`` holds both norms of every layer plus the final one, so its share per layer is a
sixth of a percent high.

    .venv/bin/python scripts/layer_vs_kvsim.py [validation/results/h100-sxm/layer_step.csv] [--gpu h100-sxm]
        [--run h100-call33]
"""
from __future__ import annotations

import argparse
import csv
import os
from collections import defaultdict

from kvsim.api import predict
from kvsim.spec.model import load_model

MODEL = "gpt-oss-120b"
# kvsim term -> the layer_step.csv kernels (op:<name>) that run it, each with how many run per layer
TERMS = {
    "norm": (("norm", 2),),  # input_layernorm and post_attention_layernorm
    "gemm.attention": (("qkv", 1), ("o_proj", 1)),
    "rope": (("rope", 1),),
    "kv_write": (("kv_write", 1),),
    "attention.decode": (("attention", 1),),
    "gemm.router": (("router", 1),),
    "moe_routing": (("routing", 1),),
    "gemm.experts": (("gemm1", 1), ("gemm2", 1)),
}
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CSV = os.path.join(HERE, "..", "validation", "results", "h100-sxm", "layer_step.csv")


def read(path: str, run: str | None) -> dict[tuple[int, int, int], dict[tuple[str, str], float]]:
    """(tp, batch, context) -> {(variant, what): seconds per layer}."""
    out: dict[tuple[int, int, int], dict[tuple[str, str], float]] = defaultdict(dict)
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r["model"] != MODEL or (run is not None and r["run"] != run):
                continue
            out[(int(r["tp"]), int(r["batch"]), int(r["context"]))][(r["variant"], r["what"])] = float(r["time_s"])
    return out


def compare(points, gpu: str) -> list[dict]:
    """One dict per point: measured steps, the kernels' sum, and per term (kvsim s, measured s) per layer."""
    rows = []
    layers = load_model(MODEL).num_layers
    for (tp, batch, context), m in sorted(points.items()):
        point = predict(MODEL, gpu, batch, context=context, tp=tp)[0]
        terms = {}
        for term, ops in TERMS.items():
            measured = [m.get(("c", f"op:{op}")) for op, _ in ops]
            alone = None if None in measured else sum(t * n for t, (_, n) in zip(measured, ops, strict=True))
            terms[term] = (point["breakdown"].get(term, 0.0) / layers, alone)
        kernels = [t for (v, w), t in m.items() if v == "c" and w.startswith("op:")]
        rows.append(dict(tp=tp, batch=batch, context=context, terms=terms,
                         steps={v: t for (v, w), t in m.items() if w == "step"},
                         kernels_alone=sum(kernels) + m.get(("c", "op:norm"), 0.0)))  # norm runs twice
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv", nargs="?", default=DEFAULT_CSV)
    ap.add_argument("--gpu", default="h100-sxm", help="kvsim hardware (its measured profile prices the terms)")
    ap.add_argument("--run", help="only the rows of this device call (the csv's run column)")
    a = ap.parse_args()
    if not os.path.isfile(a.csv):
        print(f"csv: {a.csv}: no such file (validation/vllm_layer.py writes it: run part vllm_layer)")
        raise SystemExit(2)
    points = read(a.csv, a.run)
    if not points:
        raise SystemExit(f"{a.csv}: no {MODEL} rows" + (f" of run {a.run}" if a.run else ""))
    for row in compare(points, a.gpu):
        steps = ", ".join(f"{v} {t * 1e6:.1f}" for v, t in sorted(row["steps"].items()))
        print(f"TP {row['tp']}, {row['batch']} sequences, {row['context']}-token context: step {steps or '-'} us a "
              f"layer; kernels alone {row['kernels_alone'] * 1e6:.1f} us")
        k_sum = m_sum = 0.0
        for term, (k, m) in row["terms"].items():
            k_sum += k
            m_sum += m or 0.0
            shown = "-" if m is None else f"{m * 1e6:7.1f} us, kvsim / measured {k / m:5.2f}"
            print(f"  {term:18s} kvsim {k * 1e6:7.1f} us   measured alone {shown}")
        print(f"  {'these terms':18s} kvsim {k_sum * 1e6:7.1f} us   measured alone {m_sum * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
