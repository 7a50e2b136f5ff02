"""The multi-layer kernel step reads exactly the bytes kvsim's cost model charges for decode
attention, for every sharing/eviction/latent method it runs (kvsim only; no torch)."""
import numpy as np
import pytest

pytest.importorskip("pydantic")
from kvsim.cost import Batch, CostModel  # noqa: E402
from kvsim.kv import layout_for  # noqa: E402
from kvsim.spec.hardware import load_hardware  # noqa: E402
from validation.kernels.layout_step import bytes_read, plan, synthetic_model  # noqa: E402

SPECS = ["bf16", "pyramidkv:budget=2048", "depthkv:budget=2048", "xkv:budget=2048", "snapkv:budget=2048",
         "streamingllm:window=1024", "cla:factor=2", "cla:factor=4", "mlkv:kv_layers=2,kv_heads=2", "lckv:warmup=2",
         "yoco:window=1024", "xlayer:kv_layers=2,target=bottom", "kv-latent:qk_dim=64,vo_dim=64",
         "lorc:ratio=0.5,progressive=False"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("batch,context", [(1, 512), (4, 16384)])
def test_bytes_equal_cost_model(spec, batch, context):
    reads = plan(spec, 8, 32, 8, 128, context)
    model = synthetic_model(8, 32, 8, 128)
    step = CostModel(model, load_hardware("h100-sxm"), layout_for(model, spec), 1, "none").step(
        Batch(decode_context=np.full(batch, context)))
    charged = next(op.bytes for op in step.ops if op.name == "attention.decode")
    assert bytes_read(reads, batch) == pytest.approx(charged, rel=1e-9)


def test_sharing_reads_owner_caches():
    reads = plan("cla:factor=2", 8, 32, 8, 128, 4096)
    assert [r.source for r in reads] == [0, 0, 2, 2, 4, 4, 6, 6]
    assert all(r.tokens == 4096 for r in reads)
    assert [r.tokens for r in plan("yoco:window=1024", 8, 32, 8, 128, 4096)][:4] == [1024] * 4
