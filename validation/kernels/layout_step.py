"""A multi-layer decode-attention step driven by kvsim's own KV layout of a method.

kvsim's layout says, per layer, which layer's cache it attends over (cross-layer sharing: CLA,
MLKV, LCKV, YOCO, xlayer), with how many KV heads and which head dims, and how many tokens it may
attend (sliding windows, per-layer eviction budgets: PyramidKV, DepthKV, XKV, SnapKV). The step
allocates one cache per owning layer and launches the decode kernel once per layer over the most
recent tokens it may attend, so the bytes it reads are exactly those the cost model counts
(``_build_decode_terms``: each layer reads its source's streams, capped).

``plan`` needs only kvsim (pure Python: numpy, pyyaml, pydantic) and is tested on the CPU."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerRead:
    layer: int
    source: int
    kv_heads: int
    qk_dim: int
    vo_dim: int
    tokens: int  # tokens this layer attends at context S


def synthetic_model(layers: int, q_heads: int, kv_heads: int, head_dim: int):
    """A dense model with the attention shape of the kernel benchmark (kvsim ModelSpec)."""
    from kvsim.spec.model import model_from_dict

    return model_from_dict({
        "name": f"attn-{layers}x{q_heads}-{kv_heads}-{head_dim}", "dtype": "bfloat16",
        "hidden_size": q_heads * head_dim, "vocab_size": 1, "tie_word_embeddings": True,
        "max_position_embeddings": 1 << 20, "source": {"config": "synthetic", "hf_repo": "none"},
        "attention": {"num_heads": q_heads, "num_kv_heads": kv_heads, "head_dim": head_dim, "v_head_dim": head_dim},
        "mlp": {"intermediate_size": 1}, "layers": [{"repeat": layers, "pattern": ["full"]}]})


def plan(spec: str, layers: int, q_heads: int, kv_heads: int, head_dim: int, context: int) -> list[LayerRead]:
    from kvsim.kv import layout_for

    layout = layout_for(synthetic_model(layers, q_heads, kv_heads, head_dim), spec)
    owners = {layer.index: layer for layer in layout.layers}
    out = []
    for layer in layout.layers:
        src = owners[layer.source]
        caps = [c for c in (layer.span_cap, layer.read_cap) + tuple(s.token_cap for s in src.streams) if c is not None]
        k = next(s for s in src.streams if s.part.startswith("k"))  # k, or LoRC's k_lowrank
        v = next(s for s in src.streams if s.part.startswith("v"))
        out.append(LayerRead(layer.index, layer.source, k.heads, k.dim, v.dim, min([context] + caps)))
    return out


def bytes_read(reads: list[LayerRead], batch: int, elem_bytes: int = 2) -> int:
    return sum(batch * r.kv_heads * r.tokens * (r.qk_dim + r.vo_dim) * elem_bytes for r in reads)


class LayoutStep:
    """Caches and queries for one plan; ``__call__`` runs the step (one decode kernel per layer)."""

    def __init__(self, reads: list[LayerRead], batch: int, q_heads: int, context: int, cfg=None):
        import torch

        self.reads = reads
        wide = max(max(r.qk_dim, r.vo_dim) for r in reads) > 128  # LoRC latents: smaller tiles fit SMEM
        self.cfg = cfg or (dict(BLOCK_N=32, num_warps=8, num_stages=2) if wide else None)
        d = dict(device="cuda", dtype=torch.bfloat16)
        self.k, self.v = {}, {}
        for r in reads:
            if r.source == r.layer:  # an owner stores what its readers need: its longest read
                n = max(x.tokens for x in reads if x.source == r.layer)
                self.k[r.layer] = torch.randn(batch, r.kv_heads, n, r.qk_dim, **d)
                self.v[r.layer] = torch.randn(batch, r.kv_heads, n, r.vo_dim, **d)
        self.q = [torch.randn(batch, q_heads, r.qk_dim, **d) for r in reads]

    def kv(self, r: LayerRead):
        k, v = self.k[r.source], self.v[r.source]
        return k[:, :, k.shape[2] - r.tokens:], v[:, :, v.shape[2] - r.tokens:]

    def __call__(self, outs=None):
        from validation.kernels import triton_decode as td

        last = None
        for i, r in enumerate(self.reads):
            k, v = self.kv(r)
            last = td.decode_attention(self.q[i], k, v, cfg=self.cfg, out=None if outs is None else outs[i])
        return last
