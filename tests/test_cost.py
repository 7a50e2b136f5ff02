"""Cost model: hand-computed known answers, the direction of every method's effect, TP arithmetic,
fast-forward equality, and the calibration file format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from kvsim.cli import main
from kvsim.cost import Batch, CostModel
from kvsim.cost.calibration import find_calibration
from kvsim.cost.model import sum_min_range
from kvsim.errors import KvsimError
from kvsim.kv import METHODS, layout_for
from kvsim.spec.hardware import load_hardware
from kvsim.spec.model import load_model

H100 = load_hardware("h100-sxm")


def cost(model: str = "llama-3-8b", method: str = "bf16", tp: int = 1, cal: str | None = "none") -> CostModel:
    m = load_model(model)
    return CostModel(m, H100, layout_for(m, method), tp, cal)


def decode(c: CostModel, batch: int, context: int):
    return c.step(Batch(decode_context=np.full(batch, context)))


def op(step, name: str):
    return next(o for o in step.ops if o.name == name)


def test_batch1_decode_reads_all_weights_but_the_embedding_table() -> None:
    """Llama-3-8B holds 16.06 GB of bf16 weights; a decode step streams all of them through the
    GEMMs except the 1.05 GB embedding table, of which it gathers one row."""
    step = decode(cost(), 1, 1)
    gemm_bytes = sum(o.bytes for o in step.ops if o.name.startswith("gemm."))
    embedding = 128_256 * 4096 * 2
    assert 8_030_261_248 * 2 == pytest.approx(16.06e9, rel=1e-3)
    assert gemm_bytes == pytest.approx(8_030_261_248 * 2 - embedding, rel=1e-3)
    # memory-bound: at the roofline the GEMMs take bytes / HBM bandwidth
    gemm_s = sum(o.seconds for o in step.ops if o.name.startswith("gemm."))
    assert gemm_s == pytest.approx(gemm_bytes / H100.hbm_bandwidth_bytes_per_s, rel=1e-3)


def test_prefill_flops_are_two_x_params_x_tokens_plus_attention() -> None:
    n = 2048
    step = cost().step(Batch(prefill_tokens=np.array([n]), prefill_context=np.array([0])))
    # embedding and LM head are not per-token GEMMs, nor are the 2*32+1 RMSNorm weight vectors
    matmul_params = 8_030_261_248 - 2 * 128_256 * 4096 - (2 * 32 + 1) * 4096
    gemm = sum(o.flops for o in step.ops if o.name.startswith("gemm."))
    assert gemm == pytest.approx(2 * matmul_params * n + 2 * 4096 * 128_256, rel=1e-6)
    # causal attention: 2 * heads * (d_qk + d_v) * sum_{i<=n} i, per layer
    attn = 32 * 2 * 32 * (128 + 128) * n * (n + 1) / 2
    assert op(step, "attention.prefill").flops == pytest.approx(attn)


def test_sum_min_range_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        start, count, cap = (int(x) for x in rng.integers(0, 300, 3))
        brute = sum(min(j, cap) for j in range(start + 1, start + count + 1))
        assert sum_min_range(np.array([start]), np.array([count]), cap)[0] == brute


def test_fp8_halves_decode_kv_bytes_and_cla_keeps_them() -> None:
    base = op(decode(cost(), 64, 8192), "attention.decode").bytes
    assert op(decode(cost(method="fp8"), 64, 8192), "attention.decode").bytes == pytest.approx(base / 2)
    assert op(decode(cost(method="cla:factor=2"), 64, 8192), "attention.decode").bytes == pytest.approx(base)
    assert op(decode(cost(method="mlkv:kv_layers=8,kv_heads=8"), 64, 8192), "attention.decode").bytes == \
        pytest.approx(base)


def test_eviction_caps_decode_reads_at_the_budget() -> None:
    a = op(decode(cost(method="snapkv:budget=1024"), 8, 30_000), "attention.decode").bytes
    b = op(decode(cost(method="snapkv:budget=1024"), 8, 1024), "attention.decode").bytes
    assert a == pytest.approx(b)
    assert a == pytest.approx(8 * 1024 * 131_072)


def test_mla_does_more_flops_per_cached_byte() -> None:
    def intensity(model: str) -> float:
        o = op(decode(cost(model), 32, 4096), "attention.decode")
        return o.flops / o.bytes

    # GQA: 2*Hq*(d+d) FLOPs over 2*Hkv*d*e bytes; absorbed MLA: 2*H*(r+dR+r) over (r+dR)*e
    assert intensity("llama-3-8b") == pytest.approx(2 * 32 * 256 / (2 * 8 * 128 * 2))
    assert intensity("deepseek-v2-lite") == pytest.approx(2 * 16 * (576 + 512) / (576 * 2))
    assert intensity("deepseek-v3") == pytest.approx(2 * 128 * (576 + 512) / (576 * 2))  # 60x Llama


def test_quantized_decode_pays_dequantization_flops() -> None:
    kivi = op(decode(cost(method="kivi:bits=2"), 32, 8192), "attention.decode")
    fp8 = op(decode(cost(method="fp8"), 32, 8192), "attention.decode")
    assert kivi.bytes < fp8.bytes and kivi.flops > fp8.flops


@pytest.mark.parametrize("model", ["llama-3-8b", "qwen3-30b-a3b", "deepseek-v2-lite", "gemma-2-9b", "llava-1.5-7b"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_prices_a_step_whose_breakdown_adds_up(method: str, model: str) -> None:
    """The named breakdown and the total (the simulator's fast path) agree: kernels add up, an
    overlapped transfer hides behind them."""
    try:
        c = cost(model, METHODS[method].example)
    except KvsimError as err:  # a method that does not apply to this model says so
        assert model in str(err) or "needs" in str(err) or "not" in str(err)
        return
    batch = Batch(prefill_tokens=np.array([300]), prefill_context=np.array([100]),
                  decode_context=np.array([5000, 70_000]))
    step = c.step(batch)
    assert step.total_s > 0 and all(o.seconds >= 0 for o in step.ops)
    serial = sum(o.seconds for o in step.ops if o.bound != "overlapped")
    hidden = max((o.seconds for o in step.ops if o.bound == "overlapped"), default=0.0)
    assert step.total_s == pytest.approx(max(serial, hidden), rel=1e-12)
    assert c.step_time_s(batch) == step.total_s


def test_offload_fetch_is_priced_on_the_host_link() -> None:
    step = decode(cost(method="offload:gpu_tokens=1024"), 4, 9216)
    fetch = op(step, "host_transfer")
    assert fetch.bytes == pytest.approx(4 * 8192 * 131_072)
    assert fetch.seconds == pytest.approx(fetch.bytes / H100.pcie_bandwidth_bytes_per_s)


def test_tp_splits_weights_and_adds_allreduce() -> None:
    one, two = decode(cost(tp=1), 1, 1), decode(cost(tp=2), 1, 1)
    w1 = sum(o.bytes for o in one.ops if o.name.startswith("gemm."))
    w2 = sum(o.bytes for o in two.ops if o.name.startswith("gemm."))
    assert w2 == pytest.approx(w1 / 2, rel=1e-3)
    ar = op(two, "allreduce")
    msg = 4096 * 2  # one token's hidden state in bf16
    ring = 2 * (2 - 1) / 2 * msg / H100.nvlink_bandwidth_bytes_per_s + 2 * H100.interconnect_latency_s
    assert ar.seconds == pytest.approx(ring * (2 * 32 + 1))
    assert "allreduce" not in one.breakdown


@pytest.mark.parametrize(("model", "tp", "group"), [
    ("deepseek-r1", 1, 128), ("deepseek-r1", 8, 16),  # 128 heads over one latent: 16 per rank at TP 8
    ("qwen3-32b", 8, 8),  # 64 / 8 heads: 8 and 1 per rank
    ("qwen3-235b-a22b", 4, 16), ("qwen3-235b-a22b", 8, 8),  # 64 / 4: at TP 8 each rank's 8 share a replicated one
])
def test_decode_kernel_rows_are_the_query_heads_one_rank_runs_per_kv_head(model: str, tp: int, group: int) -> None:
    """The decode curve's second axis is what one rank's kernel sees: its query heads per KV head it reads.
    DeepSeek-V3's 128 heads at TP 8 were priced as 128 per latent (the MLA kernel's slowest rows), 2-3x
    over vLLM's measured MLA module at large caches (scripts/mla_vs_aiconfigurator.py)."""
    assert cost(model, tp=tp).query_group == group


def test_fast_forward_equals_step_by_step() -> None:
    rng = np.random.default_rng(1)
    for method in ("bf16", "kivi:bits=2", "snapkv:budget=512", "shadowkv", "offload:gpu_tokens=2000"):
        c = cost(method=method, cal=None)
        ctx = rng.integers(1, 6000, size=int(rng.integers(1, 200)))
        fast = c.decode_times_s(ctx, 40)
        slow = np.array([c.step_time_s(Batch(decode_context=ctx + j)) for j in range(40)])
        assert np.array_equal(fast, slow)


def test_calibration_lookup_and_override(tmp_path) -> None:
    cal = find_calibration(H100)
    assert cal.kind in ("measured", "prior", "borrowed")
    assert find_calibration(H100, "none").kind == "roofline"
    l40s = find_calibration(load_hardware("l40s"))
    assert l40s.kind == "imported" and l40s.engine == "vllm" and l40s.engine_version
    rtx = find_calibration(load_hardware("rtx-4090"))  # no profile of its own: its family's, labelled
    assert rtx.kind == "borrowed" and rtx.note.startswith("borrowed from l40s")
    assert find_calibration(load_hardware("mi300x")).kind == "prior"
    bad = tmp_path / "cal.yaml"
    bad.write_text(yaml.safe_dump({"gpu": "h100-sxm", "ops": {}, "colour": 1}))
    with pytest.raises(KvsimError, match="colour"):
        find_calibration(H100, str(bad))


def test_predict_cli_grid_json(capsys) -> None:
    main(["predict", "--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--batch", "1,8", "--context",
          "1024,4096,65536", "--prompt", "512", "--json"])
    points = json.loads(capsys.readouterr().out)
    assert len(points) == 6
    for p in points:
        assert {"batch", "context", "decode_step_s", "prefill_s", "tokens_per_s", "breakdown", "fits"} <= set(p)
    too_big = [p for p in points if p["context"] == 65536 and p["batch"] == 8]
    assert too_big[0]["fits"] is False and "reason" in too_big[0]


def test_predict_cli_single_point_is_a_list(capsys) -> None:
    """--json always prints a list (one shape for scripts; a breaking change noted in CHANGELOG.md)."""
    main(["predict", "--model", "llama-3-8b", "--hardware", "h100-sxm", "--batch", "4", "--context", "100",
          "--json"])
    points = json.loads(capsys.readouterr().out)
    assert isinstance(points, list) and len(points) == 1 and points[0]["batch"] == 4


def test_predict_prompt_without_context_prices_the_prefill_alone(capsys) -> None:
    main(["predict", "--model", "llama-3-8b", "--hardware", "h100-sxm", "--batch", "1,2", "--prompt", "2048",
          "--json"])
    points = json.loads(capsys.readouterr().out)
    assert [p["batch"] for p in points] == [1, 2]
    assert all(p["context"] is None and "decode_step_s" not in p and p["prefill_s"] > 0 for p in points)
    # two prompts cost more than one, and the same as the prefill priced beside a decode grid
    assert points[1]["prefill_s"] > points[0]["prefill_s"]
    main(["predict", "--model", "llama-3-8b", "--hardware", "h100-sxm", "--batch", "2", "--context", "100",
          "--prompt", "2048", "--json"])
    assert json.loads(capsys.readouterr().out)[0]["prefill_s"] == points[1]["prefill_s"]
    main(["predict", "--model", "llama-3-8b", "--hardware", "h100-sxm", "--batch", "1", "--prompt", "2048"])
    assert "prefill ms" in capsys.readouterr().out


def test_predict_needs_context_or_prompt(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["predict", "--model", "llama-3-8b", "--hardware", "h100-sxm", "--batch", "1"])
    assert e.value.code == 2 and "--context" in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [(["--batch", "0"], "--batch"), (["--context", "x"], "--context"),
                                        (["--calibration", "/nope.yaml"], "no such calibration profile")])
def test_predict_bad_input(capsys, argv, match) -> None:
    args = ["predict", "--model", "llama-3-8b", "--hardware", "h100-sxm", "--batch", "1", "--context", "10"]
    with pytest.raises(SystemExit) as e:
        main(args + argv)
    assert e.value.code == 2 and match in capsys.readouterr().err
