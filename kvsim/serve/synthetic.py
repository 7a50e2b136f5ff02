"""Synthetic request streams: seeded arrivals, length distributions, multi-turn sessions and
shared system prompts.

Everything is drawn from one ``numpy.random.Generator`` seeded by the caller, in fixed-size
chunks, so the same arguments and seed always give the same stream. Streams are generators:
pass ``n`` and/or ``duration_s`` to bound them (both ``None`` = endless; use
:func:`kvsim.serve.workload.limit`).

Prefix hashes (``block_tokens`` tokens per block, 16 by default like vLLM's KV block) are
produced only when requests can share a prefix, i.e. with :class:`SessionSpec` or
:class:`SharedPrefix`; plain streams carry no hashes (no prefix hits). Each session is one
growing token stream: turn *k*'s prompt = turn *k-1*'s prompt + its answer + new user text, so
the hashes of turn *k* extend those of turn *k-1* (the block that held the end of the previous
prompt becomes full and gets a new hash, as in a real prefix cache). Blocks lying entirely inside
the shared system prompt hash identically for every user of that prompt.

Fixtures in ``traces/`` were made by :func:`write_fixtures` (command in ``traces/README.md``).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvsim.errors import KvsimError
from kvsim.serve.workload import MAX_SIM_S, Request, chain_hash, content_block_hashes, mix64, past_time_limit

# z-score of the 90th percentile of a standard normal: sigma = ln(p90/p50) / z90.
_Z90 = 1.2815515655446004
_CHUNK = 256  # sessions drawn per batch; part of the stream definition (changing it changes streams)
# Sessions in a row whose first turn exceeds max_input_tokens (so that they send nothing) before a
# stream gives up: a stream of n requests and no end time whose first turns (almost) never fit would
# otherwise draw sessions forever. A stream where even one session in 1,000 fits passes this many in a
# row with probability 0.999**25_600, about 1e-11.
_MAX_DROPPED_SESSIONS = 100 * _CHUNK


def _positive(name: str, v: float) -> None:
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
        raise KvsimError("must be a positive number", field=name, value=v)


# An arrival process's rate and CV lie in [1/_EXTREME, _EXTREME]: then its Gamma gaps' shape 1/cv**2 and
# scale cv**2/rate are positive float64s (past it they are 0 or infinite, and the gaps nan). No physical
# arrival process comes near it.
_EXTREME = 1e100


def _not_extreme(name: str, v: float, unit: str = "") -> None:
    if not 1 / _EXTREME <= v <= _EXTREME:
        raise KvsimError(f"must be within {1 / _EXTREME:g}..{_EXTREME:g}{unit}", field=name, value=v)


@dataclass(frozen=True)
class ArrivalProcess:
    """Renewal arrival process: mean ``rate`` per second, gaps with coefficient of variation
    ``cv`` (Gamma gaps; ``cv == 1`` is Poisson, ``cv > 1`` bursty, ``cv < 1`` regular)."""

    rate: float
    cv: float = 1.0

    def __post_init__(self) -> None:
        _positive("rate", self.rate)
        _positive("cv", self.cv)
        _not_extreme("rate", self.rate, " per second")
        _not_extreme("cv", self.cv)

    @classmethod
    def poisson(cls, rate: float) -> ArrivalProcess:
        """Poisson arrivals at ``rate`` per second."""
        return cls(rate, 1.0)

    @classmethod
    def gamma(cls, rate: float, cv: float) -> ArrivalProcess:
        """Gamma-renewal arrivals: mean rate ``rate``, gap CV ``cv``."""
        return cls(rate, cv)

    def gaps(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` inter-arrival gaps in seconds."""
        if self.cv == 1.0:
            return rng.exponential(1.0 / self.rate, n)
        shape = 1.0 / (self.cv * self.cv)  # Gamma CV = 1/sqrt(shape); mean = shape*scale = 1/rate
        return rng.gamma(shape, 1.0 / (self.rate * shape), n)


@dataclass(frozen=True)
class LengthDist:
    """A token-count distribution: ``fixed``, ``lognormal`` or ``empirical`` (resampling).

    Samples are rounded and clipped to ``[min_tokens, max_tokens]``. Build with the class
    methods rather than the constructor.
    """

    kind: str
    value: float = 0.0
    mu: float = 0.0
    sigma: float = 0.0
    values: tuple[int, ...] = ()
    min_tokens: int = 1
    max_tokens: int | None = None

    @classmethod
    def fixed(cls, tokens: int) -> LengthDist:
        """Always ``tokens``."""
        _positive("tokens", tokens)
        return cls("fixed", value=float(tokens))

    @classmethod
    def lognormal(cls, mean: float, sigma: float, *, max_tokens: int | None = None) -> LengthDist:
        """Lognormal with arithmetic ``mean`` tokens and log-space std ``sigma``."""
        _positive("mean", mean)
        if not sigma >= 0:
            raise KvsimError("must be >= 0", field="sigma", value=sigma)
        return cls("lognormal", mu=math.log(mean) - sigma * sigma / 2, sigma=sigma, max_tokens=max_tokens)

    @classmethod
    def lognormal_quantiles(cls, p50: float, p90: float, *, max_tokens: int | None = None) -> LengthDist:
        """Lognormal through the given median and 90th percentile."""
        _positive("p50", p50)
        if not p90 >= p50:
            raise KvsimError(f"must be >= p50={p50}", field="p90", value=p90)
        return cls("lognormal", mu=math.log(p50), sigma=math.log(p90 / p50) / _Z90, max_tokens=max_tokens)

    @classmethod
    def empirical(cls, values: Sequence[int] | np.ndarray) -> LengthDist:
        """Resample (with replacement) from observed token counts."""
        vals = tuple(int(v) for v in np.asarray(values).ravel())
        if not vals or min(vals) < 1:
            raise KvsimError("need at least one value, all >= 1", field="values",
                             value=(min(vals) if vals else "empty"))
        return cls("empirical", values=vals)

    @classmethod
    def from_trace(cls, path: str | Path, which: str = "input", format: str | None = None) -> LengthDist:
        """Empirical distribution of a trace file's ``input`` or ``output`` lengths."""
        from kvsim.serve.traces import trace_lengths
        if which not in ("input", "output"):
            raise KvsimError("must be 'input' or 'output'", field="which", value=which)
        ins, outs = trace_lengths(path, format)
        return cls.empirical(ins if which == "input" else outs)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` token counts (int64, each >= ``min_tokens``)."""
        if self.kind == "fixed":
            x = np.full(n, self.value)
        elif self.kind == "lognormal":
            x = rng.lognormal(self.mu, self.sigma, n)
        elif self.kind == "empirical":
            arr = np.asarray(self.values, dtype=np.int64)
            x = arr[rng.integers(0, len(arr), n)]
        else:
            raise KvsimError("unknown length distribution", field="kind", value=self.kind)
        return self._clip(x)

    def smallest(self) -> int:
        """The smallest count :meth:`sample` can return (a lognormal draw can be arbitrarily small)."""
        low = self.value if self.kind == "fixed" else min(self.values) if self.kind == "empirical" else 0.0
        return int(self._clip(np.array([low]))[0])

    def _clip(self, x: np.ndarray) -> np.ndarray:
        hi = self.max_tokens if self.max_tokens is not None else np.iinfo(np.int64).max // 4
        return np.clip(np.rint(x), self.min_tokens, hi).astype(np.int64)


@dataclass(frozen=True)
class SessionSpec:
    """Multi-turn chat sessions. The arrival process then gives *session* starts.

    ``turns``: turns per session. ``follow_up``: new user tokens of turns 2.. (default: the
    stream's input distribution). Turn *k* arrives ``think`` seconds after turn *k-1*
    (Gamma, mean ``think_mean_s``, CV ``think_cv``; open loop: measured from the previous
    arrival, so the think time includes reading the answer). A session ends early once a
    prompt would exceed ``max_input_tokens``; one whose first prompt does sends nothing (a stream
    where no session's first prompt can fit is an error).
    """

    turns: LengthDist = LengthDist("fixed", value=4.0)
    follow_up: LengthDist | None = None
    think_mean_s: float = 30.0
    think_cv: float = 1.0
    max_input_tokens: int = 128_000


@dataclass(frozen=True)
class SharedPrefix:
    """``num_users`` users share ``tokens``-token system prompts; user *u* uses prompt
    ``u % num_prompts`` (one prompt by default). Each request (or session) belongs to a user
    drawn uniformly; its prompt = system prompt + its own text."""

    tokens: int
    num_users: int = 1
    num_prompts: int = 1


def synthetic_requests(arrivals: ArrivalProcess, input_len: LengthDist | None = None,
                       output_len: LengthDist | None = None, *, seed: int = 0, n: int | None = None,
                       duration_s: float | None = None, sessions: SessionSpec | None = None,
                       shared_prefix: SharedPrefix | None = None, block_tokens: int = 16,
                       paired_lengths: tuple[Sequence[int] | np.ndarray, Sequence[int] | np.ndarray] | None = None
                       ) -> Iterator[Request]:
    """Generate a seeded synthetic stream (first request at t=0, ids 0, 1, ...).

    ``input_len`` is the user text of a first turn (the shared prefix is added on top);
    ``output_len`` the answer length. ``paired_lengths=(inputs, outputs)`` instead resamples
    (input, output) rows jointly, keeping their correlation (e.g. from
    :func:`kvsim.serve.traces.trace_lengths`). Stops after ``n`` requests or at ``duration_s``
    (arrivals are < duration_s), whichever comes first. A request that would arrive after
    :data:`~kvsim.serve.workload.MAX_SIM_S` is an error.
    """
    if paired_lengths is None and (input_len is None or output_len is None):
        raise KvsimError("give input_len and output_len, or paired_lengths", field="input_len",
                         value=input_len)
    if block_tokens <= 0:
        raise KvsimError("must be > 0", field="block_tokens", value=block_tokens)
    rng = np.random.default_rng(seed)
    # Salt all hashes by the seed so streams made with different seeds never share blocks.
    salt = mix64(int(rng.integers(0, 2**63)))
    pair_in = pair_out = None
    if paired_lengths is not None:
        pair_in = np.asarray(paired_lengths[0], dtype=np.int64)
        pair_out = np.asarray(paired_lengths[1], dtype=np.int64)
        if len(pair_in) != len(pair_out) or len(pair_in) == 0:
            raise KvsimError("inputs and outputs must be non-empty and of equal length",
                             field="paired_lengths", value=(len(pair_in), len(pair_out)))
    if duration_s is not None and duration_s > MAX_SIM_S:
        raise past_time_limit(duration_s, "duration_s", duration_s, "stop sooner")
    if sessions is not None:  # the think process's own rate and CV would name neither
        _not_extreme("think_mean_s", sessions.think_mean_s, " s")
        _not_extreme("think_cv", sessions.think_cv)
    think = ArrivalProcess(1.0 / sessions.think_mean_s, sessions.think_cv) if sessions else None
    follow = (sessions.follow_up or input_len) if sessions else None
    if sessions is not None and follow is None:
        raise KvsimError("give SessionSpec.follow_up when using paired_lengths",
                         field="follow_up", value=None)
    k_pre = shared_prefix.tokens if shared_prefix else 0
    if sessions is not None:
        if pair_in is not None:
            first = k_pre + int(pair_in.min())
        else:
            assert input_len is not None  # checked on entry
            first = k_pre + input_len.smallest()
        if first > sessions.max_input_tokens:
            prefix = f", {k_pre:,} of them the shared prefix" if k_pre else ""
            raise KvsimError(f"below every session's first prompt (at least {first:,} tokens{prefix}): no session "
                             "could send a request", field="max_input_tokens", value=sessions.max_input_tokens)
    hashing = sessions is not None or (shared_prefix is not None and k_pre > 0)
    prefix_cache: dict[int, list[int]] = {}
    end = math.inf if duration_s is None else duration_s
    max_n = math.inf if n is None else n

    def hashes_for(session_salt: int, group: int, tokens: int) -> tuple[int, ...]:
        full = tokens // block_tokens
        n_pre = min(k_pre // block_tokens, full)
        pre = prefix_cache.get(group)
        if pre is None:
            pre = prefix_cache[group] = content_block_hashes(chain_hash(salt, group), 0,
                                                             k_pre // block_tokens)
        return tuple(pre[:n_pre] + content_block_hashes(session_salt, n_pre, full - n_pre))

    def request(rid: int, entry: tuple[float, int, tuple]) -> Request:
        t, _, (ssalt, grp, user, sess, inp, out) = entry
        if t > MAX_SIM_S:  # a follow-up turn: no session starts this late (below)
            assert sessions is not None
            raise past_time_limit(t, "think_mean_s", sessions.think_mean_s, "shorten the think time")
        hs = hashes_for(ssalt, grp, inp) if hashing else ()
        return Request(rid, t, inp, out, hs, block_tokens if hs else 0, user, 0, sess)

    def stream() -> Iterator[Request]:  # the arguments are checked at the call, the stream drawn as it is read
        if n == 0:
            return
        heap: list[tuple[float, int, tuple]] = []
        seq = 0
        rid = 0
        t_start = 0.0
        sid = 0
        dropped = 0  # sessions in a row that sent nothing
        while True:
            # Draw a chunk of sessions (a session is a single request without SessionSpec).
            gaps = arrivals.gaps(rng, _CHUNK)
            turns = sessions.turns.sample(rng, _CHUNK) if sessions else np.ones(_CHUNK, np.int64)
            users = (rng.integers(0, shared_prefix.num_users, _CHUNK) if shared_prefix
                     else np.zeros(_CHUNK, np.int64))
            total = int(turns.sum())
            if pair_in is not None and pair_out is not None:  # set together
                idx = rng.integers(0, len(pair_in), total)
                first_in, outs = pair_in[idx], pair_out[idx]
            else:
                assert input_len is not None and output_len is not None  # checked on entry
                first_in, outs = input_len.sample(rng, total), output_len.sample(rng, total)
            extra = follow.sample(rng, total) if follow is not None else None  # follow is set with sessions
            thinks = think.gaps(rng, total) if think else None
            k = 0
            for c in range(_CHUNK):
                # Emit everything that arrives before this session starts (streams are sorted).
                while heap and heap[0][0] <= t_start:
                    yield request(rid, heapq.heappop(heap))
                    rid += 1
                    if rid >= max_n:
                        return
                # past the bound, with no end time to stop the stream first (duration_s is at most the bound)
                if t_start > MAX_SIM_S and end > MAX_SIM_S:
                    raise past_time_limit(t_start, "rate", arrivals.rate, "raise the rate or send fewer requests")
                if t_start >= end:
                    break
                u = int(users[c])
                grp = u % shared_prefix.num_prompts if shared_prefix else 0
                user = f"user-{u}" if shared_prefix else None
                # Negative tag: never equal to a prompt-group salt's content ids.
                ssalt = chain_hash(chain_hash(salt, grp), -(sid + 1))
                t, inp = t_start, k_pre + int(first_in[k])
                seq_before = seq
                for j in range(int(turns[c])):
                    if j:  # a follow-up turn: only with sessions
                        assert thinks is not None and extra is not None
                        t += float(thinks[k + j])
                        inp += int(outs[k + j - 1]) + int(extra[k + j])
                    if t >= end or (sessions and inp > sessions.max_input_tokens):
                        break
                    heapq.heappush(heap, (t, seq, (ssalt, grp, user, sid if sessions else None,
                                                   inp, int(outs[k + j]))))
                    seq += 1
                # A session sends nothing only when its first prompt exceeds max_input_tokens (t_start < end).
                dropped = dropped + 1 if seq == seq_before else 0
                if dropped >= _MAX_DROPPED_SESSIONS:
                    assert sessions is not None  # without sessions every first request is queued
                    raise KvsimError(f"below the first prompt of {dropped:,} sessions in a row: almost no session can "
                                     "send a request", field="max_input_tokens", value=sessions.max_input_tokens)
                k += int(turns[c])
                sid += 1
                t_start += float(gaps[c])
            else:
                continue
            break
        while heap and rid < max_n:
            yield request(rid, heapq.heappop(heap))
            rid += 1

    return stream()


def write_fixtures(folder: str | Path = "traces") -> dict[str, int]:
    """Regenerate the small CSV fixtures shipped in ``traces/`` (fixed seeds)."""
    from kvsim.serve.traces import write_csv
    folder = Path(folder)
    small = synthetic_requests(ArrivalProcess.poisson(5.0),
                               LengthDist.lognormal_quantiles(800, 2500, max_tokens=16_000),
                               LengthDist.lognormal_quantiles(150, 500, max_tokens=4_000),
                               seed=2024, n=200)
    # 512-token blocks so the file reads back with read_csv's default prefix_block_tokens.
    sess = synthetic_requests(ArrivalProcess.gamma(2.0, 2.0),
                              LengthDist.lognormal_quantiles(300, 1200, max_tokens=8_000),
                              LengthDist.lognormal_quantiles(200, 600, max_tokens=2_000),
                              seed=2025, n=200, block_tokens=512,
                              sessions=SessionSpec(turns=LengthDist.lognormal_quantiles(3, 8),
                                                   think_mean_s=20.0),
                              shared_prefix=SharedPrefix(tokens=1024, num_users=20, num_prompts=2))
    return {"synthetic_small.csv": write_csv(small, folder / "synthetic_small.csv"),
            "synthetic_sessions.csv": write_csv(sess, folder / "synthetic_sessions.csv")}
