"""vLLM's custom all-reduce as kvsim prices it where a GPU has no measured table (its one- or two-stage
kernel on the calibrated link, kvsim.cost.model.CostModel._custom_allreduce_s), against every measured
custom table of an NVLink GPU, each priced as if it had none; beside the 2(tp-1)-hop ring that priced such
groups before. Prints model / measured per GPU and TP, then over all sizes (README, all-reduce).

    .venv/bin/python scripts/allreduce_model_vs_tables.py
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from kvsim.cost import CostModel
from kvsim.cost.collectives import CUSTOM_MAX_BYTES, load_collectives
from kvsim.cost.execution import vllm_execution
from kvsim.kv import layout_for
from kvsim.spec.hardware import hardware_names, load_hardware
from kvsim.spec.model import load_model


def main() -> None:
    model = load_model("llama-3-8b")  # any model: only the link terms and the TP degree enter
    every_model, every_ring = [], []
    for name in hardware_names():
        tables, hw = load_collectives(name), load_hardware(name)
        if tables is None or hw.nvlink_bandwidth_bytes_per_s <= 0:  # the custom kernel runs on NVLink only
            continue
        for tp, table in sorted(tables.custom.items()):
            ex = vllm_execution(hw, tp, 256, 8192, "")
            cost = CostModel(model, hw, layout_for(model), tp, None,
                             replace(ex, allreduce=replace(ex.allreduce, custom=None)))
            b, s = np.exp2(table.log2_bytes), np.exp2(table.log2_seconds)
            b, s = b[b <= CUSTOM_MAX_BYTES], s[b <= CUSTOM_MAX_BYTES]
            m, r = cost._allreduce_call_s(b) / s, cost._ring_s(b, tp, 2) / s
            every_model += list(m)
            every_ring += list(r)
            print(f"{name:14s} TP {tp}: model / measured median {np.median(m):.2f} ({m.min():.2f}-{m.max():.2f}), "
                  f"ring {np.median(r):.2f} ({r.min():.2f}-{r.max():.2f})")
    for label, v in (("model", np.array(every_model)), ("ring", np.array(every_ring))):
        print(f"{label}: {len(v)} sizes, median {np.median(v):.2f} ({v.min():.2f}-{v.max():.2f}), "
              f"median |log2| {np.median(np.abs(np.log2(v))):.2f}")


if __name__ == "__main__":
    main()
