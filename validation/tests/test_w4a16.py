"""The W4A16 benchmark kernel (validation/kernels/w4a16.py) on CPU: the packing puts each group's rows j
and j + 64 in one byte (a known answer), and the Triton kernel under the interpreter matches x @ W on
shapes whose M and N are not multiples of the tiles (rows and columns past them must stay unwritten)."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from validation.kernels import w4a16 as wk  # noqa: E402


def test_pack_puts_rows_j_and_j_plus_half_group_in_one_byte():
    q = torch.zeros(2 * wk.GROUP, 3, dtype=torch.uint8)
    q[5, 1], q[5 + wk.HALF, 1], q[wk.GROUP + 2, 0] = 7, 12, 9
    p = wk.pack(q)
    assert p.shape == (wk.GROUP, 3)
    assert p[5, 1].item() == 7 | 12 << 4 and p[wk.HALF + 2, 0].item() == 9
    assert int((p != 0).sum()) == 2


@pytest.mark.parametrize("m,n,split", [(3, 72, 1), (20, 130, 1), (5, 72, 2), (5, 72, 4)])
def test_kernel_matches_the_dequantized_reference(m, n, split):
    g = torch.Generator().manual_seed(0)
    k = 4 * wk.GROUP
    packed, scales, w = wk.make_weights(n, k, device="cpu", generator=g)
    x = torch.randn(m, k, generator=g)  # fp32 operands: the interpreter has no bf16 dot
    out = torch.full((m + 1, n), 7.0)  # one row past the result: must stay as it was
    wk.matmul(x, packed, scales, (64, 4, 3, split), out[:m])
    assert torch.allclose(out[:m], x @ w, rtol=1e-4, atol=1e-4)
    assert (out[m] == 7.0).all()
