"""The README's per-system table of the public silicon sample's judge runs: for each system (GPU) and
engine, how many distinct runs and configurations were judged, and kvsim's median and worst absolute
error of TTFT and TPOT, under the aiconfigurator deployment and (in brackets) engine-defaults.

Runs are the judge's rows (each measured run once: ``kvsim validate --serving`` drops a row listed
twice); a configuration is a run less its measured results and its place in the file (the same
engine, settings, lengths, parallelism and measurement day measured again with other results is a
second run of one configuration: ``kvsim.judge_serving.configuration``). Errors are over runs.

    .venv/bin/kvsim validate --serving aiconfigurator --json > /tmp/aic.json
    .venv/bin/kvsim validate --serving aiconfigurator --deployment engine-defaults --json > /tmp/ed.json
    .venv/bin/python scripts/judge_by_system.py /tmp/aic.json /tmp/ed.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from kvsim.judge_serving import configuration, find_silicon_sample, read_rows


def _groups(path: Path, rows_by_line: dict) -> dict[tuple[str, str], dict]:
    """(system, engine) -> each run's absolute (TTFT, TPOT) error and the configurations behind them, of
    one judge JSON."""
    out: dict[tuple[str, str], dict] = defaultdict(lambda: {"runs": [], "configs": set()})
    for r in json.loads(path.read_text())["rows"]:
        row = rows_by_line[r["line"]]
        group = out[(row.system, row.backend)]
        group["runs"].append((abs(r["predicted_ttft_ms"] / r["ttft_ms"] - 1),
                              abs(r["predicted_tpot_ms"] / r["tpot_ms"] - 1)))
        group["configs"].add(configuration(row))
    return dict(out)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if x < 1 else f"{100 * x:.0f}%"


def table(aic: dict, ed: dict) -> str:
    """Markdown: runs (configurations), TTFT median and worst, TPOT median and worst over runs, each
    under aiconfigurator with engine-defaults in brackets (counts only where they differ)."""
    lines = ["| system | engine | runs (configurations) | TTFT median | TTFT worst | TPOT median | TPOT worst |",
             "|---|---|---|---|---|---|---|"]

    def cells(a: dict, e: dict | None) -> list[str]:
        count = f"{len(a['runs'])} ({len(a['configs'])})"
        if e is not None and (len(e["runs"]), len(e["configs"])) != (len(a["runs"]), len(a["configs"])):
            count += f" [{len(e['runs'])} ({len(e['configs'])})]"
        out = [count]
        for i in (0, 1):
            mine = [x[i] for x in a["runs"]]
            theirs = [x[i] for x in e["runs"]] if e else []
            out.append(f"{_pct(statistics.median(mine))}" + (f" ({_pct(statistics.median(theirs))})" if theirs else ""))
            out.append(f"{_pct(max(mine))}" + (f" ({_pct(max(theirs))})" if theirs else ""))
        return out

    for key in sorted(aic):
        lines.append("| " + " | ".join([*key, *cells(aic[key], ed.get(key))]) + " |")
    def pooled(groups: dict) -> dict:
        return {"runs": [x for g in groups.values() for x in g["runs"]],
                "configs": set().union(*(g["configs"] for g in groups.values()))}

    c = cells(pooled(aic), pooled(ed))
    lines.append(f"| all | | {c[0]} | {c[1]} | | {c[3]} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("aiconfigurator", type=Path, help="judge JSON, deployment aiconfigurator")
    ap.add_argument("engine_defaults", type=Path, help="judge JSON, deployment engine-defaults")
    args = ap.parse_args(argv)
    rows_by_line = {r.line: r for r in read_rows(find_silicon_sample())}
    print(table(_groups(args.aiconfigurator, rows_by_line), _groups(args.engine_defaults, rows_by_line)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
