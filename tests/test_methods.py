"""Every KV method on every catalogue model: parses, applies or refuses with a reason, and its
bytes are positive, monotone in length and bounded by what its family can do."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsim.errors import KvsimError
from kvsim.kv import METHODS, layout_for, parse
from kvsim.kv.method import Stage
from kvsim.spec.model import load_model, model_names

LENGTHS = np.array([1, 7, 100, 1000, 5000, 20000, 65536, 200000])
BOOKKEEPING = {"score", "merge_state"}  # per-token bookkeeping that eviction methods add


@pytest.fixture(scope="module")
def baselines() -> dict:
    return {n: layout_for(load_model(n)) for n in model_names()}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("model", model_names())
def test_every_method_on_every_model(model: str, method: str, baselines: dict) -> None:
    m = METHODS[method]
    try:
        layout = layout_for(load_model(model), m.example)
    except KvsimError as err:  # refusing is fine, but it must say why
        assert method in str(err) and model in str(err), "a refusal names the method and the model"
        return
    base = sum(baselines[model].bytes_by_tier(LENGTHS).values())
    tiers = layout.bytes_by_tier(LENGTHS)
    total, gpu = sum(tiers.values()), tiers["gpu"]
    assert np.all(gpu > 0) and np.all(total > 0)
    assert np.all(np.diff(total) >= 0) and np.all(np.diff(gpu) >= 0), "bytes must grow with length"
    kv_only = layout.with_layers([layer.__class__(**{**layer.__dict__, "streams": tuple(
        s for s in layer.streams if s.part not in BOOKKEEPING)}) for layer in layout.layers])
    kv_gpu = kv_only.gpu_bytes(LENGTHS)
    if m.stage in (Stage.PRECISION, Stage.STRUCTURE, Stage.EVICTION):
        assert np.all(kv_gpu <= base + 1e-6), "compression must never store more KV than the baseline"
    else:  # placement methods pay a fixed per-sequence cost, repaid at long context
        assert gpu[-1] <= base[-1]
    assert np.all(layout.prefill_peak_gpu_bytes(LENGTHS) >= gpu - 1e-6), "prefill peak >= resident"


def test_kivi_bits_per_element() -> None:
    # KIVI arXiv 2402.02750: b + 32/G bits per element (fp16 scale + zero point per group of G)
    layout = layout_for(load_model("llama-3-8b"), "kivi:bits=2,group=32,residual=128")
    t = 128 + 10_000
    expected = 32 * 2 * 8 * 128 * (128 * 2 + 10_000 * (2 + 32 / 32) / 8)
    assert layout.gpu_bytes(t)[0] == pytest.approx(expected)


def test_stacking_order_does_not_matter() -> None:
    m = load_model("llama-3-8b")
    a = layout_for(m, "snapkv:budget=2048+kivi:bits=2")
    b = layout_for(m, "kivi:bits=2+snapkv:budget=2048")
    assert np.array_equal(a.gpu_bytes(LENGTHS), b.gpu_bytes(LENGTHS))
    # eviction after prefill: the prefill peak is the (quantized) full prompt
    full = layout_for(m, "kivi:bits=2")
    assert np.array_equal(a.prefill_peak_gpu_bytes(LENGTHS), full.gpu_bytes(LENGTHS))


@pytest.mark.parametrize("spec,per_token", [
    ("cla:factor=2", 131_072 / 2),  # CLA: 2 * ceil(L/s) * Hkv * d * e
    ("cla:factor=3", 2 * 11 * 8 * 128 * 2),
    ("mlkv:kv_layers=4,kv_heads=2", 2 * 4 * 2 * 128 * 2),  # MLKV: 2 * m * g * d * e
    ("kv-latent:qk_dim=64,vo_dim=32", 32 * 8 * (64 + 32) * 2),  # KV-Latent: L * Hkv * (dqk + dvo) * e
    ("lrkv:rank=16", 32 * 2 * (128 + 8 * 16) * 2),  # LRKV: 2 * (d + Hkv * r) * e per layer
    ("lckv:warmup=2", 2 * 2 * 8 * 128 * 2),  # LCKV: 2 * max(w, 1) * Hkv * d * e
    ("fp8", 131_072 / 2),
])
def test_structure_formulas(spec: str, per_token: float) -> None:
    assert layout_for(load_model("llama-3-8b"), spec).gpu_bytes(1000)[0] == pytest.approx(per_token * 1000)


def test_mla_and_mtla() -> None:
    v3 = load_model("deepseek-v3")
    assert layout_for(v3).gpu_bytes(1000)[0] == 70_272 * 1000
    assert layout_for(v3, "mtla:stride=2").gpu_bytes(1000)[0] == 70_272 * 500
    with pytest.raises(KvsimError, match="no MLA latent"):
        layout_for(load_model("llama-3-8b"), "mtla:stride=2")


def test_eviction_caps_at_budget_and_keeps_prompt_during_prefill() -> None:
    m = load_model("llama-3-8b")
    layout = layout_for(m, "snapkv:budget=1024")
    assert layout.gpu_bytes(50_000)[0] == 131_072 * 1024
    assert layout.gpu_bytes(500)[0] == 131_072 * 500
    assert layout.prefill_peak_gpu_bytes(50_000)[0] == 131_072 * 50_000
    pyr = layout_for(m, "pyramidkv:budget=1024")
    assert pyr.gpu_bytes(50_000)[0] == pytest.approx(131_072 * 1024, rel=0.01)  # same mean budget
    per_layer = [layer.span_cap for layer in pyr.layers]
    assert per_layer == sorted(per_layer, reverse=True)


def test_streamingllm_is_constant_size() -> None:
    layout = layout_for(load_model("llama-3-8b"), "streamingllm:sinks=4,window=1020")
    assert layout.gpu_bytes(1024)[0] == layout.gpu_bytes(100_000)[0] == 131_072 * 1024


def test_offload_moves_old_tokens_to_host() -> None:
    tiers = layout_for(load_model("llama-3-8b"), "offload:gpu_tokens=1000").bytes_by_tier(5000)
    assert tiers["gpu"][0] == 131_072 * 1000 and tiers["host"][0] == 131_072 * 4000


def test_lightkv_drops_merged_vision_tokens() -> None:
    layout = layout_for(load_model("llava-1.5-7b"), "lightkv:keep=0.5")
    assert layout.gpu_bytes(1000, image_tokens=576)[0] == 524_288 * (1000 - 288)
    with pytest.raises(KvsimError, match="no vision tower"):
        layout_for(load_model("llama-3-8b"), "lightkv")


@pytest.mark.parametrize("spec,match", [
    ("kivi:bits=two", "expected int"), ("kivi:bits=9", "<= 8"), ("snapkv", "needs budget"),
    ("snapkv:budget=0", ">= 1"), ("kivvi", "did you mean kivi"), ("kivi:bitz=2", "did you mean bits"),
    ("fp8+kivi", "stack at most one"), ("kivi:bits", "key=value"), ("", "empty"),
    ("safekv:policy=nobody", "one of"),
])
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(KvsimError, match=match):
        parse(spec)


def test_sharing_methods_refuse_models_that_already_share() -> None:
    with pytest.raises(KvsimError, match="already share KV"):
        layout_for(load_model("gemma-3n-e2b"), "cla:factor=3")


def test_cla_groups_within_attention_kind() -> None:
    layout = layout_for(load_model("gemma-2-9b"), "cla:factor=2")
    for layer in layout.layers:
        assert layout.layers[layer.source].kind == layer.kind


@settings(max_examples=examples(60))
@given(bits=st.integers(1, 8), group=st.sampled_from([16, 32, 64, 128]), residual=st.integers(0, 512),
       t1=st.integers(1, 100_000), t2=st.integers(1, 100_000))
def test_quantization_properties(bits: int, group: int, residual: int, t1: int, t2: int) -> None:
    m = load_model("llama-3-8b")
    layout = layout_for(m, f"kivi:bits={bits},group={group},residual={residual}")
    lo, hi = sorted((t1, t2))
    b = layout.gpu_bytes(np.array([lo, hi]))
    assert b[0] <= b[1] <= 131_072 * hi
    per_elem_bits = bits + 32 / group
    assert b[1] >= 131_072 * hi * min(1.0, per_elem_bits / 16) - 1e-6
