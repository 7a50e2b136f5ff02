"""What each serving engine kvsim can take kernels from ships as KV-cache features.

kvsim prices research KV methods (KIVI, H2O, SnapKV, ...) on any engine's kernels, but a serving
engine runs only the KV formats it implements. ``unshipped`` names the methods of a layout that the
chosen engine does not ship, so summaries and search rankings can flag them (a KIVI configuration
on vLLM is a what-if, not something ``vllm serve`` runs).
"""

from __future__ import annotations

# KV methods (kvsim.kv.METHODS names) each engine ships, with the documentation that says so:
# - vLLM: kv_cache_dtype auto (bf16/fp16) or fp8 (docs "Quantized KV Cache"); KV offloading to CPU
#   through its KV-connector API (docs "KV offloading", LMCache connector).
# - SGLang: --kv-cache-dtype auto, fp8_e5m2 or fp8_e4m3 (docs "Server Arguments"); HiCache host offload.
# - TensorRT-LLM: FP8 and INT8 KV cache (docs "KV cache quantization"); host offloading of KV blocks.
SHIPPED_METHODS = {
    "vllm": ("bf16", "fp16", "fp8", "offload"),
    "sglang": ("bf16", "fp16", "fp8", "offload"),
    "trtllm": ("bf16", "fp16", "fp8", "intkv", "offload"),
}


def unshipped(engine: str, methods: tuple[str, ...] | list[str]) -> list[str]:
    """The methods of a layout (``name`` or ``name:params``) that ``engine`` does not ship."""
    shipped = SHIPPED_METHODS[engine]
    return [m for m in methods if m.split(":", 1)[0] not in shipped]
