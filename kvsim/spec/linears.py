"""The weight matrices of a model, per tensor-parallel rank: one source for weight bytes (memory
planner) and GEMM shapes (cost model).

Tensor-parallel splits follow vLLM's Megatron-style layers: QKV and gate/up are column-parallel,
O and down are row-parallel, embeddings and the LM head are vocabulary-parallel, norms and MLA's
latent down-projections are replicated. When a model has fewer KV heads than ranks, each rank
holds one KV head (vLLM ``QKVParallelLinear`` replicates them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from kvsim.errors import KvsimError
from kvsim.spec.model import LayerSpec, ModelSpec
from kvsim.spec.parallel import SINGLE, Parallel, expert_shard

Role = Literal["embedding", "lm_head", "attention", "mlp", "router", "experts", "shared_experts"]


@dataclass(frozen=True)
class Linear:
    """One weight matrix of one layer, as held by one TP rank."""

    name: str
    role: Role
    in_features: int
    out_features: int
    bits: float  # storage bits per weight
    experts: int = 1  # routed experts hold `experts` copies; a token uses `top_k` of them

    @property
    def params(self) -> int:
        return self.in_features * self.out_features * self.experts

    @property
    def bytes(self) -> float:
        return self.params * self.bits / 8


def check_tp(model: ModelSpec, tp: int) -> None:
    """TP must divide the query heads, and divide or be a multiple of the KV heads."""
    heads, kv = model.attention.num_heads, model.attention.num_kv_heads
    if tp <= 0:
        raise KvsimError("must be a positive integer", field="tp", value=tp)
    if heads % tp:
        raise KvsimError(f"does not divide the {heads} attention heads of {model.name}", field="tp", value=tp)
    if model.attention.mla is None and kv % tp and tp % kv:
        raise KvsimError(f"neither divides nor is a multiple of the {kv} KV heads of {model.name}",
                         field="tp", value=tp)
    # vLLM splits a dense MLP (and shared experts) evenly or refuses to load: ColumnParallelLinear takes
    # divide(output_size, tp_size), which asserts divisibility (vllm/distributed/utils.py ensure_divisibility)
    widths = [model.intermediate_size] if any(layer.mlp and not layer.moe for layer in model.layers) else []
    if model.moe is not None and model.moe.num_shared_experts:
        widths.append(model.moe.shared_intermediate_size)
    for width in widths:
        if width % tp:
            raise KvsimError(f"does not divide the {width}-wide MLP of {model.name} (vLLM splits it evenly)",
                             field="tp", value=tp)


def kv_heads_per_rank(model: ModelSpec, tp: int) -> int:
    """KV heads one rank stores: split when there are enough, else one replicated head."""
    return max(1, model.attention.num_kv_heads // tp)


def _bits(model: ModelSpec, role: Role) -> float:
    wq = model.weight_quant
    native = 8 * model.dtype_bytes
    if role == "router" and model.moe is not None and model.moe.router_fp32:
        return 32
    if wq is None or role in ("embedding", "lm_head", "router"):
        return native
    quantized = {"experts": ("experts",), "mlp": ("mlp", "experts", "shared_experts"),
                 "linear": ("attention", "mlp", "experts", "shared_experts")}[wq.modules]
    return wq.bits_per_weight if role in quantized else native


def _attention(model: ModelSpec, tp: int) -> list[Linear]:
    a, h = model.attention, model.hidden_size
    bits = _bits(model, "attention")
    heads = a.num_heads // tp
    if a.mla is not None:  # DeepSeek-V2 section 2.1: low-rank Q and joint KV compression
        m = a.mla
        q = ([Linear("q_a_proj", "attention", h, m.q_lora_rank, bits),
              Linear("q_b_proj", "attention", m.q_lora_rank, heads * a.head_dim, bits)]
             if m.q_lora_rank else [Linear("q_proj", "attention", h, heads * a.head_dim, bits)])
        return q + [
            Linear("kv_a_proj", "attention", h, m.kv_lora_rank + m.qk_rope_head_dim, bits),
            Linear("kv_b_proj", "attention", m.kv_lora_rank,
                   heads * (m.qk_nope_head_dim + m.v_head_dim), bits),
            Linear("o_proj", "attention", heads * m.v_head_dim, h, bits),
        ]
    kv = kv_heads_per_rank(model, tp)
    return [
        Linear("qkv_proj", "attention", h, heads * a.head_dim + kv * (a.head_dim + a.v_head_dim), bits),
        Linear("o_proj", "attention", heads * a.v_head_dim, h, bits),
    ]


def _mlp(model: ModelSpec, intermediate: int, role: Role, tp: int, experts: int = 1) -> list[Linear]:
    up = (2 if model.mlp_gated else 1) * intermediate // tp
    bits = _bits(model, role)
    return [Linear(f"{role}.gate_up", role, model.hidden_size, up, bits, experts),
            Linear(f"{role}.down", role, intermediate // tp, model.hidden_size, bits, experts)]


def _mixer(model: ModelSpec, layer: LayerSpec, tp: int) -> list[Linear]:
    """The token mixer's weights: attention, a state layer's in/out projections, or none."""
    if layer.attention == "none":
        return []
    if layer.attention == "state" and model.state is not None:
        st, h, bits = model.state, model.hidden_size, _bits(model, "attention")
        return [Linear("in_proj", "attention", h, st.in_proj // tp, bits),
                Linear("out_proj", "attention", st.out_proj // tp, h, bits)]
    return _attention(model, tp)


def padded_expert(lin: Linear, align: int) -> Linear:
    """A routed expert's gate/up or down matrix with its width on this rank (the intermediate size)
    rounded up to ``align``, as the engine allocates and multiplies it (kvsim.spec.quant.expert_width_align)."""
    if align <= 1 or lin.role != "experts":
        return lin
    pad = lambda n: -(-n // align) * align  # noqa: E731
    if lin.name.endswith(".gate_up"):  # gate and up side by side: twice the width
        return replace(lin, out_features=2 * pad(lin.out_features // 2))
    return replace(lin, in_features=pad(lin.in_features))


def layer_linears(model: ModelSpec, layer: LayerSpec, tp: int = 1, par: Parallel = SINGLE) -> tuple[Linear, ...]:
    """Weight matrices of one decoder layer on one rank; the routed experts as ``par`` spreads them
    (kvsim.spec.parallel.expert_shard: whole experts under expert parallelism, else TP-sharded over
    every DP x TP rank), on the GPU that holds the most."""
    out = _mixer(model, layer, tp)
    if not layer.mlp:
        return tuple(out)
    if layer.moe and model.moe is not None:
        moe = model.moe
        out.append(Linear("router", "router", model.hidden_size, moe.num_experts, _bits(model, "router")))
        held, split = expert_shard(model, tp, par)
        out += _mlp(model, moe.expert_intermediate_size, "experts", split, held)
        if moe.num_shared_experts:
            out += _mlp(model, moe.shared_intermediate_size, "shared_experts", tp)
    else:
        out += _mlp(model, model.intermediate_size, "mlp", tp)
    return tuple(out)


def head_linears(model: ModelSpec, tp: int = 1) -> tuple[Linear, ...]:
    """Embedding table and LM head (vocabulary-parallel; one table when tied)."""
    vocab = -(-model.vocab_size // tp)
    bits = _bits(model, "embedding")
    emb = Linear("embed_tokens", "embedding", vocab, model.hidden_size, bits)
    if model.tie_word_embeddings:
        return (emb,)
    return emb, Linear("lm_head", "lm_head", model.hidden_size, vocab, bits)


def norm_params(model: ModelSpec) -> int:
    """RMSNorm weights: two per layer plus the final norm (replicated on every rank)."""
    per_layer = 2 * model.hidden_size
    if model.attention.mla is not None:  # latent norms (DeepSeek-V2 kv_a_layernorm, q_a_layernorm)
        per_layer += model.attention.mla.kv_lora_rank + (model.attention.mla.q_lora_rank or 0)
    return model.num_layers * per_layer + model.hidden_size
