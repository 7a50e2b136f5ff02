"""What each KV method costs beyond its bytes: no free dequantization (a kernel is measured, derived
from a measured neighbour by a named rule, or refused), prefill that sees the whole prompt, and
every method's extra work charged."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import numpy as np
import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsim.api import predict
from kvsim.cost import Batch, CostModel
from kvsim.cost.calibration import find_calibration
from kvsim.errors import KvsimError
from kvsim.kv import METHODS, layout_for
from kvsim.kv.method import Stage
from kvsim.spec.hardware import load_hardware
from kvsim.spec.model import load_model

H100 = load_hardware("h100-sxm")
LLAMA = load_model("llama-3-8b")


def attention(method: str, batch: int = 16, context: int = 32_768, model=LLAMA, cal=None) -> float:
    c = CostModel(model, H100, layout_for(model, method), 1, cal)
    return c.step(Batch(decode_context=np.full(batch, context))).breakdown["attention.decode"]


def kernel(method: str, cal=None):
    return CostModel(LLAMA, H100, layout_for(LLAMA, method), 1, cal).decode_kernel


# ------------------------------------------------------------------ 1. no free dequantization

def test_unmeasured_bit_width_is_derived_from_its_measured_neighbour() -> None:
    """kivi:bits=3 was priced on the bf16 curve: 6.2 ms of attention at batch 16, 32k context on
    H100, against 20.4 ms for the measured kivi:bits=2. It reads more bytes than 2-bit KIVI with the
    same kernel, so it costs more; it stays below the measured 4-bit kernel, which reads more still."""
    two, three, four = (attention(f"kivi:bits={b}") for b in (2, 3, 4))
    assert two < three < four
    assert two == pytest.approx(20.4e-3, rel=0.02) and four == pytest.approx(30.0e-3, rel=0.02)
    k = kernel("kivi:bits=3")
    assert (k.status, k.curve) == ("derived", "attention_decode.kivi.k2v2")
    assert "not measured" in k.label and "bytes and dequantization work" in k.label


def test_identical_kernels_are_priced_identically() -> None:
    """asymkv at equal widths runs the very kernel kivi does (triton_kivi); MiniKV at group 32 stores
    what PyramidKV + KIVI stores. Both were priced about 4x cheaper on the bf16 curve."""
    assert attention("asymkv:k_bits=2,v_bits=2,group=32,residual=128") == attention("kivi:bits=2")
    assert kernel("asymkv:k_bits=2,v_bits=2").status == "measured"
    mini = attention("minikv:budget=4096,group=32")
    assert mini == pytest.approx(attention("pyramidkv:budget=4096+kivi:bits=2"), rel=1e-9)
    assert kernel("minikv:budget=4096").status == "derived"


@pytest.mark.parametrize("method", [m for m in METHODS.values() if m.stage == Stage.PRECISION
                                    or m.name in ("minikv", "ttkv")], ids=lambda m: m.name)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_every_nameable_width_is_measured_or_derived(method, bits: int) -> None:
    names = [p.name for p in method.params if "bits" in p.name]
    spec = method.name + ":" + ",".join(f"{n}={bits}" for n in names) if names else method.name
    if method.name == "minikv":
        spec += ",budget=1024"
    elif method.name == "kvquant" and bits < 2:
        return  # below the parameter's minimum
    k = kernel(spec)
    assert k.status in ("measured", "derived")
    if k.status == "derived":
        assert "not measured" in k.label and k.curve.startswith("attention_decode")


def test_a_profile_without_the_kernel_refuses_and_names_what_was_measured() -> None:
    cal = find_calibration(H100)
    ops = {k: v for k, v in cal.ops.items() if ".kivi." not in k and ".asymkv." not in k}
    bare = replace(cal, ops=MappingProxyType(ops))
    with pytest.raises(KvsimError, match=r"no measured decode kernel for kivi\.k3v3.*measured: .*intkv\.k2v2"):
        kernel("kivi:bits=3", bare)


def test_prior_and_roofline_profiles_say_so() -> None:
    assert kernel("kivi:bits=3", "none").status == "roofline"
    mi300x = load_hardware("mi300x")  # no measured or imported profile: the labelled prior
    assert CostModel(LLAMA, mi300x, layout_for(LLAMA, "kivi:bits=3")).decode_kernel.status == "prior"


def test_summary_and_breakdown_name_the_kernel_source() -> None:
    point = predict("llama-3.1-8b", "h100-sxm", 16, 32_768, method="kivi:bits=3")[0]
    assert point["calibration"]["decode_kernel"]["status"] == "derived"
    assert predict("llama-3.1-8b", "h100-sxm", 16, 32_768, method="kivi:bits=2")[0][
        "calibration"]["decode_kernel"]["status"] == "measured"


@pytest.mark.parametrize("method", ["lrkv", "kvquant", "minikv:budget=1024", "mka", "offload:gpu_tokens=4096",
                                    "packkv:mean_bits=4"])
def test_methods_without_a_measured_kernel_are_marked(method: str) -> None:
    k = kernel(method)
    assert k.status == "derived" and "not measured" in k.label


# ------------------------------------------------------------------ 2. prefill sees the whole prompt

EVICTION = [m.name for m in METHODS.values() if m.stage == Stage.EVICTION and m.name != "lightkv"]


@pytest.mark.parametrize("method", EVICTION)
def test_eviction_prefill_attends_the_whole_prompt(method: str) -> None:
    """SnapKV & co. were priced as if the prompt were already evicted during its own prefill: a
    32k prompt got 55 ms of attention instead of bf16's 454 ms on H100."""
    spec = METHODS[method].example
    prompt = Batch(prefill_tokens=np.array([32_768]), prefill_context=np.array([0]))
    base = CostModel(LLAMA, H100, layout_for(LLAMA), 1).step(prompt)
    step = CostModel(LLAMA, H100, layout_for(LLAMA, spec), 1).step(prompt)
    passes = layout_for(LLAMA, spec).runtime.prefill_passes
    assert step.breakdown["attention.prefill"] == pytest.approx(base.breakdown["attention.prefill"] * passes, rel=1e-3)
    assert step.total_s >= base.total_s
    scoring = step.breakdown.get("prefill.scoring", 0.0)
    assert scoring > 0 or method == "streamingllm", "every scoring method pays its scoring pass"


def test_h2o_scores_every_prompt_query() -> None:
    """H2O accumulates every prompt query's attention probabilities (arXiv 2306.14048 sec. 4): a
    QK^T pass over the causal prompt, 2 * heads * d * T(T+1)/2 FLOPs per layer."""
    n = 4096
    step = CostModel(LLAMA, H100, layout_for(LLAMA, "h2o:budget=1024"), 1, "none").step(
        Batch(prefill_tokens=np.array([n]), prefill_context=np.array([0])))
    scoring = next(o for o in step.ops if o.name == "prefill.scoring")
    assert scoring.flops == pytest.approx(32 * 2 * 32 * 128 * n * (n + 1) / 2)


# ------------------------------------------------------------------ 3. every method's extra work

def _step(method: str, batch: Batch, model=LLAMA):
    return CostModel(model, H100, layout_for(model, method), 1, "none").step(batch)


def _op(step, name: str):
    return next(o for o in step.ops if o.name == name)


def _decode(n: int, ctx: int) -> Batch:
    return Batch(decode_context=np.full(n, ctx))


def _prompt(n: int) -> Batch:
    return Batch(prefill_tokens=np.array([n]), prefill_context=np.array([0]))


def test_keepkv_merges_past_its_budget() -> None:
    """KeepKV's merge_ops_per_token (4 * head_dim per evicted token and KV head, inferred) was never
    read: past the budget, each step merges one token per layer and KV head; at prefill end, every
    prompt token past the budget."""
    merge = 4 * 128 * 8 * 32  # ops x KV heads x layers, per sequence and step
    for ctx, merging in ((1000, 0), (5000, 1)):
        keep = _op(_step("keepkv:budget=2048", _decode(3, ctx)), "attention.decode").flops
        h2o = _op(_step("h2o:budget=2048", _decode(3, ctx)), "attention.decode").flops
        assert keep - h2o == pytest.approx(3 * merge * merging)
    pre = _op(_step("keepkv:budget=2048", _prompt(5000)), "prefill.merge")
    assert pre.flops == pytest.approx((5000 - 2048) * 8 * 32 * 4 * 128)


def test_shadowkv_pays_svd_and_host_store_and_reuses_fetches() -> None:
    n, r, width = 10_000, 160, 8 * 128
    step = _step("shadowkv", _prompt(n))
    assert _op(step, "prefill.svd").flops == pytest.approx(4 * n * width * r * 32)
    assert _op(step, "prefill.host_store").bytes == pytest.approx(n * width * 2 * 32)  # values to host
    # 60% of a step's 2048 fetched tokens are still on the GPU from the step before (arXiv 2410.21465)
    fetch = _op(_step("shadowkv", _decode(4, 50_000)), "host_transfer").bytes
    assert fetch == pytest.approx(4 * 2048 * width * 2 * 32 * 0.4)
    assert _op(_step("shadowkv:reuse=0", _decode(4, 50_000)), "host_transfer").bytes == pytest.approx(fetch / 0.4)


@pytest.mark.parametrize("method,host_tokens", [("offload:gpu_tokens=4096", 10_000 - 4096),
                                                ("ttkv:recent=4096", 10_000 - 4096)])
def test_offloaded_prompt_goes_to_host_at_prefill(method: str, host_tokens: int) -> None:
    layout = layout_for(LLAMA, method)
    expected = float(layout.bytes_by_tier(10_000)["host"][0])
    assert expected > 0 and host_tokens > 0
    assert _op(_step(method, _prompt(10_000)), "prefill.host_store").bytes == pytest.approx(expected)


def test_lorc_rebuilds_keys_because_of_rope() -> None:
    """RoPE between the key projection and the dot product stops W_K being absorbed into Q: every
    step rebuilds each cached key from its rank (2 * r * Hkv*d FLOPs), attention runs over d per
    head, and only values stay absorbed (summed over the rank)."""
    layout = layout_for(LLAMA, "lorc:ratio=0.5,progressive=false")
    r = 512  # 0.5 x 8 KV heads x 128
    step = _step("lorc:ratio=0.5,progressive=false", _decode(1, 1000))
    attn = 2 * 32 * (128 + r) * 1000 * 32
    rebuild = 2 * r * 8 * 128 * 1000 * 32
    assert _op(step, "attention.decode").flops == pytest.approx(attn + rebuild)
    assert layout.layers[0].qk_dim == 128 and layout.layers[0].vo_dim == r


# ------------------------------------------------------------------ 8. not measured, and said so

def test_kvsim_methods_marks_what_is_not_measured(capsys) -> None:
    from kvsim.cli import main

    main(["methods", "--json"])
    import json

    rows = {r["name"]: r["cost (h100-sxm)"] for r in json.loads(capsys.readouterr().out)}
    for name in ("lrkv", "matkv", "kvquant", "minikv", "mka", "offload", "packkv", "lorc"):
        assert "not measured" in rows[name], name
    for name in ("bf16", "kivi", "fp8", "streamingllm", "cla"):
        assert rows[name].startswith("measured") and "not measured" not in rows[name], name


def test_every_summary_carries_the_rules() -> None:
    point = predict("llama-3.1-8b", "h100-sxm", 1, 8192, prompt=4096, method="matkv")[0]
    assert any("MatKV" in n and "not measured" in n for n in point["calibration"]["cost_notes"])


# ------------------------------------------------------------------ 6. defaults from the papers, aliases said

def test_defaults_match_the_papers() -> None:
    llama2 = load_model("llama-2-7b")  # MHA, the paper's baseline
    mha = layout_for(llama2).gpu_bytes(10_000)[0]
    share = layout_for(llama2, "lrkv").gpu_bytes(10_000)[0] / mha
    assert 0.45 <= share <= 0.53  # arXiv 2601.11471: 45-53% of MHA's cache (the old default: 28%)
    asym = {p.name: p.default for p in METHODS["asymkv"].params}
    assert (asym["group"], asym["residual"]) == (128, 64)  # arXiv 2502.15075
    kvq = layout_for(llama2, "kvquant:bits=3,outliers=0.01").gpu_bytes(10_000)[0] / mha * 16
    assert 3.32 <= kvq <= 3.35  # bits per element the KVQuant paper reports (was 3.48)
    lckv = {p.name: p.default for p in METHODS["lckv"].params}["iterations"]
    assert {p.name: p.default for p in METHODS["xlayer"].params}["iterations"] == lckv == 9.0


def test_aliases_are_what_they_say() -> None:
    same = (("depthkv:budget=1024,min_ratio=0.25", "pyramidkv:budget=1024,beta=2.5"),
            ("cla:factor=2", "xlayer:kv_layers=16,target=bottom"))
    for alias, target in same:
        a, b = layout_for(LLAMA, alias), layout_for(LLAMA, target)
        assert a.layers == b.layers, alias
    xkv, depth = layout_for(LLAMA, "xkv:budget=1024"), layout_for(LLAMA, "depthkv:budget=1024")
    assert xkv.layers == depth.layers and xkv.runtime.prefill_passes == pytest.approx(1.1)
    for name in ("depthkv", "xkv", "cla"):
        assert METHODS[name].alias_of


def test_extra_prefill_passes_add_time_never_tokens() -> None:
    """LCKV's iterations and XKV's profiling pass run the model again over the prompt chunk alone;
    YOCO's prompt leaves after half the layers while decode rows go through all. Each is priced as
    passes whose times add. They were priced as one pass over more (or fewer) tokens, which made
    XKV's 123-token prefill of Qwen3-235B 0.015% cheaper than no method at all: the grouped GEMM's
    efficiency rises with its rows faster than its time there (hypothesis seed 505, long profile)."""
    qwen = load_model("qwen3-235b-a22b")

    def gemms(method: str | None, batch: Batch) -> float:
        layout = layout_for(qwen, method) if method else layout_for(qwen)
        return CostModel(qwen, H100, layout, 1, CAL).step(batch).breakdown["gemm.experts"]

    prompt = Batch(prefill_tokens=np.array([123]), prefill_context=np.array([0]))
    base = gemms(None, prompt)
    assert gemms("xkv:budget=1024", prompt) == pytest.approx(1.1 * base, rel=1e-12)  # one pass + 0.1 profiling
    lckv = layout_for(qwen, "lckv:warmup=2").runtime.prefill_passes
    assert gemms("lckv:warmup=2", prompt) == pytest.approx(lckv * base, rel=1e-12)
    assert gemms("yoco", prompt) == pytest.approx(0.5 * base, rel=1e-12)
    # with 8 decode rows beside the chunk: YOCO's decode rows pass every layer, the chunk half of them
    mixed = Batch(prefill_tokens=np.array([123]), prefill_context=np.array([0]), decode_context=np.full(8, 1000))
    decode = Batch(decode_context=np.full(8, 1000))
    assert gemms("yoco", mixed) == pytest.approx(0.5 * gemms(None, mixed) + 0.5 * gemms(None, decode), rel=1e-12)


# ------------------------------------------------------------------ invariants over every method and model

CAL = find_calibration(H100)
# the fastest any measured decode kernel read HBM, at any size: no price may beat it
CEILING = CAL.ceilings.copy_bytes_per_s * max(float(np.max(np.asarray(c.memory, dtype=float)))
                                              for k, c in CAL.ops.items() if k.startswith("attention_decode"))
COMPRESSING = (Stage.EVICTION, Stage.PRECISION, Stage.PLACEMENT)  # full KV computed, then compressed or moved


def _check_invariants(model_name: str, method: str, prompt: int, batch: int, context: int,
                      baselines: dict) -> None:
    model = load_model(model_name)
    try:
        layout = layout_for(model, method)
    except KvsimError:
        return  # the method does not apply to this model (test_methods checks the refusal)
    step = CostModel(model, H100, layout, 1, CAL).step(
        Batch(prefill_tokens=np.array([prompt]), prefill_context=np.array([0]), decode_context=np.full(batch, context)))
    # the breakdown adds up to the total: kernels in sequence, an overlapped transfer hidden behind them
    serial = sum(o.seconds for o in step.ops if o.bound != "overlapped")
    hidden = max((o.seconds for o in step.ops if o.bound == "overlapped"), default=0.0)
    assert step.total_s == pytest.approx(max(serial, hidden), rel=1e-9)
    # decode attention is never faster than its HBM bytes at the best bandwidth any kernel reached
    dec = next(o for o in step.ops if o.name == "attention.decode")
    assert dec.seconds >= dec.bytes / CEILING * (1 - 1e-9)
    # compressing the cache never makes the prompt's own computation cheaper (only the KV write shrinks)
    if METHODS[method.split(":")[0].split("+")[0]].stage in COMPRESSING:
        key = (model_name, prompt)
        if key not in baselines:
            base = CostModel(model, H100, layout_for(model), 1, CAL).step(
                Batch(prefill_tokens=np.array([prompt]), prefill_context=np.array([0])))
            baselines[key] = base.total_s - base.breakdown["kv_write"]
        pre = CostModel(model, H100, layout, 1, CAL).step(
            Batch(prefill_tokens=np.array([prompt]), prefill_context=np.array([0])))
        assert pre.total_s - pre.breakdown["kv_write"] >= baselines[key] * (1 - 1e-9), (model_name, method)


@pytest.fixture(scope="module")
def prefill_baselines() -> dict:
    return {}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_on_every_model_prices_sanely(method: str, prefill_baselines: dict) -> None:
    from kvsim.spec.model import model_names

    for model_name in model_names():
        _check_invariants(model_name, METHODS[method].example, 40_000, 4, 50_000, prefill_baselines)


@settings(max_examples=examples(60))
@given(model=st.sampled_from(sorted(__import__("kvsim.spec.model", fromlist=["model_names"]).model_names())),
       method=st.sampled_from(sorted(m.example for m in METHODS.values())),
       prompt=st.integers(1, 200_000), batch=st.integers(1, 256), context=st.integers(1, 1_000_000))
def test_pricing_invariants_hold_at_any_shape(model: str, method: str, prompt: int, batch: int, context: int) -> None:
    _check_invariants(model, method, prompt, batch, context, {})


def test_lightkv_pays_its_vision_merge() -> None:
    """LightKV merges (1 - keep) of the vision tokens at prefill: every layer reads their K/V and
    writes the merged pairs (the pass validation/kernels/bench_evict.py times)."""
    llava = load_model("llava-1.5-7b")
    batch = Batch(prefill_tokens=np.array([1000]), prefill_context=np.array([0]), merged_tokens=288)
    step = CostModel(llava, H100, layout_for(llava, "lightkv:keep=0.5"), 1, "none").step(batch)
    assert _op(step, "prefill.vision_merge").bytes == pytest.approx(524_288 * (576 + 288))
    plain = CostModel(llava, H100, layout_for(llava), 1, "none").step(batch)
    assert all(o.name != "prefill.vision_merge" for o in plain.ops)


def test_a_quantized_mla_latent_is_not_priced_as_measured() -> None:
    """The 16-bit MLA kernels and vLLM's FP8 FlashMLA (run h100-call25) are measured: any other narrower
    latent is derived from them, labelled an estimate (not a bound: the rule gives 0.95-1.8x the measured FP8
    FlashMLA's time), never 'measured'."""
    v2 = load_model("deepseek-v2-lite")
    for spec in ("kvquant:bits=6,outliers=0", "mtla:stride=2+kivi:bits=2"):
        k = CostModel(v2, H100, layout_for(v2, spec), 1).decode_kernel
        assert k.status == "derived" and "an estimate, not a bound" in k.label, spec
    assert CostModel(v2, H100, layout_for(v2), 1).decode_kernel.status == "measured"
    fp8 = CostModel(v2, H100, layout_for(v2, "fp8"), 1).decode_kernel
    assert fp8.status == "measured" and fp8.curve == "attention_decode.mla.k8v8"


def test_the_16_bit_rule_for_an_fp8_mla_cache_is_quoted_as_measured() -> None:
    """The derived rule's label quotes how it compares with vLLM's FP8 FlashMLA where that is measured
    (H100, run h100-call25): 0.95-1.8x its time over DeepSeek-R1 at TP 1-8, 1-256 sequences, 512-32k tokens.
    The quote must stay what the profile gives (kvsim/cost/kernels.py)."""
    cal = find_calibration(H100)
    rule = replace(cal, ops=MappingProxyType({k: v for k, v in cal.ops.items() if k != "attention_decode.mla.k8v8"}))
    r1 = load_model("deepseek-r1")

    def attention_s(profile: object, tp: int, batch: int, context: int) -> float:
        step = CostModel(r1, H100, layout_for(r1, "fp8"), tp, profile).step(  # type: ignore[arg-type]
            Batch(decode_context=np.full(batch, context)))
        return next(o.seconds for o in step.ops if o.name == "attention.decode")

    ratios = [attention_s(rule, tp, b, c) / attention_s(cal, tp, b, c) for tp in (1, 2, 4, 8)
              for b in (1, 4, 16, 64, 256) for c in (512, 2048, 8192, 32768)]
    assert (round(min(ratios), 2), round(max(ratios), 1)) == (0.95, 1.8)
    label = CostModel(r1, H100, layout_for(r1, "kvquant:bits=6,outliers=0"), 8).decode_kernel.label
    assert "runs 0.95-1.8x this rule's time" in label


def test_an_fp8_mla_cache_on_measured_flashmla_is_labelled_vllms_kernel() -> None:
    """The H100 profile prices an FP8 latent cache on vLLM's FP8 FlashMLA (attention_decode.mla.k8v8, run
    h100-call25), a cache-precision variant with no stand-in of its own: its note names FlashMLA, as the
    16-bit cache's does, and never says the stand-in prices it. With the FlashMLA curves taken out of the
    profile (the stand-in back in their place) the note says the stand-in."""
    r1 = load_model("deepseek-r1")
    cal = find_calibration(H100)

    def mla_note(profile: object, method: str) -> str:
        notes = CostModel(r1, H100, layout_for(r1, method), 8, profile).cost_notes  # type: ignore[arg-type]
        return next(n for n in notes if n.startswith("MLA decode attention"))

    for method, curve in (("fp8", "attention_decode.mla.k8v8"), ("bf16", "attention_decode.mla")):
        assert mla_note(cal, method).startswith(f"MLA decode attention on vLLM's FlashMLA ({curve})")
    ops = {k: v for k, v in cal.ops.items() if k not in ("attention_decode.mla", "attention_decode.mla.k8v8")}
    ops["attention_decode.mla"] = ops.pop("attention_decode.mla.reference")
    stand_in = replace(cal, ops=MappingProxyType(ops))
    assert "Triton stand-in kernel (attention_decode.mla)" in mla_note(stand_in, "bf16")


def test_a_quantized_mla_latent_on_a_profile_without_mla_kernels_is_priced_as_its_16_bit_layout() -> None:
    """A measured profile without an MLA kernel at any width (the H200's before run h200-call7 timed them; here
    its MLA curves removed): its 16-bit MLA is priced on the dense kernel, and so is an FP8 latent (a DeepSeek
    FP8 checkpoint's cache), labelled so, instead of being refused; it reads half the bytes, so at a long
    context its attention costs less than the 16-bit one."""
    h200 = load_hardware("h200-sxm")
    full = find_calibration(h200)
    assert "attention_decode.mla" in full.ops
    cal = replace(full, ops=MappingProxyType({k: v for k, v in full.ops.items()
                                              if not k.startswith(("attention_decode.mla", "attention_decode.mtla"))}))
    v2 = load_model("deepseek-v2-lite")
    sixteen = CostModel(v2, h200, layout_for(v2), 1, cal)
    fp8 = CostModel(v2, h200, layout_for(v2, "fp8"), 1, cal)
    assert sixteen.decode_kernel.curve == fp8.decode_kernel.curve == "attention_decode"
    assert fp8.decode_kernel.status == "derived" and "no MLA kernel is measured" in fp8.decode_kernel.label
    batch = Batch(decode_context=np.full(32, 16_384))
    attn = {name: _op(m.step(batch), "attention.decode").seconds for name, m in (("16", sixteen), ("8", fp8))}
    assert attn["8"] < attn["16"]
