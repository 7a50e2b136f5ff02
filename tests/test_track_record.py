"""kvsim's track record (kvsim.track_record): every serving answer says how far kvsim has been from real
engines on the nearest judged group, and the shipped file is what the judge gives."""

from __future__ import annotations

import pytest
from conftest import ROOT, load_script, shared_file

from kvsim.judge_serving import judge
from kvsim.track_record import FILE, records


def test_the_shipped_record_is_whole_and_consistent() -> None:
    recs = records()
    assert recs.groups and recs.commit and recs.date
    keys = [(r.gpu, r.engine, r.model, r.weights) for r in recs.groups]
    assert len(keys) == len(set(keys))
    for r in recs.groups:
        assert r.runs > 0 and 0 <= r.tpot_median_abs and 0 <= r.ttft_median_abs
        assert abs(r.tpot_median_signed) <= r.tpot_median_abs + 1e-9  # |median| <= median of |x|
        assert abs(r.ttft_median_signed) <= r.ttft_median_abs + 1e-9
    # a GPU and engine's record covers exactly the runs of its models' records
    for whole in (r for r in recs.groups if not r.model):
        assert whole.runs == sum(r.runs for r in recs.groups if (r.gpu, r.engine) == (whole.gpu, whole.engine)
                                 and r.model)


def test_the_shipped_file_is_the_scripts_own_rendering() -> None:
    """kvsim/data/judged_accuracy.yaml is written whole by scripts/judged_accuracy.py: its text is what the
    script renders from the figures it holds (no hand edit; the commit a string, not a number)."""
    from dataclasses import asdict

    recs = records()
    assert recs.commit == recs.commit.strip() and not recs.commit.replace(".", "").isdigit()
    text = load_script("judged_accuracy").render([asdict(r) for r in recs.groups], recs.commit, recs.date)
    assert text == (ROOT / FILE).read_text()


def test_a_note_names_the_nearest_group_or_says_none_was_judged() -> None:
    recs = records()
    own = recs.note("h100-sxm", "vllm", "qwen3-32b", "bfloat16")
    assert own.startswith("judged on 90 ") and "qwen3-32b (bfloat16 weights) on h100-sxm with vllm" in own
    assert FILE in own
    # a model, or a precision, never judged there: the GPU and engine's record over every model judged there
    whole = "h100-sxm with vllm (every model judged there)"
    assert whole in recs.note("h100-sxm", "vllm", "llama-2-7b", "bfloat16")
    assert whole in recs.note("h100-sxm", "vllm", "qwen3-32b", "int4")
    none = recs.note("rtx-4090", "trtllm", "qwen3-32b", "bfloat16")
    assert "no public end-to-end run of trtllm on rtx-4090 has been judged" in none and "unknown" in none


def test_a_run_summary_carries_the_track_record() -> None:
    from kvsim.api import run_scenario
    from kvsim.scenario.outputs import text_summary

    summary = run_scenario(ROOT / "examples" / "vllm-bench-closed-loop.yaml").summary
    rec = summary["track_record"]
    assert (rec["gpu"], rec["engine"], rec["model"], rec["weights"]) == ("h100-sxm", "vllm", "qwen3-32b", "bfloat16")
    assert rec["runs"] == 90 and rec["note"] == records().note("h100-sxm", "vllm", "qwen3-32b", "bfloat16")
    assert f"  track record: {rec['note']}" in text_summary(summary).splitlines()


def test_the_development_set_group_is_what_the_judge_gives_now() -> None:
    """The shipped record of Qwen3-32B in bf16 under vLLM on H100 (the development set's 90 runs, which the
    public sample holds and no other run of that group) is a fresh judge's: a change that moves a judged prediction
    fails here until scripts/judged_accuracy.py is run again."""
    judged, _ = judge(shared_file("measured", "vllm_h100_qwen3-32b_closed_loop.csv"))
    key = ("h100-sxm", "vllm", "qwen3-32b", "bfloat16")
    groups = load_script("judged_accuracy").groups(judged)
    fresh = {(g["gpu"], g["engine"], g["model"], g["weights"]): g for g in groups}
    (shipped,) = [r for r in records().groups if (r.gpu, r.engine, r.model, r.weights) == key]
    got = fresh[key]
    assert shipped.runs == got["runs"] == 90
    for key in ("tpot_median_abs", "tpot_median_signed", "ttft_median_abs", "ttft_median_signed"):
        assert getattr(shipped, key) == pytest.approx(got[key], abs=1e-9), key
