"""Which measured decode-attention kernel prices a KV layout, and what kvsim can say about it.

A calibration profile holds one efficiency curve per measured decode kernel
(``attention_decode.<family>``, ``kvsim.cost.model.decode_family``). A layout's kernel is priced:

* **measured**: the profile has the curve of its own kernel at its own bit widths (or of a method
  that runs the very same kernel: KIVI and the asymmetric-bit method share ``triton_kivi``);
* **derived**: the nearest measured neighbour's efficiency is applied to this layout's own roofline
  terms, so the time scales with the bytes it reads and the dequantization work it does; a method
  without a kernel of its own (PackKV, plain offload), or whose kernel the profile lacks (KVQuant
  in a profile measured before its kernel existed), is priced this way with the kernel named below;
* **refused**: a quantized layout whose kernel has no measured curve at any width in a measured
  profile (the message names the measured combinations); a quantized MLA or MTLA cache is priced as
  the profile prices its 16-bit layout instead (those kernels are measured at 16 bits only);
* **prior** / **roofline**: the profile itself is a labelled prior or the pure roofline, and its
  dense curve prices every kernel (the dequantization work stays on the roofline).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from kvsim.cost.calibration import Calibration, Curve
from kvsim.errors import KvsimError

DENSE = "attention_decode"

# The quantized-decode kernel that runs each method's layout (validation/kernels/bench_quant.py
# ``variants`` at 2/4/8 bits, validation/kernels/bench_methods.py ``variants`` at the other widths on
# the bit-plane kernel): triton_kivi runs KIVI and asymmetric K/V widths alike (keys per channel,
# values per token, fp16 residual), triton_intkv the per-token groups, triton_skvq SKVQ's clipped
# groups, triton_minikv MiniKV's kept tokens (KIVI-style groups of 16), triton_kvquant KVQuant's
# per-channel tables and sparse outliers; TTKV's host tier is measured by
# validation/kernels/bench_offload.py ``ttkv_point``.
OWN_KERNEL = {"kivi": "kivi", "asymkv": "kivi", "intkv": "intkv", "skvq": "skvq", "ttkv": "ttkv", "minikv": "minikv",
              "kvquant": "kvquant"}
# Methods with no kernel of their own, priced with another method's measured kernel (why).
BORROWED_KERNEL = {
    "packkv": ("intkv", "PackKV's data-dependent unpacking is not measured; bench_quant runs its fixed-width "
                        "path, which is the per-token int kernel"),
}
# Kernels a profile may lack (measured before they existed): priced with this kernel instead (why).
FALLBACK_KERNEL = {
    "minikv": ("kivi", "the profile has no rows of MiniKV's kernel (validation/kernels/bench_methods.py); it "
                       "quantizes as KIVI does (arXiv 2411.18077: group 16, residual 128)"),
    "kvquant": ("intkv", "the profile has no rows of KVQuant's lookup-table kernel (validation/kernels/"
                         "bench_methods.py); priced as the uniform per-token int kernel"),
}
# Kernels measured at 16 bits only: a narrower cache is priced on the 16-bit curve with its own
# (fewer) bytes and dequantization work, labelled derived (no quantized MLA kernel exists in
# validation/kernels). It is an estimate, not a bound: where vLLM's FP8 FlashMLA is measured (H100,
# run h100-call25, attention_decode.mla.k8v8) this rule gives 0.95-1.8x its time (DeepSeek-R1, TP 1-8,
# 1-256 sequences, 512-32k tokens).
SIXTEEN_BIT_ONLY = frozenset({"mla", "mtla"})
# Unquantized families without a measured curve: priced with the dense kernel, and why.
# The rule of every derived price: the curve's efficiency applied to this layout's own roofline terms.
RULE = "bytes and dequantization work"

Status = Literal["measured", "derived", "prior", "roofline"]


@dataclass(frozen=True)
class KernelSource:
    """How decode attention is priced: the profile curve used and where it stands."""

    family: str  # the kernel the layout needs (decode_family)
    curve: str  # the profile curve that prices it
    status: Status
    reason: str = ""  # for derived: why this curve (no kernel of its own, nearest measured widths)

    @property
    def label(self) -> str:
        """One line for summaries and breakdowns."""
        if self.status == "measured":
            return f"measured ({self.curve})"
        if self.status == "derived":
            return f"cost from {self.curve} scaled by {RULE}, not measured: {self.reason}"
        return f"{self.status} profile ({self.curve}), not measured for {self.family}"

    @property
    def short(self) -> str:
        """A few words for tables (``kvsim methods``)."""
        curve = self.curve.removeprefix(DENSE + ".") if self.curve != DENSE else "dense"
        return {"measured": f"measured ({curve})", "derived": f"from {curve}, not measured"}.get(
            self.status, f"{self.status}, not measured")

    def as_dict(self) -> dict[str, str]:
        return {"family": self.family, "curve": self.curve, "status": self.status, "reason": self.reason,
                "label": self.label}


def _widths(family: str) -> tuple[str, float, float] | None:
    """``kivi.k2v1.5`` -> ("kivi", 2.0, 1.5); None for an unquantized family."""
    m = re.fullmatch(r"(.+)\.k([\d.]+)v([\d.]+)", family)
    return (m.group(1), float(m.group(2)), float(m.group(3))) if m else None


def decode_kernel(family: str, cal: Calibration) -> tuple[Curve, KernelSource]:
    """The curve that prices decode attention of kernel ``family`` in ``cal``, and its provenance."""
    if cal.kind in ("prior", "roofline"):
        return cal.ops[DENSE], KernelSource(family, DENSE, "prior" if cal.kind == "prior" else "roofline")
    own = f"{DENSE}.{family}"
    if own in cal.ops and family.split(".")[0] not in BORROWED_KERNEL:
        # an imported profile's method curves are derived from a GPU where kvsim measured both kernels
        derived = cal.derived.get(own)
        return cal.ops[own], KernelSource(family, own, "derived" if derived else "measured", derived or "")
    widths = _widths(family)
    if widths is None:
        if family == "dense":
            return cal.ops[DENSE], KernelSource(family, DENSE, "measured")
        return cal.ops[DENSE], KernelSource(family, DENSE, "derived", f"{family} has no measured kernel")
    method, k_bits, v_bits = widths
    if method in SIXTEEN_BIT_ONLY:
        if f"{DENSE}.{method}" in cal.ops:
            return cal.ops[f"{DENSE}.{method}"], KernelSource(
                family, f"{DENSE}.{method}", "derived", f"no {method.upper()} kernel of this cache's width is measured "
                "in this profile; priced at the 16-bit kernel's efficiency on this layout's bytes and dequantization "
                "work, an estimate, not a bound (vLLM's FP8 FlashMLA, measured on an H100, runs 0.95-1.8x this "
                "rule's time)")
        # as this profile prices the 16-bit layout (a family without widths, above)
        return cal.ops[DENSE], KernelSource(
            family, DENSE, "derived", f"no {method.upper()} kernel is measured in this profile at any width: priced "
            f"as its 16-bit {method.upper()} layout, on the dense kernel's efficiency")
    kernel, why = (OWN_KERNEL[method], "") if method in OWN_KERNEL else BORROWED_KERNEL.get(method, (method, ""))

    def measured_widths(kernel: str) -> list[tuple[tuple[str, float, float], str]]:
        return sorted((w, key) for key in cal.ops if key.startswith(DENSE + ".")
                      and (w := _widths(key[len(DENSE) + 1:])) is not None and OWN_KERNEL.get(w[0]) == kernel)
    measured = measured_widths(kernel)
    if not measured and method in FALLBACK_KERNEL:
        kernel, why = FALLBACK_KERNEL[method]
        measured = measured_widths(kernel)
    if not measured:
        known = sorted(k[len(DENSE) + 1:] for k in cal.ops if k.startswith(DENSE + ".") and _widths(k[len(DENSE) + 1:]))
        raise KvsimError(f"no measured decode kernel for {family} in the {cal.gpu} profile ({cal.source}), and no "
                         f"measured neighbour of the {kernel} kernel to derive it from; measured: {', '.join(known)}",
                         field="method", value=family)
    # nearest widths (sum of |bit differences|); a tie goes to fewer bits, whose unpacking per byte is the larger
    (_, k, v), key = min(measured, key=lambda m: (abs(m[0][1] - k_bits) + abs(m[0][2] - v_bits), m[0][1] + m[0][2]))
    if not why and (k, v) == (k_bits, v_bits):
        return cal.ops[key], KernelSource(family, key, "measured")
    return cal.ops[key], KernelSource(family, key, "derived", why or f"nearest measured widths of the {kernel} kernel")


# Catalogue models on which a method's example runs (dense GQA, MLA, a vision-language model).
_EXAMPLE_MODELS = ("llama-3-8b", "deepseek-v2-lite", "llava-1.5-7b")


def example_cost_label(method: str, cal: Calibration) -> str:
    """How ``cal`` prices the registry example of ``method`` (``kvsim methods``): its decode kernel
    and, when other terms rest on a rule rather than a measured kernel, how many."""
    from kvsim.cost.model import CostModel  # noqa: PLC0415 - model imports this module
    from kvsim.kv import METHODS, layout_for  # noqa: PLC0415
    from kvsim.spec.hardware import load_hardware  # noqa: PLC0415
    from kvsim.spec.model import load_model  # noqa: PLC0415

    for name in _EXAMPLE_MODELS:
        model = load_model(name)
        try:
            layout = layout_for(model, METHODS[method].example)
        except KvsimError:
            continue
        cost = CostModel(model, load_hardware(cal.gpu), layout, 1, cal)
        others = len(cost.cost_notes) - (cost.decode_kernel.status != "measured")
        return cost.decode_kernel.short + (f"; {others} more term(s) by rule, not measured" if others else "")
    raise KvsimError(f"no catalogue model of {', '.join(_EXAMPLE_MODELS)} takes the example", field="method",
                     value=method)
