"""Request streams for the serving simulator: the ``Request`` record, prefix-hash chaining, and
stream transformations.

A *stream* is any iterable of :class:`Request` sorted by ``arrival_s``. Streams come from

* real traces (:mod:`kvsim.serve.traces`: generic CSV, Azure 2023, Mooncake JSONL, ServeGen), and
* synthetic generators (:mod:`kvsim.serve.synthetic`: Poisson/Gamma arrivals, fixed/lognormal/
  empirical lengths, multi-turn sessions, shared system prompts).

Every reader and generator is a generator function, so traces of millions of rows are never
loaded whole. The transformations here (:func:`scale_rate`, :func:`time_window`, :func:`limit`,
:func:`renumber`, :func:`rebase`) are generators too and compose freely.

Prefix hashes
-------------
``Request.prefix_hashes[i]`` identifies the content of full block ``i`` of the prompt (blocks of
``prefix_block_tokens`` tokens, e.g. 512 for Mooncake). Two requests of one stream may reuse the
KV cache of block ``i`` iff they carry the same hash at ``i`` (traces guarantee that equal ids
imply equal prefixes; synthetic streams chain their hashes). The simulator's KV block is usually
smaller (16 tokens): :func:`expand_block_hashes` converts, chaining so that a destination hash
depends on every source block up to and including the one that contains it.

For convenience the reader and generator names are re-exported lazily from this module
(``from kvsim.serve.workload import read_trace`` works).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from kvsim.errors import KvsimError

log = logging.getLogger("kvsim.serve")

# The latest simulated time a request may arrive at. float64 has a 53-bit significand, so below 2**30 s
# (34 years) consecutive times are at most 2**-23 s (0.12 us) apart and step and token times keep their
# microseconds; at 1e13 s they are 2 ms apart and a TTFT of a few ms rounds to 0.
MAX_SIM_S = 2.0**30


def past_time_limit(t: float, field: str, value: object, remedy: str) -> KvsimError:
    """The error for a stream that would reach time ``t`` > :data:`MAX_SIM_S`, naming the input that
    stretched it so far (``field``, ``value``) and what to change (``remedy``)."""
    return KvsimError(f"the workload would run to {t:.3g} s of simulated time, past {MAX_SIM_S:.3g} s (34 years), "
                      f"beyond which float64 seconds lose the microsecond; {remedy}", field=field, value=value)

_M64 = (1 << 64) - 1
# splitmix64 constants (Steele, Lea & Flood, "Fast splittable pseudorandom number generators",
# OOPSLA 2014): a cheap, well-mixing 64-bit finalizer. Python's hash() of str is salted per
# process, so it cannot be used for reproducible hashes.
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


@dataclass(frozen=True, slots=True)
class Request:
    """One inference request.

    ``prefix_hashes`` holds one hash per FULL block of ``prefix_block_tokens`` tokens at the
    start of the prompt (a trailing partial block has no hash; a trace may also hash only a
    prefix). ``prefix_block_tokens`` is 0 when there are no hashes. ``image_tokens`` are counted
    in addition to ``input_tokens``.
    """

    request_id: int
    arrival_s: float
    input_tokens: int
    output_tokens: int
    prefix_hashes: tuple[int, ...] = ()
    prefix_block_tokens: int = 0
    user_id: str | None = None
    image_tokens: int = 0
    session_id: int | None = None
    # A closed loop's client round trip (kvsim.serve.closed_loop): the request reached the engine at
    # ``arrival_s`` and its client sent it at ``sent_s`` (None: as it arrived); TTFT and latency count
    # from sending. The send time is kept, not the round trip: arrival - (arrival - sent) can round
    # below an earlier request's send time.
    sent_s: float | None = None

    @property
    def front_end_s(self) -> float:
        """How long after its client sent it the request reached the engine."""
        return 0.0 if self.sent_s is None else self.arrival_s - self.sent_s


@dataclass(slots=True)
class ReadStats:
    """Counters a reader fills while it streams (mutable on purpose: it is updated row by row).

    Pass one as ``stats=`` to a reader; after the stream is exhausted, ``requests`` is the number
    yielded, ``bad_rows`` the number skipped with ``skip_bad_rows=True`` and ``bad_examples`` the
    first :attr:`MAX_EXAMPLES` error messages. Readers also log a one-line summary on the
    ``kvsim.serve`` logger when rows were skipped, unless ``quiet``.
    """

    MAX_EXAMPLES = 5
    requests: int = 0
    bad_rows: int = 0
    bad_examples: list[str] = field(default_factory=list)
    rate_scale: float = 1.0  # the multiplier applied to a trace's arrival rate (kvsim.scenario.run.workload)
    # True: no summary logged, for a pass that reads the trace beside the run (to count the bad rows at
    # which the run stopped, or for the trace's rate) and so skips none of the run's rows
    quiet: bool = False

    def bad(self, err: KvsimError) -> None:
        """Record one skipped row."""
        self.bad_rows += 1
        if len(self.bad_examples) < self.MAX_EXAMPLES:
            self.bad_examples.append(str(err))

    def summary(self, source: str, *, skipped: bool = True) -> str:
        """One line: how many rows were bad (``skipped``, or only found: a run that stopped at the
        first skipped none) and the first few reasons."""
        more = self.bad_rows - len(self.bad_examples)
        tail = f" (+{more} more)" if more > 0 else ""
        verb = "skipped" if skipped else "found"
        return (f"{source}: {verb} {self.bad_rows} bad row(s): " + "; ".join(self.bad_examples) + tail)


# ---------------------------------------------------------------------------------------------
# Hashing
# ---------------------------------------------------------------------------------------------

def mix64(x: int) -> int:
    """splitmix64 finalizer of ``x`` (taken mod 2**64): a deterministic 64-bit integer hash."""
    x &= _M64
    x = ((x ^ (x >> 30)) * _MIX1) & _M64
    x = ((x ^ (x >> 27)) * _MIX2) & _M64
    return x ^ (x >> 31)


def chain_hash(prev: int, value: int) -> int:
    """Hash of a block whose content id is ``value`` following a block chain ending in ``prev``.

    Multiplying ``prev`` by an odd constant is a bijection mod 2**64, so for a fixed ``prev``
    distinct values give distinct inputs to the finalizer.
    """
    return mix64(((prev * _GOLDEN) & _M64) ^ (mix64(value) + _GOLDEN))


def mix64_array(x: np.ndarray) -> np.ndarray:
    """Vectorised :func:`mix64` on a ``uint64`` array (wrap-around arithmetic is intended)."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(_MIX1)
    x ^= x >> np.uint64(27)
    x *= np.uint64(_MIX2)
    x ^= x >> np.uint64(31)
    return x


def expand_block_hashes(hashes: Iterable[int], src_block_tokens: int, dst_block_tokens: int,
                        input_tokens: int) -> tuple[int, ...]:
    """Convert per-source-block hashes into one chained hash per FULL destination block.

    Destination block ``j`` covers tokens ``[j*dst, (j+1)*dst)``; it depends on source block
    ``s(j) = ((j+1)*dst - 1) // src`` (the one holding its last token) and on every source block
    before it. Two requests therefore share destination hash ``j`` iff they share all source
    hashes ``0..s(j)`` (up to 64-bit collisions). Only destination blocks that are full within
    ``input_tokens`` and whose source block is hashed get a hash, so the result may be shorter
    than ``input_tokens // dst_block_tokens``. Works for any block sizes (dst need not divide
    src). Deterministic across processes.
    """
    src = list(hashes)
    if not src or input_tokens <= 0:
        return ()
    if src_block_tokens <= 0 or dst_block_tokens <= 0:
        raise KvsimError("block sizes must be positive", field="block_tokens",
                         value=(src_block_tokens, dst_block_tokens))
    # Chain over the source blocks first: c[s] summarises source blocks 0..s.
    chain: list[int] = []
    h = 0
    for v in src:
        h = chain_hash(h, v)
        chain.append(h)
    n_dst = min(input_tokens, len(src) * src_block_tokens) // dst_block_tokens
    if n_dst <= 0:
        return ()
    j = np.arange(n_dst, dtype=np.int64)
    s = ((j + 1) * dst_block_tokens - 1) // src_block_tokens
    # The destination block's index makes blocks inside one source block distinct; the source
    # chain value makes it depend on the whole prefix.
    c = np.asarray(chain, dtype=np.uint64)[s]
    out = mix64_array(c * np.uint64(_GOLDEN) ^ mix64_array(j.astype(np.uint64) + np.uint64(1)))
    return tuple(out.tolist())


def content_block_hashes(salt: int, start_block: int, n_blocks: int) -> list[int]:
    """Hashes for blocks ``start_block .. start_block+n_blocks-1`` of a token stream whose
    content is identified by ``salt`` (used by synthetic generators: the content of block ``i``
    of one session is fully determined by the session and ``i``, so no sequential chain is
    needed, and the hashes of a growing conversation extend the previous turn's)."""
    if n_blocks <= 0:
        return []
    i = np.arange(start_block, start_block + n_blocks, dtype=np.uint64)
    return mix64_array(i * np.uint64(_GOLDEN) ^ np.uint64(mix64(salt))).tolist()


# ---------------------------------------------------------------------------------------------
# Transformations (generators; any stream in, stream out)
# ---------------------------------------------------------------------------------------------

def _with(r: Request, *, request_id: int | None = None, arrival_s: float | None = None) -> Request:
    # Direct construction is ~3x faster than dataclasses.replace on slotted classes. A moved arrival
    # keeps its round trip: the send moves with it.
    arrival = r.arrival_s if arrival_s is None else arrival_s
    sent = r.sent_s if r.sent_s is None or arrival_s is None else arrival_s - r.front_end_s
    return Request(r.request_id if request_id is None else request_id, arrival,
                   r.input_tokens, r.output_tokens, r.prefix_hashes, r.prefix_block_tokens,
                   r.user_id, r.image_tokens, r.session_id, sent)


def scale_rate(stream: Iterable[Request], factor: float) -> Iterator[Request]:
    """Multiply the arrival rate by ``factor`` (every arrival time is divided by it)."""
    if not (factor > 0 and math.isfinite(factor)):
        raise KvsimError("rate scale must be a positive number", field="rate_scale", value=factor)
    if factor == 1.0:
        yield from stream
        return
    inv = 1.0 / factor
    for r in stream:
        t = r.arrival_s * inv
        if t > MAX_SIM_S:
            raise past_time_limit(t, "rate_scale", factor, "raise the rate or send fewer requests")
        yield _with(r, arrival_s=t)


def mean_rate_per_s(arrival_s: np.ndarray) -> float | None:
    """Requests per second of a stream of arrival times: (n - 1) gaps over the span from the first
    arrival to the last (the mean inter-arrival gap, inverted). None for fewer than two requests or
    a zero span (no rate to speak of)."""
    if len(arrival_s) < 2:
        return None
    span = float(np.max(arrival_s) - np.min(arrival_s))
    return (len(arrival_s) - 1) / span if span > 0 else None


def time_window(stream: Iterable[Request], start_s: float = 0.0, end_s: float = math.inf, *,
                rebase: bool = True) -> Iterator[Request]:
    """Keep requests with ``start_s <= arrival_s < end_s``; stop reading at ``end_s``.

    With ``rebase`` (default) times are shifted by ``-start_s``, so the window starts at t=0
    (the gap before the first kept request is preserved).
    """
    if end_s < start_s:
        raise KvsimError(f"end_s must be >= start_s={start_s}", field="end_s", value=end_s)
    shift = start_s if rebase else 0.0
    for r in stream:
        t = r.arrival_s
        if t >= end_s:
            return  # streams are sorted: nothing later can fall inside
        if t >= start_s:
            yield _with(r, arrival_s=t - shift) if shift else r


def limit(stream: Iterable[Request], max_requests: int | None) -> Iterator[Request]:
    """At most ``max_requests`` requests (``None``: all)."""
    if max_requests is None:
        return iter(stream)
    if max_requests < 0:
        raise KvsimError("must be >= 0", field="max_requests", value=max_requests)
    return itertools.islice(stream, max_requests)


def renumber(stream: Iterable[Request], start: int = 0) -> Iterator[Request]:
    """Re-number request ids ``start, start+1, ...`` in stream order."""
    for i, r in enumerate(stream, start):
        yield r if r.request_id == i else _with(r, request_id=i)


def rebase(stream: Iterable[Request]) -> Iterator[Request]:
    """Shift arrival times so the first request arrives at t=0."""
    t0: float | None = None
    for r in stream:
        if t0 is None:
            t0 = r.arrival_s
        yield _with(r, arrival_s=r.arrival_s - t0) if t0 else r


def merge(*streams: Iterable[Request]) -> Iterator[Request]:
    """Merge sorted streams by arrival time, then re-number ids (e.g. trace + synthetic load)."""
    import heapq
    return renumber(heapq.merge(*streams, key=lambda r: r.arrival_s))


# Lazy re-exports so callers can import everything from this module without import cycles
# (traces.py and synthetic.py import Request from here).
_REEXPORTS = {
    "traces": ("read_trace", "read_csv", "read_azure", "read_mooncake", "read_servegen",
               "detect_format", "trace_lengths", "write_csv", "FORMATS", "shared_traces_dir"),
    "synthetic": ("ArrivalProcess", "LengthDist", "SessionSpec", "SharedPrefix",
                  "synthetic_requests"),
}


def __getattr__(name: str) -> object:
    for mod, names in _REEXPORTS.items():
        if name in names:
            import importlib
            return getattr(importlib.import_module(f"kvsim.serve.{mod}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
