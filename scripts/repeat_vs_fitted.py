"""A repeated device run's kernel times against the rows a GPU profile is fitted from: per kernel, the time
ratio (repeat / fitted) over the points both measured, as median, p10-p90 and range. A repeat kept apart
(``validation/results/<gpu>/repeat_*/``, not fitted) says how far the fitted curves would move on another
card of the same kind, or on another day.

A point is a row's shape (every column but the time, the error, the run and the derived bytes or flops);
where a file holds a point more than once, its last row counts (what ``kvsim calibrate`` reads last).

    .venv/bin/python scripts/repeat_vs_fitted.py validation/results/h100-sxm/repeat_call34 [validation/results/h100-sxm]
"""
from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path

# file -> (the columns that name a kernel, the columns that name a point of it)
FILES = {
    "gemm.csv": (("dtype",), ("dtype", "m", "n", "k", "layer")),
    "attention_decode.csv": (("method", "params"),
                             ("method", "batch", "q_heads", "kv_heads", "head_dim", "context", "params", "kvsim_spec")),
    "attention_prefill.csv": (("method",), ("method", "batch", "q_heads", "kv_heads", "head_dim", "prompt", "causal")),
}


def _kernel(row: dict, columns: tuple[str, ...]) -> str:
    """The kernel's name: its columns joined; of ``params`` only a ``src=`` tag (a row kvsim does not fit)."""
    parts = []
    for c in columns:
        if c == "params":
            parts += [p for p in row.get(c, "").split(";") if p.startswith("src=")]
        else:
            parts.append(row[c])
    return " ".join(parts)


def _points(path: Path, kernel_cols: tuple[str, ...], point_cols: tuple[str, ...]) -> dict[tuple, tuple[str, float]]:
    """Point -> (kernel, seconds) of one file, the last row of each point."""
    with path.open(newline="") as f:
        return {tuple(r[c] for c in point_cols): (_kernel(r, kernel_cols), float(r["time_s"]))
                for r in csv.DictReader(f)}


def ratios(repeat: Path, fitted: Path) -> dict[str, list[float]]:
    """Kernel -> the repeat / fitted time ratios of the points both folders measured."""
    out: dict[str, list[float]] = defaultdict(list)
    for name, (kernel_cols, point_cols) in FILES.items():
        if not (repeat / name).exists() or not (fitted / name).exists():
            continue
        again = _points(repeat / name, kernel_cols, point_cols)
        before = _points(fitted / name, kernel_cols, point_cols)
        for point, (kernel, seconds) in again.items():
            if point in before:
                out[f"{name.removesuffix('.csv')} {kernel}"].append(seconds / before[point][1])
    return dict(out)


def summary(rs: list[float]) -> dict[str, float]:
    """Median, p10 and p90 (the sorted ratios at index n // 10 and 9 n // 10) and range of the ratios."""
    s = sorted(rs)
    n = len(s)
    return {"n": n, "median": statistics.median(s), "p10": s[n // 10], "p90": s[min(n - 1, 9 * n // 10)],
            "min": s[0], "max": s[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("repeat", type=Path, help="the repeated run's folder")
    ap.add_argument("fitted", type=Path, nargs="?", help="the fitted rows' folder (default: the repeat's parent)")
    a = ap.parse_args()
    fitted = a.fitted or a.repeat.parent
    found = ratios(a.repeat, fitted)
    if not found:
        raise SystemExit(f"{a.repeat}: no point that {fitted} also measured")
    for kernel, rs in sorted(found.items()):
        s = summary(rs)
        print(f"{kernel:40s} n={s['n']:4d}  median {s['median']:.3f}  p10-p90 {s['p10']:.3f}-{s['p90']:.3f}  "
              f"range {s['min']:.3f}-{s['max']:.3f}")


if __name__ == "__main__":
    main()
