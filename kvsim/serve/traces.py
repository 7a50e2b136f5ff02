"""Streaming readers for request traces: generic CSV, Azure LLM inference 2023, Mooncake JSONL and
ServeGen (sampled from its per-client distributions).

Every reader is a generator yielding :class:`~kvsim.serve.workload.Request` sorted by arrival,
re-based so the first request arrives at t=0, with ids 0, 1, 2, ... Files are read line by line.

Bad rows raise :class:`~kvsim.errors.KvsimError` naming ``file:line`` and quoting the value, e.g.
``trace.csv:17: output_tokens='abc': not an integer``. With ``skip_bad_rows=True`` they are
skipped instead; pass ``stats=ReadStats()`` to get the count and the first 5 messages (a summary
is also logged on the ``kvsim.serve`` logger, unless ``stats.quiet``). Rows must already be sorted
by time: a row earlier than its predecessor is a bad row (sorting would need the whole file in
memory). So is a row more than ``MAX_SIM_S`` (34 years) after the first: float64 seconds there no
longer resolve a microsecond.

Formats (``format=`` names, see :func:`detect_format`):

``csv``       header ``arrival_time_s,input_tokens,output_tokens`` (seconds), optional
              ``prefix_hash_ids`` (space-separated ints, one per ``prefix_block_tokens`` block),
              ``user_id``, ``image_tokens``, ``session_id``.
``azure``     ``TIMESTAMP,ContextTokens,GeneratedTokens`` (Azure/AzurePublicDataset 2023; wall
              clock ``2023-11-16 18:15:46.6805900``).
``mooncake``  JSON lines ``{"timestamp": ms, "input_length", "output_length", "hash_ids"}``,
              512-token hash blocks (kvcache-ai/Mooncake FAST'25 traces).
``servegen``  folder of ``chunk-<client>-trace.csv`` + ``chunk-<client>-dataset.json``
              (alibaba/ServeGen); a request stream is *sampled* with a seeded generator.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kvsim.errors import KvsimError
from kvsim.serve.workload import (
    MAX_SIM_S,
    ReadStats,
    Request,
    limit,
    log,
    renumber,
    scale_rate,
    time_window,
)

if TYPE_CHECKING:
    from _csv import Reader as CsvReader  # what csv.reader returns

FORMATS = ("csv", "azure", "mooncake", "servegen")
# Mooncake FAST'25 traces hash prompts in 512-token blocks (Mooncake README / trace docs).
MOONCAKE_BLOCK_TOKENS = 512
_SERVEGEN_TRACE = re.compile(r"chunk-(\d+)-trace\.csv$")


def shared_traces_dir() -> Path | None:
    """The shared folder of public traces, or None if absent.

    ``$KVSIM_SHARED_DATA`` (the ``shared/data`` folder or its ``traces`` sub-folder) wins;
    otherwise ``<repo>/../shared/data/traces``.
    """
    env = os.environ.get("KVSIM_SHARED_DATA")
    if env:
        cands = [Path(env) / "traces", Path(env)]
    else:
        cands = [Path(__file__).resolve().parents[2].parent / "shared" / "data" / "traces"]
    return next((p for p in cands if p.is_dir()), None)


# ---------------------------------------------------------------------------------------------
# Row-level helpers
# ---------------------------------------------------------------------------------------------

class _Rows:
    """Bad-row policy shared by the readers: raise, or count and skip."""

    def __init__(self, path: Path, skip: bool, stats: ReadStats | None) -> None:
        self.name = str(path)
        self.skip = skip
        self.stats = stats if stats is not None else ReadStats()

    def error(self, line: int, field: str | None, value: object, msg: str) -> KvsimError:
        return KvsimError(msg, field=field, value=value, file=f"{self.name}:{line}")

    def handle(self, err: KvsimError) -> None:
        """Raise ``err`` or record it (skip mode)."""
        if not self.skip:
            raise err
        self.stats.bad(err)

    def finish(self) -> None:
        if self.stats.bad_rows and not self.stats.quiet:
            log.warning(self.stats.summary(self.name))


# Token counts and session ids become int64 arrays in the simulator; larger values would overflow
# there. Prefix hash ids are 64-bit hashes, signed or unsigned.
MAX_INT = 2**63 - 1
HASH_RANGE = range(-(2**63), 2**64)
MAX_TOKENS = 2**31 - 1


def _int(rows: _Rows, line: int, field: str, s: str, minimum: int, maximum: int = MAX_TOKENS) -> int:
    try:
        v = int(s)
    except ValueError:
        raise rows.error(line, field, s, "not an integer") from None
    if v < minimum:
        raise rows.error(line, field, s, f"must be >= {minimum}")
    if v > maximum:
        raise rows.error(line, field, s, f"must be <= {maximum:,}")
    return v


def _undecodable(rows: _Rows, line: int, text: str) -> None:
    """Files are opened with ``surrogateescape``: a byte that is not UTF-8 spoils its row only."""
    if any("\udc80" <= ch <= "\udcff" for ch in text):
        raise rows.error(line, None, None, "not UTF-8 text")


def _float(rows: _Rows, line: int, field: str, s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise rows.error(line, field, s, "not a number") from None
    if not math.isfinite(v):
        raise rows.error(line, field, s, "not a finite number")
    return v


def _in_span(rows: _Rows, line: int, field: str, value: object, t: float, t0: float | None) -> None:
    """A row more than ``MAX_SIM_S`` after the first is bad: re-based, its time would lose the microsecond."""
    if t0 is not None and t - t0 > MAX_SIM_S:
        raise rows.error(line, field, value, f"{t - t0:.3g} s after the first row, past {MAX_SIM_S:.3g} s "
                         "(34 years), beyond which float64 seconds lose the microsecond")


def _full_blocks(rows: _Rows, line: int, field: str, ids: list[int], input_tokens: int,
                 block: int) -> tuple[int, ...]:
    """Keep the hashes of full blocks; a trace may hash the trailing partial block too."""
    if len(ids) > -(-input_tokens // block):
        raise rows.error(line, field, f"{len(ids)} ids",
                         f"more blocks than input_tokens={input_tokens} fills at {block} tokens/block")
    return tuple(ids[: input_tokens // block])


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------

def read_csv(path: str | Path, *, prefix_block_tokens: int = MOONCAKE_BLOCK_TOKENS,
             skip_bad_rows: bool = False, stats: ReadStats | None = None) -> Iterator[Request]:
    """Stream a generic CSV trace (columns documented in the module docstring).

    ``prefix_block_tokens`` is the token count of one ``prefix_hash_ids`` block; it defaults to
    512 like Mooncake and is ignored when the file has no hash column.
    """
    path = Path(path)
    rows = _Rows(path, skip_bad_rows, stats)
    if prefix_block_tokens <= 0:
        raise KvsimError("must be > 0", field="prefix_block_tokens", value=prefix_block_tokens)
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
        except csv.Error as err:
            raise rows.error(1, "header", None, f"not a CSV header ({err})") from None
        if header is None:
            raise rows.error(1, None, None, "empty file; expected header "
                             "arrival_time_s,input_tokens,output_tokens")
        col = {h.strip(): i for i, h in enumerate(header)}
        missing = [c for c in ("arrival_time_s", "input_tokens", "output_tokens") if c not in col]
        if missing:
            raise rows.error(1, "header", ",".join(header), f"missing column(s) {', '.join(missing)}")
        ia, ii, io = col["arrival_time_s"], col["input_tokens"], col["output_tokens"]
        ih, iu, im, isess = (col.get(c) for c in ("prefix_hash_ids", "user_id", "image_tokens",
                                                   "session_id"))
        ncol = len(header)
        t0: float | None = None
        prev = -math.inf
        rid = 0
        for line, row in _csv_rows(rows, reader):
            if not row:
                continue
            try:
                _undecodable(rows, line, "".join(row))
                if len(row) != ncol:
                    raise rows.error(line, None, None, f"{len(row)} fields, header has {ncol}")
                t = _float(rows, line, "arrival_time_s", row[ia])
                if t < prev:
                    raise rows.error(line, "arrival_time_s", row[ia],
                                     f"earlier than the previous row ({prev}); sort the file by time")
                _in_span(rows, line, "arrival_time_s", row[ia], t, t0)
                n_in = _int(rows, line, "input_tokens", row[ii], 1)
                n_out = _int(rows, line, "output_tokens", row[io], 1)
                hashes: tuple[int, ...] = ()
                if ih is not None and row[ih].strip():
                    try:
                        ids = [int(x) for x in row[ih].split()]
                    except ValueError:
                        raise rows.error(line, "prefix_hash_ids", row[ih],
                                         "not space-separated integers") from None
                    if any(x not in HASH_RANGE for x in ids):
                        raise rows.error(line, "prefix_hash_ids", row[ih], "an id does not fit in 64 bits")
                    hashes = _full_blocks(rows, line, "prefix_hash_ids", ids, n_in, prefix_block_tokens)
                img = _int(rows, line, "image_tokens", row[im], 0) if im is not None and row[im] else 0
                sess = (_int(rows, line, "session_id", row[isess], 0, MAX_INT)
                        if isess is not None and row[isess] else None)
                user = row[iu] or None if iu is not None else None
            except KvsimError as err:
                rows.handle(err)
                continue
            prev = t
            if t0 is None:
                t0 = t
            yield Request(rid, t - t0, n_in, n_out, hashes, prefix_block_tokens if hashes else 0,
                          user, img, sess)
            rid += 1
    rows.stats.requests += rid
    rows.finish()


def _csv_rows(rows: _Rows, reader: CsvReader) -> Iterator[tuple[int, list[str]]]:
    """``(line, row)`` of a csv reader; a row the csv module cannot parse (a NUL byte, an open
    quote at the end of the file) is a bad row like any other."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            rows.handle(rows.error(reader.line_num, None, None, f"not a CSV row ({err})"))
            continue
        yield reader.line_num, row


def _azure_seconds(ts: str, days: dict[str, int]) -> float:
    """Seconds since the first date seen of ``'2023-11-16 18:15:46.6805900'``.

    Hand-split because ``datetime.strptime`` is ~10x slower and Python's ``%f`` accepts at most
    6 fractional digits (the trace has 7). Dates are mapped through a small cache and counted
    relative to the first date so float seconds keep sub-microsecond precision.
    """
    date, _, clock = ts.partition(" ")
    day = days.get(date)
    if day is None:
        ordinal = _dt.date.fromisoformat(date).toordinal()
        base = days.setdefault("", ordinal)  # "" holds the first date's ordinal
        day = days[date] = ordinal - base
    h, m, s = clock.split(":")
    return day * 86400 + int(h) * 3600 + int(m) * 60 + float(s)


def read_azure(path: str | Path, *, skip_bad_rows: bool = False,
               stats: ReadStats | None = None) -> Iterator[Request]:
    """Stream an Azure LLM inference trace 2023 CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``)."""
    path = Path(path)
    rows = _Rows(path, skip_bad_rows, stats)
    days: dict[str, int] = {}
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        header = f.readline().strip()
        if [h.strip() for h in header.split(",")][:3] != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
            raise rows.error(1, "header", header, "expected TIMESTAMP,ContextTokens,GeneratedTokens")
        t0: float | None = None
        prev = -math.inf
        rid = 0
        for line, text in enumerate(f, 2):
            parts = text.rstrip("\r\n").split(",")
            if len(parts) == 1 and not parts[0]:
                continue
            try:
                _undecodable(rows, line, text)
                if len(parts) != 3:
                    raise rows.error(line, None, None, f"{len(parts)} fields, expected 3")
                ts, ctx, gen = parts
                try:
                    t = _azure_seconds(ts, days)
                except (ValueError, TypeError):
                    raise rows.error(line, "TIMESTAMP", ts,
                                     "not a 'YYYY-MM-DD HH:MM:SS.fffffff' timestamp") from None
                if t < prev:
                    raise rows.error(line, "TIMESTAMP", ts, "earlier than the previous row")
                _in_span(rows, line, "TIMESTAMP", ts, t, t0)
                n_in = _int(rows, line, "ContextTokens", ctx, 1)
                n_out = _int(rows, line, "GeneratedTokens", gen, 1)
            except KvsimError as err:
                rows.handle(err)
                continue
            prev = t
            if t0 is None:
                t0 = t
            yield Request(rid, t - t0, n_in, n_out)
            rid += 1
    rows.stats.requests += rid
    rows.finish()


def read_mooncake(path: str | Path, *, skip_bad_rows: bool = False,
                  stats: ReadStats | None = None) -> Iterator[Request]:
    """Stream a Mooncake JSONL trace (``timestamp`` ms, ``input_length``, ``output_length``,
    ``hash_ids`` per 512-token block; the trailing partial block's id is dropped)."""
    path = Path(path)
    rows = _Rows(path, skip_bad_rows, stats)
    bt = MOONCAKE_BLOCK_TOKENS
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        t0: float | None = None
        prev = -math.inf
        rid = 0
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                _undecodable(rows, line, text)
                try:
                    d = json.loads(text)
                except json.JSONDecodeError as e:
                    raise rows.error(line, None, None, f"not valid JSON ({e.msg})") from None
                if not isinstance(d, dict):
                    raise rows.error(line, None, None, "not a JSON object")
                vals = []
                for key, minimum in (("timestamp", 0), ("input_length", 1), ("output_length", 1)):
                    v = d.get(key)
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                        raise rows.error(line, key, v, "missing or not a finite number")
                    if key != "timestamp" and v != int(v):
                        raise rows.error(line, key, v, "not an integer")
                    if v < minimum:
                        raise rows.error(line, key, v, f"must be >= {minimum}")
                    if key != "timestamp" and v > MAX_TOKENS:
                        raise rows.error(line, key, v, f"must be <= {MAX_TOKENS:,}")
                    vals.append(v)
                t = vals[0] / 1000.0
                n_in, n_out = int(vals[1]), int(vals[2])
                if t < prev:
                    raise rows.error(line, "timestamp", vals[0], "earlier than the previous row")
                _in_span(rows, line, "timestamp", vals[0], t, t0)
                ids = d.get("hash_ids", [])
                if not isinstance(ids, list) or not all(type(x) is int and x in HASH_RANGE for x in ids):
                    raise rows.error(line, "hash_ids", ids if len(str(ids)) < 60 else str(ids)[:57] + "...",
                                     "not a list of 64-bit integers")
                hashes = _full_blocks(rows, line, "hash_ids", ids, n_in, bt)
            except KvsimError as err:
                rows.handle(err)
                continue
            prev = t
            if t0 is None:
                t0 = t
            yield Request(rid, t - t0, n_in, n_out, hashes, bt if hashes else 0)
            rid += 1
    rows.stats.requests += rid
    rows.finish()


# ---------------------------------------------------------------------------------------------
# ServeGen
# ---------------------------------------------------------------------------------------------

def _parse_pmf(s: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``"{45: 0.0097, 46: 0.0117, ...}"`` -> (sorted values, cumulative probabilities).

    Hand-parsed (not ``ast.literal_eval``): the files hold ~1e5 entries and this is ~10x faster.
    """
    body = s.strip().strip("{}").strip()
    if not body:
        return None
    pairs = [p.partition(":") for p in body.split(",")]
    vals = np.array([float(k) for k, _, _ in pairs])
    probs = np.array([float(v) for _, _, v in pairs])
    if not (np.isfinite(vals).all() and np.isfinite(probs).all() and (probs >= 0).all() and (vals < MAX_TOKENS).all()):
        raise ValueError("a PMF needs finite token counts and probabilities >= 0")
    order = np.argsort(vals, kind="stable")
    vals, cdf = vals[order], np.cumsum(probs[order])
    if cdf[-1] <= 0:
        return None
    return vals, cdf / cdf[-1]


class _ServeGenClient:
    """One client: per-window arrival parameters and per-6h length PMFs (loaded lazily)."""

    def __init__(self, folder: Path, cid: int) -> None:
        self.cid = cid
        self.trace = folder / f"chunk-{cid}-trace.csv"
        self.dataset = folder / f"chunk-{cid}-dataset.json"
        self.windows: dict[int, tuple[float, float, str, float]] = {}
        with open(self.trace, encoding="utf-8", errors="replace") as f:  # a bad byte fails its row
            for line, text in enumerate(f, 1):
                p = text.strip().split(",")
                if p == [""]:
                    continue
                try:
                    ts, rate, cv = int(float(p[0])), float(p[1]), float(p[2] or 0)
                    shape = float(p[4]) if len(p) > 4 and p[4] else 0.0
                    if not all(math.isfinite(x) and x >= 0 for x in (rate, cv, shape)) or rate * 600 > 1e9:
                        raise ValueError
                except (ValueError, IndexError, OverflowError):
                    raise KvsimError("expected start,rate,cv,dist,shape,scale (finite, >= 0)", field="row",
                                     value=text.strip()[:80], file=f"{self.trace}:{line}") from None
                if rate > 0:
                    self.windows[ts] = (rate, cv, p[3] if len(p) > 3 else "", shape)
        self._blocks: list[int] | None = None  # all dataset block starts, empty ones included
        self._pmfs: dict[int, tuple[tuple, tuple]] = {}

    def lengths(self, ts: int) -> tuple[tuple, tuple] | None:
        """(input PMF, output PMF) for window start ``ts``: the dataset block holding it, else the
        nearest non-empty block, earlier on ties (many 6-hour blocks are empty in the release)."""
        if self._blocks is None:
            self._load_dataset()
        assert self._blocks is not None  # set by _load_dataset
        if not self._pmfs:
            return None
        holding = max((b for b in self._blocks if b <= ts), default=None)
        if holding in self._pmfs:
            return self._pmfs[holding]
        return self._pmfs[min(self._pmfs, key=lambda b: (abs(b - ts), b))]


    def _load_dataset(self) -> None:
        """The client's length PMFs per 6-hour block; a damaged file is one error naming it."""
        from kvsim.fileio import read_json_file

        raw = read_json_file(self.dataset, "a ServeGen chunk-<client>-dataset.json")
        if not isinstance(raw, dict):
            raise KvsimError("expected a mapping of block start -> length PMFs", file=str(self.dataset))
        blocks = []
        for k, v in raw.items():
            try:
                start = int(float(k))
                pin, pout = _parse_pmf(v["input_tokens"]), _parse_pmf(v["output_tokens"])
            except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
                raise KvsimError("expected {input_tokens: '{tokens: p, ...}', output_tokens: ...}",
                                 field=k, value=None, file=str(self.dataset)) from None
            blocks.append(start)
            if pin is not None and pout is not None:
                self._pmfs[start] = (pin, pout)
        self._blocks = sorted(blocks)


def _servegen_gaps(rng: np.random.Generator, dist: str, cv: float, shape: float, n: int) -> np.ndarray:
    # Only the *shape* matters: gaps are normalised to the window length afterwards, which keeps
    # the window's request count exact (ServeGen does the same rescaling).
    if dist == "Gamma" and shape > 0:
        return rng.gamma(shape, 1.0, n)
    if dist == "Weibull" and shape > 0:
        return rng.weibull(shape, n)
    if cv > 0 and dist != "Exponential":
        return rng.gamma(1.0 / (cv * cv), 1.0, n)  # no fitted law: Gamma with the measured CV
    return rng.exponential(1.0, n)


def read_servegen(folder: str | Path, *, seed: int | np.random.Generator = 0, start_s: float = 0.0,
                  end_s: float | None = None, clients: Iterable[int] | None = None) -> Iterator[Request]:
    """Sample a request stream from a ServeGen client folder (e.g. ``servegen_deepseek-r1/``).

    For every client and 600-s window with a positive rate, ``round(rate * window)`` arrivals are
    placed by drawing gaps from the window's fitted law (Gamma / Weibull shape; CV-matched Gamma
    when none) and scaling them to span the window. Input/output lengths are drawn from the
    client's PMFs of the 6-hour dataset block holding the window (nearest non-empty block when
    that one is empty). ``start_s``/``end_s`` select windows on the trace clock (0 = trace start,
    86,400 = one day); the output is re-based to its first request. ``user_id`` is
    ``"client-<id>"``. Same seed -> same stream.
    """
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    ids = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _SERVEGEN_TRACE.search(p.name)))
    if clients is not None:
        wanted = set(clients)
        ids = [c for c in ids if c in wanted]
    if not ids:
        raise KvsimError("no chunk-<client>-trace.csv files", field="folder", value=str(folder))
    pool = [_ServeGenClient(folder, c) for c in ids]
    starts = sorted({ts for c in pool for ts in c.windows})
    all_ts = sorted({ts for c in pool for ts in c.windows} | {0})
    # Window length from the grid (600 s in the release).
    width = min((b - a for a, b in zip(all_ts, all_ts[1:], strict=False)), default=600) or 600
    end = math.inf if end_s is None else end_s
    t0: float | None = None
    rid = 0
    for ts in starts:
        if ts + width <= start_s or ts >= end:
            continue
        times, ins, outs, users = [], [], [], []
        for c in pool:
            w = c.windows.get(ts)
            if w is None:
                continue
            rate, cv, dist, shape = w
            n = int(round(rate * width))
            pmfs = c.lengths(ts) if n else None
            if pmfs is None:
                continue
            gaps = _servegen_gaps(rng, dist, cv, shape, n + 1)
            t = ts + width * np.cumsum(gaps)[:n] / gaps.sum()
            u = rng.random((2, n))
            (vin, cin), (vout, cout) = pmfs
            ins.append(vin[np.minimum(np.searchsorted(cin, u[0]), len(vin) - 1)])
            outs.append(vout[np.minimum(np.searchsorted(cout, u[1]), len(vout) - 1)])
            times.append(t)
            users.append(np.full(n, c.cid))
        if not times:
            continue
        t_all = np.concatenate(times)
        order = np.argsort(t_all, kind="stable")
        t_all = t_all[order]
        i_all = np.maximum(np.concatenate(ins)[order], 1).astype(np.int64).tolist()
        o_all = np.maximum(np.concatenate(outs)[order], 1).astype(np.int64).tolist()
        u_all = np.concatenate(users)[order].tolist()
        for t, a, b, cid in zip(t_all.tolist(), i_all, o_all, u_all, strict=False):
            if t < start_s or t >= end:
                continue
            if t0 is None:
                t0 = t
            yield Request(rid, t - t0, a, b, user_id=f"client-{cid}")
            rid += 1


# ---------------------------------------------------------------------------------------------
# Detection, dispatch, lengths, writing
# ---------------------------------------------------------------------------------------------

def detect_format(path: str | Path) -> str:
    """Guess a trace's format from its name, header or first line.

    Returns one of :data:`FORMATS`, or ``"vidur"`` for a lengths-only Vidur stats CSV
    (``num_prefill_tokens,num_decode_tokens,...``; usable by :func:`trace_lengths` only).
    """
    path = Path(path)
    if path.is_dir():
        if any(_SERVEGEN_TRACE.search(p.name) for p in path.iterdir()):
            return "servegen"
        raise KvsimError("folder holds no chunk-<client>-trace.csv (ServeGen)", field="path",
                         value=str(path))
    if not path.is_file():
        raise KvsimError("no such file", field="path", value=str(path))
    if re.search(r"chunk-\d+-(trace\.csv|dataset\.json)$", path.name):
        return "servegen"
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline().strip()
    if first.startswith("{"):
        try:
            d = json.loads(first)
        except json.JSONDecodeError:
            d = {}
        if isinstance(d, dict) and "input_length" in d and "timestamp" in d:
            return "mooncake"
    cols = [c.strip() for c in first.split(",")]
    if cols[:3] == ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
        return "azure"
    if "arrival_time_s" in cols:
        return "csv"
    if "num_prefill_tokens" in cols and "num_decode_tokens" in cols:
        return "vidur"
    raise KvsimError(f"cannot tell the trace format from its first line {first[:80]!r}; "
                     f"pass format= one of {', '.join(FORMATS)}", field="path", value=str(path))


def read_trace(path: str | Path, format: str | None = None, *,
               prefix_block_tokens: int = MOONCAKE_BLOCK_TOKENS, skip_bad_rows: bool = False,
               stats: ReadStats | None = None, seed: int = 0, rate_scale: float = 1.0,
               start_s: float = 0.0, end_s: float | None = None,
               max_requests: int | None = None) -> Iterator[Request]:
    """Open any supported trace as a stream: detect (or take) the format, then apply a time
    window (``[start_s, end_s)`` on the re-based clock, shifted so ``start_s`` -> 0), a rate
    scale (``rate_scale=2`` doubles the arrival rate) and a request limit, and number the
    requests 0, 1, ... . ``seed`` is used by ``servegen`` only; ``prefix_block_tokens`` by
    ``csv`` only. For ``servegen`` the window selects trace-clock windows before sampling.
    """
    fmt = format or detect_format(path)
    readers: dict[str, Callable[[], Iterator[Request]]] = {
        "csv": lambda: read_csv(path, prefix_block_tokens=prefix_block_tokens,
                                skip_bad_rows=skip_bad_rows, stats=stats),
        "azure": lambda: read_azure(path, skip_bad_rows=skip_bad_rows, stats=stats),
        "mooncake": lambda: read_mooncake(path, skip_bad_rows=skip_bad_rows, stats=stats),
        "servegen": lambda: read_servegen(path, seed=seed, start_s=start_s, end_s=end_s),
    }
    if fmt == "vidur":
        raise KvsimError("lengths-only trace (no arrival times); use it through trace_lengths() "
                         "/ LengthDist.empirical", field="format", value=fmt, file=str(path))
    if fmt not in readers:
        from kvsim.errors import unknown_name
        raise unknown_name("trace format", fmt, FORMATS, field="format", file=str(path))
    stream: Iterable[Request] = readers[fmt]()
    if fmt != "servegen" and (start_s > 0 or end_s is not None):
        stream = time_window(stream, start_s, math.inf if end_s is None else end_s)
    stream = scale_rate(stream, rate_scale)
    return _not_empty(renumber(limit(stream, max_requests)), path)


def _not_empty(stream: Iterator[Request], path: str | Path) -> Iterator[Request]:
    """The stream; an error at its end when it held no request (a header without rows, every row
    skipped, or a time window past the end): a run of nothing would report zeros as results."""
    empty = True
    for r in stream:
        empty = False
        yield r
    if empty:
        raise KvsimError("the trace yields no requests (no rows, every row skipped, or a time window "
                         "outside the trace)", field="path", value=str(path))


def trace_lengths(path: str | Path, format: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All (input_tokens, output_tokens) pairs of a trace as two int64 arrays (row order), for
    empirical length resampling. Also reads lengths-only Vidur stats CSVs."""
    fmt = format or detect_format(path)
    if fmt == "vidur":
        from kvsim.fileio import read_csv_rows

        rows = read_csv_rows(Path(path), "a Vidur stats CSV", ("num_prefill_tokens", "num_decode_tokens"))
        try:
            pairs = [(int(r["num_prefill_tokens"]), int(r["num_decode_tokens"])) for r in rows]
            arr = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        except (ValueError, OverflowError):
            raise KvsimError("token counts must be integers", field="num_prefill_tokens", value=None,
                             file=str(path)) from None
        if not len(arr) or arr.min() < 1 or arr.max() > MAX_TOKENS:
            raise KvsimError(f"needs rows of token counts in 1..{MAX_TOKENS:,}", field="num_prefill_tokens",
                             value=None, file=str(path))
        return arr[:, 0], arr[:, 1]
    if fmt == "servegen":
        raise KvsimError("ServeGen is distributional; sample it with read_servegen()",
                         field="format", value=fmt, file=str(path))
    ins, outs = [], []
    for r in read_trace(path, fmt):
        ins.append(r.input_tokens)
        outs.append(r.output_tokens)
    return np.array(ins, dtype=np.int64), np.array(outs, dtype=np.int64)


def write_csv(stream: Iterable[Request], path: str | Path) -> int:
    """Write a stream as a generic CSV (the ``csv`` format); returns the row count.

    Optional columns appear only if some request uses them. Hash ids are written as given, so
    read the file back with the same ``prefix_block_tokens`` the stream used.
    """
    reqs = list(stream)
    opt = [("prefix_hash_ids", any(r.prefix_hashes for r in reqs)),
           ("user_id", any(r.user_id is not None for r in reqs)),
           ("image_tokens", any(r.image_tokens for r in reqs)),
           ("session_id", any(r.session_id is not None for r in reqs))]
    cols = ["arrival_time_s", "input_tokens", "output_tokens"] + [c for c, used in opt if used]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(cols)
        for r in reqs:
            row: list[object] = [f"{r.arrival_s:.6f}", r.input_tokens, r.output_tokens]
            extra = {"prefix_hash_ids": " ".join(map(str, r.prefix_hashes)),
                     "user_id": r.user_id or "", "image_tokens": r.image_tokens,
                     "session_id": "" if r.session_id is None else r.session_id}
            row += [extra[c] for c in cols[3:]]
            w.writerow(row)
    return len(reqs)
