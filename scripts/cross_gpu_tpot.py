"""Measured and predicted TPOT of one model and engine release on two GPUs at the configurations both ran:
does kvsim put the two GPUs as far apart as the measurements do? (A step bound by bytes moves with memory
bandwidth; one bound by kernel latencies does not.)

Reads the JSON of ``kvsim validate --serving aiconfigurator --json`` (about 8 minutes to write) and the
silicon-sample file it names; pairs rows by (TP, input, output, clients).

    .venv/bin/kvsim validate --serving aiconfigurator --json > /tmp/judge.json
    .venv/bin/python scripts/cross_gpu_tpot.py /tmp/judge.json [--model openai/gpt-oss-120b]
        [--version 0.18.0] [--gpus h100_sxm,h200_sxm]
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("judge_json")
    ap.add_argument("--model", default="openai/gpt-oss-120b", help="silicon-sample model_path")
    ap.add_argument("--backend", default="vllm")
    ap.add_argument("--version", default="0.18.0", help="silicon-sample backend_version")
    ap.add_argument("--gpus", default="h100_sxm,h200_sxm", help="two silicon-sample systems: first / second")
    a = ap.parse_args()
    with open(a.judge_json) as f:
        judged = json.load(f)
    with open(judged["file"], newline="") as f:
        lines = list(csv.reader(f))
    header = lines[0]
    first, second = a.gpus.split(",")
    tpot: dict[tuple, tuple[float, float]] = {}
    for r in judged["rows"]:
        s = dict(zip(header, lines[r["line"] - 1], strict=True))
        if (s["model_path"], s["backend"], s["backend_version"]) != (a.model, a.backend, a.version):
            continue
        # repeated configurations: the first row stands for them (the judge reports every row)
        tpot.setdefault((s["system"], r["tp"], r["isl"], r["osl"], r["concurrency"]),
                        (r["tpot_ms"], r["predicted_tpot_ms"]))
    by_tp: dict[int, list[tuple[float, float]]] = {}
    for key, (meas, pred) in sorted(tpot.items()):
        if key[0] != first or (second,) + key[1:] not in tpot:
            continue
        meas2, pred2 = tpot[(second,) + key[1:]]
        by_tp.setdefault(key[1], []).append((meas / meas2, pred / pred2))
        print(f"TP {key[1]} input {key[2]} output {key[3]} clients {key[4]}: measured {first}/{second} "
              f"{meas / meas2:.3f}, kvsim {pred / pred2:.3f}")
    pairs = [p for v in by_tp.values() for p in v]
    if not pairs:
        raise SystemExit(f"no configuration of {a.model} ({a.backend} {a.version}) on both {first} and {second}")
    for tp, v in sorted(by_tp.items()):
        print(f"TP {tp}: {len(v)} configurations, TPOT {first}/{second} median measured "
              f"{statistics.median(m for m, _ in v):.3f}, kvsim {statistics.median(k for _, k in v):.3f}")
    print(f"all: {len(pairs)} configurations, measured {statistics.median(m for m, _ in pairs):.3f} "
          f"(range {min(m for m, _ in pairs):.3f}-{max(m for m, _ in pairs):.3f}), kvsim "
          f"{statistics.median(k for _, k in pairs):.3f} (range {min(k for _, k in pairs):.3f}-"
          f"{max(k for _, k in pairs):.3f})")


if __name__ == "__main__":
    main()
