"""CPU checks of the reference engine's config arithmetic (no torch needed)."""
import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from validation.engine_model import FALLBACK, EngineConfig, MLAConfig, get_config


def test_param_counts():
    assert 7.9e9 < FALLBACK["llama-3-8b"].weight_params() < 8.1e9  # 8.03B
    assert 6.6e9 < FALLBACK["llama-2-7b"].weight_params() < 6.9e9  # 6.74B
    assert 46e9 < FALLBACK["mixtral-8x7b"].weight_params() < 47.5e9  # 46.7B
    assert 15.5e9 < FALLBACK["deepseek-v2-lite"].weight_params() < 16.0e9  # 15.7B (HF model card)


def test_kv_bytes():
    assert FALLBACK["llama-3-8b"].kv_bytes(1, 1) == 32 * 2 * 8 * 128 * 2  # 128 KiB per token
    m = FALLBACK["mistral-7b"]
    assert m.kv_bytes(1, 32768) == m.kv_bytes(1, 4096)
    assert FALLBACK["deepseek-v2-lite"].kv_bytes(1, 1) == 27 * 576 * 2  # latent 512 + RoPE key 64


@pytest.mark.parametrize("name", sorted(FALLBACK))
def test_kvsim_spec_matches_fallback(name):
    """The documented fallback table holds the same shapes as kvsim's loader."""
    pytest.importorskip("pydantic")
    cfg = get_config(name, log=lambda *a: None)
    assert dataclasses.replace(cfg, source="") == dataclasses.replace(FALLBACK[name], source="")


@given(st.sampled_from([1, 2, 4, 8]), st.sampled_from(sorted(FALLBACK)))
def test_rank_slices_partition(tp, name):
    """Query heads, intermediates and vocab rows are split into disjoint covering ranges; KV heads
    are split, or each rank holds the one head its query heads read (replicated)."""
    c = FALLBACK[name]
    if c.q_heads % tp or (c.kv_heads > tp and c.kv_heads % tp):
        with pytest.raises(AssertionError):
            c.rank_slices(tp, 0)
        return
    sl = [c.rank_slices(tp, r) for r in range(tp)]
    for key, total in (("q_heads", c.q_heads), ("intermediate", c.intermediate), ("vocab", c.vocab)):
        assert sl[0][key][0] == 0 and sl[-1][key][1] == total
        assert all(sl[r][key][1] == sl[r + 1][key][0] for r in range(tp - 1))
    group = c.q_heads // c.kv_heads
    for s in sl:  # every query head of a rank reads a KV head the rank holds
        q0, q1 = s["q_heads"]
        assert s["kv_heads"][0] <= q0 // group and (q1 - 1) // group < s["kv_heads"][1]
    assert c.shard(tp).kv_heads == max(1, c.kv_heads // tp)


def test_mla_shard_keeps_latent():
    c = EngineConfig("m", 2048, 100, 2, 16, 16, 192, 64, mla=MLAConfig(512, 128, 64, 128))
    s = c.shard(4)
    assert s.q_heads == 4 and s.mla == c.mla and s.kv_bytes(1, 10) == c.kv_bytes(1, 10)
