"""Probe hypotheses about the closed-loop TTFT kvsim misses on real vLLM runs.

kvsim's first tokens on the development set (../shared/data/measured/, vLLM 0.12 Qwen3-32B on H100) come
too soon while its TPOT agrees within 5%. Each probe changes one thing for the duration of a judge run
and reports TTFT and TPOT error per TP; the first three patch kvsim for the run, the round trips are
kvsim's own option, which is off by default (README, "TTFT: what the development set rules out"):

  baseline        kvsim as it ships
  prefill-x1.3    every engine step that holds a prefill takes 30% longer (is it the prefill's GPU time?);
                  any factor: prefill-xF (prefill-x1.06: the H100's sustained GEMM rate, validation/sustained.py)
  prompt+13       every prompt 13 tokens longer (aiperf's chat-templated prompts run about 13 tokens over
                  the nominal length: tenstorrent/tt-inference-server issue 4179, 4096 -> 4109)
  rtt-exp-M       a client round trip (kvsim's workload.closed_loop.round_trip_ms, off by default): each
                  request reaches the engine a random time after its client sent it (exponential, mean
                  M ms, in sending order), and its TTFT counts from sending
  rtt-uni-M       the same, uniform on [0, 2M] ms
  step-lag        every arrival that reaches a busy engine first runs a step later, as vLLM's async
                  scheduling admits it (kvsim models that lag from 0.14 or with --async-scheduling), while
                  the host time between steps stays the version's: does the measured path delay each
                  request by one engine step?
  sglang-whole    SGLang rows admit whole prompts only, as SGLang's PrefillAdder.add_one_req does
                  (python/sglang/srt/managers/schedule_policy.py: a prompt that does not fit what is left of
                  --max-prefill-tokens waits for the next batch unless the batch is empty; aiconfigurator's
                  deployment sets it to isl + 1500 with --enable-mixed-chunk, the decode rows counting
                  against it): the step budget becomes the decodes plus the whole prompts that fit, where
                  kvsim's vLLM-like scheduler would chunk the next prompt into what is left (kvsim now runs
                  SGLang's own prefill batches, whole prompts included, on rows without --enable-mixed-chunk:
                  kvsim.serve.policy; this probe changes the budget of every SGLang row on top of that)

Each line also gives the closed-loop cycle, TTFT + (output - 1) x TPOT, against the measured one: a cycle
that agrees while TTFT misses says the time is right and its split between waiting and decoding is not.
``--group engine`` reports per serving engine instead of per TP (with ``--measured aiconfigurator``: vLLM,
SGLang and TensorRT-LLM rows measured through the same benchmark client).

    .venv/bin/python scripts/ttft_probes.py [--measured FILE|aiconfigurator] [--only BACKEND:MODEL]
                                            [--probes NAME,...] [--group tp|engine]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from fit_host_step import DEV_SET  # the development set's one path (this script's folder is on sys.path)

from kvsim import judge_serving
from kvsim.scenario import run
from kvsim.serve import closed_loop, replica
from kvsim.serve.replica import EngineConfig

PROBES = ("baseline", "prefill-x1.3", "prompt+13", "rtt-exp-10", "rtt-exp-15", "rtt-uni-15", "rtt-uni-20",
          "step-lag", "sglang-whole")


@contextlib.contextmanager
def _patched(obj: object, name: str, value: object) -> Iterator[None]:
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def _prefill_stretch(factor: float) -> contextlib.AbstractContextManager[None]:
    original = replica.Replica._step_s

    def step_s(self: replica.Replica, decodes: list, prefills: list) -> float:
        t = original(self, decodes, prefills)
        return t * factor if prefills else t
    return _patched(replica.Replica, "_step_s", step_s)


def _longer_prompts(tokens: int) -> contextlib.AbstractContextManager[None]:
    original = closed_loop.ClosedLoop.__init__

    def init(self: closed_loop.ClosedLoop, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        self.inputs = [n + tokens for n in self.inputs]
        self._pending = type(self._pending)(dataclasses.replace(r, input_tokens=r.input_tokens + tokens)
                                            for r in self._pending)
    return _patched(closed_loop.ClosedLoop, "__init__", init)


def _sglang_whole_prompts() -> contextlib.AbstractContextManager[None]:
    original = judge_serving.Deployment.engine

    def engine(self: judge_serving.Deployment, row: judge_serving.Row) -> dict:
        settings = original(self, row)
        if row.backend != "sglang" or self.budget_headroom_tokens is None:
            return settings
        decodes = row.concurrency // row.dp
        # --max-prefill-tokens isl + headroom, less the decode rows and the first prompt (which always joins)
        left, prompts = self.budget_headroom_tokens - decodes, 1
        while row.isl < left:  # add_one_req: input_tokens >= rem_input_tokens -> wait for the next batch
            left, prompts = left - row.isl, prompts + 1
        return {**settings, "max_num_batched_tokens": decodes + prompts * row.isl}
    return _patched(judge_serving.Deployment, "engine", engine)


def _step_lag() -> contextlib.AbstractContextManager[None]:
    original = run.engine_config

    def engine_config(*args: object, **kwargs: object) -> EngineConfig:
        return dataclasses.replace(original(*args, **kwargs), async_scheduling=True)  # type: ignore[arg-type]
    return _patched(run, "engine_config", engine_config)


def _probe(name: str) -> tuple[contextlib.AbstractContextManager[None], list[str]]:
    """The patch a probe applies and the scenario settings it adds to every row."""
    if name == "baseline":
        return contextlib.nullcontext(), []
    stretch = re.fullmatch(r"prefill-x(\d+(?:\.\d+)?)", name)
    if stretch is not None:
        return _prefill_stretch(float(stretch.group(1))), []
    if name == "prompt+13":
        return _longer_prompts(13), []
    if name == "sglang-whole":
        return _sglang_whole_prompts(), []
    if name == "step-lag":
        return _step_lag(), []
    m = re.fullmatch(r"rtt-(exp|uni)-(\d+(?:\.\d+)?)", name)
    if m is None:
        raise SystemExit(f"--probes: unknown probe {name!r} (known: {', '.join(PROBES)})")
    return contextlib.nullcontext(), [f"workload.closed_loop.round_trip_ms={m.group(2)}",
                                      "workload.closed_loop.round_trip_distribution="
                                      + {"exp": "exponential", "uni": "uniform"}[m.group(1)]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measured", default=str(DEV_SET), help="a silicon-sample CSV, or 'aiconfigurator'")
    ap.add_argument("--only", default=None, help="BACKEND:MODEL, e.g. trtllm:Qwen/Qwen3-32B")
    ap.add_argument("--probes", default=",".join(PROBES))
    ap.add_argument("--group", choices=("tp", "engine"), default="tp")
    args = ap.parse_args()
    path = judge_serving.find_silicon_sample() if args.measured == "aiconfigurator" else Path(args.measured)
    with tempfile.TemporaryDirectory() as tmp:
        if args.only is not None:  # judge a filtered copy: the judge reads whole files
            backend, model = args.only.split(":", 1)
            lines = path.read_text().splitlines(keepends=True)
            path = Path(tmp) / "rows.csv"
            path.write_text("".join([lines[0]] + [x for x in lines[1:] if f",{backend}," in x and f",{model}," in x]))
        _report(path, args.probes.split(","), args.group)


def _cycle_error(j: judge_serving.Judged) -> float:
    """kvsim's closed-loop cycle (TTFT + (output - 1) x TPOT) against the measured one, signed."""
    r = j.row
    return (j.ttft_ms + (r.osl - 1) * j.tpot_ms) / (r.ttft_ms + (r.osl - 1) * r.tpot_ms) - 1


def _report(path: Path, probes: list[str], group: str) -> None:
    print(f"{'probe':14} {group:>7} {'rows':>5} {'TTFT median':>12} {'p90':>7} {'signed':>8} "
          f"{'TPOT median':>12} {'worst':>7} {'signed':>8} {'cycle median':>13} {'signed':>8}")
    key = (lambda j: j.row.tp) if group == "tp" else (lambda j: j.row.backend)
    for name in probes:
        patch, sets = _probe(name)
        with patch:
            judged, _ = judge_serving.judge(path, sets=sets)
        for k in sorted({key(j) for j in judged}):
            js = [j for j in judged if key(j) == k]
            ttft = np.array([j.ttft_error for j in js])
            tpot = np.array([j.tpot_error for j in js])
            cycle = np.array([_cycle_error(j) for j in js])
            print(f"{name:14} {k:>7} {len(js):5} {100 * np.median(np.abs(ttft)):11.1f}% "
                  f"{100 * np.percentile(np.abs(ttft), 90):6.1f}% {100 * np.median(ttft):+7.1f}% "
                  f"{100 * np.median(np.abs(tpot)):11.1f}% {100 * np.abs(tpot).max():6.1f}% "
                  f"{100 * np.median(tpot):+7.1f}% {100 * np.median(np.abs(cycle)):12.1f}% "
                  f"{100 * np.median(cycle):+7.1f}%")


if __name__ == "__main__":
    main()
