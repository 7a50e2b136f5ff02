"""Offloaded-KV steps (bench_offload.py) on the CPU, Triton under the interpreter: the chunk gather
against torch.gather, each method's pipelined step against its float64 reference (outputs and
fetched buffers poisoned first) on fresh random inputs, and each row's bytes against kvsim's cost
model for the row's spec."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from validation.kernels import bench_offload as bo  # noqa: E402


@pytest.fixture
def seed():
    torch.manual_seed(int(np.random.default_rng().integers(1 << 31)))  # fresh inputs every run


@pytest.mark.parametrize("chunk,width", [(8, 32), (16, 24)])
def test_gather_chunks(seed, chunk, width):
    src = torch.randn(2, 3, 10 * chunk, width).to(torch.bfloat16)
    idx = torch.stack([torch.stack([torch.randperm(10)[:4].sort().values for _ in range(3)]) for _ in range(2)]).int()
    dst = torch.full((2, 3, 4 * chunk + 5, width), float("nan"), dtype=torch.bfloat16)
    bo.gather_chunks(src, idx, dst[:, :, 5:], chunk)
    want = torch.gather(src, 2, bo.token_rows(idx, chunk)[..., None].expand(-1, -1, -1, width))
    assert torch.equal(dst[:, :, 5:], want)
    assert torch.isnan(dst[:, :, :5].float()).all()  # nothing written outside the slice


SMALL = {"shadowkv": (bo.Shadowkv, dict(rank=16, chunk=8, outlier_chunks=2, budget=64)),
         "ttkv": (bo.Ttkv, dict(recent=64, k_bits=4, v_bits=2, topk=64)),
         "mka": (bo.Mka, dict(local=32, stride=16, topk=32))}


@pytest.mark.parametrize("name", list(SMALL))
def test_step_matches_reference(seed, name):
    make, params = SMALL[name]
    step = make(2, 4, 2, 32, 256, 2, device="cpu", dtype=torch.float16, **params)  # the interpreter has no bf16
    assert step.check() < 2e-2


def test_selection_takes_the_best_chunks(seed):
    q = torch.randn(1, 4, 16)
    lm = torch.randn(1, 2, 12, 16)
    sel = bo.select_chunks(q, lm, 3)
    scores = torch.einsum("hd,hcd->hc", q[0].view(2, 2, 16).mean(1), lm[0])
    assert torch.equal(sel[0].long(), scores.topk(3, -1).indices.sort(-1).values)


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("batch,context", [(1, 32768), (4, 8192)])
def test_bytes_equal_cost_model(name, batch, context):
    pytest.importorskip("pydantic")
    from kvsim.cost import Batch, CostModel
    from kvsim.kv import layout_for
    from kvsim.measured import attention_model
    from kvsim.spec.hardware import load_hardware

    params = dict(bo.SHADOWKV if name == "shadowkv" else bo.TTKV if name == "ttkv" else bo.MKA)
    kvsim, hbm, pcie = bo.BYTES[name](batch, 8, 128, context, **params)
    model = attention_model(32, 8, 128)
    step = CostModel(model, load_hardware("h100-sxm"), layout_for(model, bo.kvsim_spec(name, params)), 1, "none").step(
        Batch(decode_context=np.full(batch, context)))
    ops = {op.name: op for op in step.ops}
    assert kvsim == pytest.approx(ops["attention.decode"].bytes, rel=1e-9)
    assert pcie == pytest.approx(ops["host_transfer"].bytes, rel=1e-9)
    assert hbm == kvsim if name != "ttkv" else hbm > kvsim  # TTKV: + its block means, not in kvsim's layout


def test_poison_catches_a_missing_fetch(seed):
    make, params = SMALL["shadowkv"]
    step = make(1, 4, 2, 32, 256, 1, device="cpu", dtype=torch.float16, **params)
    step.fetch = lambda l, sel: None  # the fetched values stay NaN
    assert step.check() == float("inf")
