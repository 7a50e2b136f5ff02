"""Write kvsim/data/judged_accuracy.yaml: kvsim's track record (kvsim.track_record) from a fresh judge of
every expressible run of aiconfigurator's public silicon sample under the aiconfigurator deployment
(``kvsim validate --serving aiconfigurator``), per (GPU, engine, model, weights) and per (GPU, engine), at this
checkout's commit. Run it after any change that moves a judged prediction (about 8 minutes; needs
kvsim[aic] for the sample):

    .venv/bin/python scripts/judged_accuracy.py [--out kvsim/data/judged_accuracy.yaml]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
from collections import defaultdict
from pathlib import Path

from kvsim.fileio import write_atomic
from kvsim.judge_serving import DEFAULT_DEPLOYMENT, Judged, find_silicon_sample, judge
from kvsim.track_record import FILE

ROOT = Path(__file__).resolve().parent.parent


def groups(judged: list[Judged]) -> list[dict]:
    """Per (GPU, engine, model, weights), then per (GPU, engine) with model and weights "": runs and the
    median absolute and signed TPOT and TTFT errors, rounded to 0.1 point; sorted."""
    by: dict[tuple[str, str, str, str], list[Judged]] = defaultdict(list)
    for j in judged:
        by[(j.hardware, j.row.backend, j.catalogue_model, j.weights)].append(j)
        by[(j.hardware, j.row.backend, "", "")].append(j)
    out = []
    for (gpu, engine, model, weights), js in sorted(by.items()):
        entry: dict = {"gpu": gpu, "engine": engine, "model": model, "weights": weights, "runs": len(js)}
        for metric in ("tpot", "ttft"):
            errs = [getattr(j, f"{metric}_error") for j in js]
            entry[f"{metric}_median_abs"] = round(statistics.median(abs(e) for e in errs), 3)
            entry[f"{metric}_median_signed"] = round(statistics.median(errs), 3)
        out.append(entry)
    return out


def render(entries: list[dict], commit: str, day: str) -> str:
    lines = [
        "# kvsim's track record on real engines (kvsim/track_record.py): written by scripts/judged_accuracy.py,",
        "# do not edit by hand. Errors are (predicted - measured) / measured over the group's runs.",
        f"commit: \"{commit}\"",  # quoted: a hash like 34932e8 would read as a number
        f"date: \"{day}\"",
        f"source: \"every expressible run of aiconfigurator-core's public silicon sample, deployment "
        f"{DEFAULT_DEPLOYMENT} (kvsim validate --serving aiconfigurator)\"",
        "groups:",
    ]
    for e in entries:
        lines.append(f"  - {{gpu: {e['gpu']}, engine: {e['engine']}, model: \"{e['model']}\", "
                     f"weights: \"{e['weights']}\", runs: {e['runs']}, "
                     f"tpot_median_abs: {e['tpot_median_abs']}, tpot_median_signed: {e['tpot_median_signed']}, "
                     f"ttft_median_abs: {e['ttft_median_abs']}, ttft_median_signed: {e['ttft_median_signed']}}}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / FILE))
    a = ap.parse_args()
    commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.strip()
    judged, _ = judge(find_silicon_sample())
    write_atomic(Path(a.out), render(groups(judged), commit, datetime.date.today().isoformat()))
    print(f"{a.out}: {len(judged)} runs judged at {commit}")


if __name__ == "__main__":
    main()
