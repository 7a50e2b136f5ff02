"""Which layers own KV, and at what width: cross-layer sharing and latent / low-rank caches.

Sharing reduces the bytes a model stores but not the bytes each layer reads: a layer that reads
another layer's cache still reads all of it every step (MLKV arXiv 2406.09297, section 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from kvsim.errors import KvsimError
from kvsim.kv.layout import KVLayout, Stream
from kvsim.kv.method import Method, Param, Params, Stage

# LCKV encodes a prompt iteratively, about 9 passes (arXiv 2405.10637; docs/kv-methods.md). The
# unified study (arXiv 2410.14442) prefills its top and middle targets with the same iterative
# encoding, so both methods default to it.
ITERATIVE_PREFILL_PASSES = 9.0
# LRKV stores 45-53% of MHA's KV cache (arXiv 2601.11471, abstract); the default rank is the one
# that gives the midpoint on the model it is applied to.
LRKV_CACHE_SHARE = 0.49


def _require_unshared(layout: KVLayout, method: str) -> None:
    if any(not layer.owns_kv for layer in layout.layers):
        raise KvsimError(f"{layout.model.name}'s layers already share KV across layers, so {method} "
                         "cannot be applied on top", field=f"method.{method}", value=layout.model.name)


def _require_uniform(layout: KVLayout, method: str) -> None:
    kinds = {(layer.kind, layer.span_cap) for layer in layout.layers}
    if len(kinds) > 1:
        raise KvsimError(f"{layout.model.name} mixes attention kinds across layers; {method} groups "
                         "contiguous layers, so it needs one kind", field=f"method.{method}",
                         value=layout.model.name)


def _require_dense_kv(layout: KVLayout, method: str) -> None:
    if any(layer.kind == "mla" for layer in layout.layers):
        raise KvsimError(f"{layout.model.name} already caches an MLA latent; {method} applies to "
                         "per-head K/V caches", field=f"method.{method}", value=layout.model.name)


def share(layout: KVLayout, owner_of: Sequence[int]) -> KVLayout:
    """Layer i attends over layer owner_of[i]'s cache; non-owners drop their streams."""
    layers = layout.layers
    out = []
    for layer, owner in zip(layers, owner_of, strict=True):
        streams = layer.streams if owner == layer.index else ()
        out.append(replace(layer, source=owner, streams=streams))
    return layout.with_layers(out)


def _groups(indices: Sequence[int], n_groups: int) -> list[list[int]]:
    """Split contiguous layers into n_groups nearly equal contiguous groups."""
    size, rest = divmod(len(indices), n_groups)
    out, start = [], 0
    for g in range(n_groups):
        end = start + size + (1 if g < rest else 0)
        out.append(list(indices[start:end]))
        start = end
    return out


def _cla(layout: KVLayout, p: Params) -> KVLayout:
    # CLA (arXiv 2405.12981): every `factor` adjacent layers share the first one's KV. Layers are
    # grouped within each attention kind, so hybrid models pair sliding with sliding.
    _require_unshared(layout, "cla")
    factor = int(p["factor"])
    owner_of = [layer.index for layer in layout.layers]
    by_kind: dict[tuple, list[int]] = {}
    for layer in layout.layers:
        by_kind.setdefault((layer.kind, layer.span_cap), []).append(layer.index)
    for indices in by_kind.values():
        for start in range(0, len(indices), factor):
            group = indices[start:start + factor]
            for i in group:
                owner_of[i] = group[0]
    return share(layout, owner_of)


def _mlkv(layout: KVLayout, p: Params) -> KVLayout:
    # MLKV (arXiv 2406.09297): m layers own KV with g KV heads each; every layer of a contiguous
    # group reads its group's owner: 2*m*g*d*e bytes per token.
    _require_unshared(layout, "mlkv")
    _require_uniform(layout, "mlkv")
    _require_dense_kv(layout, "mlkv")
    m, g = int(p["kv_layers"]), int(p["kv_heads"])
    heads = layout.model.attention.num_heads
    if m > layout.model.num_layers:
        raise KvsimError(f"more than the {layout.model.num_layers} layers of {layout.model.name}",
                         field="method.mlkv.kv_layers", value=m)
    if heads % g:
        raise KvsimError(f"must divide the {heads} query heads of {layout.model.name}", field="method.mlkv.kv_heads",
                         value=g)
    owner_of = [0] * layout.model.num_layers
    for group in _groups([layer.index for layer in layout.layers], m):
        for i in group:
            owner_of[i] = group[0]
    shared = share(layout, owner_of)
    return shared.with_layers([
        replace(layer, kv_heads=g, streams=tuple(replace(s, heads=g) for s in layer.streams))
        for layer in shared.layers])


def _lckv(layout: KVLayout, p: Params) -> KVLayout:
    # LCKV (arXiv 2405.10637): all layers attend to the top layer's KV except w warm-up layers
    # (split between bottom and top) that keep their own; about 2*max(w,1)*Hkv*d*e bytes per token.
    # The prompt is encoded iteratively (about 9 passes in the paper, see docs/kv-methods.md).
    _require_unshared(layout, "lckv")
    _require_uniform(layout, "lckv")
    n, w = layout.model.num_layers, int(p["warmup"])
    if w >= n:
        raise KvsimError(f"must be below the {n} layers of {layout.model.name}", field="method.lckv.warmup", value=w)
    bottom = w // 2
    owner_of = [i if i < bottom or i >= n - max(1, w - bottom) else n - 1 for i in range(n)]
    return share(layout, owner_of).with_runtime(prefill_passes=float(p["iterations"]))


def _yoco(layout: KVLayout, p: Params) -> KVLayout:
    # YOCO (arXiv 2405.05254): the lower half (self-decoder) uses constant-memory sliding-window
    # attention; the upper half (cross-decoder) reads one global KV made once; prefill of the
    # cross-decoder is skipped for all but the last prompt token (early exit).
    _require_unshared(layout, "yoco")
    _require_uniform(layout, "yoco")
    _require_dense_kv(layout, "yoco")
    n, window = layout.model.num_layers, int(p["window"])
    half = n // 2
    out = []
    for layer in layout.layers:
        if layer.index < half:
            streams = tuple(replace(s, token_cap=window) for s in layer.streams)
            out.append(replace(layer, kind="sliding", span_cap=window, streams=streams))
        else:
            out.append(replace(layer, source=half, streams=layer.streams if layer.index == half else ()))
    return layout.with_layers(out).with_runtime(prefill_layer_fraction=0.5)


def _xlayer(layout: KVLayout, p: Params) -> KVLayout:
    # Unified cross-layer sharing (arXiv 2410.14442): l_kv contiguous groups, the KV of each group
    # made by its bottom, middle or top layer; top and middle targets need iterative prefill.
    _require_unshared(layout, "xlayer")
    _require_uniform(layout, "xlayer")
    m, target = int(p["kv_layers"]), str(p["target"])
    if m > layout.model.num_layers:
        raise KvsimError(f"more than the {layout.model.num_layers} layers of {layout.model.name}",
                         field="method.xlayer.kv_layers",
                         value=m)
    owner_of = [0] * layout.model.num_layers
    for group in _groups([layer.index for layer in layout.layers], m):
        owner = {"bottom": group[0], "top": group[-1], "middle": group[len(group) // 2]}[target]
        for i in group:
            owner_of[i] = owner
    passes = 1.0 if target == "bottom" else float(p["iterations"])
    return share(layout, owner_of).with_runtime(prefill_passes=passes)


def _kv_latent(layout: KVLayout, p: Params) -> KVLayout:
    # KV-Latent (arXiv 2507.11273): K and V down-sampled to smaller head dims d_qk, d_vo:
    # L*Hkv*(d_qk + d_vo)*e bytes per token; attention runs over the smaller dims.
    _require_dense_kv(layout, "kv-latent")
    qk, vo = int(p["qk_dim"]), int(p["vo_dim"])
    a = layout.model.attention
    if qk > a.head_dim or vo > a.v_head_dim:
        raise KvsimError(f"latent dims must not exceed the head dims of {layout.model.name} "
                         f"({a.head_dim}, {a.v_head_dim})",
                         field="method.kv-latent", value=f"qk_dim={qk},vo_dim={vo}")
    dims = {"k": qk, "v": vo}
    return layout.with_layers([
        replace(layer, qk_dim=qk, vo_dim=vo,
                streams=tuple(replace(s, dim=dims.get(s.part, s.dim)) for s in layer.streams))
        for layer in layout.layers])


def _lrkv(layout: KVLayout, p: Params) -> KVLayout:
    # LRKV (arXiv 2601.11471): one shared full-rank K/V head per layer plus per-head rank-r
    # residuals: about 2*(d + Hkv*r)*e bytes per layer per token (inferred in docs/kv-methods.md).
    # Without a rank, the one whose cache is `share` of the model's own.
    _require_dense_kv(layout, "lrkv")
    a = layout.model.attention
    r = int(p["rank"]) or max(1, round((float(p["share"]) * a.num_kv_heads * a.head_dim - a.head_dim)
                                       / a.num_kv_heads))
    out = []
    for layer in layout.layers:
        streams: tuple[Stream, ...] = ()
        if layer.owns_kv:
            k, v = layer.streams[0], layer.streams[1]
            streams = (replace(k, part="k_shared", heads=1, split_by_tp=False),
                       replace(v, part="v_shared", heads=1, split_by_tp=False),
                       replace(k, part="k_res", dim=r), replace(v, part="v_res", dim=r))
        out.append(replace(layer, streams=streams))
    return layout.with_layers(out).with_runtime(reconstruct_rank=r)


def _lorc(layout: KVLayout, p: Params) -> KVLayout:
    # LoRC (arXiv 2410.03111): truncated SVD of W_K and W_V per layer; the cache holds rank-r
    # projections ((rK_l + rV_l)*e bytes per layer per token) and the up-projections are absorbed
    # into Q and O, so attention runs over the ranks like MLA. Progressive: shallow layers keep
    # more rank than deep ones (linear from 1.5x to 0.5x of the mean ratio; inferred).
    _require_dense_kv(layout, "lorc")
    a = layout.model.attention
    ratio, progressive = float(p["ratio"]), bool(p["progressive"])
    owners = [layer.index for layer in layout.layers if layer.owns_kv]
    full = a.num_kv_heads * a.head_dim
    out = []
    for layer in layout.layers:
        pos = owners.index(layer.source) / max(1, len(owners) - 1)
        share_l = ratio * (1.5 - pos) if progressive else ratio
        rank = max(1, min(full, round(full * share_l)))
        streams = tuple(replace(s, part=f"{s.part}_lowrank", heads=1, dim=rank, split_by_tp=False)
                        for s in layer.streams)
        # RoPE sits between the key projection and the dot product, so W_K's up-projection cannot be
        # absorbed into Q: each step rebuilds the keys (rank -> Hkv*d) and attends per head over d;
        # only the value up-projection is absorbed into O (attention sums over the rank).
        out.append(replace(layer, streams=streams, qk_dim=a.head_dim, vo_dim=rank))
    return layout.with_layers(out).with_runtime(rebuild_lowrank_keys=True)


def _mtla(layout: KVLayout, p: Params) -> KVLayout:
    # MTLA (arXiv 2505.13544): MLA's latent merged over time with stride s: about (r + dR)*L/s
    # elements per token, attention work O(T/s).
    if any(layer.kind != "mla" for layer in layout.layers):
        raise KvsimError(f"{layout.model.name} has no MLA latent cache to merge over time",
                         field="method.mtla", value=layout.model.name)
    s = int(p["stride"])
    return layout.with_layers([
        replace(layer, streams=tuple(replace(x, tokens_per_entry=s) for x in layer.streams))
        for layer in layout.layers])


METHODS = (
    Method("cla", Stage.STRUCTURE, "Cross-layer attention: adjacent layers share one KV",
           "arXiv 2405.12981", (Param("factor", int, 2, minimum=2, doc="layers per shared KV"),),
           _cla, "cla:factor=2", alias_of="xlayer:kv_layers=ceil(L/factor),target=bottom, grouped within each "
                                             "attention kind"),
    Method("mlkv", Stage.STRUCTURE, "Multi-layer KV heads: m layers own KV with g heads each",
           "arXiv 2406.09297",
           (Param("kv_layers", int, None, minimum=1, doc="layers that own KV (m)"),
            Param("kv_heads", int, None, minimum=1, doc="KV heads per owning layer (g)")),
           _mlkv, "mlkv:kv_layers=8,kv_heads=8"),
    Method("lckv", Stage.STRUCTURE, "Layer-condensed KV: layers attend to the top layer's KV",
           "arXiv 2405.10637",
           (Param("warmup", int, 2, minimum=0, doc="layers that keep their own KV"),
            Param("iterations", float, ITERATIVE_PREFILL_PASSES, minimum=1, doc="prefill passes (paper: about 9)")),
           _lckv, "lckv:warmup=2"),
    Method("yoco", Stage.STRUCTURE, "YOCO: sliding-window self-decoder + one shared global KV",
           "arXiv 2405.05254",
           (Param("window", int, 1024, minimum=1, doc="self-decoder sliding window"),), _yoco, "yoco"),
    Method("xlayer", Stage.STRUCTURE, "Unified cross-layer KV sharing with bottom/middle/top targets",
           "arXiv 2410.14442",
           (Param("kv_layers", int, None, minimum=1, doc="layers that own KV (l_kv)"),
            Param("target", str, "bottom", ("bottom", "middle", "top"), doc="which layer of a group makes KV"),
            Param("iterations", float, ITERATIVE_PREFILL_PASSES, minimum=1,
                  doc="prefill passes for middle/top targets (LCKV's iterative encoding)")),
           _xlayer, "xlayer:kv_layers=8,target=top"),
    Method("kv-latent", Stage.STRUCTURE, "KV-Latent: smaller K and V head dims",
           "arXiv 2507.11273",
           (Param("qk_dim", int, None, minimum=1, doc="key head dim"),
            Param("vo_dim", int, None, minimum=1, doc="value head dim")),
           _kv_latent, "kv-latent:qk_dim=64,vo_dim=64"),
    Method("lrkv", Stage.STRUCTURE, "LRKV: shared full-rank KV head + per-head low-rank residuals",
           "arXiv 2601.11471",
           (Param("rank", int, 0, minimum=0,
                  doc="residual rank per head (0: the rank that stores `share` of the cache)"),
            Param("share", float, LRKV_CACHE_SHARE, minimum=0.01, maximum=1,
                  doc="cache kept when rank is 0 (arXiv 2601.11471: 45-53% of MHA's)")),
           _lrkv, "lrkv"),
    Method("lorc", Stage.STRUCTURE, "LoRC: low-rank K/V projections, progressive per layer",
           "arXiv 2410.03111",
           (Param("ratio", float, 0.5, minimum=0.01, maximum=1, doc="mean kept rank / Hkv*d"),
            Param("progressive", bool, True, doc="deeper layers compressed more")),
           _lorc, "lorc:ratio=0.5"),
    Method("mtla", Stage.STRUCTURE, "MTLA: MLA latent merged over time with a stride",
           "arXiv 2505.13544", (Param("stride", int, 2, minimum=1, doc="tokens per latent entry"),),
           _mtla, "mtla:stride=2"),
)
