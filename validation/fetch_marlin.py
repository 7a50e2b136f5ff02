"""Unpack IST-DASLab's Marlin (the FP16 x INT4 GEMM kernel whose design vLLM's Marlin kernels carry on:
csrc/quantization/gptq_marlin, the W4A16 path of AWQ checkpoints on every GPU and of GPTQ ones before
Hopper; Frantar et al., arXiv 2408.11743; Apache-2.0) into validation/vendor/marlin/, for the ``marlin``
run part (validation/gemm.py --part marlin), which compiles it on the device. Run it on a machine that
reaches GitHub, then carry validation/vendor on the device call; nothing of it is committed.

  python3 validation/fetch_marlin.py [--git-dir DIR]   # DIR: a clone of IST-DASLab/marlin already on disk
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request

COMMIT = "2f6d7c10e124b3c5fa29ff8d77d568bd7af3274c"  # the repository's head, 2024-04-04
URL = f"https://github.com/IST-DASLab/marlin/archive/{COMMIT}.tar.gz"
FILES = ("LICENSE", "marlin/__init__.py", "marlin/marlin_cuda.cpp", "marlin/marlin_cuda_kernel.cu")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vendor", "marlin")
# CUDA 13's ptxas drops the createpolicy that Marlin's L2 evict-first hint on the weight loads needs and
# the kernel traps with an illegal instruction on sm_90 (IST-DASLab/marlin issue 44; issue 40's fix, seen
# here on an H100 with nvcc 13.0, run h100-call19): the weights are loaded with a plain cp.async.cg.
HINTED = ('"   .reg .b64 p;\\n"\n'
          '    "   createpolicy.fractional.L2::evict_first.b64 p, 1.0;"\n'
          '    "   cp.async.cg.shared.global.L2::cache_hint [%0], [%1], %2, p;\\n"')
PLAIN = '"   cp.async.cg.shared.global [%0], [%1], %2;\\n"'


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--git-dir", help="a git directory of IST-DASLab/marlin holding the commit (else GitHub's tarball)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        staged = os.path.join(tmp, "marlin")
        if args.git_dir:
            data = subprocess.run(["git", "--git-dir", args.git_dir, "archive", "--format=tar", COMMIT, *FILES],
                                  check=True, capture_output=True).stdout
            prefix = ""
        else:
            with urllib.request.urlopen(URL, timeout=120) as r:  # noqa: S310 - a fixed https URL
                data = r.read()
            prefix = f"marlin-{COMMIT}/"
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            for name in FILES:
                member = t.extractfile(prefix + name)
                if member is None:
                    raise SystemExit(f"{prefix + name}: not in the archive")
                dest = os.path.join(staged, name)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                data = member.read()
                if name.endswith(".cu"):
                    text = data.decode()
                    if text.count(HINTED) != 1:
                        raise SystemExit(f"{name}: the hinted weight load to patch is not there once")
                    data = text.replace(HINTED, PLAIN).encode()
                with open(dest, "wb") as f:
                    f.write(data)
        with open(os.path.join(staged, "COMMIT"), "w") as f:
            f.write(COMMIT + " (weight loads without the L2 hint: fetch_marlin.py)\n")
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.move(staged, OUT)
    print(f"Marlin {COMMIT[:10]} -> {OUT}")


if __name__ == "__main__":
    main()
