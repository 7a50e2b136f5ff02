"""scripts/judge_by_system.py: the README's per-system table of the public sample's judge runs. Known answers
on hand-made groups: medians and worsts over runs, engine-defaults in brackets, its counts only where
they differ, and the 'all' row over every group."""

from __future__ import annotations

from conftest import load_script

jbs = load_script("judge_by_system")


def test_table_gives_medians_worsts_and_engine_defaults_in_brackets() -> None:
    aic = {("h100_sxm", "vllm"): {"runs": [(0.1, 0.01), (0.3, 0.03), (0.2, 0.02)],
                                  "configs": {"a", "b"}},
           ("b200_sxm", "sglang"): {"runs": [(0.5, 0.2)], "configs": {"c"}}}
    ed = {("h100_sxm", "vllm"): {"runs": [(0.4, 0.05), (0.6, 0.07), (0.5, 0.06)],
                                 "configs": {"a", "b"}},
          ("b200_sxm", "sglang"): {"runs": [(2.5, 0.2), (0.5, 0.1)], "configs": {"c"}}}
    lines = jbs.table(aic, ed).splitlines()
    assert lines[0].startswith("| system | engine | runs (configurations) |")
    assert lines[2] == ("| b200_sxm | sglang | 1 (1) [2 (1)] | 50.0% (150%) | 50.0% (250%) | 20.0% (15.0%) "
                        "| 20.0% (20.0%) |")
    assert lines[3] == "| h100_sxm | vllm | 3 (2) | 20.0% (50.0%) | 30.0% (60.0%) | 2.0% (6.0%) | 3.0% (7.0%) |"
    assert lines[4] == "| all | | 4 (3) [5 (3)] | 25.0% (50.0%) | | 2.5% (7.0%) | |"
