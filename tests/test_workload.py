"""Tests for kvsim.serve workloads: trace readers, detection, bad rows, synthetic streams,
prefix-hash expansion and stream transformations. Real-trace tests skip without ../shared."""

from __future__ import annotations

import itertools
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsim.errors import KvsimError
from kvsim.serve.synthetic import (
    ArrivalProcess,
    LengthDist,
    SessionSpec,
    SharedPrefix,
    synthetic_requests,
)
from kvsim.serve.traces import (
    detect_format,
    read_azure,
    read_csv,
    read_mooncake,
    read_servegen,
    read_trace,
    trace_lengths,
    write_csv,
)
from kvsim.serve.workload import (
    MAX_SIM_S,
    ReadStats,
    Request,
    expand_block_hashes,
    limit,
    merge,
    rebase,
    renumber,
    scale_rate,
    time_window,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "traces"


def _shared() -> Path:
    env = os.environ.get("KVSIM_SHARED_DATA")
    if env:
        p = Path(env)
        return p / "traces" if (p / "traces").is_dir() else p
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "traces"


SHARED = _shared()
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared traces absent ({SHARED})")


def _stats(reqs: list[Request]) -> tuple[float, float, float]:
    a = np.array([r.input_tokens for r in reqs])
    o = np.array([r.output_tokens for r in reqs])
    rate = (len(reqs) - 1) / (reqs[-1].arrival_s - reqs[0].arrival_s)
    return float(a.mean()), float(o.mean()), rate


def _check_stream(reqs: list[Request]) -> None:
    assert reqs[0].arrival_s == 0.0
    ts = [r.arrival_s for r in reqs]
    assert ts == sorted(ts)
    assert [r.request_id for r in reqs] == list(range(len(reqs)))
    assert all(r.input_tokens >= 1 and r.output_tokens >= 1 for r in reqs)


# --------------------------------------------------------------------------- real traces

@needs_shared
@pytest.mark.parametrize("name, rows, in_mean, out_mean, rate", [
    ("azure2023_conv.csv", 19366, 1155, 211.1, 5.53),
    ("azure2023_code.csv", 8819, 2048, 27.9, 2.57),
    ("mooncake_fast25_conversation_trace.jsonl", 12031, 12035, 342.6, 3.40),
    ("mooncake_fast25_synthetic_trace.jsonl", 3993, 15326, 149.1, 3.91),
    ("sharegpt_300/sharegpt_300_a.csv", 300, 857, 652, 10.27),
])
def test_real_trace_counts_and_stats(name: str, rows: int, in_mean: float, out_mean: float,
                                     rate: float) -> None:
    reqs = list(read_trace(SHARED / name))
    assert len(reqs) == rows
    _check_stream(reqs)
    m_in, m_out, r = _stats(reqs)
    assert m_in == pytest.approx(in_mean, rel=2e-3)
    assert m_out == pytest.approx(out_mean, rel=2e-3)
    assert r == pytest.approx(rate, rel=5e-3)


@needs_shared
def test_azure_timestamps_parse_exactly() -> None:
    reqs = list(read_azure(SHARED / "azure2023_conv.csv"))
    # 18:15:46.6805900 -> 18:15:50.9951690 (first two rows); 19:14:08.4025270 is the last.
    assert reqs[1].arrival_s == pytest.approx(4.314579, abs=1e-6)
    assert reqs[-1].arrival_s == pytest.approx(3501.721937, abs=1e-6)
    assert all(r.prefix_hashes == () and r.prefix_block_tokens == 0 for r in reqs[:100])


@needs_shared
def test_mooncake_hashes_are_full_blocks_and_share_prefixes() -> None:
    reqs = list(read_mooncake(SHARED / "mooncake_fast25_conversation_trace.jsonl"))
    assert all(len(r.prefix_hashes) == r.input_tokens // 512 for r in reqs)
    assert all(r.prefix_block_tokens == 512 for r in reqs if r.prefix_hashes)
    # first rows share block 0 (the README: 36.6 % of block references are prefix hits).
    assert reqs[0].prefix_hashes[0] == reqs[1].prefix_hashes[0]
    assert reqs[-1].arrival_s == pytest.approx(3537, abs=1)


@needs_shared
def test_servegen_sampling_is_seeded_and_matches_rates() -> None:
    folder = SHARED / "servegen_deepseek-r1"
    a = list(read_servegen(folder, seed=7, end_s=1200))
    b = list(read_servegen(folder, seed=7, end_s=1200))
    c = list(itertools.islice(read_servegen(folder, seed=8, end_s=1200), 50))
    assert a == b and a[:50] != c
    _check_stream(a)
    # Expected count = sum over clients and the two windows of round(rate * 600).
    expected = 0
    for f in folder.glob("chunk-*-trace.csv"):
        for line in f.read_text().splitlines():
            p = line.split(",")
            if int(float(p[0])) < 1200 and float(p[1]) > 0:
                expected += round(float(p[1]) * 600)
    assert len(a) == pytest.approx(expected, rel=0.02)  # a few clients have no length data
    assert all(r.user_id and r.user_id.startswith("client-") for r in a[:100])
    assert detect_format(folder) == "servegen"
    assert detect_format(folder / "chunk-0-trace.csv") == "servegen"


@needs_shared
def test_detect_format_on_real_files() -> None:
    assert detect_format(SHARED / "azure2023_conv.csv") == "azure"
    assert detect_format(SHARED / "mooncake_fast25_synthetic_trace.jsonl") == "mooncake"
    assert detect_format(SHARED / "sharegpt_300" / "sharegpt_300_b.csv") == "csv"
    vidur = SHARED / "vidur_arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"
    assert detect_format(vidur) == "vidur"
    ins, outs = trace_lengths(vidur)
    assert len(ins) == 28257 and ins.mean() == pytest.approx(2588, rel=1e-3)
    with pytest.raises(KvsimError, match="lengths-only"):
        read_trace(vidur)


@needs_shared
def test_window_and_rate_scale_on_real_trace() -> None:
    full = list(read_trace(SHARED / "azure2023_conv.csv"))
    win = list(read_trace(SHARED / "azure2023_conv.csv", start_s=600, end_s=1200))
    assert len(win) == sum(600 <= r.arrival_s < 1200 for r in full)
    assert all(0 <= r.arrival_s < 600 for r in win)
    fast = list(read_trace(SHARED / "azure2023_conv.csv", rate_scale=2.0, max_requests=1000))
    assert len(fast) == 1000
    assert fast[-1].arrival_s == pytest.approx(full[999].arrival_s / 2)


# --------------------------------------------------------------------------- fixtures / csv

def test_fixtures_read_without_shared() -> None:
    small = list(read_trace(FIXTURES / "synthetic_small.csv"))
    sess = list(read_trace(FIXTURES / "synthetic_sessions.csv"))
    assert len(small) == 200 and len(sess) == 200
    _check_stream(small)
    _check_stream(sess)
    assert all(len(r.prefix_hashes) == r.input_tokens // 512 for r in sess)
    assert any(r.session_id is not None and r.user_id for r in sess)


def test_fixtures_are_reproducible(tmp_path: Path) -> None:
    from kvsim.serve.synthetic import write_fixtures
    write_fixtures(tmp_path)
    for name in ("synthetic_small.csv", "synthetic_sessions.csv"):
        assert (tmp_path / name).read_text() == (FIXTURES / name).read_text()


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_generic_csv_optional_columns(tmp_path: Path) -> None:
    p = _write(tmp_path, "t.csv", "arrival_time_s,input_tokens,output_tokens,prefix_hash_ids,user_id,"
               "image_tokens\n10.5,40,5,1 2 3,alice,0\n11.0,33,7,1 2 9,,64\n12,8,1,,bob,\n")
    reqs = list(read_csv(p, prefix_block_tokens=16))
    assert [r.arrival_s for r in reqs] == [0.0, 0.5, 1.5]
    assert reqs[0].prefix_hashes == (1, 2) and reqs[0].prefix_block_tokens == 16  # 40 // 16 = 2
    assert reqs[1].prefix_hashes == (1, 2) and reqs[1].image_tokens == 64 and reqs[1].user_id is None
    assert reqs[2].prefix_hashes == () and reqs[2].prefix_block_tokens == 0 and reqs[2].user_id == "bob"


def test_write_csv_roundtrip(tmp_path: Path) -> None:
    src = list(synthetic_requests(ArrivalProcess.poisson(3), LengthDist.lognormal(600, 0.8),
                                  LengthDist.fixed(50), seed=3, n=50, block_tokens=512,
                                  shared_prefix=SharedPrefix(1024, num_users=4)))
    write_csv(src, tmp_path / "rt.csv")
    back = list(read_csv(tmp_path / "rt.csv"))
    assert [(r.input_tokens, r.output_tokens, r.prefix_hashes, r.user_id) for r in back] == \
           [(r.input_tokens, r.output_tokens, r.prefix_hashes, r.user_id) for r in src]


# --------------------------------------------------------------------------- bad rows / detection

BAD_CSV = ("arrival_time_s,input_tokens,output_tokens\n0,10,5\n1,10,abc\n2,-3,5\n3,10\n"
           "x,1,1\n4,10,5\n3.5,10,5\n5,10,5\n")


def test_bad_row_names_file_and_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "trace.csv", BAD_CSV)
    with pytest.raises(KvsimError) as e:
        list(read_csv(p))
    assert str(e.value).endswith("trace.csv:3: output_tokens='abc': not an integer")


def test_skip_bad_rows_counts(tmp_path: Path) -> None:
    p = _write(tmp_path, "trace.csv", BAD_CSV)
    stats = ReadStats()
    reqs = list(read_trace(p, skip_bad_rows=True, stats=stats))
    assert [r.arrival_s for r in reqs] == [0.0, 4.0, 5.0]
    assert stats.bad_rows == 5 and stats.requests == 3
    assert len(stats.bad_examples) == 5
    assert "trace.csv:4: input_tokens='-3'" in stats.bad_examples[1]
    assert "trace.csv:8: arrival_time_s='3.5'" in stats.bad_examples[4]


def test_bad_rows_azure_and_mooncake(tmp_path: Path) -> None:
    az = _write(tmp_path, "az.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                "2023-11-16 23:59:59.5000000,10,5\n2023-11-17 00:00:00.2500000,7,x\n"
                "2023-11-17 00:00:01.0000000,7,3\n")
    with pytest.raises(KvsimError, match=r"az\.csv:3: GeneratedTokens='x': not an integer"):
        list(read_azure(az))
    stats = ReadStats()
    reqs = list(read_azure(az, skip_bad_rows=True, stats=stats))
    assert [r.arrival_s for r in reqs] == [0.0, 1.5]  # crosses midnight
    assert stats.bad_rows == 1
    mc = _write(tmp_path, "m.jsonl", '{"timestamp": 0, "input_length": 600, "output_length": 3, '
                '"hash_ids": [4, 5]}\n{"timestamp": 5, "input_length": "big", "output_length": 3}\n'
                '{"timestamp": 9, "input_length": 100, "output_length": 3, "hash_ids": [1, 2, 3]}\n')
    with pytest.raises(KvsimError, match=r"m\.jsonl:2: input_length='big'"):
        list(read_mooncake(mc))
    stats = ReadStats()
    reqs = list(read_mooncake(mc, skip_bad_rows=True, stats=stats))
    assert len(reqs) == 1 and reqs[0].prefix_hashes == (4,) and stats.bad_rows == 2


def test_detect_format_and_override(tmp_path: Path) -> None:
    p = _write(tmp_path, "whatever.txt", "arrival_time_s,input_tokens,output_tokens\n0,1,1\n")
    assert detect_format(p) == "csv"
    assert detect_format(_write(tmp_path, "a.log", "TIMESTAMP,ContextTokens,GeneratedTokens\n")) == "azure"
    assert detect_format(_write(tmp_path, "m.json", '{"timestamp": 1, "input_length": 2}\n')) == "mooncake"
    junk = _write(tmp_path, "junk.csv", "a,b,c\n")
    with pytest.raises(KvsimError, match="format"):
        detect_format(junk)
    with pytest.raises(KvsimError, match="did you mean"):
        read_trace(p, format="moncake")
    assert len(list(read_trace(p, format="csv"))) == 1


# --------------------------------------------------------------------------- synthetic

@settings(max_examples=examples(15))
@given(rate=st.floats(0.1, 200), cv=st.floats(0.3, 3.0), seed=st.integers(0, 2**32))
def test_synthetic_rate_and_determinism(rate: float, cv: float, seed: int) -> None:
    n = 4000
    args = (ArrivalProcess.gamma(rate, cv), LengthDist.lognormal_quantiles(500, 2000),
            LengthDist.lognormal(200, 1.0))
    a = list(synthetic_requests(*args, seed=seed, n=n))
    assert a == list(synthetic_requests(*args, seed=seed, n=n))
    _check_stream(a)
    mean_gap = a[-1].arrival_s / (n - 1)
    # std of the mean gap is cv/(rate*sqrt(n)); 6 sigma keeps false failures negligible.
    assert mean_gap == pytest.approx(1 / rate, rel=6 * cv / math.sqrt(n - 1))
    assert all(r.prefix_hashes == () for r in a)


@settings(max_examples=examples(20))
@given(mean=st.floats(5, 5000), sigma=st.floats(0, 2), seed=st.integers(0, 1000))
def test_length_distributions_positive(mean: float, sigma: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = LengthDist.lognormal(mean, sigma).sample(rng, 2000)
    assert x.dtype == np.int64 and x.min() >= 1
    e = LengthDist.empirical([3, 7, 7, 100]).sample(rng, 500)
    assert set(e.tolist()) <= {3, 7, 100}
    q = LengthDist.lognormal_quantiles(100, 400).sample(rng, 20000)
    assert np.percentile(q, 50) == pytest.approx(100, rel=0.1)
    assert np.percentile(q, 90) == pytest.approx(400, rel=0.1)


def test_empirical_from_fixture_and_paired() -> None:
    d = LengthDist.from_trace(FIXTURES / "synthetic_small.csv", "output")
    ins, outs = trace_lengths(FIXTURES / "synthetic_small.csv")
    assert set(d.sample(np.random.default_rng(0), 100).tolist()) <= set(outs.tolist())
    reqs = list(synthetic_requests(ArrivalProcess.poisson(1), seed=1, n=100,
                                   paired_lengths=(ins, outs)))
    pairs = set(zip(ins.tolist(), outs.tolist(), strict=False))
    assert all((r.input_tokens, r.output_tokens) in pairs for r in reqs)


def test_sessions_extend_prefixes() -> None:
    spec = SessionSpec(turns=LengthDist.fixed(5), think_mean_s=10.0)
    reqs = list(synthetic_requests(ArrivalProcess.poisson(0.5), LengthDist.lognormal(300, 0.5),
                                   LengthDist.lognormal(150, 0.5), seed=11, duration_s=600,
                                   sessions=spec))
    _check_stream(reqs)
    assert all(r.arrival_s < 600 for r in reqs)
    by: dict[int, list[Request]] = {}
    for r in reqs:
        by.setdefault(r.session_id, []).append(r)
    assert len(by) > 100 and max(len(v) for v in by.values()) == 5
    for turns in by.values():
        for a, b in zip(turns, turns[1:], strict=False):
            assert b.input_tokens > a.input_tokens + a.output_tokens
            assert b.prefix_hashes[: len(a.prefix_hashes)] == a.prefix_hashes
        assert all(len(r.prefix_hashes) == r.input_tokens // 16 for r in turns)
    first = [v[0] for v in by.values()]
    assert first[0].prefix_hashes[0] != first[1].prefix_hashes[0]  # no shared prompt


def test_shared_system_prompt() -> None:
    reqs = list(synthetic_requests(ArrivalProcess.poisson(5), LengthDist.fixed(100),
                                   LengthDist.fixed(10), seed=5, n=300,
                                   shared_prefix=SharedPrefix(tokens=1000, num_users=8, num_prompts=2)))
    assert all(r.input_tokens == 1100 for r in reqs)
    groups: dict[int, set] = {}
    for r in reqs:
        groups.setdefault(int(r.user_id.split("-")[1]) % 2, set()).add(r.prefix_hashes[:62])
        assert len(set(r.prefix_hashes[62:]) & set(reqs[0].prefix_hashes[62:])) == 0 or r is reqs[0]
    assert all(len(v) == 1 for v in groups.values()) and len(groups) == 2
    # block 62 straddles the 1000-token prompt and the user's text: not shared.
    assert len({r.prefix_hashes[62] for r in reqs}) == len(reqs)


# --------------------------------------------------------------------------- hash expansion

@st.composite
def _prefix_pair(draw):
    src = draw(st.sampled_from([64, 128, 512]))
    dst = draw(st.sampled_from([8, 16, 48, 64, 100, 512]))
    n = draw(st.integers(1, 12))
    a = draw(st.lists(st.integers(-(2**63), 2**64), min_size=n, max_size=n))
    common = draw(st.integers(0, n))
    b = a[:common] + [x + 1 for x in a[common:]]
    return src, dst, a, b, common


@settings(max_examples=examples(200))
@given(_prefix_pair(), st.integers(0, 511))
def test_expand_preserves_prefix_sharing(case, extra: int) -> None:
    src, dst, a, b, common = case
    tokens = len(a) * src - (extra % src)
    ea = expand_block_hashes(a, src, dst, tokens)
    eb = expand_block_hashes(b, src, dst, tokens)
    assert len(ea) == min(tokens, len(a) * src) // dst  # one per full destination block
    assert ea == expand_block_hashes(tuple(a), src, dst, tokens)  # deterministic
    for j, (x, y) in enumerate(zip(ea, eb, strict=False)):
        last_src = ((j + 1) * dst - 1) // src
        assert (x == y) == (last_src < common)
    assert all(0 <= h < 2**64 for h in ea)
    assert len(set(ea)) == len(ea)


def test_expand_examples() -> None:
    assert expand_block_hashes((), 512, 16, 5000) == ()
    h = expand_block_hashes([7, 8], 512, 16, 1000)  # 2nd block partial: 1000 // 16 = 62 blocks
    assert len(h) == 62
    assert h[:32] == expand_block_hashes([7], 512, 16, 512)
    assert expand_block_hashes([7, 8], 512, 16, 2000) == expand_block_hashes([7, 8], 512, 16, 1024)
    with pytest.raises(KvsimError):
        expand_block_hashes([1], 0, 16, 100)


# --------------------------------------------------------------------------- transformations

def _toy(n: int = 10) -> list[Request]:
    return [Request(i * 3, float(i), 10, 2) for i in range(n)]


def test_transformations() -> None:
    reqs = _toy()
    assert [r.arrival_s for r in scale_rate(reqs, 2.0)] == [i / 2 for i in range(10)]
    w = list(time_window(reqs, 2.5, 6.0))
    assert [r.arrival_s for r in w] == [0.5, 1.5, 2.5]
    assert [r.arrival_s for r in time_window(reqs, 2.5, 6.0, rebase=False)] == [3.0, 4.0, 5.0]
    assert len(list(limit(reqs, 4))) == 4 and len(list(limit(reqs, None))) == 10
    assert [r.request_id for r in renumber(reqs, 100)] == list(range(100, 110))
    assert [r.arrival_s for r in rebase(reqs[3:])][:2] == [0.0, 1.0]
    m = list(merge(reqs[::2], reqs[1::2]))
    assert [r.arrival_s for r in m] == [float(i) for i in range(10)]
    assert [r.request_id for r in m] == list(range(10))
    with pytest.raises(KvsimError):
        list(scale_rate(reqs, 0))


def test_window_stops_reading_early() -> None:
    def endless():
        i = 0
        while True:
            yield Request(i, float(i), 1, 1)
            i += 1
    assert len(list(time_window(endless(), 5, 10))) == 5


@settings(max_examples=examples(30))
@given(factor=st.floats(0.1, 10), seed=st.integers(0, 100))
def test_rate_scaling_property(factor: float, seed: int) -> None:
    base = list(synthetic_requests(ArrivalProcess.poisson(4), LengthDist.fixed(10), LengthDist.fixed(1),
                                   seed=seed, n=200))
    scaled = list(scale_rate(base, factor))
    assert [r.arrival_s * factor for r in scaled] == pytest.approx([r.arrival_s for r in base])
    assert [(r.request_id, r.input_tokens) for r in scaled] == [(r.request_id, r.input_tokens) for r in base]


# --------------------------------------------------------------------------- streams that cannot end

@pytest.fixture
def bounded_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Arrival draws that fail the test, instead of going on forever, after 1,000 chunks (a stream of
    sessions draws two a chunk: starts and think times)."""
    gaps, drawn = ArrivalProcess.gaps, []

    def bounded(self: ArrivalProcess, rng: np.random.Generator, n: int) -> np.ndarray:
        drawn.append(n)
        assert len(drawn) <= 1_000, "the stream kept drawing sessions"
        return gaps(self, rng, n)

    monkeypatch.setattr(ArrivalProcess, "gaps", bounded)


def _sessions(max_input_tokens: int, input_len: LengthDist, **kw: object):  # noqa: ANN202 - a stream
    spec = SessionSpec(turns=LengthDist.fixed(3), follow_up=LengthDist.fixed(10), think_mean_s=1.0,
                       max_input_tokens=max_input_tokens)
    return synthetic_requests(ArrivalProcess(5.0), input_len, LengthDist.fixed(64), seed=1, n=10, sessions=spec,
                              **kw)


@pytest.mark.usefixtures("bounded_draws")
def test_sessions_whose_first_prompt_cannot_fit_are_refused_up_front() -> None:
    with pytest.raises(KvsimError, match=r"max_input_tokens=500: below every session's first prompt "
                                         r"\(at least 512 tokens\)"):
        _sessions(500, LengthDist.fixed(512))  # the call, before any is drawn
    with pytest.raises(KvsimError, match="at least 1,524 tokens, 1,500 of them the shared prefix"):
        _sessions(1_000, LengthDist.empirical([24, 30]), shared_prefix=SharedPrefix(1_500))
    assert len(list(_sessions(512, LengthDist.fixed(512)))) == 10  # a first prompt of exactly the limit fits


@pytest.mark.usefixtures("bounded_draws")
def test_a_stream_whose_first_prompts_almost_never_fit_stops() -> None:
    # a lognormal can draw one token, so the call cannot refuse it; the stream gives up drawing
    stream = _sessions(500, LengthDist.lognormal_quantiles(100_000, 200_000))
    with pytest.raises(KvsimError, match="max_input_tokens=500: below the first prompt of 25,600 sessions in a row"):
        next(stream)


@pytest.mark.usefixtures("bounded_draws")
def test_a_scenario_whose_sessions_cannot_start_names_the_key_and_file() -> None:
    from kvsim.scenario import run_scenario, scenario_from_dict

    raw = {"model": "llama-3-8b", "hardware": "h100-sxm", "engine": {"max_model_len": 400},
           "workload": {"synthetic": {"rate": 5, "num_requests": 10, "input": {"kind": "fixed", "tokens": 512},
                                      "output": {"kind": "fixed", "tokens": 64},
                                      "sessions": {"turns": {"kind": "fixed", "tokens": 3}, "think_mean_s": 1}}}}
    with pytest.raises(KvsimError) as exc:
        run_scenario(scenario_from_dict(raw, "s.yaml"))
    assert exc.value.file == "s.yaml" and exc.value.field == "workload.synthetic.sessions.max_input_tokens"
    assert exc.value.value == 400 and "engine.max_model_len" in str(exc.value)  # unset: the context length


# --------------------------------------------------------------------------- a run stopped by a bad row

def _trace_run(tmp_path: Path, text: str, **workload: object):  # noqa: ANN202 - a Scenario
    from kvsim.scenario import scenario_from_dict

    trace = _write(tmp_path, "t.csv", text)
    return scenario_from_dict({"model": "llama-3-8b", "hardware": "h100-sxm",
                               "workload": {"trace": str(trace), **workload}}, "t.yaml")


@pytest.mark.parametrize("workload", [{}, {"rate": 2.0}])
def test_a_run_stopped_by_bad_rows_says_so_once(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                workload: dict) -> None:
    from kvsim.scenario import run_scenario

    sc = _trace_run(tmp_path, "arrival_time_s,input_tokens,output_tokens\n0,100,10\n0.5,-200,20\n1,300,30\n"
                              "1.5,x,1\n", **workload)
    caplog.set_level(logging.WARNING, logger="kvsim.serve")
    with pytest.raises(KvsimError) as exc:
        run_scenario(sc)
    assert not caplog.records  # the error is the one line: no "skipped" summary beside it
    text = str(exc.value)
    assert text.startswith("t.yaml: workload.trace=") and "found 2 bad row(s)" in text and "skipped" not in text
    assert "t.csv:3: input_tokens='-200': must be >= 1" in text and "the run stopped" in text
    # skipping them, the run says what it skipped, once (a pass for the trace's rate included)
    bad = run_scenario(sc, skip_bad_rows=True).summary["bad_rows"]
    assert bad["skipped"] == 2
    assert [r.getMessage() for r in caplog.records] == [f"{tmp_path / 't.csv'}: skipped 2 bad row(s): "
                                                        + "; ".join(bad["examples"])]


def test_a_bad_header_is_reported_as_itself(tmp_path: Path) -> None:
    from kvsim.scenario import run_scenario

    with pytest.raises(KvsimError, match=r"t\.csv:1: header='foo,bar,baz': missing column\(s\)") as exc:
        run_scenario(_trace_run(tmp_path, "foo,bar,baz\n1,2,3\n", format="csv"))
    assert "bad row" not in str(exc.value)


# --------------------------------------------------------------------------- float time

def test_streams_past_what_float_seconds_resolve_are_refused(tmp_path: Path) -> None:
    assert MAX_SIM_S == 2.0**30 and np.spacing(MAX_SIM_S) < 1e-6 < np.spacing(1e13)
    with pytest.raises(KvsimError, match="rate=1e-13: the workload would run to 1.0.e\\+13 s of simulated time"):
        list(synthetic_requests(ArrivalProcess.poisson(1e-13), LengthDist.fixed(512), LengthDist.fixed(64), n=50))
    with pytest.raises(KvsimError, match="rate_scale=1e-13"):
        list(scale_rate([Request(0, 0.0, 1, 1), Request(1, 1.0, 1, 1)], 1e-13))
    with pytest.raises(KvsimError, match=r"t\.csv:4: arrival_time_s='1e15': 1e\+15 s after the first row"):
        list(read_csv(_write(tmp_path, "t.csv", "arrival_time_s,input_tokens,output_tokens\n0,1,1\n1,1,1\n1e15,1,1\n")))
    with pytest.raises(KvsimError, match="duration_s"):
        synthetic_requests(ArrivalProcess.poisson(1.0), LengthDist.fixed(1), LengthDist.fixed(1), duration_s=1e12)
    for rate, cv in ((1e-320, 1.0), (1.0, 1e160)):  # gaps that would be infinite or nan
        with pytest.raises(KvsimError, match="must be within 1e-100..1e\\+100"):
            ArrivalProcess(rate, cv)


def test_a_slow_synthetic_run_is_refused_or_timed_to_the_microsecond() -> None:
    from kvsim.scenario import apply_override, run_scenario, scenario_from_dict

    raw = {"model": "llama-3-8b", "hardware": "h100-sxm",
           "workload": {"synthetic": {"rate": 1e-13, "num_requests": 50, "input": {"kind": "fixed", "tokens": 512},
                                      "output": {"kind": "fixed", "tokens": 64}}}}
    with pytest.raises(KvsimError) as exc:
        run_scenario(scenario_from_dict(raw, "r.yaml"))
    assert (exc.value.file, exc.value.field, exc.value.value) == ("r.yaml", "workload.synthetic.rate", 1e-13)
    # about one request a year: each is served alone, in the time a lone request takes
    raw = apply_override(raw, "workload.synthetic.num_requests", 1)
    alone = run_scenario(scenario_from_dict(raw, "r.yaml")).summary
    yearly = run_scenario(scenario_from_dict(apply_override(apply_override(raw, "workload.synthetic.num_requests", 5),
                                                            "workload.synthetic.rate", 3e-8), "r.yaml")).summary
    assert yearly["duration_s"] > 1e7 and yearly["completed"] == 5
    for key in ("ttft_s", "tpot_s"):
        assert yearly[key]["p50"] == pytest.approx(alone[key]["p50"], rel=1e-4) and alone[key]["p50"] > 1e-3
