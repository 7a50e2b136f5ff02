"""Read-only and write-only streaming kernels: the device-memory ceilings every decode kernel is
reported against (issue 15 item 1). A copy moves bytes both ways and its read+write rate is not
a ceiling for a kernel that only reads (the bf16 decode kernel beat the H100 copy figure by 27%).

read: each program streams a contiguous slice with 16-byte vector loads (BLOCK elements a load,
several loads in flight), sums it in fp32 and writes one float, so the bytes written are
negligible (programs x 4 B). write: each program stores a constant over its slice."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _read_kernel(x_ptr, part_ptr, n, per_prog, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * per_prog  # 64-bit: 8 GiB of bf16 is 2**32 elements (int32 overflowed on the H200)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, per_prog, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + idx, mask=idx < n, other=0.0, eviction_policy="evict_first").to(tl.float32)
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _write_kernel(y_ptr, n, per_prog, value, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * per_prog
    v = (tl.zeros([BLOCK], dtype=tl.float32) + value).to(y_ptr.dtype.element_ty)
    for off in range(0, per_prog, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        tl.store(y_ptr + idx, v, mask=idx < n)


def _grid(n: int, programs: int, block: int) -> tuple[int, int]:
    per = triton.cdiv(triton.cdiv(n, programs), block) * block
    return triton.cdiv(n, per), per


def stream_read(x, partials, programs: int, block: int = 4096, num_warps: int = 8):
    """Sum of x (any float dtype, 1-D contiguous) into partials[:programs]; returns programs used."""
    g, per = _grid(x.numel(), programs, block)
    _read_kernel[(g,)](x, partials, x.numel(), per, BLOCK=block, num_warps=num_warps)
    return g


def stream_write(y, value: float, programs: int, block: int = 4096, num_warps: int = 8):
    g, per = _grid(y.numel(), programs, block)
    _write_kernel[(g,)](y, y.numel(), per, value, BLOCK=block, num_warps=num_warps)
    return g
