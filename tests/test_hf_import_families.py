"""HF config import across model families: every layer-pattern convention, checked on real configs.

Each config below is the subset of a public ``config.json`` that the importer reads, copied with its
source (repository @ commit and file, or the HF model page). Expected KV bytes per token are worked
out by hand beside each case: a layer that keeps K and V stores ``kv_heads x head_dim x 2 (K, V) x
2 bytes (bf16)`` per token; a sliding-window or chunked layer keeps ``min(ctx, window)`` tokens, so
per token of a ``ctx``-token sequence it costs that times ``min(ctx, window) / ctx``; a linear-attention
or Mamba layer keeps a fixed per-sequence state, i.e. ``state bytes / ctx`` per token.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvsim.errors import KvsimError
from kvsim.kv import layout_for
from kvsim.spec.hf_import import model_from_hf_config
from kvsim.spec.model import ModelSpec, model_from_dict

K4, K32 = 4096, 32768
AIC = "ai-dynamo/aiconfigurator@095f58a5 aic-core/src/aiconfigurator_core/model_configs"
MLC = "mlc-ai/mlc-llm@79d603f0 python/mlc_llm/model/model_preset.py"
MAXTEXT = "AI-Hypercomputer/maxtext@e591f30c src/maxtext/checkpoint_conversion/utils/hf_model_configs.py"


def load(config: dict, name: str = "m") -> ModelSpec:
    return model_from_dict(model_from_hf_config(config, name=name, config_file=f"{name}.json"))


def per_token(config: dict, ctx: int, block_size: int = 1) -> float:
    return float(layout_for(load(config)).gpu_bytes(ctx, block_size=block_size)[0]) / ctx


def kv(kv_heads: int, head_dim: int) -> int:
    """bf16 K+V bytes of one layer for one token."""
    return kv_heads * head_dim * 2 * 2


# ---------------------------------------------------------------- sliding_window_pattern (Gemma-3, Cohere2)

# MAXTEXT gemma3_27b_config (google/gemma-3-27b-it): 62 layers, 16 KV heads x 128, window 1024, pattern 6.
GEMMA3_27B = {"model_type": "gemma3", "torch_dtype": "bfloat16", "text_config": {
    "model_type": "gemma3_text", "head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504,
    "num_attention_heads": 32, "num_hidden_layers": 62, "num_key_value_heads": 16, "sliding_window": 1024,
    "sliding_window_pattern": 6, "vocab_size": 262144, "max_position_embeddings": 163840}}


def test_gemma3_27b_has_one_global_layer_in_six() -> None:
    # (i + 1) % 6 == 0 is global: layers 5, 11, ..., 59 -> 10 global, 52 sliding (issue 13: all 62 were
    # sliding, 15,872 B/token at 32k = 62 x 8192 x 1024 / 32768).
    layer = kv(16, 128)  # 8192
    assert per_token(GEMMA3_27B, K32) == 10 * layer + 52 * layer * 1024 / K32 == 95_232
    assert per_token(GEMMA3_27B, K4) == 10 * layer + 52 * layer * 1024 / K4 == 188_416
    assert [i for i, layer in enumerate(load(GEMMA3_27B).layers) if layer.attention == "full"] == list(
        range(5, 62, 6))


# MLC "gemma3_1b_it" (google/gemma-3-1b-it): 26 layers, 1 KV head x 256, window 512, pattern 6.
GEMMA3_1B = {"model_type": "gemma3_text", "head_dim": 256, "hidden_size": 1152, "intermediate_size": 6912,
             "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1, "sliding_window": 512,
             "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "vocab_size": 262144,
             "max_position_embeddings": 32768}

# google/gemma-3 family without a pattern field: the layer kinds are unknown, not guessed.
GEMMA3_NO_PATTERN = {k: v for k, v in GEMMA3_1B.items() if k != "sliding_window_pattern"}

# https://huggingface.co/CohereForAI/c4ai-command-r7b-12-2024/blob/main/config.json (fields also in
# huggingface/transformers docs/source/en/model_doc/cohere2.md: three 4096-token sliding layers, then a
# global one): 32 layers, 8 KV heads x 128.
COMMAND_R7B = {"model_type": "cohere2", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
               "num_hidden_layers": 32, "num_key_value_heads": 8, "head_dim": 128, "sliding_window": 4096,
               "sliding_window_pattern": 4, "vocab_size": 256000, "torch_dtype": "bfloat16",
               "max_position_embeddings": 132096}

# ---------------------------------------------------------------- layer_types

# AIC stepfun-ai--Step-3.7-Flash_config.json: 45 layers, full every 4th from layer 0, window 512.
STEP37 = {"model_type": "step3p7", "num_hidden_layers": 45, "hidden_size": 4096, "num_attention_heads": 64,
          "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128896, "intermediate_size": 11264,
          "sliding_window": 512, "torch_dtype": "bfloat16", "max_position_embeddings": 65536,
          "layer_types": (["full_attention"] + ["sliding_attention"] * 3) * 11 + ["full_attention"]}

# ---------------------------------------------------------------- linear attention (Gated DeltaNet)

# MAXTEXT qwen3_next_80b_a3b_dict (Qwen/Qwen3-Next-80B-A3B-Instruct): full attention every 4th layer.
QWEN3_NEXT = {"model_type": "qwen3_next", "full_attention_interval": 4, "head_dim": 256, "hidden_size": 2048,
              "intermediate_size": 5120, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
              "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_value_head_dim": 128,
              "moe_intermediate_size": 512, "num_attention_heads": 16, "num_experts": 512, "num_experts_per_tok": 10,
              "num_hidden_layers": 48, "num_key_value_heads": 2, "torch_dtype": "bfloat16", "vocab_size": 151936,
              "max_position_embeddings": 262144}
# Gated DeltaNet state of one layer: conv (4 - 1) x (2 x 16 x 128 + 32 x 128) = 24,576 elements and the
# recurrent 32 x 128 x 128 = 524,288 elements, both bf16.
QWEN3_NEXT_STATE = (3 * (2 * 16 * 128 + 32 * 128) + 32 * 128 * 128) * 2  # 1,097,728 bytes

# AIC Qwen--Qwen3.5-27B_config.json text_config: layer_types (3 linear, 1 full) x 16; the recurrent
# state declared float32 (mamba_ssm_dtype).
QWEN35_27B = {"model_type": "qwen3_5", "text_config": {
    "model_type": "qwen3_5_text", "dtype": "bfloat16", "head_dim": 256, "hidden_size": 5120,
    "intermediate_size": 17408, "num_attention_heads": 24, "num_hidden_layers": 64, "num_key_value_heads": 4,
    "vocab_size": 248320, "max_position_embeddings": 262144, "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128, "linear_num_key_heads": 16,
    "linear_num_value_heads": 48, "linear_value_head_dim": 128, "mamba_ssm_dtype": "float32",
    "full_attention_interval": 4, "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 16}}
QWEN35_STATE = 3 * (2 * 16 * 128 + 48 * 128) * 2 + 48 * 128 * 128 * 4  # conv bf16 + recurrent fp32

# ---------------------------------------------------------------- Mamba hybrids

# AIC nvidia--Nemotron-H-56B-Base-8K_config.json: one block per character, M = Mamba-2, * = attention.
NEMOTRON_H_56B = {
    "model_type": "nemotron_h", "attention_head_dim": 128, "conv_kernel": 4, "hidden_size": 8192,
    "hybrid_override_pattern": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-"
                               "M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
    "intermediate_size": 32768, "mamba_head_dim": 64, "mamba_num_heads": 256, "n_groups": 8,
    "num_attention_heads": 64, "num_hidden_layers": 118, "num_key_value_heads": 8, "ssm_state_size": 256,
    "torch_dtype": "bfloat16", "vocab_size": 131072, "max_position_embeddings": 8192}
# Mamba-2 state: conv (4 - 1) x (256 x 64 + 2 x 8 x 256) and 256 heads x 64 x 256, both bf16.
NEMOTRON_H_STATE = (3 * (256 * 64 + 2 * 8 * 256) + 256 * 64 * 256) * 2  # 8,511,488 bytes

# AIC nvidia--NVIDIA-Nemotron-3-Nano-30B-A3B-BF16_config.json: E = MoE block; state cache float32.
NEMOTRON3_NANO = {
    "model_type": "nemotron_h", "conv_kernel": 4, "head_dim": 128, "hidden_size": 2688,
    "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME", "intermediate_size": 1856,
    "mamba_head_dim": 64, "mamba_num_heads": 64, "mamba_ssm_cache_dtype": "float32", "moe_intermediate_size": 1856,
    "n_groups": 8, "n_routed_experts": 128, "num_attention_heads": 32, "num_experts_per_tok": 6,
    "num_hidden_layers": 52, "num_key_value_heads": 2, "ssm_state_size": 128, "torch_dtype": "bfloat16",
    "vocab_size": 131072, "max_position_embeddings": 262144}
NANO_STATE = 3 * (64 * 64 + 2 * 8 * 128) * 2 + 64 * 64 * 128 * 4  # conv bf16 + recurrent fp32

# https://huggingface.co/ai21labs/Jamba-v0.1/blob/main/config.json: attention where i % 8 == 4, experts
# where i % 2 == 1, Mamba elsewhere (d_inner = 2 x 4096).
JAMBA = {"model_type": "jamba", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 8, "attn_layer_offset": 4, "attn_layer_period": 8,
         "expert_layer_offset": 1, "expert_layer_period": 2, "mamba_d_conv": 4, "mamba_d_state": 16,
         "mamba_expand": 2, "num_experts": 16, "num_experts_per_tok": 2, "vocab_size": 65536,
         "torch_dtype": "bfloat16", "max_position_embeddings": 262144}
JAMBA_STATE = (3 * 8192 + 8192 * 16) * 2  # conv (4 - 1) x d_inner + d_inner x d_state, bf16

# ---------------------------------------------------------------- chunked attention + NoPE (Llama-4)

# AIC meta-llama--Llama-4-Maverick-17B-128E-Instruct_config.json: no no_rope_layers in the file, so the
# HF default applies (every 4th layer NoPE = global, the others chunked at 8192).
MAVERICK = {"model_type": "llama4", "text_config": {
    "model_type": "llama4_text", "attention_chunk_size": 8192, "head_dim": 128, "hidden_size": 5120,
    "interleave_moe_layer_step": 2, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
    "num_attention_heads": 40, "num_experts_per_tok": 1, "num_hidden_layers": 48, "num_key_value_heads": 8,
    "num_local_experts": 128, "torch_dtype": "bfloat16", "vocab_size": 202048, "max_position_embeddings": 1048576}}

# ---------------------------------------------------------------- MLA + sparse-attention indexer

# AIC deepseek-ai--DeepSeek-V3.2_config.json: MLA latent 512 + rope 64 (bf16) and the DSA indexer key
# (128 fp8 + one fp32 scale) per layer and token.
DEEPSEEK_V32 = {"model_type": "deepseek_v32", "first_k_dense_replace": 3, "hidden_size": 7168,
                "index_head_dim": 128, "index_n_heads": 64, "index_topk": 2048, "intermediate_size": 18432,
                "kv_lora_rank": 512, "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
                "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
                "num_key_value_heads": 128, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 129280,
                "max_position_embeddings": 163840}

# AIC zai-org--GLM-5_config.json: the same MLA + indexer design, 78 layers.
GLM5 = {"model_type": "glm_moe_dsa", "hidden_size": 6144, "index_head_dim": 128, "index_n_heads": 32,
        "index_topk": 2048, "intermediate_size": 12288, "kv_lora_rank": 512, "moe_intermediate_size": 2048,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_attention_heads": 64, "num_experts_per_tok": 8,
        "num_hidden_layers": 78, "num_key_value_heads": 64, "q_lora_rank": 2048, "qk_nope_head_dim": 192,
        "qk_rope_head_dim": 64, "v_head_dim": 256, "dtype": "bfloat16", "vocab_size": 154880,
        "max_position_embeddings": 202752}
MLA_DSA_LAYER = (512 + 64) * 2 + 128 + 128 // 128 * 4  # 1,284 bytes

# ---------------------------------------------------------------- one attention kind on every layer

# https://huggingface.co/zai-org/GLM-4.5/blob/main/config.json; 92 layers, 8 KV groups x 128 also in
# zyzshishui/slime scripts/models/glm4.5-355B-A32B.sh and pufanyi/Megatron-Bridge docs/models/llm/glm45.md.
GLM45 = {"model_type": "glm4_moe", "head_dim": 128, "hidden_size": 5120, "intermediate_size": 12288,
         "moe_intermediate_size": 1536, "n_routed_experts": 160, "num_attention_heads": 96,
         "num_experts_per_tok": 8, "num_hidden_layers": 92, "num_key_value_heads": 8, "torch_dtype": "bfloat16",
         "vocab_size": 151552, "max_position_embeddings": 131072}

# AIC MiniMaxAI--MiniMax-M2.5_config.json: full attention on all 62 layers.
MINIMAX_M25 = {"model_type": "minimax_m2", "num_hidden_layers": 62, "hidden_size": 3072, "num_attention_heads": 48,
               "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 1536, "vocab_size": 200064,
               "num_experts_per_tok": 8, "num_local_experts": 256, "torch_dtype": "bfloat16",
               "max_position_embeddings": 196608, "use_qk_norm": True, "qk_norm_type": "per_layer"}

# MLC "phi-4" (microsoft/Phi-4-mini-instruct): a 262,144-token window, longer than any context here.
PHI4_MINI = {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 24,
             "num_hidden_layers": 32, "num_key_value_heads": 8, "sliding_window": 262144,
             "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 200064,
             "max_position_embeddings": 131072}

# MLC "olmo2_32b" (allenai/OLMo-2-0325-32B), float32 checkpoint served in 16 bits.
OLMO2_32B = {"model_type": "olmo2", "hidden_size": 5120, "intermediate_size": 27648, "num_attention_heads": 40,
             "num_hidden_layers": 64, "num_key_value_heads": 8, "torch_dtype": "float32", "vocab_size": 100352,
             "max_position_embeddings": 4096}

# MLC "ministral3_3b_2512" (mistralai/Ministral-3-3B-Instruct-2512) text_config: no sliding window.
MINISTRAL3_3B = {"model_type": "mistral3", "text_config": {
    "model_type": "ministral3", "head_dim": 128, "hidden_size": 3072, "intermediate_size": 9216,
    "num_attention_heads": 32, "num_hidden_layers": 26, "num_key_value_heads": 8, "sliding_window": None,
    "tie_word_embeddings": True, "vocab_size": 131072, "max_position_embeddings": 262144}}

# MLC "aya-23" (CohereForAI/aya-23-8B): Cohere's first architecture, all layers global.
AYA23 = {"model_type": "cohere", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
         "num_hidden_layers": 32, "num_key_value_heads": 8, "torch_dtype": "float16", "vocab_size": 256000,
         "max_position_embeddings": 8192}

# MLC "qwen2" (Qwen/Qwen1.5-1.8B-Chat): a sliding_window is set but use_sliding_window is false.
QWEN15 = {"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 5504, "max_window_layers": 21,
          "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16, "sliding_window": 32768,
          "use_sliding_window": False, "torch_dtype": "bfloat16", "vocab_size": 151936,
          "max_position_embeddings": 4096}

CASES = {  # name: (config, bytes/token at 4k, at 32k), by hand
    # 10 global + 52 sliding(1024) layers of 16 x 128
    "gemma-3-27b": (GEMMA3_27B, 10 * kv(16, 128) + 52 * kv(16, 128) * 1024 / K4,
                    10 * kv(16, 128) + 52 * kv(16, 128) * 1024 / K32),
    # layers 5, 11, 17, 23 global, 22 sliding(512), 1 x 256
    "gemma-3-1b": (GEMMA3_1B, 4 * kv(1, 256) + 22 * kv(1, 256) * 512 / K4,
                   4 * kv(1, 256) + 22 * kv(1, 256) * 512 / K32),
    # 8 global + 24 sliding(4096) of 8 x 128: at 4k the window covers the whole context
    "command-r7b": (COMMAND_R7B, 32 * kv(8, 128), 8 * kv(8, 128) + 24 * kv(8, 128) * 4096 / K32),
    # 12 full + 33 sliding(512) of 8 x 128
    "step-3.7-flash": (STEP37, 12 * kv(8, 128) + 33 * kv(8, 128) * 512 / K4,
                       12 * kv(8, 128) + 33 * kv(8, 128) * 512 / K32),
    # 12 full layers of 2 x 256, 36 Gated DeltaNet states
    "qwen3-next-80b-a3b": (QWEN3_NEXT, 12 * kv(2, 256) + 36 * QWEN3_NEXT_STATE / K4,
                           12 * kv(2, 256) + 36 * QWEN3_NEXT_STATE / K32),
    # 16 full layers of 4 x 256, 48 Gated DeltaNet states
    "qwen3.5-27b": (QWEN35_27B, 16 * kv(4, 256) + 48 * QWEN35_STATE / K4, 16 * kv(4, 256) + 48 * QWEN35_STATE / K32),
    # 10 attention blocks of 8 x 128, 54 Mamba-2 blocks, 54 MLP-only blocks
    "nemotron-h-56b": (NEMOTRON_H_56B, 10 * kv(8, 128) + 54 * NEMOTRON_H_STATE / K4,
                       10 * kv(8, 128) + 54 * NEMOTRON_H_STATE / K32),
    # 6 attention blocks of 2 x 128, 23 Mamba-2 blocks, 23 MoE blocks
    "nemotron-3-nano": (NEMOTRON3_NANO, 6 * kv(2, 128) + 23 * NANO_STATE / K4, 6 * kv(2, 128) + 23 * NANO_STATE / K32),
    # attention on layers 4, 12, 20, 28 (8 x 128), Mamba on the other 28
    "jamba-v0.1": (JAMBA, 4 * kv(8, 128) + 28 * JAMBA_STATE / K4, 4 * kv(8, 128) + 28 * JAMBA_STATE / K32),
    # 12 NoPE global + 36 chunked(8192) of 8 x 128: at 4k the chunk covers the whole context
    "llama-4-maverick": (MAVERICK, 48 * kv(8, 128), 12 * kv(8, 128) + 36 * kv(8, 128) * 8192 / K32),
    "deepseek-v3.2": (DEEPSEEK_V32, 61 * MLA_DSA_LAYER, 61 * MLA_DSA_LAYER),
    "glm-5": (GLM5, 78 * MLA_DSA_LAYER, 78 * MLA_DSA_LAYER),
    "glm-4.5": (GLM45, 92 * kv(8, 128), 92 * kv(8, 128)),
    "minimax-m2.5": (MINIMAX_M25, 62 * kv(8, 128), 62 * kv(8, 128)),
    # head_dim = 3072 / 24 = 128; the window (262,144) exceeds both contexts
    "phi-4-mini": (PHI4_MINI, 32 * kv(8, 128), 32 * kv(8, 128)),
    # head_dim = 5120 / 40 = 128
    "olmo-2-32b": (OLMO2_32B, 64 * kv(8, 128), 64 * kv(8, 128)),
    "ministral-3-3b": (MINISTRAL3_3B, 26 * kv(8, 128), 26 * kv(8, 128)),
    # head_dim = 4096 / 32 = 128
    "aya-23-8b": (AYA23, 32 * kv(8, 128), 32 * kv(8, 128)),
    # head_dim = 2048 / 16 = 128, no layer slides
    "qwen1.5-1.8b": (QWEN15, 24 * kv(16, 128), 24 * kv(16, 128)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kv_bytes_per_token_at_4k_and_32k(name: str) -> None:
    config, at_4k, at_32k = CASES[name]
    assert per_token(config, K4) == pytest.approx(at_4k, rel=1e-12)
    assert per_token(config, K32) == pytest.approx(at_32k, rel=1e-12)


def test_hand_figures_for_the_new_conventions() -> None:
    """The arithmetic above, spelled out to the byte for the cases issue 13 names."""
    assert CASES["command-r7b"][2] == 45_056  # 8 x 4096 + 24 x 4096 x 4096 / 32768
    assert CASES["qwen3-next-80b-a3b"][1] == 34_224  # 12 x 2048 + 36 x 1,097,728 / 4096
    assert CASES["llama-4-maverick"][2] == 86_016  # 12 x 4096 + 36 x 4096 / 4
    assert CASES["deepseek-v3.2"][1] == 78_324  # 61 x (576 x 2 + 132)


def test_state_is_per_sequence_not_per_token() -> None:
    """Qwen3-Next: the 36 DeltaNet states are held once per sequence, even in a paged cache (a state
    takes no page); the 12 full-attention layers grow with the sequence."""
    layout = layout_for(load(QWEN3_NEXT))
    state = 36 * QWEN3_NEXT_STATE
    assert layout.gpu_bytes(1)[0] == state + 12 * kv(2, 256)
    assert layout.gpu_bytes(17, block_size=16)[0] == state + 12 * kv(2, 256) * 32  # 17 tokens -> 2 pages
    assert layout.gpu_bytes(10_001)[0] - layout.gpu_bytes(1)[0] == 10_000 * 12 * kv(2, 256)


def test_state_splits_over_tensor_parallel_ranks() -> None:
    layout = layout_for(load(JAMBA))
    assert layout.gpu_bytes(K4, tp=2)[0] == (4 * kv(8, 128) * K4 + 28 * JAMBA_STATE) / 2


def test_layer_kinds_of_the_hybrids() -> None:
    nemotron = load(NEMOTRON3_NANO)
    assert [(layer.attention, layer.moe, layer.mlp) for layer in nemotron.layers[:6]] == [
        ("state", False, False), ("none", True, True), ("state", False, False), ("none", True, True),
        ("state", False, False), ("full", False, False)]
    jamba = load(JAMBA)
    assert [i for i, layer in enumerate(jamba.layers) if layer.attention == "full"] == [4, 12, 20, 28]
    assert [layer.moe for layer in jamba.layers[:4]] == [False, True, False, True]
    maverick = load(MAVERICK)
    assert [(layer.attention, layer.window_tokens) for layer in maverick.layers[:4]] == [
        ("chunked", 8192), ("chunked", 8192), ("chunked", 8192), ("full", None)]


def test_qwen2_slides_only_from_max_window_layers_on() -> None:
    # configuration_qwen2: with use_sliding_window, layers i >= max_window_layers slide.
    model = load({**QWEN15, "use_sliding_window": True})
    assert [layer.window_tokens for layer in model.layers] == [None] * 21 + [32768] * 3


def test_an_unknown_model_type_warns_naming_what_was_assumed() -> None:
    # AIC XiaomiMiMo--MiMo-7B-Base_config.json: model_type "mimo" (Qwen2 layout, no sliding layers).
    mimo = {"model_type": "mimo", "num_hidden_layers": 36, "hidden_size": 4096, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 11008, "vocab_size": 151680,
            "sliding_window": 32768, "max_window_layers": 32, "use_sliding_window": False, "torch_dtype": "bfloat16",
            "max_position_embeddings": 32768}
    with pytest.warns(UserWarning, match=r"model_type 'mimo' is not one kvsim knows; assumed .*36 x full"):
        assert per_token(mimo, K4) == 36 * kv(8, 128)


@pytest.mark.parametrize("config,field", [
    (GEMMA3_NO_PATTERN, "layer_types"),
    ({k: v for k, v in QWEN3_NEXT.items() if k != "full_attention_interval"}, "layer_types"),
    # MAXTEXT olmo3_7b_dict: OLMo-3 interleaves sliding layers; this dict has no layer_types.
    ({"model_type": "olmo3", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
      "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 100278, "sliding_window": 4096,
      "max_position_embeddings": 8192},
     "layer_types"),
    ({**STEP37, "layer_types": STEP37["layer_types"][:-1]}, "layer_types"),
    ({**STEP37, "layer_types": ["full_attention"] * 44 + ["local_attention"]}, "layer_types[44]"),
    ({k: v for k, v in JAMBA.items() if k != "mamba_d_state"}, "mamba_d_state"),
    ({k: v for k, v in JAMBA.items() if k != "attn_layer_period"}, "attn_layer_period"),
    ({k: v for k, v in NEMOTRON3_NANO.items() if k != "hybrid_override_pattern"}, "hybrid_override_pattern"),
])
def test_undeterminable_layers_are_errors_naming_the_field(config: dict, field: str) -> None:
    with pytest.raises(KvsimError) as err:
        load(config)
    assert err.value.field == field


@pytest.mark.parametrize("config,field", [
    # AIC google--gemma-4-26B-A4B_config.json: global layers have their own head size and KV heads.
    ({"model_type": "gemma4_text", "global_head_dim": 512, "num_global_key_value_heads": 2, "head_dim": 256,
      "num_hidden_layers": 30, "num_attention_heads": 16, "num_key_value_heads": 8, "hidden_size": 2816},
     "global_head_dim"),
    # AIC XiaomiMiMo--MiMo-V2-Flash_config.json: sliding layers have their own KV heads.
    ({"model_type": "mimo_v2_flash", "swa_num_key_value_heads": 8, "num_hidden_layers": 48,
      "num_attention_heads": 64, "num_key_value_heads": 4, "hidden_size": 4096}, "swa_num_key_value_heads"),
])
def test_layers_kvsim_cannot_represent_are_errors(config: dict, field: str) -> None:
    with pytest.raises(KvsimError, match="not modelled") as err:
        load(config)
    assert err.value.field == field


def test_dsa_indexer_is_a_stream_of_its_own() -> None:
    layer = layout_for(load(DEEPSEEK_V32)).layer_bytes(1)[0]
    assert layer == {"latent": 1024.0, "k_rope": 128.0, "index_k": 132.0}


def test_whole_model_bytes_are_vectorized_over_hybrids() -> None:
    layout = layout_for(load(NEMOTRON_H_56B))
    t = np.array([K4, K32])
    assert np.array_equal(layout.gpu_bytes(t), 10 * kv(8, 128) * t + 54 * NEMOTRON_H_STATE)


@pytest.mark.parametrize("spec", ["cla", "shadowkv", "h2o:budget=1024"])
def test_kv_methods_leave_no_state_layer_rewritten(spec: str) -> None:
    """Cross-layer sharing, offloading and score-keeping eviction would treat a DeltaNet or Mamba
    state as KV: refused (precision and plain eviction act on the attention layers only)."""
    for config in (QWEN3_NEXT, NEMOTRON_H_56B):
        with pytest.raises(KvsimError, match="linear-attention/state-space layers") as err:
            layout_for(load(config), spec)
        assert err.value.field == "method"


def test_fp8_and_eviction_act_on_attention_layers_only() -> None:
    model = load(QWEN3_NEXT)
    state = 36 * QWEN3_NEXT_STATE
    assert layout_for(model, "fp8").gpu_bytes(K32)[0] == 12 * kv(2, 256) // 2 * K32 + state
    assert layout_for(model, "streamingllm:window=1024").gpu_bytes(K32)[0] == pytest.approx(
        layout_for(model, "streamingllm:window=1024").gpu_bytes(2 * K32)[0])
