"""The fused-MoE benchmark kernel (validation/kernels/fused_moe.py) on CPU: the routing laid out as
vLLM's moe_align_block_size lays it out (a known answer), and the Triton kernel under the interpreter
against the float reference in bf16, FP8 per-tensor and FP8 128x128 blocks (shapes whose K and N are
not multiples of the tiles, and padding rows that must stay unwritten)."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from validation.common import rel_error  # noqa: E402
from validation.kernels import fused_moe as fm  # noqa: E402


def test_align_pads_each_expert_to_whole_row_blocks():
    # pairs (token, slot): 0 -> expert 0, 1 -> expert 2, 2 -> expert 2, 3 -> expert 1
    ids, experts, padded = fm.align(torch.tensor([[0, 2], [2, 1]]), experts=3, block_m=4)
    n = 4  # padding slots hold the pair count
    assert ids.tolist() == [0, n, n, n, 3, n, n, n, 1, 2, n, n] + [n]  # worst case: 4 + 3 x 3 slots
    assert experts[:3].tolist() == [0, 1, 2]
    assert padded.tolist() == [12]


def test_an_expert_no_token_picks_takes_no_row_block():
    ids, experts, padded = fm.align(torch.tensor([[3], [3], [0]]), experts=4, block_m=2)
    assert padded.tolist() == [4]  # expert 0: one block, expert 3: one block, experts 1 and 2: none
    assert experts[:2].tolist() == [0, 3]
    assert ids[:4].tolist() == [2, 3, 0, 1]


@pytest.mark.parametrize("mode", fm.MODES)
def test_kernel_matches_the_dequantized_reference(mode):
    g = torch.Generator().manual_seed(0)
    E, N, K, T, top_k = 4, 192, 200, 5, 2
    # Triton 3.6's interpreter garbles bf16 dot operands (numpy has no bf16): the 16-bit path runs on fp32
    # operands here, the same kernel code; on the GPU every measured row checks bf16 itself
    dtype = torch.float32 if mode == "bf16" else torch.bfloat16
    w = (torch.randn(E, N, K, generator=g) / K ** 0.5).to(dtype)
    ids = torch.rand(T, E, generator=g).topk(top_k, dim=1).indices.to(torch.int32)
    wq, sb = fm.quantize_weights(w, mode)
    xq, sa = fm.quantize_acts(torch.randn(T, K, generator=g).to(dtype), mode)
    launch = fm.moe_gemm(xq, wq, sa, sb, ids, mode, dict(BM=16, BN=64, BK=128, GROUP_M=1, warps=4, stages=1))
    launch().fill_(float("nan"))
    out = launch().float()
    ref = fm.reference(fm.dequantized_acts(xq, sa, mode), fm.dequantized_weights(wq, sb, mode), ids)
    assert rel_error(out, ref) < 1e-2
    if mode != "bf16":  # against the unquantized weights, the precision itself costs a few percent
        assert 1e-3 < rel_error(out, fm.reference(fm.dequantized_acts(xq, sa, mode), w.float(), ids)) < 0.1


def test_block_scales_need_one_k_step_per_scale_group():
    x, w = torch.zeros(2, 128, dtype=torch.bfloat16), torch.zeros(2, 128, 128, dtype=torch.bfloat16)
    wq, sb = fm.quantize_weights(w, "fp8_block")
    xq, sa = fm.quantize_acts(x, "fp8_block")
    with pytest.raises(ValueError, match="BK = 128"):
        fm.moe_gemm(xq, wq, sa, sb, torch.zeros(2, 1, dtype=torch.int32), "fp8_block",
                    dict(BM=16, BN=64, BK=64, GROUP_M=1, warps=4, stages=1))
