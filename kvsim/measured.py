"""Reading GPU result folders (``validation/results/<gpu>[-x<N>]/``), shared by ``kvsim calibrate``
and ``kvsim validate``: CSV rows, measured ceilings, the kvsim model and layout each kernel row
measured, and the split of kernel shapes into a calibration half and a held-out half.

Column schemas are in validation/README.md. Every decode-attention row names the kvsim method it
implements (``kvsim_spec``) and the layers it ran (``layers``), so a prediction prices exactly the
layout that was measured.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvsim.errors import KvsimError
from kvsim.kv import layout_for
from kvsim.kv.layout import KVLayout
from kvsim.spec.model import ModelSpec, model_from_dict

# Decode rows that are tuning probes or alternative baselines, not a method's production kernel.
NOT_A_PATH = ("sdpa_gqa", "sdpa_fold")
# vLLM's own decode kernels, measured from its 0.24.0 wheel: FlashMLA (validation/flashmla.py) and, for dense
# attention with a bf16 or FP8 cache, FlashAttention 3 (validation/vllm_decode.py). Where a run measured one,
# ``kvsim calibrate`` fits its kernel family's curve from it (what vLLM runs) and keeps kvsim's stand-in
# kernel of the family (what the reference engine runs) apart (REFERENCE_SUFFIX).
VLLM_DECODE_KERNELS = ("vllm_flashmla", "vllm_flashmla_fp8", "vllm_fa3", "vllm_fa3_fp8")
MLA_KERNELS = ("triton_mla_absorbed", "triton_mtla_absorbed", "vllm_flashmla", "vllm_flashmla_fp8")
# Which measured rows a fit may read: (file name, CSV row) -> keep it. kvsim.lomo leaves out one
# model's shapes with it; every row is kept otherwise.
RowFilter = Callable[[str, dict], bool]


def keep_all(_file: str, _row: dict) -> bool:
    return True


def rows(path: Path, keep: RowFilter = keep_all) -> list[dict]:
    """Rows of a result CSV that carry a time (failed points are recorded with an empty time), are not
    tiling comparisons and that ``keep`` keeps. A row whose params start ``src=`` times a named tiling
    (validation/gemm.py --part fused_moe --tilings vllm: vLLM's own choice beside the same call's best
    of 13; validation/oai_moe.py: the same kernel timed with the L2 flushed), not the timing the curves price."""
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if r.get("time_s") not in (None, "", "nan")
                and not (r.get("params") or "").startswith("src=") and keep(path.name, r)]


def base_gpu(folder_name: str) -> str:
    """Catalogue name of a results folder: ``h100-sxm-x4`` (a 4-GPU machine) or ``h100-sxm-m2`` (a second
    machine of the kind, judged with the first one's profile) -> ``h100-sxm``."""
    return re.sub(r"-(x|m)\d+$", "", folder_name)


def ceilings(folder: Path) -> dict:
    """Measured ceilings in calibration-profile keys. The copy bandwidth is the better of the
    start-of-run and end-of-run measurements (clocks may still be ramping at the start)."""
    path = folder / "ceilings.json"
    if not path.is_file():
        raise KvsimError("no ceilings.json: run validation/run_all.py on the GPU first", field="gpu",
                         value=folder.name, file=str(path))
    c = json.loads(path.read_text())
    copy = max(float(c["copy"]["bw_Bps"]), float(c.get("copy_end", {}).get("bw_Bps", 0.0)))
    out = {"copy_bytes_per_s": copy, "bf16_flops_per_s": float(c["gemm_bf16"]["rate_flops"])}
    if "gemm_fp8" in c:
        out["fp8_flops_per_s"] = float(c["gemm_fp8"]["rate_flops"])
    if "host" in c:
        out["h2d_bytes_per_s"] = float(c["host"]["h2d_pinned_Bps"])
    # The lab machine's disk (a VM's virtual disk) says nothing about a serving box's NVMe: SSD
    # reads (MatKV, offload) use the hardware description's rate; the measurement stays in
    # ceilings.json for the MatKV load benchmark it accompanies.
    return out


def attention_model(q_heads: int, kv_heads: int, head_dim: int, layers: int = 1, mla: bool = False) -> ModelSpec:
    """A model with only the attention shape of a kernel benchmark (validation/kernels/layout_step.py
    builds the same one), ``layers`` identical layers."""
    attention: dict[str, object] = {"num_heads": q_heads, "num_kv_heads": kv_heads, "head_dim": head_dim,
                                    "v_head_dim": head_dim}
    if mla:  # the kernels' latent (512) + RoPE key (64): DeepSeek-V2/V3 shapes (config.json kv_lora_rank)
        attention.update(head_dim=192, v_head_dim=128, num_kv_heads=q_heads,
                         mla={"kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                              "v_head_dim": 128})
    name = f"attn-{layers}x{q_heads}-{kv_heads}-{head_dim}" + ("-mla" if mla else "")
    return model_from_dict({
        "name": name, "dtype": "bfloat16", "hidden_size": q_heads * head_dim, "vocab_size": 1,
        "tie_word_embeddings": True, "max_position_embeddings": 1 << 20,
        "source": {"config": "synthetic", "hf_repo": "none"}, "attention": attention,
        "mlp": {"intermediate_size": 1}, "layers": [{"repeat": layers, "pattern": ["mla" if mla else "full"]}]})


@dataclass(frozen=True)
class KernelRow:
    """One decode-attention measurement and what it measured."""

    method: str  # the kernel (triton_bf16, triton_kivi, layout_step, ...)
    spec: str  # the kvsim method spec it implements
    batch: int
    context: int
    layers: int
    shape: tuple[int, int, int]  # q_heads, kv_heads, head_dim
    mla: bool
    time_s: float
    call: str  # the measuring call: the row's ``run`` column, else its file (no run id recorded)

    @property
    def group(self) -> tuple:
        """Rows comparable with each other: the same kernel harness, attention shape and call."""
        harness = "mla" if self.mla else ("layout_step" if self.method == "layout_step" else "single")
        return harness, self.shape, self.layers, self.call

    @property
    def key(self) -> tuple[int, int]:
        return self.batch, self.context

    def model(self) -> ModelSpec:
        q, kv, hd = self.shape
        return attention_model(q, kv, hd, self.layers, self.mla)

    def layout(self) -> KVLayout:
        return layout_for(self.model(), self.spec)


def decode_rows(folder: Path, keep: RowFilter = keep_all) -> list[KernelRow]:
    """The decode-attention rows that measure a method's kernel (tuning probes and SDPA variants out)."""
    out = []
    path = folder / "attention_decode.csv"
    for r in rows(path, keep):
        spec = r.get("kvsim_spec", "")
        if r.get("phase", "decode") != "decode" or not spec or r["method"] in NOT_A_PATH:
            continue
        out.append(KernelRow(r["method"], spec, int(r["batch"]), int(r["context"]), int(r.get("layers") or 1),
                             (int(r["q_heads"]), int(r["kv_heads"]), int(r["head_dim"])),
                             r["method"] in MLA_KERNELS, float(r["time_s"]), r.get("run") or path.name))
    return out


def held_out_rows(kernel_rows: list[KernelRow]) -> set[KernelRow]:
    """For each single-layer kernel and method, every other (batch, context) shape it was measured
    at, in sorted order: ``kvsim calibrate`` fits kernel efficiencies on the rest, and ``kvsim
    validate`` judges method speed-ups on these, so each method has shapes on both sides. Multi-layer
    steps (``layers`` > 1) are all held out: calibration never reads them."""
    shapes: dict[tuple, set[tuple[int, int]]] = {}
    for r in kernel_rows:
        shapes.setdefault((r.group, r.method, r.spec), set()).add(r.key)
    held = {g: {k for i, k in enumerate(sorted(keys)) if i % 2 == 1} for g, keys in shapes.items()}
    return {r for r in kernel_rows if r.layers != 1 or r.key in held[(r.group, r.method, r.spec)]}


def baseline_row(row: KernelRow, by_group: dict) -> KernelRow | None:
    """The bf16 row measured by the same harness, in the same call, at the same shape (the dense
    production kernel for single-layer rows)."""
    for other in by_group.get(row.group, ()):
        production = row.group[0] != "single" or other.method == "triton_bf16"
        if other.key == row.key and other.spec == "bf16" and production:
            return other
    return None


def judged_rows(kernel_rows: list[KernelRow]) -> list[tuple[KernelRow, KernelRow]]:
    """(method row, its bf16 baseline) for every non-bf16 row calibration held out that has a
    same-call baseline: the rows ``kvsim validate`` judges speed-ups on."""
    by_group = group_rows(kernel_rows)
    held = held_out_rows(kernel_rows)
    out = []
    for r in kernel_rows:
        base = baseline_row(r, by_group) if r.spec != "bf16" and r in held else None
        if base is not None:
            out.append((r, base))
    return out


def group_rows(kernel_rows: list[KernelRow]) -> dict:
    out: dict[tuple, list[KernelRow]] = {}
    for r in kernel_rows:
        out.setdefault(r.group, []).append(r)
    return out
