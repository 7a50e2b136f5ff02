"""Model architectures: the frozen ``ModelSpec`` and its strict YAML catalogue (``models/``).

A model is described layer by layer, because the unit of KV memory is the layer, not the model:
Gemma-2 alternates sliding-window and global layers, gpt-oss alternates 128-token windows with
full attention, Llama-4 uses chunked attention on three of every four layers, Gemma-3n's last
layers read the KV of earlier ones, and DeepSeek caches one MLA latent per layer.

YAML layer patterns are compact strings, repeated ``repeat`` times:

    full | sliding:N | chunked:N | mla     attention kind (N = window or chunk in tokens)
    state                                 linear attention or state-space mixer: a fixed
                                          per-sequence state (``state`` section), no per-token KV
    none                                  no token mixer (an MLP-only block, Nemotron-H)
    ... moe                               the layer's MLP is the mixture of experts
    ... nomlp                             the layer has no MLP (a mixer-only block, Nemotron-H)
    ... kv=J                              the layer owns no KV and attends over layer J's

e.g. ``layers: [{repeat: 21, pattern: ["sliding:4096", "full"]}]`` for Gemma-2-9B.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvsim.errors import KvsimError, schema_error, unknown_name
from kvsim.fileio import read_yaml_file

AttentionKind = Literal["full", "sliding", "chunked", "mla", "state", "none"]

# Bytes per element of the dtypes a checkpoint can be served in.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2 arXiv 2405.04434, section 2.1)."""

    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    index_head_dim: int | None  # DeepSeek-V3.2 sparse attention: the lightning indexer's key dim


@dataclass(frozen=True)
class AttentionSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int  # query/key head dim (MLA: nope + rope)
    v_head_dim: int
    bias: bool
    mla: MLASpec | None
    # RMSNorm of the queries and keys over all heads at once (MiniMax-M2: HF use_qk_norm with
    # qk_norm_type "per_layer"), not per head as Qwen3's: under tensor parallelism each rank holds a
    # slice of the heads, so vLLM all-reduces every token's sums of squares before normalizing
    # (MiniMaxText01RMSNormTP, vllm/model_executor/layers/mamba/linear_attn.py)
    qk_norm_across_heads: bool = False


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    num_shared_experts: int
    shared_intermediate_size: int
    # the router's weights held and run in fp32 (vLLM's MiniMax-M2: ReplicatedLinear(params_dtype=
    # torch.float32) on hidden states cast to fp32, vllm/model_executor/models/minimax_m2.py), else in
    # the model's dtype
    router_fp32: bool = False


@dataclass(frozen=True)
class StateSpec:
    """The per-sequence state of one linear-attention or state-space layer (its size does not grow
    with the sequence): a short convolution window and the recurrent state."""

    kind: Literal["mamba", "mamba2", "gated_deltanet"]
    heads: int  # heads the state is split along under tensor parallelism
    conv_elements: int  # convolution state elements, all heads
    recurrent_elements: int  # SSM / delta-rule state elements, all heads
    recurrent_dtype: str  # the recurrent state's dtype (the convolution state uses the model's)
    in_proj: int  # output features of the mixer's input projection
    out_proj: int  # input features of the mixer's output projection


@dataclass(frozen=True)
class LayerSpec:
    index: int
    attention: AttentionKind
    window_tokens: int | None  # sliding window or attention chunk; None for full and MLA
    kv_source: int  # the layer whose KV this layer attends over (itself when it owns KV)
    moe: bool
    mlp: bool = True  # False: a mixer-only block with no MLP

    @property
    def owns_kv(self) -> bool:
        return self.kv_source == self.index


WeightPrecision = Literal["fp8", "int8", "int4", "mxfp4", "nvfp4"]
QuantModules = Literal["experts", "mlp", "linear"]


@dataclass(frozen=True)
class WeightQuantSpec:
    """Weight quantization (a checkpoint's ``quantization_config`` or a ``weights:`` choice; kvsim/spec/quant.py).

    ``modules``: which linears are quantized: routed ``experts`` only (vLLM's MXFP4 MoE method), every
    ``mlp`` (dense MLP, routed and shared experts), or every ``linear`` layer. Embeddings, the LM head,
    routers and norms stay in the model dtype in every case."""

    modules: QuantModules
    bits_per_weight: float  # storage bits per weight, scales and zero points included
    precision: WeightPrecision
    weight_only: bool = False  # W8A16 / W4A16: dequantized to the activation dtype inside the GEMM
    needs_native_fp8: bool = False  # the method has no weight-only fallback (ModelOpt FP8: compute capability 8.9)
    # FP8 with 128x128 weight blocks and 1x128 activation groups (DeepSeek-V3, Qwen3-FP8), not per-tensor scales:
    # vLLM's fused-MoE kernel applies the scales at every K step (its routed experts price on their own curve)
    block_scaled: bool = False
    # the checkpoint's quantization_config.quant_method ("" for a ``weights:`` choice): which of
    # vLLM's kernels its 4-bit weights run in (kvsim.spec.quant.weight_kernel)
    method: str = ""
    # the checkpoint carries a quantization_config (vLLM's ModelConfig.is_quantized), as opposed to
    # a bf16 checkpoint quantized when it loads (a ``weights:`` choice)
    from_checkpoint: bool = True


@dataclass(frozen=True)
class VisionSpec:
    """Vision tower of a VLM: parameters and the KV tokens one image becomes."""

    params: int
    image_tokens: int


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    dtype: str  # serving dtype of weights and (by default) KV
    hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    attention: AttentionSpec
    intermediate_size: int  # dense MLP
    mlp_gated: bool
    moe: MoESpec | None
    layers: tuple[LayerSpec, ...]
    weight_quant: WeightQuantSpec | None
    vision: VisionSpec | None
    state: StateSpec | None = None
    architecture: str | None = None  # the HF model class (config.json "architectures"); None: not given

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def attention_layers(self) -> int:
        """Layers that run attention over tokens (neither a recurrent state nor no mixer)."""
        return sum(1 for layer in self.layers if layer.attention not in ("state", "none"))

    @property
    def moe_layers(self) -> int:
        """Layers whose MLP is routed experts."""
        return sum(1 for layer in self.layers if layer.moe)

    @property
    def kv_layers(self) -> tuple[LayerSpec, ...]:
        """Layers that own a KV cache."""
        return tuple(layer for layer in self.layers if layer.owns_kv)


# ---------------------------------------------------------------- YAML schema (strict)

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _MLA(_Strict):
    kv_lora_rank: int = Field(gt=0)
    q_lora_rank: int | None = Field(default=None, gt=0)
    qk_nope_head_dim: int = Field(gt=0)
    qk_rope_head_dim: int = Field(gt=0)
    v_head_dim: int = Field(gt=0)
    index_head_dim: int | None = Field(default=None, gt=0)


class _Attention(_Strict):
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    v_head_dim: int = Field(gt=0)
    bias: bool = False
    mla: _MLA | None = None
    qk_norm_across_heads: bool = False


class _MLP(_Strict):
    intermediate_size: int = Field(gt=0)
    gated: bool = True


class _MoE(_Strict):
    num_experts: int = Field(gt=0)
    top_k: int = Field(gt=0)
    expert_intermediate_size: int = Field(gt=0)
    num_shared_experts: int = Field(default=0, ge=0)
    shared_intermediate_size: int = Field(default=0, ge=0)
    router_fp32: bool = False


class _LayerGroup(_Strict):
    repeat: int = Field(default=1, gt=0)
    pattern: list[str] = Field(min_length=1)


class _WeightQuant(_Strict):
    modules: Literal["experts", "mlp", "linear"]
    bits_per_weight: float = Field(gt=0, le=32)
    precision: Literal["fp8", "int8", "int4", "mxfp4", "nvfp4"]
    weight_only: bool = False
    needs_native_fp8: bool = False
    block_scaled: bool = False
    method: Literal["", "fp8", "modelopt", "compressed-tensors", "awq", "gptq", "bitsandbytes", "mxfp4"] = ""
    source: str


class _Vision(_Strict):
    params: int = Field(gt=0)
    image_tokens: int = Field(gt=0)
    source: str


class _State(_Strict):
    kind: Literal["mamba", "mamba2", "gated_deltanet"]
    heads: int = Field(gt=0)
    conv_elements: int = Field(gt=0)
    recurrent_elements: int = Field(gt=0)
    recurrent_dtype: Literal["float32", "bfloat16", "float16"]
    in_proj: int = Field(gt=0)
    out_proj: int = Field(gt=0)
    source: str


class _Source(_Strict):
    config: str
    hf_repo: str
    note: str = ""


class _ModelFile(_Strict):
    name: str
    source: _Source
    architecture: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"]
    hidden_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    tie_word_embeddings: bool
    max_position_embeddings: int = Field(gt=0)
    attention: _Attention
    mlp: _MLP
    moe: _MoE | None = None
    layers: list[_LayerGroup] = Field(min_length=1)
    weight_quantization: _WeightQuant | None = None
    vision: _Vision | None = None
    state: _State | None = None


def _parse_layer(token: str, index: int, file: str | None) -> LayerSpec:
    """Parse one pattern token such as ``sliding:4096 moe`` or ``full kv=19``."""
    words = token.split()
    kind, _, window = words[0].partition(":")
    field = f"layers[{index}]"
    if kind not in ("full", "sliding", "chunked", "mla", "state", "none"):
        raise KvsimError("attention kind must be full, sliding:N, chunked:N, mla, state or none",
                         field=field, value=token, file=file)
    window_tokens = None
    if kind in ("sliding", "chunked"):
        if not window.isdigit() or int(window) <= 0:
            raise KvsimError(f"{kind} needs a positive token count, e.g. {kind}:4096",
                             field=field, value=token, file=file)
        window_tokens = int(window)
    elif window:
        raise KvsimError(f"{kind} takes no window", field=field, value=token, file=file)
    moe, mlp, source = False, True, index
    for word in words[1:]:
        if word == "moe":
            moe = True
        elif word == "nomlp":
            mlp = False
        elif word.startswith("kv=") and word[3:].isdigit():
            source = int(word[3:])
        else:
            raise KvsimError("layer options are 'moe', 'nomlp' and 'kv=J'", field=field, value=token, file=file)
    if source != index and kind in ("state", "none"):
        raise KvsimError(f"a {kind} layer has no KV to share", field=field, value=token, file=file)
    return LayerSpec(index, cast(AttentionKind, kind), window_tokens, source, moe, mlp)  # kind checked above


def _expand_layers(groups: list[_LayerGroup], file: str | None) -> tuple[LayerSpec, ...]:
    tokens = [tok for g in groups for _ in range(g.repeat) for tok in g.pattern]
    layers = tuple(_parse_layer(tok, i, file) for i, tok in enumerate(tokens))
    for layer in layers:
        src = layer.kv_source
        if src != layer.index and not (0 <= src < layer.index and layers[src].owns_kv):
            raise KvsimError("a layer can only read the KV of an earlier layer that owns KV",
                             field=f"layers[{layer.index}].kv", value=src, file=file)
        if src != layer.index and layers[src].attention != layer.attention:
            raise KvsimError("shared KV must come from a layer of the same attention kind",
                             field=f"layers[{layer.index}].kv", value=src, file=file)
    return layers


def model_from_dict(data: dict, file: str | None = None) -> ModelSpec:
    """Validate a model YAML mapping (strict: unknown keys are errors) into a ModelSpec."""
    try:
        m = _ModelFile.model_validate(data)
    except ValidationError as err:
        raise schema_error(err, file, what="a model YAML: see models/*.yaml") from None
    a = m.attention
    if a.num_heads % a.num_kv_heads:
        raise KvsimError(f"num_heads={a.num_heads} is not a multiple of num_kv_heads",
                         field="attention.num_kv_heads", value=a.num_kv_heads, file=file)
    layers = _expand_layers(m.layers, file)
    if any(layer.attention == "mla" for layer in layers) and a.mla is None:
        raise KvsimError("mla layers need attention.mla", field="attention.mla", value=None, file=file)
    if any(layer.moe for layer in layers) and m.moe is None:
        raise KvsimError("moe layers need a moe section", field="moe", value=None, file=file)
    if any(layer.attention == "state" for layer in layers) and m.state is None:
        raise KvsimError("state layers need a state section", field="state", value=None, file=file)
    if m.state and (m.state.conv_elements % m.state.heads or m.state.recurrent_elements % m.state.heads):
        raise KvsimError("state elements must divide evenly over state.heads", field="state.heads",
                         value=m.state.heads, file=file)
    mla = MLASpec(**a.mla.model_dump()) if a.mla else None
    return ModelSpec(
        name=m.name,
        source=f"{m.source.hf_repo} ({m.source.config})",
        dtype=m.dtype,
        hidden_size=m.hidden_size,
        vocab_size=m.vocab_size,
        tie_word_embeddings=m.tie_word_embeddings,
        max_position_embeddings=m.max_position_embeddings,
        attention=AttentionSpec(a.num_heads, a.num_kv_heads, a.head_dim, a.v_head_dim, a.bias, mla,
                                a.qk_norm_across_heads),
        intermediate_size=m.mlp.intermediate_size,
        mlp_gated=m.mlp.gated,
        moe=MoESpec(**m.moe.model_dump()) if m.moe else None,
        layers=layers,
        weight_quant=(WeightQuantSpec(**m.weight_quantization.model_dump(exclude={"source"}))
                      if m.weight_quantization else None),
        vision=VisionSpec(m.vision.params, m.vision.image_tokens) if m.vision else None,
        state=StateSpec(**m.state.model_dump(exclude={"source"})) if m.state else None,
        architecture=m.architecture,
    )


# ---------------------------------------------------------------- catalogue lookup

def catalogue_dir() -> Path:
    """``models/`` of a checkout, or the copy hatchling puts inside an installed wheel."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_catalog" / "models", here.parent / "models"):
        if candidate.is_dir():
            return candidate
    raise KvsimError("model catalogue not found (expected models/ beside the kvsim package)")


def check_context(model: ModelSpec, tokens: int, field: str = "--context") -> None:
    """A context the model cannot attend over would plan a deployment that cannot exist."""
    if tokens > model.max_position_embeddings:
        raise KvsimError(f"longer than {model.name}'s maximum context of {model.max_position_embeddings:,} tokens",
                         field=field, value=tokens)


def model_names() -> list[str]:
    return sorted(p.stem for p in catalogue_dir().glob("*.yaml"))


def read_yaml(path: Path) -> dict:
    """Read a model YAML mapping with the safe loader; errors name the file."""
    return read_yaml_file(path, "a model YAML")


def load_model(name_or_path: str) -> ModelSpec:
    """A catalogue name (``llama-3-8b``), a model YAML, or any HF ``config.json``."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.name == "config.json":
        from kvsim.fileio import read_json_file
        from kvsim.spec.hf_import import model_from_hf_config

        config = read_json_file(path, "a Hugging Face config.json")
        if not isinstance(config, dict):
            raise KvsimError("expected a Hugging Face config.json: a JSON object", file=str(path))
        try:
            data = model_from_hf_config(config, name=path.stem, config_file=path.name)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
            raise KvsimError(f"not a usable Hugging Face config.json ({type(err).__name__}: {err})",
                             file=str(path)) from None
        return model_from_dict(data, file=str(path))
    if not name_or_path.strip():
        raise KvsimError("empty model name", field="model", value=name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return model_from_dict(read_yaml(path), file=str(path))
    catalogue = catalogue_dir() / f"{name_or_path}.yaml"
    if not catalogue.is_file():
        raise unknown_name("model", name_or_path, model_names(), field="model")
    return model_from_dict(read_yaml(catalogue), file=str(catalogue))
