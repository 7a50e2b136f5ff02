"""A closed-loop workload, as benchmark clients run one: ``concurrency`` clients, each sending its
next request when its previous one has finished (or was rejected).

This is ``vllm bench serve --max-concurrency N --request-rate inf`` (vLLM's
``benchmarks/serve.py``: every request is sent at once through an ``asyncio.Semaphore(N)``, so N are
in flight at t=0 and each completion releases the next) and the closed-loop tables that public
TTFT/TPOT figures come from. Without a client round trip (below), a request's ``arrival_s`` is the
time its client sends it, so TTFT is measured from sending, as the client measures it.

With a finite ``--request-rate R`` (and ``--burstiness b``) the benchmark schedules request i at the
sum of i gaps of a Gamma process of mean 1/R and shape b (``get_request``: the first at once, then
``np.random.gamma(shape=b, scale=1/(R b))`` between them) and each scheduled request still waits for a
slot of the semaphore, which FIFO waiters take in order: request i is sent at the later of its
scheduled time and the end of request i - N's slot holder. Sends stay in request order, so an arrival
released later is never earlier than one released before.

Lengths follow vLLM's ``random`` dataset: with ``random_range_ratio`` r, each request's input and
output lengths are drawn uniformly from ``[floor(L * (1 - r)), ceil(L * (1 + r))]`` (at least 1),
where L is the length distribution's draw (``fixed`` for the benchmark's ``--random-input-len``).

A client round trip (``round_trip_s``, default none) puts time between a client sending a request and
the engine receiving it: the HTTP front end, tokenization and the way back of the previous response,
all of which a benchmark client's TTFT includes. Each request draws its own (``fixed``, ``exponential``
or ``uniform`` on [0, 2 x mean]) and the front end passes requests on in the order they were sent (a
request never reaches the engine before one sent earlier). Its ``arrival_s`` is when the engine
receives it and ``sent_s`` when its client sent it, so the recorded TTFT counts from sending. When
the round trip exceeds a decode step, requests that finish a step apart reach the engine together.

A think time (``think_s``, default none) is the time between a request ending and its client
sending the next one: a benchmark client's own loop (aiperf's processes pass each completion back
before the next send) or a user reading the answer. It is drawn per request like the round trip and,
unlike it, is outside TTFT (the client has not sent yet); the first ``concurrency`` requests go at once.
Sends keep request order, as one client loop hands them out: a request whose think time ends before
that of the request released ahead of it waits for that one (with widely spread think times of
independent users, an approximation).

A prompt dataset (``dataset_entries`` N, default none: every prompt is new, as vLLM's ``random``
dataset draws fresh tokens for each request) is how aiperf and genai-perf run: N prompts are made
once (``--num-dataset-entries``, 100 by default: aiperf ``InputDefaults.NUM_DATASET_ENTRIES``,
ai-dynamo/aiperf src/aiperf/common/config/config_defaults.py) and each request takes one by
``--dataset-sampling-strategy`` (aiperf ``dataset_samplers.py``): ``shuffle`` (its default: every
prompt once in a random order, then a new order), ``sequential`` (0, 1, ..., N - 1, 0, ...) or
``random`` (with replacement). A prompt keeps its lengths, and a request that repeats it carries the
same content hash, so an engine with prefix caching (vLLM's default) reuses what it still caches.

The simulator asks :meth:`ClosedLoop.next_arrival_s` for the horizon of a fast-forwarded run and
calls :meth:`ClosedLoop.request_done` when a request completes or is rejected; requests released by
a completion at time t arrive at t (plus their round trip), after the step that starts at t was planned
(the client receives the last token after that step's output is processed).

A loop that would run past :data:`~kvsim.serve.workload.MAX_SIM_S` (a rate of one request in decades, a
think time of centuries) is an error: when it is built if its drawn schedule, think times or round trips
already take it there, else when it would release a request past it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import numpy as np

from kvsim.errors import KvsimError
from kvsim.serve.synthetic import ArrivalProcess, LengthDist
from kvsim.serve.workload import MAX_SIM_S, Request, chain_hash, past_time_limit

INF = float("inf")
DELAYS = ("fixed", "exponential", "uniform")  # how each request's round trip and think time are drawn
SAMPLINGS = ("shuffle", "sequential", "random")  # how each request picks a prompt of the dataset (aiperf's)


def _entries(sampling: str, entries: int, num_requests: int, rng: np.random.Generator) -> list[int]:
    """The dataset prompt each request sends, as aiperf's samplers pick them."""
    if sampling == "sequential":
        return [i % entries for i in range(num_requests)]
    if sampling == "random":
        return rng.integers(0, entries, num_requests).tolist()
    passes = -(-num_requests // entries)  # shuffle: each pass a new order of every prompt
    return np.concatenate([rng.permutation(entries) for _ in range(passes)])[:num_requests].tolist()


def _delays(kind: str, mean_s: float, n: int, rng: np.random.Generator) -> list[float]:
    """``n`` delays of mean ``mean_s``: all equal (``fixed``), ``exponential``, or ``uniform`` on [0, 2 x mean]
    (no draw when the mean is 0)."""
    if kind == "fixed" or mean_s == 0:
        return [mean_s] * n
    if kind == "exponential":
        return rng.exponential(mean_s, n).tolist()
    return rng.uniform(0.0, 2 * mean_s, n).tolist()


def _ranged(base: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    if ratio == 0:
        return base
    lo = np.maximum(np.floor(base * (1 - ratio)), 1).astype(np.int64)
    hi = np.ceil(base * (1 + ratio)).astype(np.int64)
    return rng.integers(lo, hi + 1)


class ClosedLoop:
    """``num_requests`` requests sent by ``concurrency`` clients, each waiting for its previous one.

    Iterating yields the requests released so far, in sending order; it stops when none is pending
    (more are released by :meth:`request_done`)."""

    def __init__(self, concurrency: int, num_requests: int, input_len: LengthDist, output_len: LengthDist, *,
                 random_range_ratio: float = 0.0, seed: int = 0, schedule: ArrivalProcess | None = None,
                 round_trip_s: float = 0.0, round_trip: str = "fixed", dataset_entries: int | None = None,
                 dataset_sampling: str = "shuffle", think_s: float = 0.0, think: str = "fixed") -> None:
        if concurrency < 1:
            raise KvsimError("must be at least 1", field="concurrency", value=concurrency)
        if num_requests < 1:
            raise KvsimError("must be at least 1", field="num_requests", value=num_requests)
        if not 0 <= random_range_ratio < 1:
            raise KvsimError("must be in [0, 1)", field="random_range_ratio", value=random_range_ratio)
        if not round_trip_s >= 0:  # NaN included
            raise KvsimError("must be at least 0", field="round_trip_ms", value=round_trip_s * 1e3)
        if round_trip not in DELAYS:
            raise KvsimError(f"must be one of {', '.join(DELAYS)}", field="round_trip_distribution", value=round_trip)
        if not think_s >= 0:  # NaN included
            raise KvsimError("must be at least 0", field="think_ms", value=think_s * 1e3)
        if think not in DELAYS:
            raise KvsimError(f"must be one of {', '.join(DELAYS)}", field="think_distribution", value=think)
        if dataset_entries is not None and dataset_entries < 1:
            raise KvsimError("must be at least 1", field="dataset_entries", value=dataset_entries)
        if dataset_sampling not in SAMPLINGS:
            raise KvsimError(f"must be one of {', '.join(SAMPLINGS)}", field="dataset_sampling", value=dataset_sampling)
        rng = np.random.default_rng(seed)
        # the lengths of each prompt: one per request, or one per dataset prompt
        prompts = num_requests if dataset_entries is None else dataset_entries
        self.inputs = _ranged(input_len.sample(rng, prompts), random_range_ratio, rng).tolist()
        self.outputs = _ranged(output_len.sample(rng, prompts), random_range_ratio, rng).tolist()
        # scheduled sending times (None: every request at once, --request-rate inf); drawn after the
        # lengths, so a rate does not change them
        self.scheduled_s: list[float] | None = None
        if schedule is not None:
            self.scheduled_s = np.concatenate([[0.0], np.cumsum(schedule.gaps(rng, num_requests - 1))]).tolist()
        # each request's client round trip, drawn last so that it changes neither lengths nor schedule
        self.round_trips_s = _delays(round_trip, round_trip_s, num_requests, rng)
        # the dataset prompt of each request (None: its own), drawn last: no dataset changes nothing above
        self.entries = None if dataset_entries is None else _entries(dataset_sampling, dataset_entries,
                                                                     num_requests, rng)
        # each client's think time before sending request i, drawn last of all
        self.thinks_s = _delays(think, think_s, num_requests, rng)
        # The run lasts at least until the last scheduled send, and at least the think times and round
        # trips that each slot's holders spend one after another (the first concurrency requests think
        # none), spread over the slots; the largest names the input at fault.
        scheduled = self.scheduled_s[-1] if self.scheduled_s is not None else 0.0
        thinking = sum(self.thinks_s[concurrency:]) / concurrency
        travelling = sum(self.round_trips_s) / concurrency
        self._stretch = {
            "request_rate": (scheduled, schedule.rate if schedule else None,
                             "raise the request rate or send fewer requests"),
            "think_ms": (thinking, think_s * 1e3, "shorten the think time"),
            "round_trip_ms": (travelling, round_trip_s * 1e3, "shorten the round trip")}
        at_least = max(scheduled, thinking + travelling)
        if at_least > MAX_SIM_S:
            raise self._past_time_limit(at_least)
        self._salt = seed  # a dataset prompt's content hash: one run's prompts, distinct per seed
        self._last_sent_s = 0.0  # the client's loop sends in request order
        self._last_reach_s = 0.0  # the front end keeps sending order
        self.concurrency = concurrency
        self.num_requests = num_requests
        self._sent = 0
        self._pending: deque[Request] = deque()
        for _ in range(min(concurrency, num_requests)):
            self._release(0.0, after=False)

    def _past_time_limit(self, t: float) -> KvsimError:
        field = max(self._stretch, key=lambda f: self._stretch[f][0])
        _, value, remedy = self._stretch[field]
        return past_time_limit(t, field, value, remedy)

    def _release(self, slot_free_s: float, after: bool = True) -> None:
        """The next request takes a slot that is free from ``slot_free_s`` (``after`` a request of its
        client ended: plus the think time); it is sent then or at its scheduled time, whichever is later."""
        i = self._sent
        ready_s = slot_free_s + (self.thinks_s[i] if after else 0.0)
        if self.scheduled_s is not None:
            ready_s = max(ready_s, self.scheduled_s[i])
        sent_s = self._last_sent_s = max(ready_s, self._last_sent_s)  # sends leave in request order
        reach_s = self._last_reach_s = max(sent_s + self.round_trips_s[i], self._last_reach_s)
        if reach_s > MAX_SIM_S:  # the serving itself took the rest of the way
            raise self._past_time_limit(reach_s)
        if self.entries is None:
            request = Request(i, reach_s, self.inputs[i], self.outputs[i], sent_s=sent_s)
        else:  # a dataset prompt: its lengths, and one content hash over the whole prompt
            e = self.entries[i]
            request = Request(i, reach_s, self.inputs[e], self.outputs[e], (chain_hash(self._salt, e),),
                              self.inputs[e], sent_s=sent_s)
        self._pending.append(request)
        self._sent += 1

    def __iter__(self) -> Iterator[Request]:
        return self

    def __next__(self) -> Request:
        if not self._pending:
            raise StopIteration
        return self._pending.popleft()

    def next_arrival_s(self) -> float:
        """When the engine receives the next released request not yet taken (infinity: none)."""
        return self._pending[0].arrival_s if self._pending else INF

    def request_done(self, time_s: float) -> None:
        """A request ended (completed or rejected) at ``time_s``: its client sends the next one."""
        if self._sent < self.num_requests:
            self._release(time_s)

