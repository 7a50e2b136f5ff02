"""The bit-plane decode kernel (plane_decode.py) on the CPU, Triton under the interpreter: plane
packing round trips at every width, the kernel against its float64 reference on fresh random inputs
(outputs and split partials poisoned) for KVQuant's tables + outliers and the affine modes at odd
widths, and every bench_methods row's bytes against kvsim's cost model for the row's spec."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from validation.common import rel_error  # noqa: E402
from validation.kernels import bench_methods as bm  # noqa: E402
from validation.kernels import plane_decode as pd  # noqa: E402
from validation.kernels import triton_decode as td  # noqa: E402
from validation.kernels.bench_common import ref_decode  # noqa: E402


@pytest.fixture
def seed():
    torch.manual_seed(int(np.random.default_rng().integers(1 << 31)))  # fresh inputs every run


@pytest.mark.parametrize("bits", range(1, 9))
def test_planes_round_trip(seed, bits):
    codes = torch.randint(0, 1 << bits, (2, 3, 5, 128), dtype=torch.uint8)
    words = pd.pack_planes(codes, bits)
    assert words.shape[-1] == 128 * bits // 32  # exactly b bits per code
    assert torch.equal(pd.unpack_planes(words, bits, 128), codes)


CASES = {"kvquant3": dict(k_bits=3, v_bits=3, k_mode="lut", v_mode="lut", outliers=20),
         "kvquant8": dict(k_bits=8, v_bits=8, k_mode="lut", v_mode="lut", outliers=20),
         "kivi5_3": dict(k_bits=5, v_bits=3, k_mode="channel", v_mode="token", k_group=16, v_group=16, residual=40),
         "int1_7": dict(k_bits=1, v_bits=7, k_mode="token", v_mode="token", k_group=32, v_group=64)}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(seed, name):
    B, Hq, Hkv, D, S = 2, 4, 2, 128, 200  # 200: a partial tile, and a residual for the non-residual cases
    q, k, v = torch.randn(B, Hq, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    cache = pd.PlaneCache(k, v, **CASES[name])
    ref = ref_decode(q, *cache.dequant([0, 1]), 1 / math.sqrt(D))
    td.POISON = True
    try:
        out = torch.full((B, Hq, D), float("nan"), dtype=torch.float16)
        pd.plane_attention(q, cache, cfg=pd.CONFIGS[1], out=out)
    finally:
        td.POISON = False
    assert rel_error(out, ref) < 2e-3


def test_outliers_reach_the_output(seed):
    """Dropping the sparse part changes the result: the kernel reads it."""
    B, Hq, Hkv, D, S = 1, 4, 2, 128, 64
    q, k, v = torch.randn(B, Hq, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    cache = pd.PlaneCache(k, v, **CASES["kvquant3"])
    full = pd.plane_attention(q, cache)
    cache.k.outliers.zero_()
    cache.v.outliers.zero_()
    assert rel_error(pd.plane_attention(q, cache), full) > 1e-3


@pytest.mark.parametrize("variant", bm.variants(False, 128), ids=lambda v: v[1])
def test_bytes_equal_cost_model(variant):
    pytest.importorskip("pydantic")
    from kvsim.cost import Batch, CostModel
    from kvsim.kv import layout_for
    from kvsim.measured import attention_model
    from kvsim.spec.hardware import load_hardware

    _, spec, kw, kept = variant
    B, S = 1, 2048
    n = min(S, kept or S)
    cache = pd.PlaneCache(torch.randn(B, 8, n, 128), torch.randn(B, 8, n, 128), **kw)
    model = attention_model(32, 8, 128)
    step = CostModel(model, load_hardware("h100-sxm"), layout_for(model, spec), 1, "none").step(
        Batch(decode_context=np.full(B, S)))
    charged = next(op.bytes for op in step.ops if op.name == "attention.decode")
    assert cache.nbytes() - bm.table_bytes(cache) == pytest.approx(charged, rel=1e-9)
