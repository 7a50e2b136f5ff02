"""The element-wise benchmark's plan and checks on CPU (fp32, Triton under the interpreter): one
row per (op, hidden) so kvsim calibrate's best-of-impls key stays unambiguous, every case's
float64 check passes, and the byte counts are what each kernel reads plus writes."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytest.importorskip("pydantic")  # shapes come from kvsim's catalogue
from validation import elementwise as ew  # noqa: E402
from validation.engine import QUICK_MODELS  # noqa: E402
from validation.engine_model import get_config  # noqa: E402


@pytest.fixture(scope="module")
def plan():
    return list(ew.shapes([get_config(n, log=lambda *a: None) for n in QUICK_MODELS]))


def test_one_row_per_op_and_hidden(plan):
    keys = [(op, hidden) for op, hidden, *_ in plan]
    assert len(keys) == len(set(keys))
    ops = {op for op, *_ in plan}
    assert ops == {"rms_norm", "fused_add_rms_norm", "rotary_embedding", "reshape_and_cache", "silu_and_mul",
                   "moe_topk_softmax", "moe_align", "moe_align_permute", "moe_unpermute"}
    # llama-3-8b first: hidden 4096, (32 + 8) x 128 rotated, 2 x 8 x 128 cached, intermediate 14336
    assert [(op, h) for op, h, *_ in plan[:5]] == [("fused_add_rms_norm", 4096), ("rms_norm", 4096),
                                                  ("rotary_embedding", 5120), ("reshape_and_cache", 2048),
                                                  ("silu_and_mul", 14336)]


def test_every_case_checks_against_float64(plan):
    g = ew.Inputs("cpu", torch.float32)
    for op, hidden, params, setup in plan:
        fn, err, nbytes = setup(3, g)
        fn()
        assert err < 1e-5, (op, hidden, params)
        assert nbytes > 0


def test_byte_counts():
    g = ew.Inputs("cpu", torch.float32)
    T, H, e = 3, 64, 4
    assert ew.norm_case(T, g, H, True)[2] == 4 * T * H * e + H * e  # x, residual read; both written; weight
    assert ew.silu_case(T, g, 40)[2] == 3 * T * 40 * e
    assert ew.cache_case(T, g, 2 * 32, True)[2] == 2 * T * 64 * e + 8 * T  # k and v rows, slot mapping
    assert ew.permute_case(T, g, 8, 2, H)[2] == 2 * T * 2 * H * e + 12 * T * 2 + 8 * 8
