"""Pure-numpy reference of the packed layout that validation/kernels/quant_decode.py reads (no
torch): asymmetric min/max group quantization, "blocked" int16 packing, and an emulator of the
kernel's PTX unpack (lop3 / shr on two 16-bit words per 32-bit register), so the CPU tests can check
the asm strings bit for bit without a GPU.

Packing: with per = 16 // bits fields per 16-bit word and W = D // per words per token, bit field j
(bits [j*bits, (j+1)*bits)) of word c holds channel j*W + c. Unpacking field j of a tile yields the
contiguous channel slice [j*W, (j+1)*W). The kernel turns field j into the fp16 number
1024 + code * 2**(bits * (j % (8 // bits))) by OR-ing it into the mantissa of 1024.0 (0x6400).
"""
from __future__ import annotations

import re

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


def unpack_ptx(bits: int) -> str:
    """The kernel's PTX: register $n holds two 16-bit words; outputs $0..$(n-1) are fields 0..n-1 of
    both words as fp16 pairs. Fields in the low byte of each half come straight from lop3 ((a & mask)
    | 0x64006400: immLut 0xEA); the high byte's fields after one shr.b32 by 8 (each half's high byte
    lands in its low byte; bits crossing from the upper half stay outside every mask)."""
    per_byte, n = 8 // bits, 16 // bits
    lines = ["{", ".reg .b32 t;"]
    for j in range(n):
        if j == per_byte:
            lines.append(f"shr.b32 t, ${n}, 8;")
        field = ((1 << bits) - 1) << (bits * (j % per_byte))
        lines.append(f"lop3.b32 ${j}, {f'${n}' if j < per_byte else 't'}, 0x{field | field << 16:08X}, 0x64006400, 0xEA;")
    lines.append("}")
    return "\n".join(lines)


def run_ptx(asm: str, word_pairs: np.ndarray) -> list[np.ndarray]:
    """Emulate the kernel's unpack PTX (only lop3.b32 with immLut 0xEA and shr.b32) on 32-bit
    registers holding two 16-bit words each; returns the output registers as fp16 pairs."""
    regs = {}
    n_out = len(re.findall(r"lop3\.b32 \$\d+", asm))
    src = np.asarray(word_pairs, dtype=np.uint32)
    regs[f"${n_out}"] = src
    regs["t"] = np.zeros_like(src)
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line.startswith("shr.b32"):
            dst, a, k = [t.strip() for t in line[len("shr.b32"):].split(",")]
            regs[dst] = regs[a] >> np.uint32(int(k))
        elif line.startswith("lop3.b32"):
            dst, a, b, c, lut = [t.strip() for t in line[len("lop3.b32"):].split(",")]
            assert lut == "0xEA", lut  # (a & b) | c
            regs[dst] = (regs[a] & np.uint32(int(b, 16))) | np.uint32(int(c, 16))
    return [regs[f"${i}"].astype(np.uint32).view(np.uint16).view(np.float16) for i in range(n_out)]
