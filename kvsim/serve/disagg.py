"""Disaggregated prefill/decode serving: prefill instances compute each prompt's KV and sample its
first token, a shared link carries the KV to a decode instance, which only decodes.

The model follows vLLM's P/D disaggregation with its ``NixlConnector``
(``vllm/distributed/kv_transfer/kv_connector/v1/nixl_connector.py``; docs/features/nixl_connector_usage.md):

* A prefill instance runs the request to its first token (the proxy sends it with ``max_tokens=1``).
  Its ``request_finished`` then asks the scheduler to keep the request's blocks (``delay_free_blocks``)
  until the decode instance has read them: here the blocks stay held (``Replica.parked``) until the
  transfer lands. TTFT is that first token's time (the summary says that vLLM's own proxy streams
  the first token from the decode side, which also waits for the transfer).
* The decode instance allocates the blocks of the prompt's KV when it takes the request (it waits
  as ``WAITING_FOR_REMOTE_KVS``) and reads the whole request's KV at once after the prefill, not
  layer by layer. The bytes are the prefill side's blocks after compression (eviction, merged vision
  tokens), each rank's share: ``blocks x block_bytes x tp_prefill``, so an fp8 cache moves half the
  bytes of bf16, and KIVI's 2-bit cache less still.
* One link carries every transfer, one at a time at its full rate, first come first served, and
  each occupies it for ``latency + bytes / bandwidth``. FIFO is work-conserving like processor
  sharing (the link is busy as long, the last byte lands at the same time), and it fixes each
  transfer's landing time when it starts, which the decode instances' fast-forward horizon needs.
* A transfer starts only when a decode instance has room: a sequence slot (``max_num_seqs``) and
  the blocks of the sequence's whole life (its last token's), reserved when the transfer starts.
  vLLM's decode instance reserves only the prompt's blocks and may preempt and recompute; kvsim's
  reserves the peak so a decode instance never preempts, hence never prefills. Without room the
  transfer at the head of the queue waits, and the queue behind it (head-of-line).

Events are arrivals (to the prefill instances, through the router), transfer landings and replica
step ends, in that order at equal times. A decode instance's fast-forward never spans a time at
which a transfer could land on it: its horizon is the earliest of the next arrival, the next
landing, the next prefill step end and, while transfers wait for room, the other decode instances'
step ends (every new transfer starts at one of those events and lands no earlier), so a
fast-forwarded run gives the step-by-step result (``tests/test_disagg.py``).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from kvsim.serve.closed_loop import ClosedLoop
from kvsim.serve.engine import Admission, Deployment, ReplicaTotals, admit_and_route
from kvsim.serve.metrics import COMPLETED, UNFINISHED, Recorder
from kvsim.serve.replica import INF, EngineConfig, Replica
from kvsim.serve.router import Router
from kvsim.serve.sequence import BlockTables, Seq, SharingPolicy
from kvsim.serve.workload import Request


@dataclass(frozen=True)
class Link:
    """The network between the prefill and the decode instances."""

    bandwidth_bytes_per_s: float  # may be infinite (a validation limit)
    latency_s: float

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


class _Parked:
    """A prefill instance's blocks of a handed-off sequence, held until its transfer lands."""

    __slots__ = ("held", "block_keys")

    def __init__(self, held: int, block_keys: list[int]) -> None:
        self.held, self.block_keys = held, block_keys


@dataclass
class _Transfer:
    seq: Seq
    source: Replica
    parked: _Parked
    queued_s: float  # the prompt's first token: the transfer may start from then
    dest: Replica | None = None
    start_s: float = 0.0
    end_s: float = 0.0


class DisaggSimulation(ReplicaTotals):
    """Prefill instances behind a router, a link, and decode instances. Build, then :meth:`run`.

    Replica indices (``Seq.replica``, the recorder's rows) are global: prefill instances first."""

    def __init__(self, prefill: Deployment, decode: Deployment, prefill_cfg: EngineConfig,
                 decode_cfg: EngineConfig, prefill_replicas: int, decode_replicas: int, link: Link,
                 router: str = "round_robin", *, timeseries_interval_s: float = 1.0, record_steps: bool = True,
                 prefill_tables: BlockTables | None = None, decode_tables: BlockTables | None = None) -> None:
        assert not decode_cfg.prefix_caching, "a decode instance never prefills: nothing to cache"
        self.prefill, self.decode, self.link = prefill, decode, link
        self.dep, self.cfg = decode, prefill_cfg  # the summary's KV keys describe the decode side
        self.tables = prefill_tables or BlockTables(prefill.plan)
        self.decode_tables = decode_tables or BlockTables(decode.plan)
        bs = prefill.plan.engine.block_size
        sharing = None
        if prefill_cfg.prefix_caching or prefill_cfg.doc_kv_from_ssd or router == "prefix_affinity":
            sharing = SharingPolicy(prefill.layout.runtime.prefix_sharing, bs,
                                    prefill_replicas * prefill.num_gpu_blocks)
        self.admission = Admission(prefill, prefill_cfg, self.tables, sharing,
                                   decode_side=(self.decode_tables, decode.num_gpu_blocks))
        self.router = Router(router, prefill_replicas, bs, prefill.num_gpu_blocks)
        self.recorder = Recorder(prefill_replicas + decode_replicas, timeseries_interval_s, record_steps)
        obs = self.recorder.observe
        self.prefill_replicas = [
            Replica(i, prefill_cfg, prefill.num_gpu_blocks, prefill.plan.block_bytes, prefill.cost, self.tables,
                    self._finished_at_prefill, obs, self._handoff) for i in range(prefill_replicas)]
        self.decode_replicas = [
            Replica(prefill_replicas + i, decode_cfg, decode.num_gpu_blocks, decode.plan.block_bytes, decode.cost,
                    self.decode_tables, self._finished_at_decode, obs) for i in range(decode_replicas)]
        self.replicas = [*self.prefill_replicas, *self.decode_replicas]
        self.reserved = [0] * len(self.replicas)  # decode instances: peak blocks of their sequences
        self.queue: deque[_Transfer] = deque()  # prefilled, waiting for the link or for room
        self.inflight: deque[_Transfer] = deque()  # on the link (FIFO: at most one)
        self.transfer_s: list[float] = []  # first token -> KV landed (waits for the link and for room included)
        self.wire_s: list[float] = []  # on the link
        self.transfer_bytes = 0.0
        self.link_busy_s = 0.0
        self.arrived = 0
        self.end_s = 0.0
        self.loop: ClosedLoop | None = None
        self._bytes_per_block = prefill.plan.block_bytes * prefill.plan.tp

    # ------------------------------------------------------------------ callbacks
    def _done(self, seq: Seq) -> None:
        self.recorder.request(seq, COMPLETED)
        if seq.finish_s > self.end_s:
            self.end_s = seq.finish_s
        if self.loop is not None:
            self.loop.request_done(seq.finish_s)

    def _finished_at_prefill(self, seq: Seq) -> None:  # a one-token output needs no decode instance
        self.router.done(seq)
        self._done(seq)

    def _finished_at_decode(self, seq: Seq) -> None:
        self.reserved[seq.replica] -= self._peak(seq)
        self._done(seq)

    def _handoff(self, seq: Seq) -> None:
        """``seq``'s prompt is done on its prefill instance: park its blocks there, queue its KV."""
        source = self.prefill_replicas[seq.replica]
        parked = _Parked(seq.held, seq.block_keys)
        seq.held, seq.block_keys, seq.registered = 0, [], 0
        source.parked.append(parked)
        self.router.done(seq)
        self.queue.append(_Transfer(seq, source, parked, seq.first_token_s))

    def _peak(self, seq: Seq) -> int:
        return self.decode_tables.decode[seq.prompt + seq.out - 1 - seq.dropped]

    # ------------------------------------------------------------------ the link
    def _dispatch(self, now: float) -> None:
        """Start the head transfer if the link is free and a decode instance has room for it."""
        if self.inflight or not self.queue:
            return
        tr = self.queue[0]
        seq, peak = tr.seq, self._peak(tr.seq)
        dest = None
        for rep in self.decode_replicas:
            fits = self.reserved[rep.index] + peak <= rep.bm.num_blocks
            if fits and len(rep.running) + len(rep.parked) < rep.cfg.max_num_seqs \
                    and (dest is None or self.reserved[rep.index] < self.reserved[dest.index]):
                dest = rep
        if dest is None:
            return  # held until a decode instance frees room
        self.queue.popleft()
        self.reserved[dest.index] += peak
        dest.bm.allocate(seq, self.decode_tables.decode[seq.stored])  # the landing buffer
        dest.parked.append(seq)
        nbytes = tr.parked.held * self._bytes_per_block
        tr.dest, tr.start_s, tr.end_s = dest, now, now + self.link.seconds(nbytes)
        self.transfer_bytes += nbytes
        self.link_busy_s += tr.end_s - now
        self.inflight.append(tr)

    def _land(self, tr: _Transfer) -> None:
        """The KV has arrived: the prefill instance frees its blocks, the decode instance decodes."""
        src, dest, seq = tr.source, tr.dest, tr.seq
        assert dest is not None
        src.bm.free(tr.parked)
        src.parked.remove(tr.parked)
        dest.parked.remove(seq)
        seq.replica = dest.index
        dest.running.append(seq)
        self.transfer_s.append(tr.end_s - tr.queued_s)
        self.wire_s.append(tr.end_s - tr.start_s)

    # ------------------------------------------------------------------ the event loop
    def run(self, stream: Iterable[Request],
            progress: Callable[[float, int], None] | None = None) -> DisaggSimulation:
        """Simulate until every request of ``stream`` has finished or been rejected."""
        heap: list[tuple[float, int, int, int]] = []  # (time, order, replica, version)
        n = len(self.replicas)
        version = [0] * n
        pending = [INF] * n
        order = 0
        it: Iterator[Request] = iter(stream)
        self.loop = stream if isinstance(stream, ClosedLoop) else None
        nxt = next(it, None)

        def wake(r: int, now: float) -> None:
            nonlocal order
            if not self.replicas[r].busy and pending[r] > now:
                version[r] += 1
                pending[r] = now
                heapq.heappush(heap, (now, order, r, version[r]))
                order += 1

        n_pre = len(self.prefill_replicas)
        events = 0
        while nxt is not None or heap or self.inflight:
            t_arrival = nxt.arrival_s if nxt is not None else INF
            t_land = self.inflight[0].end_s if self.inflight else INF
            t_step = heap[0][0] if heap else INF
            events += 1
            if progress is not None and events % 4096 == 0:
                progress(min(t_arrival, t_land, t_step), self.arrived)
            if nxt is not None and t_arrival <= t_land and t_arrival <= t_step:
                r = self._arrive(nxt)
                nxt = next(it, None)
                if r is not None:
                    wake(r, t_arrival)
            elif self.inflight and t_land <= t_step:
                tr = self.inflight.popleft()
                self._land(tr)
                wake(tr.source.index, t_land)  # its freed blocks may admit a waiting prompt
                assert tr.dest is not None
                wake(tr.dest.index, t_land)
                self._dispatch(t_land)
            else:
                now, _, r, ver = heapq.heappop(heap)
                if ver != version[r]:
                    continue
                pending[r] = INF
                rep = self.replicas[r]
                if rep.busy:
                    rep.complete()
                self._dispatch(now)  # a prompt was handed off, or decode blocks were freed
                if r < n_pre:
                    horizon = nxt.arrival_s if nxt is not None else INF
                else:
                    horizon = self._decode_horizon(r, nxt, pending, n_pre)
                # a decode instance's horizon may be a transfer landing, which no step holds back
                work = rep.plan(now, horizon, arrival_lags=r < n_pre)
                when = work.end_s if work is not None else rep.next_ready_s(now)
                if when < INF:
                    version[r] += 1
                    pending[r] = when
                    heapq.heappush(heap, (when, order, r, version[r]))
                    order += 1
            if nxt is None and self.loop is not None:  # a request ended: its client sent the next
                nxt = next(it, None)
        self._report_unfinished()
        return self

    def _decode_horizon(self, r: int, nxt: Request | None, pending: list[float], n_pre: int) -> float:
        """Earliest time a transfer could land on decode instance ``r`` (see the module docstring)."""
        h = nxt.arrival_s if nxt is not None else INF
        if self.loop is not None:
            h = min(h, self.loop.next_arrival_s())
        if self.inflight:
            h = min(h, self.inflight[0].end_s)
        h = min(h, min(pending[:n_pre]))
        if self.queue:
            h = min(h, min((p for i, p in enumerate(pending) if i >= n_pre and i != r), default=INF))
        return h

    def _arrive(self, req: Request) -> int | None:
        self.arrived += 1
        return admit_and_route(req, self.admission, self.recorder, self.loop, self.router, self.prefill_replicas)

    def _report_unfinished(self) -> None:
        for tr in [*self.queue, *self.inflight]:
            self.recorder.request(tr.seq, UNFINISHED)
        for rep in self.replicas:
            for seq in [*rep.running, *rep.waiting]:
                self.recorder.request(seq, UNFINISHED)

    # ------------------------------------------------------------------ results

    def transfer_summary(self, duration_s: float) -> dict:
        from kvsim.serve.metrics import stats

        return {"kv_transfer_s": stats(np.array(self.transfer_s)), "kv_wire_s": stats(np.array(self.wire_s)),
                "transfers": len(self.transfer_s),
                "kv_transfer_bytes": self.transfer_bytes,
                "link_utilisation": self.link_busy_s / duration_s if duration_s else 0.0}
