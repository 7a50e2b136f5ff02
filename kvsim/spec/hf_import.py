"""Turn a HuggingFace ``config.json`` into kvsim's model YAML mapping.

Each architecture family stores layer kinds differently; the rules here follow the HF
``transformers`` modelling code for that family (cited beside each rule). The result is a plain
mapping in the ``models/*.yaml`` schema, validated by ``kvsim.spec.model.model_from_dict``.
"""

from __future__ import annotations

from kvsim.errors import KvsimError

# vLLM serves float32 checkpoints in 16 bits (vllm/config.py `_get_and_verify_dtype`: "Following
# common practice, we use float16 for float32 models", bfloat16 for Gemma-2/3).
_SERVING_DTYPE = {"float32": "bfloat16", "bfloat16": "bfloat16", "float16": "float16"}

# Architectures whose config omits tie_word_embeddings but whose HF config class defaults it to True.
_TIED_BY_DEFAULT = {"gemma2", "gemma3n_text", "gemma3n"}


def _need(cfg: dict, key: str, file: str) -> object:
    if key not in cfg or cfg[key] is None:
        raise KvsimError("missing from config.json", field=key, value=None, file=file)
    return cfg[key]


def _layer_tokens(cfg: dict, mtype: str, n: int, moe_layers: list[bool]) -> list[str]:
    """Per-layer pattern tokens (attention kind, MoE flag, shared-KV source)."""
    window = cfg.get("sliding_window")
    if mtype in ("deepseek_v2", "deepseek_v3", "kimi_k2"):
        kinds = ["mla"] * n
    elif "layer_types" in cfg:  # gpt-oss, gemma-3n: explicit per-layer list
        kinds = ["full" if t == "full_attention" else f"sliding:{window}" for t in cfg["layer_types"]]
    elif mtype == "gemma2":  # modeling_gemma2: layer_idx % 2 == 0 is sliding
        kinds = [f"sliding:{window}" if i % 2 == 0 else "full" for i in range(n)]
    elif mtype == "llama4_text":  # modeling_llama4: every 4th layer is global NoPE, the rest chunked
        chunk = cfg["attention_chunk_size"]
        kinds = ["full" if (i + 1) % 4 == 0 else f"chunked:{chunk}" for i in range(n)]
    elif window and cfg.get("use_sliding_window", True):  # mistral, phi3
        kinds = [f"sliding:{window}"] * n
    else:
        kinds = ["full"] * n
    tokens = [k + (" moe" if moe else "") for k, moe in zip(kinds, moe_layers, strict=True)]
    shared = cfg.get("num_kv_shared_layers", 0)
    if shared:  # modeling_gemma3n: a shared layer reads the last earlier owner of its own kind
        first = n - shared
        for i in range(first, n):
            src = max(j for j in range(first) if kinds[j] == kinds[i])
            tokens[i] += f" kv={src}"
    return tokens


def _moe(cfg: dict, mtype: str, n: int) -> tuple[dict | None, list[bool]]:
    experts = cfg.get("n_routed_experts") or cfg.get("num_local_experts") or cfg.get("num_experts")
    if not experts:
        return None, [False] * n
    top_k = cfg.get("num_experts_per_tok") or cfg.get("experts_per_token")
    if mtype in ("deepseek_v2", "deepseek_v3", "kimi_k2"):
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
    return ({"num_experts": experts, "top_k": top_k, "expert_intermediate_size": size},
            [True] * n)


def _weight_quant(cfg: dict) -> dict | None:
    q = cfg.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") == "mxfp4":
        # OCP MX spec v1.0: 4-bit E2M1 elements + one 8-bit E8M0 scale per 32 -> 4.25 bits.
        return {"modules": "experts", "bits_per_weight": 4.25,
                "source": "quantization_config mxfp4 (OCP Microscaling spec v1.0)"}
    if q.get("quant_method") == "fp8":
        rows, cols = q.get("weight_block_size", [128, 128])
        # 8-bit weights plus one fp32 scale per weight block.
        return {"modules": "linear", "bits_per_weight": 8 + 32 / (rows * cols),
                "source": f"quantization_config fp8 blocks {rows}x{cols}"}
    return None


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
    n = int(_need(cfg, "num_hidden_layers", config_file))
    heads = int(_need(cfg, "num_attention_heads", config_file))
    hidden = int(_need(cfg, "hidden_size", config_file))
    moe, moe_layers = _moe(cfg, mtype, n)
    attention: dict = {"num_heads": heads, "num_kv_heads": cfg.get("num_key_value_heads") or heads}
    if mtype in ("deepseek_v2", "deepseek_v3", "kimi_k2"):
        attention["head_dim"] = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
        attention["v_head_dim"] = cfg["v_head_dim"]
        attention["mla"] = {k: cfg[k] for k in ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim",
                                                "qk_rope_head_dim", "v_head_dim")}
    else:
        head_dim = cfg.get("head_dim") or hidden // heads
        attention["head_dim"] = attention["v_head_dim"] = head_dim
    attention["bias"] = bool(cfg.get("attention_bias", mtype == "qwen2"))
    dtype = cfg.get("torch_dtype") or full.get("torch_dtype") or "bfloat16"
    tied = cfg.get("tie_word_embeddings", full.get("tie_word_embeddings", mtype in _TIED_BY_DEFAULT))
    # Gemma3nTextConfig default vocab (the partial config omits it).
    vocab = cfg.get("vocab_size") or (262400 if mtype.startswith("gemma3n") else None)
    if vocab is None:
        raise KvsimError("missing from config.json", field="vocab_size", value=None, file=config_file)
    out = {
        "name": name,
        "source": {"config": config_file, "hf_repo": hf_repo},
        "dtype": _SERVING_DTYPE.get(dtype, "bfloat16"),
        "hidden_size": hidden,
        "vocab_size": int(vocab),
        "tie_word_embeddings": bool(tied),
        "max_position_embeddings": int(cfg.get("max_position_embeddings", 4096)),
        "attention": attention,
        "mlp": {"intermediate_size": int(cfg.get("intermediate_size_mlp") or cfg["intermediate_size"]),
                "gated": True},
        "layers": [{"repeat": 1, "pattern": _layer_tokens(cfg, mtype, n, moe_layers)}],
    }
    if moe:
        out["moe"] = moe
    if (wq := _weight_quant(full)) is not None:
        out["weight_quantization"] = wq
    if (vision := _vision(full)) is not None:
        out["vision"] = vision
    return out
