"""CPU checks of engine.py's config table and size arithmetic (no torch needed)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from validation.engine import FALLBACK, EngineConfig, from_kvsim_spec  # noqa: E402


def test_llama3_8b_params():
    p = FALLBACK["llama-3-8b"].weight_params()
    assert 7.9e9 < p < 8.1e9  # 8.03B


def test_llama2_7b_params():
    assert 6.6e9 < FALLBACK["llama-2-7b"].weight_params() < 6.9e9  # 6.74B


def test_mixtral_params():
    assert 46e9 < FALLBACK["mixtral-8x7b"].weight_params() < 47.5e9  # 46.7B


def test_kv_bytes():
    c = FALLBACK["llama-3-8b"]
    assert c.kv_bytes(1, 1) == 32 * 2 * 8 * 128 * 2  # 128 KiB per token
    m = FALLBACK["mistral-7b"]
    assert m.kv_bytes(1, 32768) == m.kv_bytes(1, 4096)


def test_every_model_divides():
    for c in FALLBACK.values():
        assert c.q_heads % c.kv_heads == 0, c.name


def test_adapter():
    from types import SimpleNamespace as N

    layers = tuple(N(index=i, attention="sliding", window_tokens=4096, kv_source=i, moe=None) for i in range(32))
    spec = N(name="mistral-7b", hidden_size=4096, vocab_size=32000, tie_word_embeddings=False, intermediate_size=14336,
             attention=N(num_heads=32, num_kv_heads=8, head_dim=128, v_head_dim=128, mla=None), layers=layers, moe=None)
    c = from_kvsim_spec(spec)
    assert isinstance(c, EngineConfig)
    assert c == EngineConfig("mistral-7b", 4096, 32000, 32, 32, 8, 128, 14336, sliding_window=4096, source="kvsim.spec")
