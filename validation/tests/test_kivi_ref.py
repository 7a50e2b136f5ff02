"""CPU checks of the numpy KIVI reference (packing, quantisation, byte counts); torch-twin checks
skip cleanly when torch is absent."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from validation import kivi_ref as kr  # noqa: E402


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_roundtrip(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(3, 5, 64), dtype=np.uint8)
    packed = kr.pack_bits(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8)
    assert np.array_equal(kr.unpack_bits(packed, bits), codes)


def test_pack_layout_int4():
    codes = np.array([[1, 2, 3, 4]], dtype=np.uint8)  # W = 2: byte0 = ch0 | ch2<<4, byte1 = ch1 | ch3<<4
    assert kr.pack_bits(codes, 4).tolist() == [[0x31, 0x42]]


def test_pack_layout_int2():
    codes = np.array([[1, 2, 3, 0, 2, 2, 2, 2]], dtype=np.uint8)  # W = 2
    assert kr.pack_bits(codes, 2).tolist() == [[1 | (3 << 2) | (2 << 4) | (2 << 6), 2 | (0 << 2) | (2 << 4) | (2 << 6)]]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [0, 1])
def test_quantize_error_bound(bits, axis):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 64)).astype(np.float32)
    c, s, z = kr.quantize_groups(x, bits, 32, axis)
    assert s.shape == ((2, 64) if axis == 0 else (64, 2))
    xd = kr.dequantize_groups(c, s, z, 32, axis)
    # error at most half a step (plus fp16 rounding of scale/zero)
    step = np.repeat(s.astype(np.float32), 32, axis=axis)
    assert np.all(np.abs(xd - x) <= 0.5 * step + 2e-3 * (np.abs(x) + 1) + 1e-6 + (1 << bits) * 1e-3 * step)
    assert c.max() <= (1 << bits) - 1


def test_split_residual():
    assert kr.split_residual(100) == (0, 100)
    assert kr.split_residual(4096) == (3968, 128)
    sq, nr = kr.split_residual(1000)
    assert sq % 32 == 0 and 128 <= nr < 160 and sq + nr == 1000


def test_kivi_bytes():
    b = kr.kivi_bytes(2, 8, 4096, 128, 4, 2)
    sq, nr = 3968, 128
    bh = 16
    assert b["k_codes"] == bh * sq * 128 // 2
    assert b["v_codes"] == bh * sq * 128 // 4
    assert b["k_meta"] == bh * (sq // 32) * 128 * 4
    assert b["v_meta"] == bh * sq * 4 * 4
    assert b["residual"] == bh * nr * 128 * 4
    assert b["total"] == sum(b[k] for k in ("k_codes", "v_codes", "k_meta", "v_meta", "residual"))
    # int2 K/V with scales is well under a quarter of bf16 but over an eighth
    dense = kr.dense_kv_bytes(2, 8, 4096, 128, 2)
    b22 = kr.kivi_bytes(2, 8, 4096, 128, 2, 2)["total"]
    assert dense / 8 < b22 < dense / 4


def test_dense_bytes_mla_style():
    assert kr.dense_kv_bytes(1, 1, 10, 576, 2, v_head_dim=0) == 10 * 576 * 2


def test_torch_twin_matches_numpy():
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from validation.kernels import triton_decode as td

    rng = np.random.default_rng(1)
    for bits in (2, 4, 8):
        codes = rng.integers(0, 1 << bits, size=(2, 64), dtype=np.uint8)
        p = td.torch_pack(torch.from_numpy(codes), bits).numpy()
        assert np.array_equal(p, kr.pack_bits(codes, bits))
        assert np.array_equal(td.torch_unpack(torch.from_numpy(p), bits).numpy(), codes)
    x = rng.standard_normal((64, 64)).astype(np.float32)
    c, s, z = td.quantize_groups(torch.from_numpy(x), 4, 32, 0)
    c2, s2, z2 = kr.quantize_groups(x, 4, 32, 0)
    assert np.array_equal(s.numpy(), s2) and np.array_equal(z.numpy(), z2)
    assert np.mean(c.numpy() != c2) < 0.01  # rounding ties may differ
