"""The numpy reference of the packed quantized layout and the kernel's unpack PTX, bit for bit
(no torch needed)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from validation import kivi_ref as kr


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_roundtrip(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(3, 5, 128), dtype=np.uint8)
    words = kr.pack16(codes, bits)
    assert words.shape == (3, 5, 128 * bits // 16) and words.dtype == np.uint16
    assert np.array_equal(kr.unpack16(words, bits), codes)


def test_pack_layout_int4():
    # D = 8, int4: W = 2 words; word c holds channels c, 2+c, 4+c, 6+c at bits 0, 4, 8, 12
    codes = np.array([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=np.uint8)
    assert kr.pack16(codes, 4).tolist() == [[0x7531, 0x8642]]


@settings(max_examples=50, deadline=None)
@given(st.sampled_from([2, 4, 8]), st.lists(st.integers(0, 0xFFFF), min_size=2, max_size=64).filter(lambda x: len(x) % 2 == 0),
       st.data())
def test_ptx_matches_field_semantics(bits, raw, data):
    """The dequant PTX gives, for every field of every word, fp16(code * scale + zero) rounded once,
    with the scale passed pre-multiplied by 2**-off (as the kernel does); lop3 alone gives the
    1024 + code * 2**off of field_fp16."""
    words = np.array(raw, dtype=np.uint16)
    n = len(raw)
    fp16 = st.floats(-8, 8, width=16, allow_nan=False, allow_subnormal=False)
    scale = np.array(data.draw(st.lists(fp16, min_size=n, max_size=n)), dtype=np.float16)
    zero = np.array(data.draw(st.lists(fp16, min_size=n, max_size=n)), dtype=np.float16)
    codes = kr.unpack16(words[:, None], bits)
    for j in range(16 // bits):
        off = bits * (j % (8 // bits))
        high = j >= 8 // bits
        assert np.array_equal(((kr.field_fp16(words, bits, j).astype(np.float32) - 1024) / 2**off), codes[:, j])
        s_in = (scale.astype(np.float32) / 2**off).astype(np.float16)  # exact unless subnormal
        mask = np.full(n, kr.field_mask(bits, j), dtype=np.uint16)
        regs = {"$1": words.view(np.uint32), "$2": s_in.view(np.uint32), "$3": zero.view(np.uint32),
                "$4": mask.view(np.uint32)}
        got = kr.run_ptx(kr.dequant_ptx(high), regs).view(np.float16)
        want = (codes[:, j].astype(np.float64) * 2**off * s_in.astype(np.float64) + zero).astype(np.float16)
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), (bits, j)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [0, 1])
def test_quantize_error_bound(bits, axis):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 64)).astype(np.float32)
    c, s, z = kr.quantize_groups(x, bits, 32, axis)
    assert s.shape == ((2, 64) if axis == 0 else (64, 2)) and c.max() <= (1 << bits) - 1
    step = np.repeat(s.astype(np.float32), 32, axis=axis)
    err = np.abs(kr.dequantize_groups(c, s, z, 32, axis) - x)
    assert np.all(err <= 0.5 * step + 1e-3 * (np.abs(x) + 1) + (1 << bits) * 1e-3 * step)  # + fp16 rounding


def test_clip_shrinks_range():
    x = np.linspace(-1, 1, 64, dtype=np.float32)[None, :]
    _, s1, _ = kr.quantize_groups(x, 2, 64, 1)
    _, s2, _ = kr.quantize_groups(x, 2, 64, 1, clip=0.9)
    assert np.isclose(float(s2[0, 0]), 0.9 * float(s1[0, 0]), rtol=1e-3)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_code_ptx_exact(bits):
    """The register-dequant kernel's PTX (code_ptx) gives every field's exact code as fp16, for
    every 16-bit word value, in both halves of the 32-bit register."""
    words = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    codes = kr.unpack16(words[:, None], bits)
    for j in range(16 // bits):
        got = kr.run_ptx(kr.code_ptx(bits, j), {"$1": words.view(np.uint32)}).view(np.float16)
        assert np.array_equal(got.astype(np.float32), codes[:, j].astype(np.float32)), (bits, j)
