"""Unpack vLLM's own compiled kernels from the vLLM 0.24.0 wheel on PyPI into validation/vendor/vllm/:
its FlashMLA kernels (the MLA decode kernel vLLM runs on Hopper: its FlashMLA backend,
vllm/v1/attention/backends/mla/flashmla.py), for the ``flashmla`` run part (validation/flashmla.py), and
its main kernel library ``_C_stable_libtorch.abi3.so`` (CUTLASS FP8 GEMMs, Machete, ...) for the
``vllm_gemm`` part (validation/vllm_gemm.py). The main library is 110 MB, more than a device call
carries (64 MiB), so it is written xz-compressed with the GPU code of every compute capability but 9.0
zeroed (``prune_fatbin``: the CUDA fatbin entries for sm_75-sm_120 keep their headers and sizes, their
payloads become zeros, which compress away; a compute capability 9.0 GPU loads only its own entries):
17.6 MB. The ``vllm_fa3`` part (validation/vllm_prefill.py) times vLLM's FlashAttention-3 library
``vllm_flash_attn/_vllm_fa3_C.abi3.so`` (what its FlashAttention backend, vllm/v1/attention/backends/
flash_attn.py, runs on Hopper), 153 MB of GPU code for compute capability 9.0 only, so it is written
xz-compressed whole, not pruned: 10.7 MB. vLLM 0.24.0 is built
against torch 2.11.0 and CUDA 13 (its METADATA: ``Requires-Dist: torch==2.11.0``; the libraries need
libcudart.so.13), the torch the device machines run, so its kernels load there without vLLM's Python
package. Run it on a machine that reaches PyPI, then carry validation/vendor on the device call; nothing
of it is committed (Apache-2.0; the wheel's sha256 is written beside the files).

  python3 validation/fetch_vllm_kernels.py [--wheel PATH]   # PATH: vllm-0.24.0-...-x86_64.whl already on disk
"""
from __future__ import annotations

import argparse
import hashlib
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

VERSION = "0.24.0"
# the two libraries the FlashMLA backend imports (vllm/v1/attention/ops/flashmla.py): dense bf16 decode
# (torch.ops._flashmla_C.dense_decode_fwd) and dense FP8-cache decode (torch.ops._flashmla_extension_C)
FILES = ("vllm/_flashmla_C.abi3.so", "vllm/_flashmla_extension_C.abi3.so")
MAIN = "vllm/_C_stable_libtorch.abi3.so"  # carried pruned and compressed (prune_fatbin)
# FlashAttention 3 (torch.ops._vllm_fa3_C, vllm/vllm_flash_attn/flash_attn_interface.py): its GPU code is
# all compute capability 9.0 (Hopper-only), so it is carried compressed, not pruned
FA3 = "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so"
KEEP_SM = 90  # the compute capability whose GPU code is kept (H100, H200)
FATBIN_MAGIC = 0xBA55ED50
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vendor", "vllm")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prune_fatbin(data: bytearray, keep_sm: int) -> int:
    """Zero, in place, the payload of every CUDA fatbin entry (cubin or PTX) in the ELF shared library
    ``data`` whose architecture is not ``keep_sm``; returns the bytes zeroed. The layout (the fatbin
    header: magic, version, header size, size; each entry: kind, version, header size, payload size at
    8, architecture at 28) is the one cuobjdump reads; the section is found through the ELF section
    headers (64-bit little-endian)."""
    import struct

    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]
    fatbin = next(((off, size) for name, _, _, _, off, size in sections
                   if data[names_at + name:data.index(b"\0", names_at + name)] == b".nv_fatbin"), None)
    if fatbin is None:
        raise SystemExit("no .nv_fatbin section")
    pos, end = fatbin[0], fatbin[0] + fatbin[1]
    zeroed = 0
    while pos < end:
        magic, _, header, size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:  # alignment padding between fatbins
            pos += 8
            continue
        entry, stop = pos + header, pos + header + size
        while entry < stop:
            _, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            arch, = struct.unpack_from("<I", data, entry + 28)
            if arch != keep_sm:
                data[entry + entry_header:entry + entry_header + payload] = bytes(payload)
                zeroed += payload
            entry += entry_header + payload
        pos = stop
    return zeroed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheel", help=f"the vllm {VERSION} x86_64 wheel (else pip downloads it)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel
        if not wheel:
            subprocess.run([sys.executable, "-m", "pip", "download", f"vllm=={VERSION}", "--no-deps",
                            "--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64", "-d", tmp, "-q"],
                           check=True)
            wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        if f"vllm-{VERSION}-" not in os.path.basename(wheel):
            raise SystemExit(f"{wheel}: not the vllm {VERSION} wheel")
        staged = os.path.join(tmp, "vllm")
        os.makedirs(staged)
        with zipfile.ZipFile(wheel) as z:
            for name in FILES:
                with z.open(name) as src, open(os.path.join(staged, os.path.basename(name)), "wb") as dst:
                    shutil.copyfileobj(src, dst)
            data = bytearray(z.read(MAIN))
            fa3 = os.path.join(staged, os.path.basename(FA3) + ".xz")
            fa3_hash = hashlib.sha256()
            with z.open(FA3) as src, lzma.open(fa3, "wb", preset=6) as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    fa3_hash.update(block)
                    dst.write(block)
        zeroed = prune_fatbin(data, KEEP_SM)
        packed = os.path.join(staged, os.path.basename(MAIN) + ".xz")
        with lzma.open(packed, "wb", preset=6) as dst:
            dst.write(data)
        with open(os.path.join(staged, "SOURCE"), "w") as f:
            f.write(f"vllm {VERSION} wheel {os.path.basename(wheel)} sha256 {sha256(wheel)}\n")
            for name in FILES:
                f.write(f"{os.path.basename(name)} sha256 {sha256(os.path.join(staged, os.path.basename(name)))}\n")
            f.write(f"{os.path.basename(MAIN)}: GPU code of compute capabilities other than {KEEP_SM // 10}.{KEEP_SM % 10} "
                    f"zeroed ({zeroed} bytes), xz-compressed: {os.path.basename(packed)} sha256 {sha256(packed)}\n")
            f.write(f"{os.path.basename(FA3)} ({FA3[len('vllm/'):]} in the wheel) sha256 {fa3_hash.hexdigest()}, "
                    f"xz-compressed: {os.path.basename(fa3)} sha256 {sha256(fa3)}\n")
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.move(staged, OUT)
    print(f"vLLM {VERSION} FlashMLA kernels, {os.path.basename(MAIN)} (compute capability {KEEP_SM // 10}.{KEEP_SM % 10}) "
          f"and {os.path.basename(FA3)} -> {OUT}")


if __name__ == "__main__":
    main()
