"""Unpack vLLM's own compiled FlashMLA kernels (the MLA decode kernel vLLM runs on Hopper: its FlashMLA
backend, vllm/v1/attention/backends/mla/flashmla.py) from the vLLM 0.24.0 wheel on PyPI into
validation/vendor/vllm/, for the ``flashmla`` run part (validation/flashmla.py). vLLM 0.24.0 is built
against torch 2.11.0 and CUDA 13 (its METADATA: ``Requires-Dist: torch==2.11.0``; the libraries need
libcudart.so.13), the torch the device machines run, so its kernels load there without vLLM's Python
package. Run it on a machine that reaches PyPI, then carry validation/vendor on the device call; nothing
of it is committed (Apache-2.0; the wheel's sha256 is written beside the files).

  python3 validation/fetch_vllm_kernels.py [--wheel PATH]   # PATH: vllm-0.24.0-...-x86_64.whl already on disk
"""
from __future__ import annotations

import argparse
import hashlib
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
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vendor", "vllm")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
        with open(os.path.join(staged, "SOURCE"), "w") as f:
            f.write(f"vllm {VERSION} wheel {os.path.basename(wheel)} sha256 {sha256(wheel)}\n")
            for name in FILES:
                f.write(f"{os.path.basename(name)} sha256 {sha256(os.path.join(staged, os.path.basename(name)))}\n")
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.move(staged, OUT)
    print(f"vLLM {VERSION} FlashMLA kernels -> {OUT}")


if __name__ == "__main__":
    main()
