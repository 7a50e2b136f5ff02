"""Unpack the triton_kernels package vLLM 0.18.0 ships (vllm/third_party/triton_kernels: OpenAI's Triton
MoE kernels, MIT, built for Triton 3.6) into validation/vendor/, for the ``oai_moe`` run part. Run it on a
machine that reaches PyPI, then carry validation/vendor on the device call; nothing of it is committed.

  python3 validation/fetch_triton_kernels.py [--wheel PATH]   # PATH: a vllm-0.18.0 wheel already downloaded
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

VLLM = "vllm==0.18.0"
PREFIX = "vllm/third_party/triton_kernels/"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vendor")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheel", help="a downloaded vllm-0.18.0 wheel (else pip downloads it, about 430 MB)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", VLLM, "-d", tmp], check=True)
            wheel = glob.glob(os.path.join(tmp, "vllm-*.whl"))[0]
        staged = os.path.join(tmp, "triton_kernels")
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if n.startswith(PREFIX) and not n.endswith("/")]
            if not names:
                raise SystemExit(f"{wheel}: no {PREFIX} inside")
            for n in names:
                dest = os.path.join(staged, n[len(PREFIX):])
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with z.open(n) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        target = os.path.join(OUT, "triton_kernels")
        shutil.rmtree(target, ignore_errors=True)
        os.makedirs(OUT, exist_ok=True)
        shutil.move(staged, target)
    print(f"{len(names)} files of {os.path.basename(wheel)} -> {target}")


if __name__ == "__main__":
    main()
