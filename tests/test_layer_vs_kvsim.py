"""scripts/layer_vs_kvsim.py: validation/vllm_layer.py's rows set against kvsim's terms. Known answers on a
generated layer_step.csv: each term's measured side is the sum of its kernels (both norms counted), kvsim's
side is its decode-step term spread over gpt-oss-120b's 36 layers, and a run filter keeps one device call."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import load_script

from kvsim.api import predict
from kvsim.spec.model import load_model

ROOT = Path(__file__).resolve().parents[1]
lvk = load_script("layer_vs_kvsim")

OPS_US = {"norm": 2.0, "qkv": 5.0, "rope": 2.5, "kv_write": 2.2, "attention": 11.0, "o_proj": 4.0, "router": 5.5,
          "routing": 7.0, "gemm1": 26.0, "gemm2": 33.0}
COLUMNS = ["model", "tp", "batch", "context", "variant", "what", "layers", "time_s", "params", "run"]


def _write(path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        base = dict(model="gpt-oss-120b", tp=8, batch=4, context=2048, layers=12, params="", run="call-a")
        w.writerow(dict(base, variant="c", what="step", time_s=95e-6))
        w.writerow(dict(base, variant="compiled", what="step", time_s=93e-6))
        for op, us in OPS_US.items():
            w.writerow(dict(base, variant="c", what=f"op:{op}", time_s=us * 1e-6))
        w.writerow(dict(base, variant="c", what="step", time_s=1.0, run="call-b", batch=16))  # another call


def test_each_term_sets_kvsims_price_against_the_kernels_that_run_it(tmp_path: Path) -> None:
    path = tmp_path / "layer_step.csv"
    _write(path)
    points = lvk.read(str(path), "call-a")
    assert list(points) == [(8, 4, 2048)]
    (row,) = lvk.compare(points, "h100-sxm")
    breakdown = predict("gpt-oss-120b", "h100-sxm", 4, context=2048, tp=8)[0]["breakdown"]
    layers = load_model("gpt-oss-120b").num_layers
    assert layers == 36  # gpt-oss-120b config.json num_hidden_layers
    measured = {"norm": 4.0, "gemm.attention": 9.0, "rope": 2.5, "kv_write": 2.2, "attention.decode": 11.0,
                "gemm.router": 5.5, "moe_routing": 7.0, "gemm.experts": 59.0}
    assert set(row["terms"]) == set(measured)
    for term, (kvsim_s, alone_s) in row["terms"].items():
        assert alone_s == pytest.approx(measured[term] * 1e-6)
        assert kvsim_s == pytest.approx(breakdown[term] / layers)
    assert row["steps"] == {"c": pytest.approx(95e-6), "compiled": pytest.approx(93e-6)}
    assert row["kernels_alone"] == pytest.approx((sum(OPS_US.values()) + OPS_US["norm"]) * 1e-6)


def test_a_term_whose_kernel_was_not_timed_has_no_measured_side(tmp_path: Path) -> None:
    path = tmp_path / "layer_step.csv"
    _write(path)
    rows = [r for r in csv.DictReader(open(path)) if r["what"] != "op:gemm2"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    (row, _) = lvk.compare(lvk.read(str(path), None), "h100-sxm")
    assert row["terms"]["gemm.experts"][1] is None
    assert row["terms"]["gemm.router"][1] == pytest.approx(5.5e-6)
