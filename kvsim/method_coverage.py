"""Which KV methods ``kvsim validate`` judges on a GPU's kernel rows, and why the others are not.

A method is judged by its decode-attention speed-up over bf16 (kvsim.validate.speedup_points) on
rows calibration held out (kvsim.measured.held_out_rows) that have a bf16 baseline of the same
harness, shape and call (kvsim.measured.baseline_row). Every method kvsim knows (kvsim.kv.METHODS)
gets a line: its judged points, or the reason it has none, so no method drops out silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvsim import measured


@dataclass(frozen=True)
class MethodCoverage:
    method: str  # kvsim method name (the spec before ":")
    kernel_rows: int  # decode-step kernel rows measuring it
    held_out: int  # of those, rows calibration held out
    judged: int  # held-out rows judged (a same-call bf16 baseline exists)
    other_phases: tuple[str, ...]  # phases it was measured in besides decode (prefill, load)

    @property
    def why_not_judged(self) -> str:
        """Why a method has no judged point ('' when it has some)."""
        if self.judged:
            return ""
        if not self.kernel_rows:
            return (f"only {'/'.join(self.other_phases)}-phase rows, no decode step to judge" if self.other_phases
                    else "no decode-attention kernel rows on this GPU")
        if not self.held_out:
            return f"its {self.kernel_rows} row(s) are all in calibration's half (too few shapes to hold one out)"
        return (f"{self.held_out} held-out rows, none with a bf16 baseline of the same harness, shape and call "
                "(attention_decode.csv)")


def method_name(spec: str) -> str:
    return spec.split(":", 1)[0]


def method_coverage(folder: Path) -> list[MethodCoverage]:
    """One line per kvsim method other than the bf16 baseline, in catalogue order."""
    from kvsim.kv import METHODS  # noqa: PLC0415 - the registry imports every method module; only needed here

    rows = measured.decode_rows(folder)
    held = measured.held_out_rows(rows)
    judged = [r for r, _ in measured.judged_rows(rows)]
    phases: dict[str, set[str]] = {}
    for r in measured.rows(folder / "attention_decode.csv"):
        if r.get("kvsim_spec") and r.get("phase", "decode") not in ("decode", "tune"):
            phases.setdefault(method_name(r["kvsim_spec"]), set()).add(r["phase"])
    out = []
    for name in METHODS:
        if name == "bf16":
            continue
        mine = [r for r in rows if method_name(r.spec) == name]
        out.append(MethodCoverage(name, len(mine),
                                  sum(r in held for r in mine), sum(method_name(r.spec) == name for r in judged),
                                  tuple(sorted(phases.get(name, ())))))
    return out


def coverage_lines(folder: Path) -> list[str]:
    """The report's per-method section (markdown): judged points per method, the methods with none
    and why, and what counted as one measuring call."""
    coverage = method_coverage(folder)
    calls = sorted({r.call for r in measured.decode_rows(folder)})
    call_note = (f"Calls: {', '.join(calls)} (the CSV's `run` column)." if calls != ["attention_decode.csv"] else
                 "attention_decode.csv has no `run` column, so the whole file counts as one call: a baseline "
                 "appended by a later call (meta.json `supplementary_run`) cannot be told apart.")
    missing = [c.method for c in coverage if not c.judged]
    lines = ["## Judged points per KV method", "",
             "A method is judged by its decode-attention speed-up over bf16 on kernel rows calibration held "
             f"out, against a bf16 baseline of the same harness, shape and call. {call_note}", "",
             "| method | judged points | held-out rows | kernel rows | why none judged |", "|---|---|---|---|---|"]
    lines += [f"| {c.method} | {c.judged} | {c.held_out} | {c.kernel_rows} | {c.why_not_judged} |" for c in coverage]
    lines += ["", f"Methods with no judged point ({len(missing)} of {len(coverage)}): "
              + (", ".join(missing) if missing else "none") + ".",
              f"Held-out rows left unjudged for want of a same-call bf16 baseline: "
              f"{sum(c.held_out - c.judged for c in coverage)}."]
    return lines
