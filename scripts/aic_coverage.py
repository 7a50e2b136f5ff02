"""How much of a typical engine step an imported profile prices from the database's measurements.

For every shipped imported profile (kvsim/data/calibration/<gpu>.<engine>.yaml): the operators the
database covered and how many of its rows each fit used (shape ranges: the profile's
``imported.tables``), and, for two typical steps
of Llama-3.1-8B at TP 1 (a decode step of 64 sequences at 2,048 tokens of context; a mixed step
with a 2,048-token prefill chunk and those 64 decodes), the share of the step's predicted time that
falls outside that coverage: element-wise kernels and the per-step overhead (priced from the
labelled prior: the database has none), and any operator whose size lies outside the imported
table's range (its curve is clamped there). Prints a Markdown table (README "Imported calibration").

    PYTHONPATH=. python scripts/aic_coverage.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from kvsim.cost import Batch, CostModel
from kvsim.cost.calibration import SHIPPED_DIR, calibration_from_dict
from kvsim.fileio import read_yaml_file
from kvsim.kv import layout_for
from kvsim.spec.hardware import load_hardware
from kvsim.spec.model import load_model

MODEL = "llama-3.1-8b"
STEPS = {"decode": Batch(decode_context=np.full(64, 2048)),
         "mixed": Batch(prefill_tokens=np.array([2048]), prefill_context=np.array([0]),
                        decode_context=np.full(64, 2048))}
PRIOR_OPS = ("kv_write", "norm", "rope", "activation", "moe_routing", "sampling", "overhead")


def _in_range(span: list[float] | None, value: float) -> bool:
    return span is None or span[0] <= value <= span[1]


def outside_share(profile: dict, path: Path) -> dict[str, float]:
    """Share of each typical step's time priced outside the database's coverage."""
    hw = load_hardware(profile["gpu"])
    cal = calibration_from_dict(profile, hw, str(path))
    model = load_model(MODEL)
    cost = CostModel(model, hw, layout_for(model, "bf16"), 1, cal)
    tables = profile["imported"]["tables"]
    out = {}
    for name, batch in STEPS.items():
        step = cost.step(batch)
        outside = sum(op.seconds for op in step.ops if op.name in PRIOR_OPS)
        decode = next(o for o in step.ops if o.name == "attention.decode")
        if not _in_range(tables["attention_decode"].get("kv_bytes"), decode.bytes / model.num_layers):
            outside += decode.seconds
        if len(batch.prefill_tokens) and not _in_range(tables["attention_prefill"].get("prompt_tokens"),
                                                       float(batch.prefill_tokens.max())):
            outside += next(o.seconds for o in step.ops if o.name == "attention.prefill")
        out[name] = outside / step.total_s
    return out


def main() -> None:
    ops = ("gemm", "gemm.fp8", "attention_decode", "attention_decode.mla", "attention_prefill", "gemm_grouped",
           "allreduce")
    print("| GPU | engine | decode kernel | " + " | ".join(f"{op} rows" for op in ops)
          + " | outside coverage: decode step | mixed step |")
    print("|---|---|---|" + "---|" * len(ops) + "---|---|")
    for path in sorted(SHIPPED_DIR.glob("*.yaml")):
        profile = read_yaml_file(path, "a calibration profile")
        tables = profile["imported"]["tables"]
        share = outside_share(profile, path)
        print(f"| {profile['gpu']} | {profile['engine']} {profile['engine_version']} | "
              f"{tables['attention_decode']['kernel']} | "
              + " | ".join(str(tables[op]["rows_used"]) if op in tables else "-" for op in ops)
              + f" | {share['decode']:.1%} | {share['mixed']:.1%} |")


if __name__ == "__main__":
    sys.exit(main())
