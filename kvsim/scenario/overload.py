"""Is the deployment overloaded at the offered rate? A run whose queue grows without bound still
"finishes" (the simulator drains it), with TTFTs of minutes; its percentiles then describe the
length of the run, not the deployment. The rule (docs/scenario.md, "Overload"):

* the *offered* rate is the requests' mean arrival rate (:func:`kvsim.serve.workload.mean_rate_per_s`);
* the *sustained* rate is the completion throughput from the first completion to the last first
  token (the last admission): throughout that window an overloaded engine is full, so it completes
  requests at its capacity, while one that keeps up completes them about as fast as they arrive;
* overloaded when the sustained rate is below ``SUSTAINED_SHARE`` of the offered rate AND the
  median TTFT of the last quarter of arrivals is over ``TTFT_GROWTH`` times that of the first
  quarter (the queue grows with arrival index; a burst that the engine absorbs does not).

The sustained rate is then the highest rate the run's steady state suggests: an upper bound (no
SLO is applied to it); ``kvsim search`` finds the highest rate within the SLOs.
"""

from __future__ import annotations

import numpy as np

from kvsim.serve.workload import mean_rate_per_s

MIN_REQUESTS = 40  # fewer arrivals: quarters of under 10 requests say nothing about a trend
SUSTAINED_SHARE = 0.9  # completions at under 90% of arrivals while saturated ...
TTFT_GROWTH = 2.0  # ... and late arrivals wait over twice as long as early ones for their first token


def overload(arrival_s: np.ndarray, ttft_s: np.ndarray, finish_s: np.ndarray) -> dict | None:
    """The verdict for one run. Per request (any order): arrival time, TTFT (inf when it never got a
    first token) and finish time (nan when it did not complete). None for fewer than
    ``MIN_REQUESTS`` arrivals, no spread of arrival times, or no completion before the last admission."""
    n = len(arrival_s)
    offered = mean_rate_per_s(arrival_s)
    if n < MIN_REQUESTS or offered is None:
        return None
    finished = finish_s[np.isfinite(finish_s)]
    first_tokens = (arrival_s + ttft_s)[np.isfinite(ttft_s)]
    if not len(finished) or not len(first_tokens):
        return None
    start, end = float(finished.min()), float(first_tokens.max())
    if end <= start:
        return None
    sustained = float(((finished >= start) & (finished <= end)).sum()) / (end - start)
    ttft = ttft_s[np.argsort(arrival_s, kind="stable")]
    quarter = n // 4
    early, late = float(np.median(ttft[:quarter])), float(np.median(ttft[-quarter:]))
    overloaded = bool(sustained < SUSTAINED_SHARE * offered and late > TTFT_GROWTH * early)
    return {"overloaded": overloaded, "offered_rate_per_s": offered, "sustained_rate_per_s": sustained,
            "ttft_p50_first_quarter_s": _finite(early), "ttft_p50_last_quarter_s": _finite(late),
            "rule": f"completions (first completion to last admission) under {SUSTAINED_SHARE:.0%} of the arrival "
                    f"rate and median TTFT of the last quarter of arrivals over {TTFT_GROWTH:g}x the first "
                    "quarter's (docs/scenario.md, Overload)"}


def _finite(x: float) -> float | None:
    """JSON has no infinity: a median of requests that never got a first token is None."""
    return x if np.isfinite(x) else None


def overload_note(verdict: dict, rate_scale: float | None) -> str:
    """The one-line statement of an overloaded run (``rate_scale``: a trace's, else None)."""
    v = verdict
    ms = lambda x: "never" if x is None else f"{x * 1e3:,.0f} ms"  # noqa: E731
    suggest = f"{v['sustained_rate_per_s']:.3g} req/s"
    if rate_scale is not None:
        scale = rate_scale * v["sustained_rate_per_s"] / v["offered_rate_per_s"]
        suggest += f" (workload.rate, or rate_scale {scale:.3g})"
    return (f"OVERLOADED at {v['offered_rate_per_s']:.3g} req/s: while saturated it completed only "
            f"{v['sustained_rate_per_s']:.3g} req/s and the median TTFT grew from {ms(v['ttft_p50_first_quarter_s'])}"
            f" (first quarter of arrivals) to {ms(v['ttft_p50_last_quarter_s'])} (last quarter), so the latency "
            f"figures measure the queue, not the deployment; its steady state suggests at most about {suggest}; "
            f"`kvsim search` finds the highest rate within the SLOs")
