"""The read-only and write-only ceiling kernels on CPU (Triton under the interpreter): the read
kernel's partial sums add up to the float64 sum on odd sizes (masked tails, uneven programs), and
the write kernel writes every element."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from validation.kernels.stream import stream_read, stream_write  # noqa: E402


@pytest.mark.parametrize("n,programs,block", [(100_003, 16, 1024), (4096, 4, 1024), (5, 3, 1024)])
def test_read_sums_every_element(n, programs, block):
    x = torch.randn(n, dtype=torch.bfloat16)
    part = torch.full((64,), float("nan"))
    g = stream_read(x, part, programs, block, 4)
    assert 1 <= g <= programs
    got = part[:g].double().sum().item()
    assert got == pytest.approx(x.double().sum().item(), rel=1e-5, abs=1e-3)


@pytest.mark.parametrize("n,programs", [(100_003, 16), (7, 2)])
def test_write_writes_every_element(n, programs):
    y = torch.randn(n, dtype=torch.bfloat16)
    stream_write(y, 1.5, programs, 1024, 4)
    assert bool((y == 1.5).all())
