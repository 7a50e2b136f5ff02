"""Which tokens a sequence keeps: eviction, selection, merging and vision-token pruning.

Memory per sequence becomes ``sum over layers of min(T, budget_l)``. Eviction happens once the
prompt has been prefilled, so the full prompt exists during prefill: these methods are marked
``compresses_after_prefill`` and the layout keeps the uncompressed view as its prefill peak.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from kvsim.errors import KvsimError
from kvsim.kv.layout import KVLayout, Quant, Stream, min_cap
from kvsim.kv.method import Method, Param, Params, Stage
from kvsim.kv.precision import FP16_SCALE_ZERO_BITS, set_precision


def cap_layers(layout: KVLayout, budgets: Sequence[int], extra: tuple[Stream, ...] = ()) -> KVLayout:
    """Cap each owning layer's streams (and span) at its budget; add per-layer bookkeeping streams
    (sized to the same cap)."""
    out = []
    owners = [layer for layer in layout.layers if layer.owns_kv]
    if len(budgets) != len(owners):
        raise ValueError("one budget per owning layer")
    budget_of = {layer.index: b for layer, b in zip(owners, budgets, strict=True)}
    for layer in layout.layers:
        budget = budget_of[layer.source]
        streams = tuple(replace(s, token_cap=min_cap(s.token_cap, budget)) for s in layer.streams)
        if layer.owns_kv:
            streams += tuple(replace(x, heads=layer.kv_heads, token_cap=min_cap(layer.span_cap, budget))
                             for x in extra)
        out.append(replace(layer, streams=streams, span_cap=min_cap(layer.span_cap, budget)))
    return layout.with_layers(out)


def _owner_count(layout: KVLayout) -> int:
    return sum(1 for layer in layout.layers if layer.owns_kv)


def pyramid_budgets(n_layers: int, mean_budget: int, beta: float) -> list[int]:
    """PyramidKV (arXiv 2406.02069, section 3.3): budgets fall linearly with depth, the top layer
    holding mean/beta and the bottom layer 2*mean - mean/beta, so the mean stays ``mean_budget``."""
    if n_layers == 1:
        return [mean_budget]
    top = mean_budget / beta
    bottom = 2 * mean_budget - top
    return [max(1, round(bottom - (bottom - top) * i / (n_layers - 1))) for i in range(n_layers)]


def _uniform(layout: KVLayout, p: Params, extra: tuple[Stream, ...] = ()) -> KVLayout:
    return cap_layers(layout, [int(p["budget"])] * _owner_count(layout), extra)


def _snapkv(layout: KVLayout, p: Params) -> KVLayout:
    # SnapKV (arXiv 2404.14469): one selection at the end of prefill from the last `window` queries
    # (which are kept within the budget); decode then reads only the budget.
    if int(p["window"]) > int(p["budget"]):
        raise KvsimError("observation window must fit in the budget", field="method.snapkv.window",
                         value=p["window"])
    return _uniform(layout, p).with_runtime(prefill_scoring_window=int(p["window"]))


def _h2o(layout: KVLayout, p: Params) -> KVLayout:
    # H2O (arXiv 2306.14048): heavy hitters + recent tokens; every step accumulates attention
    # probabilities into a per-token, per-head score (fp32, counted as a stream).
    score = Stream("score", 1, 1, 4.0)
    return _uniform(layout, p, (score,)).with_runtime(per_step_scoring=True, prefill_scores_all_queries=True)


def _streaming(layout: KVLayout, p: Params) -> KVLayout:
    # StreamingLLM (arXiv 2309.17453): attention sinks + a recent window, constant size.
    return cap_layers(layout, [int(p["sinks"]) + int(p["window"])] * _owner_count(layout))


def _pyramid(layout: KVLayout, p: Params) -> KVLayout:
    budgets = pyramid_budgets(_owner_count(layout), int(p["budget"]), float(p["beta"]))
    return cap_layers(layout, budgets).with_runtime(prefill_scoring_window=int(p["window"]))


def _depth_budgets(n: int, mean_budget: int, min_ratio: float) -> list[int]:
    """A global budget split by per-layer sensitivity. Without a model's measured sensitivity
    profile we use DepthKV's qualitative finding that early layers are the most sensitive
    (arXiv 2604.24647): weights fall linearly from 1 to ``min_ratio`` and are renormalised to the
    mean (inferred; pass a measured profile through a custom method to do better)."""
    weights = [1 - (1 - min_ratio) * i / max(1, n - 1) for i in range(n)]
    scale = mean_budget * n / sum(weights)
    return [max(1, round(w * scale)) for w in weights]


def _depthkv(layout: KVLayout, p: Params) -> KVLayout:
    budgets = _depth_budgets(_owner_count(layout), int(p["budget"]), float(p["min_ratio"]))
    return cap_layers(layout, budgets).with_runtime(prefill_scoring_window=int(p["window"]))


def _xkv(layout: KVLayout, p: Params) -> KVLayout:
    # XKV (arXiv 2412.05896): per-layer budgets from an optimisation over a short profiling
    # "mini-prefill"; modelled as the sensitivity split above plus that extra prefill pass fraction.
    budgets = _depth_budgets(_owner_count(layout), int(p["budget"]), float(p["min_ratio"]))
    passes = layout.runtime.prefill_passes + float(p["profile_fraction"])
    return cap_layers(layout, budgets).with_runtime(prefill_passes=passes, prefill_scoring_window=32)


def _keepkv(layout: KVLayout, p: Params) -> KVLayout:
    # KeepKV (arXiv 2504.09936): evicted tokens are merged into kept ones; each kept entry carries
    # a vote count and an accumulated score (fp16 each: 4 bytes per head per token, inferred).
    merge_state = Stream("merge_state", 1, 2, 2.0)
    head_dim = max(layer.qk_dim for layer in layout.layers)
    return (_uniform(layout, p, (merge_state,))
            .with_runtime(per_step_scoring=True, prefill_scores_all_queries=True,
                          merge_ops_per_token=4.0 * head_dim))


def _minikv(layout: KVLayout, p: Params) -> KVLayout:
    # MiniKV (arXiv 2411.18077): pyramid heavy+recent selection, then 2-bit KIVI-style quantization
    # with group 16 and a 128-token fp16 residual.
    budgets = pyramid_budgets(_owner_count(layout), int(p["budget"]), 20.0)
    q = Quant(float(p["bits"]), int(p["group"]), FP16_SCALE_ZERO_BITS, int(p["residual"]))
    return set_precision(cap_layers(layout, budgets), q, q).with_runtime(prefill_scoring_window=32)


def _lightkv(layout: KVLayout, p: Params) -> KVLayout:
    # LightKV (arXiv 2605.00789): vision tokens are merged during prefill, keeping a fraction.
    if layout.model.vision is None:
        raise KvsimError(f"{layout.model.name} has no vision tower, so there are no image tokens to merge",
                         field="method.lightkv", value=layout.model.name)
    return layout.with_runtime(image_token_keep=float(p["keep"]))


_BUDGET = Param("budget", int, None, minimum=1, doc="tokens kept per layer")
_WINDOW = Param("window", int, 32, minimum=1, doc="observation window of queries scored at prefill end")

METHODS = (
    Method("snapkv", Stage.EVICTION, "SnapKV: keep the budget chosen once from an observation window",
           "arXiv 2404.14469", (_BUDGET, _WINDOW), _snapkv, "snapkv:budget=2048", True),
    Method("h2o", Stage.EVICTION, "H2O: heavy hitters + recent tokens, scored every decode step",
           "arXiv 2306.14048", (_BUDGET,), _h2o, "h2o:budget=1024", True),
    Method("streamingllm", Stage.EVICTION, "StreamingLLM: attention sinks + recent window (constant size)",
           "arXiv 2309.17453",
           (Param("sinks", int, 4, minimum=0, doc="sink tokens"),
            Param("window", int, None, minimum=1, doc="recent tokens kept")),
           _streaming, "streamingllm:sinks=4,window=2044", True),
    Method("pyramidkv", Stage.EVICTION, "PyramidKV: budgets that shrink with depth, same mean",
           "arXiv 2406.02069",
           (_BUDGET, Param("beta", float, 20.0, minimum=1, doc="top-layer budget = budget/beta"), _WINDOW),
           _pyramid, "pyramidkv:budget=1024", True),
    Method("depthkv", Stage.EVICTION, "DepthKV: a global budget split across layers by sensitivity",
           "arXiv 2604.24647",
           (_BUDGET, Param("min_ratio", float, 0.25, minimum=0.01, maximum=1,
                           doc="last layer's share relative to the first"), _WINDOW),
           _depthkv, "depthkv:budget=1024", True,
           "pyramidkv:beta=(1 + 1/min_ratio)/2, the same linear budgets (DepthKV's measured per-layer "
           "sensitivities are not modelled)"),
    Method("xkv", Stage.EVICTION, "XKV: personalised per-layer budgets from a profiling mini-prefill",
           "arXiv 2412.05896",
           (_BUDGET, Param("min_ratio", float, 0.25, minimum=0.01, maximum=1, doc="budget spread"),
            Param("profile_fraction", float, 0.1, minimum=0, maximum=1,
                  doc="extra prefill work of the profiling pass")),
           _xkv, "xkv:budget=1024", True,
           "depthkv plus a profile_fraction prefill pass (XKV's per-layer budget optimisation is not modelled)"),
    Method("keepkv", Stage.EVICTION, "KeepKV: budget with merging (vote counts) instead of dropping",
           "arXiv 2504.09936", (_BUDGET,), _keepkv, "keepkv:budget=1024", True),
    Method("minikv", Stage.EVICTION, "MiniKV: pyramid selection + 2-bit KIVI-style quantization",
           "arXiv 2411.18077",
           (_BUDGET, Param("bits", int, 2, minimum=1, maximum=8, doc="bits"),
            Param("group", int, 16, minimum=1, doc="group size"),
            Param("residual", int, 128, minimum=0, doc="recent tokens in fp16")),
           _minikv, "minikv:budget=1024", True),
    Method("lightkv", Stage.EVICTION, "LightKV: merge vision tokens at prefill, keep a fraction",
           "arXiv 2605.00789",
           (Param("keep", float, 0.55, minimum=0.01, maximum=1, doc="fraction of vision tokens kept"),),
           _lightkv, "lightkv:keep=0.55", True),
)

