"""Pure-numpy reference of the packed layout that validation/kernels/quant_decode.py reads (no
torch): asymmetric min/max group quantization, "blocked" int16 packing, and an emulator of the
kernel's PTX dequantization (shr / lop3 / f16x2 sub and fma on two 16-bit words per 32-bit
register), so the CPU tests can check the asm strings bit for bit without a GPU.

Packing: with per = 16 // bits fields per 16-bit word and W = D // per words per token, bit field j
(bits [j*bits, (j+1)*bits)) of word c holds channel j*W + c. Unpacking field j of a tile yields the
contiguous channel slice [j*W, (j+1)*W). The kernel turns field j into the fp16 number
1024 + code * 2**(bits * (j % (8 // bits))) by OR-ing it into the mantissa of 1024.0 (0x6400), then
subtracts 1024 and applies scale and zero point in one fp16 fma.
"""
from __future__ import annotations

import numpy as np

MAGIC = 0x6400  # fp16 bit pattern of 1024.0


def quantize_groups(x: np.ndarray, bits: int, group: int, axis: int, clip: float = 1.0):
    """Codes (uint8, same shape as x), fp16 scale and zero of each group of `group` along `axis`;
    dequantized value = code * scale + zero."""
    x = np.asarray(x, dtype=np.float32)
    axis = axis % x.ndim
    n = x.shape[axis]
    assert n % group == 0, (n, group)
    xg = x.reshape(x.shape[:axis] + (n // group, group) + x.shape[axis + 1:])
    mn = xg.min(axis=axis + 1, keepdims=True) * clip
    mx = xg.max(axis=axis + 1, keepdims=True) * clip
    qmax = (1 << bits) - 1
    scale = ((mx - mn) / qmax).astype(np.float16)
    zero = mn.astype(np.float16)
    codes = np.clip(np.rint((xg - zero.astype(np.float32)) / np.maximum(scale.astype(np.float32), 1e-8)), 0, qmax)
    return codes.astype(np.uint8).reshape(x.shape), np.squeeze(scale, axis + 1), np.squeeze(zero, axis + 1)


def dequantize_groups(codes, scale, zero, group: int, axis: int):
    axis = axis % codes.ndim
    return (codes.astype(np.float32) * np.repeat(scale.astype(np.float32), group, axis=axis)
            + np.repeat(zero.astype(np.float32), group, axis=axis))


def pack16(codes: np.ndarray, bits: int) -> np.ndarray:
    per = 16 // bits
    c = np.asarray(codes, dtype=np.uint32)
    w = c.shape[-1] // per
    c = c.reshape(c.shape[:-1] + (per, w))
    out = np.zeros(c.shape[:-2] + (w,), dtype=np.uint32)
    for j in range(per):
        out |= (c[..., j, :] & ((1 << bits) - 1)) << (j * bits)
    return out.astype(np.uint16)


def unpack16(words: np.ndarray, bits: int) -> np.ndarray:
    per = 16 // bits
    w = np.asarray(words, dtype=np.uint16).astype(np.uint32)
    return np.concatenate([(w >> (j * bits)) & ((1 << bits) - 1) for j in range(per)], -1).astype(np.uint8)


def field_fp16(words: np.ndarray, bits: int, j: int) -> np.ndarray:
    """What the kernel feeds the tensor cores for field j: fp16 1024 + code_j * 2**off_j."""
    per_byte = 8 // bits
    w = np.asarray(words, dtype=np.uint16).astype(np.uint32)
    mask = ((1 << bits) - 1) << (bits * (j % per_byte))
    return (((w >> (8 * (j // per_byte))) & mask) | MAGIC).astype(np.uint16).view(np.float16)


def dequant_ptx(high: bool) -> str:
    """The kernel's PTX for one field of two 16-bit words: $1 holds the words, $4 the field mask in
    both halves, $2/$3 the fp16 scale/zero pairs (the scale already times 2**-off); $0 gets the fp16
    pair code * scale + zero. lop3 ((a & mask) | 0x64006400: immLut 0xEA) gives 1024 + code * 2**off
    exactly, sub.f16x2 removes the 1024 exactly, fma.rn.f16x2 rounds once. A field in the high byte
    of its word first moves down by shr.b32 8 (each half's high byte lands in its low byte; bits
    crossing from the upper half stay outside every mask). Four instructions per two values, no I2F."""
    src = "t" if high else "$1"
    lines = ["{", ".reg .b32 t, m;"]
    if high:
        lines.append("shr.b32 t, $1, 8;")
    lines += [f"lop3.b32 t, {src}, $4, 0x64006400, 0xEA;", "mov.b32 m, 0x64006400;", "sub.f16x2 t, t, m;",
              "fma.rn.f16x2 $0, t, $2, $3;", "}"]
    return "\n".join(lines)


def code_ptx(bits: int, j: int) -> str:
    """PTX of the register-dequant kernel (quant_decode._qdecode_rd_kernel): field j of the two 16-bit
    words in $1 -> the fp16 pair of its exact codes (0 .. 2**bits - 1). lop3 ((w & mask) | 0x6400)
    gives 1024 + code * 2**off exactly; one fma.rn.f16x2 by 2**-off and -1024 * 2**-off (both powers
    of two, so every step is exact) leaves the code. A field in the high byte first moves down by
    shr.b32 8. Scale and zero point are applied outside, to the query / scores / probabilities, so
    this is the only per-element work: two instructions per two values (three in the high byte)."""
    per_byte = 8 // bits
    off = bits * (j % per_byte)
    mask = ((1 << bits) - 1) << off
    a = (15 - off) << 10  # fp16 2**-off
    c = 0x8000 | ((25 - off) << 10)  # fp16 -(2**(10 - off))
    src = "$1"
    lines = ["{", ".reg .b32 t, a, c;"]
    if j >= per_byte:
        lines.append("shr.b32 t, $1, 8;")
        src = "t"
    lines += [f"lop3.b32 t, {src}, 0x{mask * 0x10001:08x}, 0x64006400, 0xEA;", f"mov.b32 a, 0x{a * 0x10001:08x};",
              f"mov.b32 c, 0x{c * 0x10001:08x};", "fma.rn.f16x2 $0, t, a, c;", "}"]
    return "\n".join(lines)


def field_mask(bits: int, j: int) -> int:
    """Field j's mask within its byte (the kernel passes it in both 16-bit halves)."""
    return ((1 << bits) - 1) << (bits * (j % (8 // bits)))


def _f16x2(r: np.ndarray) -> np.ndarray:
    return np.asarray(r, dtype=np.uint32).view(np.uint16).view(np.float16).astype(np.float64).reshape(-1, 2)


def _pack_f16x2(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1).view(np.uint16).view(np.uint32)


def run_ptx(asm: str, regs_in: dict[str, np.ndarray]) -> np.ndarray:
    """Emulate the kernel's PTX (shr.b32, lop3.b32 with immLut 0xEA, mov.b32, sub.f16x2, fma.rn.f16x2)
    on arrays of 32-bit registers; regs_in maps "$1".. to uint32 arrays; returns $0. f16x2 results
    are computed exactly in float64 and rounded once to fp16 (products of fp16 values are exact)."""
    regs = {k: np.asarray(v, dtype=np.uint32) for k, v in regs_in.items()}
    n = len(next(iter(regs.values())))

    def val(t: str) -> np.ndarray:
        return regs[t] if t in regs else np.full(n, int(t, 16), dtype=np.uint32)

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        a = [t.strip() for t in rest.split(",")]
        if op == "shr.b32":
            regs[a[0]] = val(a[1]) >> np.uint32(int(a[2]))
        elif op == "lop3.b32":
            assert a[4] == "0xEA", a  # (a & b) | c
            regs[a[0]] = (val(a[1]) & val(a[2])) | val(a[3])
        elif op == "mov.b32":
            regs[a[0]] = val(a[1])
        elif op == "sub.f16x2":
            regs[a[0]] = _pack_f16x2(_f16x2(val(a[1])) - _f16x2(val(a[2])))
        elif op == "fma.rn.f16x2":
            regs[a[0]] = _pack_f16x2(_f16x2(val(a[1])) * _f16x2(val(a[2])) + _f16x2(val(a[3])))
        else:
            raise ValueError(f"unknown instruction {line!r}")
    return regs["$0"]
