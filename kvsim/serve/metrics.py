"""What a simulation records (per request, KV usage over time, engine steps) and the summary
statistics computed from it, including the prefix-cache timing side channel of SafeKV.

Columns live in typed ``array`` buffers (8 bytes a value), so a million requests cost tens of
megabytes, not a million Python objects.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

import numpy as np

from kvsim.serve.sequence import Seq

if TYPE_CHECKING:  # for annotations only: the replica calls observe, this module needs none of its code
    from kvsim.serve.replica import Replica, Work

COMPLETED = "completed"
# Rejection reasons (the status column of requests.csv and the keys of summary["rejected"]).
REJECT_CONTEXT = "prompt_exceeds_context"
REJECT_KV = "exceeds_kv_cache"
REJECT_BATCH = "prompt_exceeds_batch_tokens"
# Still queued or running when the simulation ended (not a rejection: the summary counts it apart).
UNFINISHED = "unfinished"
STATUSES = (COMPLETED, REJECT_CONTEXT, REJECT_KV, REJECT_BATCH, UNFINISHED)

REQUEST_COLUMNS = (("request_id", "q"), ("arrival_s", "d"), ("input_tokens", "q"), ("output_tokens", "q"),
                   ("generated_tokens", "q"), ("image_tokens", "q"), ("replica", "q"), ("status", "b"),
                   ("scheduled_s", "d"), ("first_token_s", "d"), ("finish_s", "d"), ("prefix_hit_tokens", "q"),
                   ("doc_ssd_tokens", "q"), ("cross_user_hit", "b"), ("preemptions", "q"))
SERIES_COLUMNS = (("time_s", "d"), ("replica", "q"), ("blocks_used", "q"), ("blocks_cached_free", "q"),
                  ("blocks_free", "q"), ("running", "q"), ("waiting", "q"))
STEP_COLUMNS = (("replica", "q"), ("start_s", "d"), ("end_s", "d"), ("steps", "q"), ("prefill_tokens", "q"),
                ("prefill_seqs", "q"), ("decode_seqs", "q"))


def _columns(spec: tuple[tuple[str, str], ...]) -> dict[str, array]:
    return {name: array(code) for name, code in spec}


class Recorder:
    """Collects requests, time series (at most one row per ``interval_s`` per replica, taken at
    step boundaries) and engine steps (a fast-forwarded run of decode steps is one row)."""

    def __init__(self, replicas: int, interval_s: float, record_steps: bool = True) -> None:
        self.requests = _columns(REQUEST_COLUMNS)
        self.users: list[str | None] = []
        self.sessions: list[int | None] = []
        self.series = _columns(SERIES_COLUMNS)
        self.steps = _columns(STEP_COLUMNS)
        # inter-token latency: each decoding sequence of a step waits that step's duration for its
        # next token (a fast-forwarded run counts its steps at their mean duration)
        self.itl_s, self.itl_weight = array("d"), array("d")
        self.interval_s = interval_s
        self.record_steps = record_steps
        self.next_sample_s = [0.0] * replicas

    def request(self, seq: Seq, status: str) -> None:
        r, c = seq.req, self.requests
        c["request_id"].append(r.request_id)
        c["arrival_s"].append(r.arrival_s if r.sent_s is None else r.sent_s)  # when it was sent: TTFT counts from there
        c["input_tokens"].append(r.input_tokens)
        c["output_tokens"].append(r.output_tokens)
        c["generated_tokens"].append(seq.generated)
        c["image_tokens"].append(r.image_tokens)
        c["replica"].append(seq.replica)
        c["status"].append(STATUSES.index(status))
        c["scheduled_s"].append(seq.scheduled_s)
        c["first_token_s"].append(seq.first_token_s)
        c["finish_s"].append(seq.finish_s)
        c["prefix_hit_tokens"].append(max(seq.hit_tokens, 0))
        c["doc_ssd_tokens"].append(seq.doc_tokens)
        c["cross_user_hit"].append(seq.cross_user_hit)
        c["preemptions"].append(seq.preemptions)
        self.users.append(r.user_id)
        self.sessions.append(r.session_id)

    def observe(self, replica: Replica, work: Work) -> None:
        """Called by a replica after planning ``work`` (see :class:`kvsim.serve.replica.Replica`)."""
        idx = replica.index
        now = work.start_s
        if now >= self.next_sample_s[idx]:
            self.next_sample_s[idx] = now + self.interval_s
            bm = replica.bm
            s = self.series
            s["time_s"].append(now)
            s["replica"].append(idx)
            s["blocks_used"].append(bm.num_used)
            s["blocks_cached_free"].append(bm.evictable)
            s["blocks_free"].append(bm.free_uncached)
            s["running"].append(len(replica.running))
            s["waiting"].append(len(replica.waiting))
        n_dec = len(work.decodes)
        if n_dec:
            steps = work.steps
            self.itl_s.append((work.end_s - now) / steps)
            self.itl_weight.append(n_dec * steps)
        if self.record_steps:
            st = self.steps
            prefills = work.prefills
            st["replica"].append(idx)
            st["start_s"].append(now)
            st["end_s"].append(work.end_s)
            st["steps"].append(work.steps)
            st["prefill_tokens"].append(sum(p.scheduled for p in prefills))
            st["prefill_seqs"].append(len(prefills))
            st["decode_seqs"].append(len(work.decodes))

    def arrays(self) -> dict[str, np.ndarray]:
        """Request columns as numpy arrays, in request-id order."""
        cols = {k: np.frombuffer(v, dtype=v.typecode) if len(v) else np.zeros(0, dtype=v.typecode)
                for k, v in self.requests.items()}
        order = np.argsort(cols["request_id"], kind="stable")
        return {k: v[order] for k, v in cols.items()}


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

def stats(x: np.ndarray) -> dict[str, float | None]:
    """Mean and 50/90/99th percentiles (numpy's linear interpolation); None when empty."""
    if len(x) == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"mean": float(np.mean(x)), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def weighted_stats(x: np.ndarray, weight: np.ndarray) -> dict[str, float | None]:
    """Mean and 50/90/99th percentiles of values with integer weights (each counted ``weight``
    times; the percentile is the smallest value whose cumulative share reaches it)."""
    if len(x) == 0 or weight.sum() <= 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    order = np.argsort(x, kind="stable")
    xs, cum = x[order], np.cumsum(weight[order])
    at = np.searchsorted(cum, np.array([0.5, 0.9, 0.99]) * cum[-1], side="left")
    p50, p90, p99 = xs[np.minimum(at, len(xs) - 1)]
    return {"mean": float(np.average(x, weights=weight)), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def separability(pos: np.ndarray, neg: np.ndarray) -> dict[str, float | None]:
    """How well "TTFT below a threshold" tells positives (prefix hits) from negatives (misses).

    ``auc``: probability that a random miss has a longer TTFT than a random hit (ties count half;
    0.5 = no information). ``best_threshold_s`` / ``best_balanced_accuracy``: the threshold that
    maximises the mean of the hit and miss recall (balanced, so class sizes do not matter).
    """
    if len(pos) == 0 or len(neg) == 0:
        return {"auc": None, "best_threshold_s": None, "best_balanced_accuracy": None}
    pos, neg = np.sort(pos), np.sort(neg)
    below = np.searchsorted(pos, neg, side="left")  # hits strictly faster than each miss
    ties = np.searchsorted(pos, neg, side="right") - below
    auc = float((below.sum() + 0.5 * ties.sum()) / (len(pos) * len(neg)))
    cands = np.unique(np.concatenate([pos, neg]))
    tpr = np.searchsorted(pos, cands, side="right") / len(pos)  # hits with TTFT <= threshold
    tnr = 1.0 - np.searchsorted(neg, cands, side="right") / len(neg)  # misses above it
    bal = (tpr + tnr) / 2
    best = int(np.argmax(bal))
    return {"auc": auc, "best_threshold_s": float(cands[best]), "best_balanced_accuracy": float(bal[best])}


def side_channel(policy: str, ttft: np.ndarray, hit_tokens: np.ndarray, cross_user: np.ndarray) -> dict:
    """The SafeKV leak (arXiv 2508.08438): an attacker times TTFT to learn whether another user's
    prompt shares its prefix. Positives are requests that hit blocks another user cached; negatives
    are requests with no prefix hit at all."""
    pos = ttft[cross_user]
    neg = ttft[hit_tokens == 0]
    out: dict[str, object] = {"policy": policy, "cross_user_hit_requests": int(cross_user.sum()),
                              "own_hit_requests": int(((hit_tokens > 0) & ~cross_user).sum()),
                              "miss_requests": int(len(neg))}
    gap = float(np.median(neg) - np.median(pos)) if len(pos) and len(neg) else None
    out["ttft_gap_p50_s"] = gap
    out.update(separability(pos, neg))
    if not len(pos):
        out["note"] = "no request hit another user's cached prefix: the timing channel carries nothing"
    elif policy == "selective":
        out["note"] = ("cross-user hits are on content two users have sent (treated as non-sensitive); "
                       "content only one user has sent is never hit by another")
    return out

