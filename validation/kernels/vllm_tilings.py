"""The tilings vLLM's Triton fused-MoE path launches on Hopper, so kernels/fused_moe.py can be timed at vLLM's
choice rather than at the best of gemm.MOE_CONFIGS (gemm.py --part fused_moe --tilings vllm).

How vLLM chooses (vllm/model_executor/layers/fused_moe/fused_moe.py, try_get_optimal_moe_config and
get_moe_configs, the same in 0.12.0 and 0.19.0): it reads
configs/E=<experts>,N=<N>,device_name=<device>[,dtype=fp8_w8a8][,block_shape=[128,128]].json, N being the
intermediate size per rank (``E, _, N = w2_shape``: w2's K, half of the fused w13's N), and takes the entry whose
token-count key is closest to the layer's token count (the first such key in the file's order on a tie; one
config serves both GEMMs of the layer). With no file, get_default_config's rule, which changed between 0.12.0
and 0.19.0 (below). A config without num_warps / num_stages launches with Triton's defaults; block-FP8
launches clamp BLOCK_SIZE_K to the 128 of the scale blocks and every launch sets SPLIT_K to 1
(invoke_fused_moe_kernel). This is the rule written out again for kvsim; no vLLM code is copied.

The file entries these shapes need are in vllm_moe_configs.json, data from the PyPI wheels (Apache-2.0), written by
  python3 validation/kernels/vllm_tilings.py --wheel vllm-0.12.0-*.whl --wheel vllm-0.19.0-*.whl
and a --tilings vllm run's rows summarized (vLLM's tiling over the same call's best of 13) by
  python3 validation/kernels/vllm_tilings.py --summarize validation/results/<gpu>/fused_moe.csv
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys
import zipfile
from dataclasses import dataclass

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_moe_configs.json")
CONFIGS_DIR = "vllm/model_executor/layers/fused_moe/configs/"
# the names get_config_file_name gives the two Hopper parts kvsim measures (torch's device name, spaces to '_';
# any name with an 'H200' word becomes NVIDIA_H200)
DEVICES = ("NVIDIA_H100_80GB_HBM3", "NVIDIA_H200")
# mode -> the file name's dtype and block selectors (Fp8 per-tensor: dtype fp8_w8a8; 128x128 blocks add
# block_shape=[128,128]; bf16 has neither)
SELECTOR = {"bf16": "", "fp8": ",dtype=fp8_w8a8", "fp8_block": ",dtype=fp8_w8a8,block_shape=[128,128]"}
SCALE_BLOCK = 128  # the block-FP8 checkpoints' weight_block_size, which invoke_fused_moe_kernel clamps BLOCK_SIZE_K to
# Triton's launch defaults where a config names neither (triton/backends/nvidia/compiler.py, CUDAOptions:
# num_warps 4, num_stages 3; the same in Triton 3.5 and 3.6)
TRITON_WARPS, TRITON_STAGES = 4, 3


@dataclass(frozen=True)
class Tiling:
    """One launch configuration of the fused-MoE GEMM and where vLLM took it from ('config': a tuned file's
    entry, 'default': get_default_config)."""
    bm: int
    bn: int
    bk: int
    group_m: int
    warps: int
    stages: int
    source: str

    def cfg(self) -> dict:
        """The dict kernels/fused_moe.moe_gemm takes."""
        return dict(BM=self.bm, BN=self.bn, BK=self.bk, GROUP_M=self.group_m, warps=self.warps, stages=self.stages)


def device_name(gpu_name: str) -> str:
    """vLLM's device_name for a torch device name, e.g. 'NVIDIA H100 80GB HBM3' -> NVIDIA_H100_80GB_HBM3."""
    name = gpu_name.replace(" ", "_")
    return "NVIDIA_H200" if "H200" in name.split("_") else name


def intermediate_size(n: int, k: int, label: str) -> int:
    """The N of vLLM's file name for one GEMM of gemm.FUSED_MOE: w13 [2I, H] -> I; w2 [H, I] -> I."""
    if label.endswith(".w13"):
        return n // 2
    if label.endswith(".w2"):
        return k
    raise ValueError(f"fused-MoE layer label {label!r} names neither w13 nor w2")


def file_name(experts: int, inter: int, device: str, mode: str) -> str:
    return f"E={experts},N={inter},device_name={device}{SELECTOR[mode]}.json"


def load_table(path: str = TABLE) -> dict:
    with open(path) as f:
        return json.load(f)


def vllm_tiling(table: dict, version: str, gpu_name: str, experts: int, inter: int, mode: str, tokens: int) -> Tiling:
    """The tiling vLLM ``version`` ('0.12' or '0.19') launches for ``tokens`` tokens of one MoE layer."""
    name = file_name(experts, inter, device_name(gpu_name), mode)
    files = table["versions"][version]["files"]
    if name not in files:
        raise KeyError(f"{name} not in {TABLE} for vLLM {version}: regenerate it (module docstring)")
    entries = files[name]
    if entries is None:
        return DEFAULT_RULES[version](tokens, experts, mode)
    key = min(entries, key=lambda m: abs(int(m) - tokens))  # dict order is the file's order
    e = entries[key]
    bk = min(e["BLOCK_SIZE_K"], SCALE_BLOCK) if mode == "fp8_block" else e["BLOCK_SIZE_K"]
    return Tiling(e["BLOCK_SIZE_M"], e["BLOCK_SIZE_N"], bk, e["GROUP_SIZE_M"], e.get("num_warps", TRITON_WARPS),
                  e.get("num_stages", TRITON_STAGES), "config")


def default_0_12(tokens: int, experts: int, mode: str) -> Tiling:
    """vLLM 0.12.0 get_default_config: block FP8 64x128x128, GROUP_M 32, 4 warps, 3 stages; otherwise 16x32x64,
    GROUP_M 1 up to one token per expert, 64x64x32, GROUP_M 8 above (Triton's warps and stages)."""
    if mode == "fp8_block":
        return Tiling(64, SCALE_BLOCK, SCALE_BLOCK, 32, 4, 3, "default")
    if tokens <= experts:
        return Tiling(16, 32, 64, 1, TRITON_WARPS, TRITON_STAGES, "default")
    return Tiling(64, 64, 32, 8, TRITON_WARPS, TRITON_STAGES, "default")


def default_0_19(tokens: int, experts: int, mode: str) -> Tiling:
    """vLLM 0.19.0 get_default_config: block FP8 BLOCK_M 16 up to 64 tokens (64 above), GROUP_M 1 up to 16 tokens
    (32 above), 128x128 blocks, 4 warps, 3 stages. bf16 and FP8 per-tensor: BLOCK_M 16 / 32 / 64 / 128 up to 32 / 96
    / 512 tokens / above; BLOCK_N 64 up to 64 tokens, 128 above; BLOCK_K 128 for FP8 or up to 64 tokens, else 64;
    GROUP_M 16 above 128 tokens per expert, else 1; 4 warps up to 128 tokens, else 8; 4 stages up to 32 tokens,
    else 3."""
    if mode == "fp8_block":
        return Tiling(16 if tokens <= 64 else 64, SCALE_BLOCK, SCALE_BLOCK, 1 if tokens <= 16 else 32, 4, 3, "default")
    bm = 16 if tokens <= 32 else 32 if tokens <= 96 else 64 if tokens <= 512 else 128
    bk = 128 if mode == "fp8" or tokens <= 64 else 64
    return Tiling(bm, 64 if tokens <= 64 else 128, bk, 16 if tokens // experts > 128 else 1,
                  4 if tokens <= 128 else 8, 4 if tokens <= 32 else 3, "default")


DEFAULT_RULES = {"0.12": default_0_12, "0.19": default_0_19}


def needed_files() -> list[str]:
    """Every config file name vLLM would look up for gemm.FUSED_MOE's shapes on the two Hopper parts."""
    from validation.gemm import FUSED_MOE

    pairs = sorted({(e, intermediate_size(n, k, label)) for e, _, n, k, label in FUSED_MOE})
    return [file_name(e, i, d, m) for e, i in pairs for d in DEVICES for m in SELECTOR]


def read_wheel(path: str, names: list[str]) -> tuple[str, dict]:
    """(version, {file name: its entries without triton_version, or None where the wheel has no such file})."""
    version = re.match(r"vllm-(\d+\.\d+)\.", os.path.basename(path)).group(1)
    files = {}
    with zipfile.ZipFile(path) as z:
        held = set(z.namelist())
        for name in names:
            entries = json.loads(z.read(CONFIGS_DIR + name)) if CONFIGS_DIR + name in held else None
            if entries is not None:
                entries.pop("triton_version", None)
            files[name] = entries
    return version, files


# token-count ranges of the summary: decode batches, small batches, mid-size batches, prefill chunks (upper bounds)
RANGES = ((16, "1-16"), (128, "32-128"), (1024, "256-1024"), (float("inf"), "2k+"))


def summary(path: str) -> str:
    """Per vLLM version, mode and token range: median and range of time(vLLM's tiling) / time(best of 13) over
    the rows of --tilings vllm runs in a fused_moe.csv (paired by run, layer, mode and tokens)."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["params"].startswith("src=") and r["time_s"]]
    key = lambda r: (r.get("run", ""), r["layer"], r["mode"], int(r["tokens"]))  # noqa: E731
    best = {key(r): float(r["time_s"]) for r in rows if r["params"].startswith("src=best-of-13;")}
    ratios: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        src = r["params"].split(";")[0].removeprefix("src=")
        if src == "best-of-13" or key(r) not in best:
            continue
        span = next(name for top, name in RANGES if int(r["tokens"]) <= top)
        for version in src.split("+"):  # vllm-0.12-config -> 0.12
            ratios.setdefault((version.split("-")[1], r["mode"], span), []).append(float(r["time_s"]) / best[key(r)])
    lines = [f"{'vLLM':5s} {'mode':9s} {'tokens':8s} {'n':>3s} {'median':>7s} {'min':>6s} {'max':>6s}  "
             "time(vLLM tiling) / time(best of 13)"]
    for (version, mode, span), rs in sorted(ratios.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                             [n for _, n in RANGES].index(kv[0][2]))):
        lines.append(f"{version:5s} {mode:9s} {span:8s} {len(rs):3d} {statistics.median(rs):7.3f} {min(rs):6.3f} "
                     f"{max(rs):6.3f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description="write vllm_moe_configs.json from vLLM wheels (pip download --no-deps), "
                                             "or summarize a --tilings vllm run")
    ap.add_argument("--wheel", action="append", help="a vllm-<version>-*.whl; repeat for each version")
    ap.add_argument("--out", default=TABLE)
    ap.add_argument("--summarize", metavar="CSV", help="a fused_moe.csv holding --tilings vllm rows")
    a = ap.parse_args()
    if a.summarize:
        print(summary(a.summarize))
        return
    if not a.wheel:
        ap.error("--wheel or --summarize")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(TABLE))))  # the repo root, for validation.gemm
    names = needed_files()
    versions = {}
    for w in a.wheel:
        v, files = read_wheel(w, names)
        versions[v] = {"wheel": os.path.basename(w), "files": files}
    out = {"source": "vLLM wheels from PyPI, vllm/model_executor/layers/fused_moe/configs/<name> (Apache-2.0); "
                     "null: no such file in that wheel (get_default_config's rule applies). Written by "
                     "validation/kernels/vllm_tilings.py.", "versions": versions}
    text = json.dumps(out, indent=1)  # one line per token-count entry
    text = re.sub(r"\{\s*(\"BLOCK_SIZE_M\"[^{}]*?)\s*\}", lambda m: "{" + " ".join(m.group(1).split()) + "}", text)
    with open(a.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
