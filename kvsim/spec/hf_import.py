"""Turn a HuggingFace ``config.json`` into kvsim's model YAML mapping.

Each architecture family stores layer kinds differently; the rules here follow the HF
``transformers`` modelling code for that family (cited beside each rule). The result is a plain
mapping in the ``models/*.yaml`` schema, validated by ``kvsim.spec.model.model_from_dict``.
"""

from __future__ import annotations

import warnings
from typing import Any

from kvsim.errors import KvsimError
from kvsim.spec.quant import quant_from_hf

# vLLM serves float32 checkpoints in 16 bits (vllm/config.py `_get_and_verify_dtype`: "Following
# common practice, we use float16 for float32 models", bfloat16 for Gemma-2/3).
_SERVING_DTYPE = {"float32": "bfloat16", "bfloat16": "bfloat16", "float16": "float16"}

# Architectures whose config omits tie_word_embeddings but whose HF config class defaults it to True.
_TIED_BY_DEFAULT = {"gemma2", "gemma3n_text", "gemma3n"}


def _need(cfg: dict, key: str, file: str) -> Any:  # a JSON value
    if key not in cfg or cfg[key] is None:
        raise KvsimError("missing from config.json", field=key, value=None, file=file)
    return cfg[key]


# model_types whose layer rule ``_layer_kinds`` follows from the family's HF transformers code (cited
# there). A type not listed still imports (plain dense attention is the common case), with a warning
# naming the rule that was assumed.
_KNOWN_TYPES = frozenset((
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo2", "olmo3", "cohere",
    "cohere2", "granite", "granitemoe", "glm4_moe", "ministral", "ministral3", "minimax_m2", "hunyuan_v1_dense",
    "hunyuan_v1_moe", "step3p7", "gpt_oss", "gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text",
    "exaone4", "llama4_text", "deepseek_v2", "deepseek_v3", "kimi_k2", "deepseek_v32", "glm_moe_dsa", "qwen3_next",
    "qwen3_5_text", "qwen3_5_moe_text", "nemotron_h", "jamba"))
_MLA_TYPES = ("deepseek_v2", "deepseek_v3", "kimi_k2", "deepseek_v32", "glm_moe_dsa")
_LINEAR_ATTENTION_TYPES = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
_QWEN_TYPES = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe")
# Families that interleave sliding and global layers: without a per-layer field their kinds are unknown.
_SLIDING_HYBRID_TYPES = ("gemma3_text", "gemma3", "cohere2", "exaone4", "olmo3")

# Config fields describing layers kvsim cannot represent yet: importing them silently would misstate
# the KV cache, so they are errors.
_UNREAD_FIELDS = {
    "use_cla": "cross-layer attention (Hunyuan CLA)",
    "attn_type_list": "lightning/linear attention layers (MiniMax-Text-01)",
    "linear_attn_config": "Kimi delta attention layers",
    "global_head_dim": "per-kind head sizes (global layers differ)",
    "num_global_key_value_heads": "per-kind KV heads (global layers differ)",
    "swa_num_key_value_heads": "per-kind KV heads (sliding layers differ)",
    "swa_head_dim": "per-kind head sizes (sliding layers differ)",
    "attention_k_eq_v": "keys reused as values",
    "block_configs": "per-layer block configs (DeciLM / Nemotron-NAS: some layers drop attention)",
}

# HF layer_types entries (configuration_utils ALLOWED_LAYER_TYPES, granitemoehybrid "mamba"/"attention").
_LAYER_TYPES = {"full_attention": "full", "attention": "full", "sliding_attention": "sliding",
                "chunked_attention": "chunked", "linear_attention": "state", "mamba": "state"}


def _int(cfg: dict, key: str, file: str) -> int:
    return _as_int(_need(cfg, key, file), key, file)


def _as_int(value: Any, key: str, file: str) -> int:  # noqa: ANN401 - a JSON value
    """A JSON integer as it stands: 1.5 or "32" in a config.json is a mistake, not 1 or 32 layers."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise KvsimError("expected an integer", field=key, value=value, file=file)
    return value


def _from_layer_types(cfg: dict, n: int, file: str) -> list[str]:
    types = cfg["layer_types"]
    if len(types) != n:
        raise KvsimError(f"has {len(types)} entries for {n} layers", field="layer_types", value=len(types),
                         file=file)
    kinds = []
    for i, t in enumerate(types):
        if t not in _LAYER_TYPES:
            raise KvsimError(f"unknown layer type (known: {', '.join(_LAYER_TYPES)})", field=f"layer_types[{i}]",
                             value=t, file=file)
        kind = _LAYER_TYPES[t]
        if kind == "sliding":
            kind = f"sliding:{_int(cfg, 'sliding_window', file)}"
        elif kind == "chunked":
            kind = f"chunked:{_int(cfg, 'attention_chunk_size', file)}"
        kinds.append(kind)
    return kinds


def _sliding_pattern(cfg: dict, n: int, file: str) -> list[str]:
    """Gemma-3 / Cohere2 / EXAONE-4: layer i is global when (i + 1) % pattern == 0 (modeling_gemma3
    ``is_sliding``, modeling_cohere2)."""
    pattern, window = cfg["sliding_window_pattern"], _int(cfg, "sliding_window", file)
    if not isinstance(pattern, int) or pattern <= 0:
        raise KvsimError("expected a positive layer period", field="sliding_window_pattern", value=pattern, file=file)
    return [f"sliding:{window}" if (i + 1) % pattern else "full" for i in range(n)]


def _layer_kinds(cfg: dict, mtype: str, n: int, file: str) -> tuple[list[str], str]:
    """Per-layer attention kinds and the config field(s) they were read from."""
    if mtype in _MLA_TYPES:
        return ["mla"] * n, "model_type (MLA)"
    if "layer_types" in cfg:  # the per-layer list transformers now writes for every hybrid family
        return _from_layer_types(cfg, n, file), "layer_types"
    if mtype == "nemotron_h" or "hybrid_override_pattern" in cfg:  # configuration_nemotron_h: a char per block
        pattern = str(_need(cfg, "hybrid_override_pattern", file))
        kinds_of = {"M": "state nomlp", "*": "full nomlp", "-": "none", "E": "none"}
        if len(pattern) != n or set(pattern) - set(kinds_of):
            raise KvsimError(f"expected {n} characters of M, *, - and E", field="hybrid_override_pattern",
                             value=pattern, file=file)
        return [kinds_of[c] for c in pattern], "hybrid_override_pattern"
    if mtype == "jamba" or "attn_layer_period" in cfg:  # configuration_jamba: attention where i % period == offset
        period, offset = _int(cfg, "attn_layer_period", file), _int(cfg, "attn_layer_offset", file)
        return ["full" if i % period == offset else "state" for i in range(n)], "attn_layer_period/offset"
    if mtype in _LINEAR_ATTENTION_TYPES:  # configuration_qwen3_next: every interval-th layer is full
        interval = cfg.get("full_attention_interval")
        if not interval:
            raise KvsimError("cannot tell linear-attention from full-attention layers: config.json has neither "
                             "layer_types nor full_attention_interval", field="layer_types", value=None, file=file)
        return ["full" if (i + 1) % interval == 0 else "state" for i in range(n)], "full_attention_interval"
    if "sliding_window_pattern" in cfg:
        return _sliding_pattern(cfg, n, file), "sliding_window_pattern"
    if mtype in _SLIDING_HYBRID_TYPES:
        raise KvsimError(f"{mtype} mixes sliding and global layers, but config.json has neither layer_types nor "
                         "sliding_window_pattern", field="layer_types", value=None, file=file)
    if mtype == "gemma2":  # modeling_gemma2: layer_idx % 2 == 0 is sliding
        size = _int(cfg, "sliding_window", file)
        return [f"sliding:{size}" if i % 2 == 0 else "full" for i in range(n)], "gemma2 alternation"
    if "attention_chunk_size" in cfg and cfg["attention_chunk_size"]:
        # configuration_llama4: no_rope_layers[i] == 1 uses RoPE and chunked attention, 0 is a global NoPE
        # layer; absent, every no_rope_layer_interval-th (default 4) layer is NoPE.
        chunk = _int(cfg, "attention_chunk_size", file)
        interval = _as_int(cfg.get("no_rope_layer_interval", 4), "no_rope_layer_interval", file)
        rope = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
        if len(rope) != n:
            raise KvsimError(f"has {len(rope)} entries for {n} layers", field="no_rope_layers", value=len(rope),
                             file=file)
        return [f"chunked:{chunk}" if r else "full" for r in rope], "attention_chunk_size + no_rope_layers"
    window = cfg.get("sliding_window")
    if "use_sliding_window" in cfg or mtype in _QWEN_TYPES:
        # configuration_qwen2/qwen3: sliding from layer max_window_layers on, only with use_sliding_window
        # (default False)
        if not cfg.get("use_sliding_window", False) or not window:
            return ["full"] * n, "use_sliding_window false"
        first = _int(cfg, "max_window_layers", file)
        kinds = [f"sliding:{window}" if i >= first else "full" for i in range(n)]
        return kinds, "use_sliding_window + max_window_layers"
    if window:  # mistral, phi3: every layer slides
        return [f"sliding:{_as_int(window, 'sliding_window', file)}"] * n, "sliding_window on every layer"
    return ["full"] * n, "full attention on every layer"


def _check_representable(cfg: dict, file: str) -> None:
    for key, what in _UNREAD_FIELDS.items():
        if value := cfg.get(key):
            shown = value if isinstance(value, (bool, int, float, str)) else f"<{len(value)} entries>"
            raise KvsimError(f"{what} is not modelled; kvsim cannot size this model's KV cache",
                             field=key, value=shown, file=file)


# MiniMax configs' qk_norm_type (read when use_qk_norm is set): "per_layer" normalizes the queries
# (keys) of a token over all heads together, "per_head" each head alone (vLLM minimax_m2.py
# MiniMaxText01RMSNormTP; minimax_m3 qk_norm_type == "per_head"). Other families' use_qk_norm is a
# per-head norm (Llama-4: an L2 norm of each head, modeling_llama4 Llama4TextL2Norm).
_QK_NORM_TYPES = {"per_layer": True, "per_head": False}


def _qk_norm_across_heads(cfg: dict, mtype: str, file: str) -> bool:
    """Whether the config normalizes Q and K across all heads (priced apart under tensor parallelism)."""
    if not cfg.get("use_qk_norm") or not mtype.startswith("minimax"):
        return False
    kind = _need(cfg, "qk_norm_type", file)  # which of the two it is changes the price: never assumed
    if kind not in _QK_NORM_TYPES:
        raise KvsimError(f"must be one of {', '.join(_QK_NORM_TYPES)}", field="qk_norm_type", value=kind, file=file)
    return _QK_NORM_TYPES[kind]


def _layer_tokens(cfg: dict, mtype: str, n: int, moe_layers: list[bool], file: str) -> list[str]:
    """Per-layer pattern tokens (attention kind, MoE flag, shared-KV source)."""
    kinds, rule = _layer_kinds(cfg, mtype, n, file)
    if mtype not in _KNOWN_TYPES:
        counts = {k: kinds.count(k) for k in dict.fromkeys(kinds)}
        summary = ", ".join(f"{c} x {k}" for k, c in counts.items())
        warnings.warn(f"{file}: model_type {mtype!r} is not one kvsim knows; assumed its layers follow "
                      f"{rule}: {summary}", UserWarning, stacklevel=3)
    tokens = [k + (" moe" if moe else "") for k, moe in zip(kinds, moe_layers, strict=True)]
    shared = cfg.get("num_kv_shared_layers", 0)
    if shared:  # modeling_gemma3n: a shared layer reads the last earlier owner of its own kind
        first = n - shared
        for i in range(first, n):
            src = max(j for j in range(first) if kinds[j] == kinds[i])
            tokens[i] += f" kv={src}"
    return tokens


def _state(cfg: dict, mtype: str, dtype: str, file: str) -> dict:
    """Per-sequence state of a linear-attention or Mamba layer, as vLLM's ``MambaStateShapeCalculator``
    sizes it: conv state (conv_kernel - 1) x conv_dim and the recurrent state."""
    # The recurrent state's dtype as the config declares it (vLLM mamba_ssm_cache_dtype), else the model's.
    rdtype = cfg.get("mamba_ssm_cache_dtype") or cfg.get("mamba_ssm_dtype") or dtype
    h = _int(cfg, "hidden_size", file)

    def need(key: str) -> int:
        return _int(cfg, key, file)

    if mtype in _LINEAR_ATTENTION_TYPES:  # Gated DeltaNet (modeling_qwen3_next)
        kh, vh, kd, vd = (need("linear_num_key_heads"), need("linear_num_value_heads"),
                          need("linear_key_head_dim"), need("linear_value_head_dim"))
        conv_dim = 2 * kh * kd + vh * vd
        return {"kind": "gated_deltanet", "heads": vh, "conv_elements": conv_dim * (need("linear_conv_kernel_dim") - 1),
                "recurrent_elements": vh * kd * vd, "recurrent_dtype": rdtype,
                "in_proj": conv_dim + vh * vd + 2 * vh, "out_proj": vh * vd,
                "source": "Gated DeltaNet state: conv (kernel-1) x (2 key_dim + value_dim), v_heads x k_dim x v_dim"}
    if mtype == "nemotron_h":  # Mamba-2 (modeling_nemotron_h)
        heads, hd, groups, n_state = need("mamba_num_heads"), need("mamba_head_dim"), need("n_groups"), need(
            "ssm_state_size")
        inner = heads * hd
        conv_dim = inner + 2 * groups * n_state
        return {"kind": "mamba2", "heads": heads, "conv_elements": conv_dim * (need("conv_kernel") - 1),
                "recurrent_elements": heads * hd * n_state, "recurrent_dtype": rdtype,
                "in_proj": inner + conv_dim + heads, "out_proj": inner,
                "source": "Mamba-2 state: conv (kernel-1) x (d_inner + 2 groups d_state), heads x head_dim x d_state"}
    if mtype == "jamba":  # Mamba-1 (modeling_jamba): d_inner channels, each with its own state
        inner = need("mamba_expand") * h
        return {"kind": "mamba", "heads": inner, "conv_elements": inner * (need("mamba_d_conv") - 1),
                "recurrent_elements": inner * need("mamba_d_state"), "recurrent_dtype": rdtype,
                "in_proj": 2 * inner, "out_proj": inner,
                "source": "Mamba state: conv (d_conv-1) x d_inner, d_inner x d_state"}
    raise KvsimError(f"layers without attention, but no state layout is known for model_type {mtype!r}",
                     field="model_type", value=mtype, file=file)


def _moe(cfg: dict, mtype: str, n: int) -> tuple[dict | None, list[bool]]:
    experts = cfg.get("n_routed_experts") or cfg.get("num_local_experts") or cfg.get("num_experts")
    if not experts:
        return None, [False] * n
    top_k = cfg.get("num_experts_per_tok") or cfg.get("experts_per_token")
    if mtype in _MLA_TYPES:
        first_dense = cfg.get("first_k_dense_replace", 0)
        moe_layers = [i >= first_dense for i in range(n)]
        size = cfg["moe_intermediate_size"]
        shared = cfg.get("n_shared_experts") or 0
        return ({"num_experts": experts, "top_k": top_k, "expert_intermediate_size": size,
                 "num_shared_experts": shared, "shared_intermediate_size": size * shared},
                moe_layers)
    if mtype == "llama4_text":  # one shared expert of the routed experts' size (modeling_llama4)
        step = cfg.get("interleave_moe_layer_step", 1)
        size = cfg["intermediate_size"]
        return ({"num_experts": experts, "top_k": top_k, "expert_intermediate_size": size,
                 "num_shared_experts": 1, "shared_intermediate_size": size},
                [(i + 1) % step == 0 for i in range(n)])
    size = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    if mtype == "nemotron_h":  # the E blocks of hybrid_override_pattern
        layers = [c == "E" for c in cfg.get("hybrid_override_pattern") or ""]
    elif mtype == "jamba":  # configuration_jamba: experts where i % expert_layer_period == offset
        period, offset = int(cfg.get("expert_layer_period", 1)), int(cfg.get("expert_layer_offset", 0))
        layers = [i % period == offset for i in range(n)]
    else:
        layers = [True] * n
    moe = {"num_experts": experts, "top_k": top_k, "expert_intermediate_size": size}
    if mtype == "minimax_m2":  # vLLM minimax_m2.py MiniMaxM2MoE: gate = ReplicatedLinear(params_dtype=float32)
        moe["router_fp32"] = True
    return moe, layers


def _vision(full: dict) -> dict | None:
    """CLIP ViT tower + 2-layer projector of LLaVA-1.5 (modeling_clip, modeling_llava)."""
    v = full.get("vision_config")
    if not v or full.get("model_type") != "llava":
        return None
    h, inter, n_layers = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    embed = 3 * v["patch_size"] ** 2 * h + h + (patches + 1) * h + 2 * h
    per_layer = 4 * (h * h + h) + (h * inter + inter) + (inter * h + h) + 4 * h
    text_h = full["text_config"]["hidden_size"]
    projector = h * text_h + text_h + text_h * text_h + text_h
    return {"params": embed + n_layers * per_layer + projector, "image_tokens": patches,
            "source": "CLIP ViT tower and projector counted from vision_config"}


def model_from_hf_config(full: dict, *, name: str, config_file: str, hf_repo: str = "unknown") -> dict:
    """Model YAML mapping from a HF config dict (text_config is used for VLMs)."""
    cfg = full.get("text_config", full)
    mtype = cfg.get("model_type", full.get("model_type", ""))
    _check_representable(cfg, config_file)
    n = _int(cfg, "num_hidden_layers", config_file)
    heads = _int(cfg, "num_attention_heads", config_file)
    hidden = _int(cfg, "hidden_size", config_file)
    moe, moe_layers = _moe(cfg, mtype, n)
    attention: dict = {"num_heads": heads, "num_kv_heads": cfg.get("num_key_value_heads") or heads}
    if mtype in _MLA_TYPES:
        attention["head_dim"] = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
        attention["v_head_dim"] = cfg["v_head_dim"]
        attention["mla"] = {k: cfg[k] for k in ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim",
                                                "qk_rope_head_dim", "v_head_dim")}
        if cfg.get("index_head_dim"):  # DeepSeek sparse attention's lightning indexer (V3.2, GLM-5)
            attention["mla"]["index_head_dim"] = cfg["index_head_dim"]
    else:
        head_dim = cfg.get("head_dim") or cfg.get("attention_head_dim") or hidden // heads
        attention["head_dim"] = attention["v_head_dim"] = head_dim
    attention["bias"] = bool(cfg.get("attention_bias", mtype == "qwen2"))
    if _qk_norm_across_heads(cfg, mtype, config_file):
        attention["qk_norm_across_heads"] = True
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or full.get("torch_dtype") or full.get("dtype") or "bfloat16"
    tied = cfg.get("tie_word_embeddings", full.get("tie_word_embeddings", mtype in _TIED_BY_DEFAULT))
    # Gemma3nTextConfig default vocab (the partial config omits it).
    vocab = cfg.get("vocab_size") or (262400 if mtype.startswith("gemma3n") else None)
    if vocab is None:
        raise KvsimError("missing from config.json", field="vocab_size", value=None, file=config_file)
    architectures = full.get("architectures") or cfg.get("architectures")
    out: dict[str, Any] = {
        "name": name,
        "source": {"config": config_file, "hf_repo": hf_repo},
        # the HF model class; vLLM picks its model runner by it (kvsim/data/vllm_memory.yaml)
        **({"architecture": str(architectures[0])} if architectures else {}),
        "dtype": _SERVING_DTYPE.get(dtype, "bfloat16"),
        "hidden_size": hidden,
        "vocab_size": _as_int(vocab, "vocab_size", config_file),
        "tie_word_embeddings": bool(tied),
        "max_position_embeddings": _int(cfg, "max_position_embeddings", config_file),
        "attention": attention,
        "mlp": {"intermediate_size": _as_int(cfg.get("intermediate_size_mlp"), "intermediate_size_mlp", config_file)
                if cfg.get("intermediate_size_mlp") else _int(cfg, "intermediate_size", config_file),
                "gated": mtype != "nemotron_h"},  # modeling_nemotron_h NemotronHMLP: up, relu2, down
        "layers": [{"repeat": 1, "pattern": _layer_tokens(cfg, mtype, n, moe_layers, config_file)}],
    }
    if any(token.startswith("state") for token in out["layers"][0]["pattern"]):
        out["state"] = _state(cfg, mtype, out["dtype"], config_file)
    if moe:
        out["moe"] = moe
    if (wq := quant_from_hf(full, config_file)) is not None:
        out["weight_quantization"] = wq
    if (vision := _vision(full)) is not None:
        out["vision"] = vision
    return out
