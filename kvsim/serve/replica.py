"""One serving replica (a TP group running a vLLM-v1-style engine): scheduler, paged KV blocks with
prefix caching, preemption, and step pricing with fast-forward over predictable decode steps.

Scheduling (one call of :meth:`Replica.plan` per engine step) is the replica's policy
(:mod:`kvsim.serve.policy`: vLLM v1's FCFS by default); the replica holds the mechanics a policy
uses (admission with prefix-cache hits and swap-in, preemption by recompute or swap, block commits),
prices the step and fast-forwards.

Every KV method enters only through the memory plan's block tables (``blocks_for`` after
compression, ``prefill_blocks_for`` while a prompt is written), ``layout.stored_tokens`` (merged
vision tokens) and the layout's ``Runtime`` (``doc_kv_from_ssd``); step times come from the cost
model, which reads the layout itself.

Fast-forward: when a step is decode-only, nothing was admitted or preempted and no transfer is
pending, the following steps repeat the same schedule until a sequence finishes, blocks run out,
or an outside event (the next arrival, a document load finishing: the ``horizon``) can change it.
Those steps are priced in one ``CostModel.decode_times_s`` call and their blocks taken at once;
time advances by the same float additions as step-by-step simulation, so results are identical.

Async scheduling (``EngineConfig.async_scheduling``): vLLM's engine core then keeps two steps in
flight (``EngineCore.step_with_batch_queue``, vllm/v1/engine/core.py, batch queue of 2): it schedules
and launches step k + 1 as soon as step k is launched, and only then waits for step k's output. A
request that reaches the engine while step k runs is therefore first scheduled with step k + 2 (one
step later than without async scheduling), unless nothing else would run: an engine with no step
left in flight schedules what waits at once. A request whose output length ends at step k is not
scheduled for step k + 1 (vLLM's scheduler skips a request whose in-flight step reaches max_tokens),
so finishing costs nothing extra. kvsim tags each arrival with the plan it may first join (``Seq.
first_plan``): the next plan, or the one after it when it arrives while a step of its replica is in
flight under async scheduling. The step that holds such an arrival back is the same whether it arrived or
not, so a fast-forwarded decode run whose horizon is that arrival goes on through it (``Work.lag_end_s``):
one priced run instead of a run cut at the arrival and a lone step after it, with identical results.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from kvsim.cost.model import Batch, CostModel
from kvsim.serve.blocks import BlockManager, HoldsBlocks
from kvsim.serve.policy import DEFAULT_POLICY, PolicyName, make_policy
from kvsim.serve.sequence import BlockTables, Seq

INF = float("inf")
# A fast-forward run prices this many times the steps that the previous step time says fit before
# its horizon: step times drift slowly as contexts grow, and a run that stops short of the horizon
# only costs one more pricing call (the result is the same either way).
_HORIZON_MARGIN = 1.25


@dataclass(frozen=True)
class EngineConfig:
    """Scheduler settings of one replica (vLLM engine arguments of the same names)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool
    prefix_caching: bool  # effective: requested and possible for the layout
    preemption: Literal["recompute", "swap"]
    swap_space_bytes: float  # host memory for swapped blocks, per GPU
    doc_kv_from_ssd: bool = False  # MatKV (layout.runtime.doc_kv_from_ssd)
    fast_forward: bool = True
    check: bool = False  # assert block and scheduler invariants every step (tests)
    scheduling_policy: PolicyName = DEFAULT_POLICY
    # vLLM's async scheduling (--async-scheduling; the default from 0.14, kvsim.cost.execution): the
    # scheduler plans step k + 1 while step k runs, so a request that arrives during step k first runs
    # in step k + 2 (module docstring, "Async scheduling")
    async_scheduling: bool = False
    # SGLang without --enable-mixed-chunk: a step that prefills runs no decode (kvsim.serve.policy)
    prefill_alone: bool = False


class Work:
    """A planned engine step, or a fast-forwarded run of ``steps`` identical decode steps. Under async
    scheduling a run may end with the step that holds back the arrival at its horizon: ``lag_end_s``
    is then that step's start, and only an arrival after it waits for a second plan (module docstring)."""

    __slots__ = ("start_s", "end_s", "steps", "decodes", "prefills", "lag_end_s")

    def __init__(self, start_s: float, end_s: float, steps: int, decodes: list[Seq],
                 prefills: list[Seq], lag_end_s: float = -INF) -> None:
        self.start_s, self.end_s, self.steps = start_s, end_s, steps
        self.decodes, self.prefills = decodes, prefills
        self.lag_end_s = lag_end_s


class Replica:
    """Engine state of one replica; the event loop calls :meth:`plan` at a step boundary and
    :meth:`complete` when the planned work ends."""

    def __init__(self, index: int, cfg: EngineConfig, num_blocks: int, block_bytes: float, cost: CostModel,
                 tables: BlockTables, on_finish: Callable[[Seq], None],
                 observe: Callable[..., None] | None = None,
                 handoff: Callable[[Seq], None] | None = None) -> None:
        self.index = index
        self.cfg = cfg
        self.policy = make_policy(cfg.scheduling_policy)
        self.bm = BlockManager(num_blocks, cfg.prefix_caching)
        self.block_size = tables.block_size
        self.block_bytes = block_bytes
        self.cost = cost
        self.tables = tables
        self.on_finish = on_finish
        self.observe = observe  # (replica, work) after each plan, for time series and traces
        # A prefill instance of a disaggregated deployment (kvsim.serve.disagg): a sequence whose
        # prompt is done leaves the running batch, holding its blocks, and is handed to this.
        self.handoff = handoff
        self.parked: list[HoldsBlocks] = []  # blocks held outside the running batch (KV in transfer)
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []  # admission order, document loads included
        self.work: Work | None = None
        self.ssd_free_s = 0.0  # MatKV: the replica's NVMe link is busy until then
        self.swap_used_blocks = 0
        self.last_decode_s = 0.0  # previous decode step time, to size fast-forward runs
        self.steps = 0
        self.plans = 0  # steps planned (a fast-forwarded run counts once): arrivals are tagged by it
        self.preemptions = 0
        self.owner: dict[int, str | None] = {}  # cache key -> user who computed it (side channel)
        self.peak_used_blocks = 0

    # ------------------------------------------------------------------ queries
    @property
    def busy(self) -> bool:
        return self.work is not None

    def next_ready_s(self, now: float) -> float:
        """Earliest document load still in flight (MatKV), else infinity."""
        return min((s.ready_s for s in self.running if s.ready_s > now), default=INF)

    def enqueue(self, seq: Seq) -> None:
        seq.replica = self.index
        w = self.work
        # the arrival is processed while ``w`` runs (at a step's end it comes before the next plan)
        lagged = self.cfg.async_scheduling and w is not None and seq.req.arrival_s > w.lag_end_s
        seq.first_plan = self.plans + (2 if lagged else 1)
        self.tables.ensure(seq.prompt + seq.out)
        self.waiting.append(seq)

    def schedulable(self, seq: Seq) -> bool:
        """Whether the plan being made may admit waiting ``seq`` (see the module docstring)."""
        return seq.first_plan <= self.plans + 1

    # ------------------------------------------------------------------ scheduling
    def plan(self, now: float, next_arrival_s: float, arrival_lags: bool = True) -> Work | None:
        """Schedule the step starting at ``now`` with the replica's policy (and, if it is a plain
        decode step, the identical steps after it that start before the next arrival or document
        load); its blocks are committed as it is scheduled; return it. ``arrival_lags``: the event at
        ``next_arrival_s`` is a request this replica's ``enqueue`` may hold back (async scheduling),
        not an event that acts at once (a transfer landing on a disaggregated decode instance)."""
        cfg = self.cfg
        step = self.policy.schedule(self, now)
        # Waiting sequences that joined the queue most recently are at its back (a preempted one goes
        # to the front and is older): whether the last one may be admitted says whether any waits.
        held = bool(self.waiting) and not self.schedulable(self.waiting[-1])
        if held and not (step.decodes or step.prefills or step.transfer_s or step.preempted):
            # nothing in flight after this boundary: the engine schedules what waits at once
            for s in self.waiting:
                s.first_plan = min(s.first_plan, self.plans + 1)
            held = False
            step = self.policy.schedule(self, now)
        decodes, prefills, transfer_s = step.decodes, step.prefills, step.transfer_s
        if not decodes and not prefills and not transfer_s:
            return None
        self.plans += 1
        if cfg.check:
            assert len(self.running) <= cfg.max_num_seqs
            assert sum(s.scheduled for s in decodes) + sum(s.scheduled for s in prefills) \
                <= cfg.max_num_batched_tokens
        steps, lag_end = 1, -INF
        if not decodes and not prefills:  # only swap copies this step
            end = now + transfer_s
        elif prefills or transfer_s:
            end = now + self._step_s(decodes, prefills) + transfer_s
        else:
            ready_s = self.next_ready_s(now)  # loads admitted just now included
            horizon = min(next_arrival_s, ready_s)
            # a held-back arrival joins the next plan: this run is one step
            fast = cfg.fast_forward and not step.preempted and not held and step.repeats
            # the run may go on through the step that holds back the arrival at its horizon, if that
            # step starts before a document load lands
            lag_before_s = ready_s if cfg.async_scheduling and arrival_lags and next_arrival_s < ready_s else -INF
            steps, end, lag_end = self._decode_run(now, decodes, horizon, fast, lag_before_s)
        self.steps += steps
        self.work = Work(now, end, steps, decodes, prefills, lag_end)
        if self.bm.num_used > self.peak_used_blocks:
            self.peak_used_blocks = self.bm.num_used
        if self.observe is not None:
            self.observe(self, self.work)
        return self.work

    def ready(self, now: float) -> tuple[list[Seq], list[Seq]]:
        """Running sequences that can compute at ``now`` (a document load still in flight waits):
        those that decode and those whose prefill continues, each in admission order."""
        dec_order: list[Seq] = []
        pre_order: list[Seq] = []
        for s in self.running:
            if s.ready_s <= now:
                if s.generated and s.computed + 1 == s.prompt + s.generated:  # Seq.decoding, inlined
                    dec_order.append(s)
                else:
                    pre_order.append(s)
        return dec_order, pre_order

    def admit(self, s: Seq, now: float, budget: int) -> tuple[int, float] | None:
        """Take waiting sequence ``s`` into the running batch if its blocks fit: a swapped-out one
        copies its blocks back; a new one takes its prefix-cache hits (and, for MatKV, loads its
        documents' KV from NVMe). Returns (tokens it computes this step, copy seconds), or None
        (nothing changed) when it does not fit."""
        cfg, bm, bs = self.cfg, self.bm, self.block_size
        dec, pre = self.tables.decode, self.tables.prefill
        transfer_s = 0.0
        if s.swapped_blocks:  # swapped out: copy its blocks back, then continue where it stopped
            n_new = min(s.total - s.computed, budget)
            if not cfg.enable_chunked_prefill and n_new < s.total - s.computed:
                return None
            need = dec[s.stored + 1] if s.decoding else pre[s.computed + n_new]
            if need > bm.num_free:
                return None
            bm.allocate(s, need)
            transfer_s = self.cost.host_transfer_s(s.swapped_blocks * self.block_bytes)
            self.swap_used_blocks -= s.swapped_blocks
            s.swapped_blocks = 0
        else:
            limit = (s.total - 1) // bs  # at least one token is computed to sample from
            hits = bm.match(s.cache_keys, limit) if cfg.prefix_caching else 0
            hit_keys = s.cache_keys[:hits]
            computed = hits * bs
            doc_blocks = max(0, min(len(s.keys), limit) - hits) if cfg.doc_kv_from_ssd else 0
            n_new = min(s.total - computed - doc_blocks * bs, budget)
            if doc_blocks:  # MatKV: load the documents' KV from NVMe instead of prefilling it
                n_new = 0
            elif not cfg.enable_chunked_prefill and n_new < s.total - computed:
                return None
            need = pre[computed + doc_blocks * bs + n_new] - hits
            if not bm.can_allocate(need, hit_keys):
                return None
            bm.allocate(s, need, hit_keys)
            s.computed = computed + doc_blocks * bs
            s.registered = hits
            self._first_admission(s, now, hit_keys, doc_blocks)
            if doc_blocks:
                start = max(now, self.ssd_free_s)
                s.ready_s = self.ssd_free_s = start + self.cost.ssd_read_s(doc_blocks * self.block_bytes)
        if self.waiting[0] is s:
            self.waiting.popleft()
        else:
            self.waiting.remove(s)
        self.running.append(s)
        s.scheduled = n_new
        return n_new, transfer_s

    def _first_admission(self, s: Seq, now: float, hit_keys: Sequence[int], doc_blocks: int) -> None:
        if s.hit_tokens >= 0:
            return
        s.scheduled_s = now
        s.hit_tokens = len(hit_keys) * self.block_size
        s.doc_tokens = doc_blocks * self.block_size
        user = s.req.user_id
        owner = self.owner
        s.cross_user_hit = any(owner.get(k, user) != user for k in hit_keys)

    def preempt(self, s: Seq) -> float:
        """Preempt ``s``: swap its blocks to host memory if configured and room is left (returns the
        copy time), else drop them to be recomputed. It goes to the front of the waiting queue."""
        cfg = self.cfg
        self.running.remove(s)
        s.preemptions += 1
        self.preemptions += 1
        t = 0.0
        held = s.held
        swap = cfg.preemption == "swap" and (self.swap_used_blocks + held) * self.block_bytes <= cfg.swap_space_bytes
        if cfg.prefix_caching and not swap:
            self._register(s, private=True)  # freed, its blocks stay cached for its return (CacheKeys)
        self.bm.free(s)
        s.registered = 0
        if swap:
            s.swapped_blocks = held
            self.swap_used_blocks += held
            t = self.cost.host_transfer_s(held * self.block_bytes)  # GPU -> host over the same link
        else:
            s.computed = 0
        self.waiting.appendleft(s)
        return t

    # ------------------------------------------------------------------ pricing
    def _step_s(self, decodes: list[Seq], prefills: list[Seq]) -> float:
        batch = Batch(prefill_tokens=np.array([s.scheduled for s in prefills], dtype=np.int64),
                      prefill_context=np.array([s.computed for s in prefills], dtype=np.int64),
                      decode_context=np.array([s.stored for s in decodes], dtype=np.int64),
                      prefill_samples=sum(1 for s in prefills if s.computed + s.scheduled == s.total),
                      merged_tokens=sum(s.dropped for s in prefills if s.computed + s.scheduled == s.total))
        if not prefills:
            return float(self.cost.decode_times_s(batch.decode_context, 1)[0])
        return self.cost.step_time_s(batch)

    def _decode_run(self, now: float, decodes: list[Seq], horizon: float, fast: bool,
                    lag_before_s: float) -> tuple[int, float, float]:
        """Steps, end time and ``Work.lag_end_s`` of a decode-only run starting at ``now`` (step 0's
        blocks are taken). The event at ``horizon`` is an arrival that async scheduling holds back a
        step, which that arrival cannot change, when ``lag_before_s`` is above ``horizon``: the run goes
        on through that step if it starts before ``lag_before_s`` (the next other outside event)."""
        contexts = [s.computed - s.dropped for s in decodes]
        ctx = np.array(contexts, dtype=np.int64)
        k = min(s.out - s.generated for s in decodes) if fast else 1
        if k > 1 and horizon < INF and self.last_decode_s > 0:
            k = min(k, int((horizon - now) / self.last_decode_s * _HORIZON_MARGIN) + 2)
        if k > 1:
            free = self.bm.num_free
            if self.waiting and len(self.running) < self.cfg.max_num_seqs:
                # A waiting sequence was refused blocks at step 0. Taking free blocks cannot change
                # that, unless it evicts a cached block: a hit cut short in the middle of a waiting
                # prompt's prefix frees the evictable hits after it from the count that
                # ``can_allocate`` checks, so the next step may admit it. The run ends first.
                free = self.bm.free_before_eviction
            k = self._steps_with_blocks(ctx, k, free)
        times = self.cost.decode_times_s(ctx, k).tolist()
        self.last_decode_s = times[-1]
        end = now + times[0]
        steps = 1
        lag_end = -INF
        for dt in times[1:]:  # the same float additions as step-by-step simulation
            if end >= horizon:  # the next step would start at or after the next outside event
                if lag_end > -INF or end >= lag_before_s:
                    break
                lag_end = end  # ... which arrived during the step that ends here: the next one holds it back
            end += dt
            steps += 1
        if steps > 1:
            dec, bm = self.tables.decode, self.bm
            for s, c in zip(decodes, contexts, strict=True):
                more = dec[c + steps] - dec[c + 1]
                if more:
                    bm.append(s, more)
        return steps, end, lag_end

    def _steps_with_blocks(self, ctx: np.ndarray, k: int, free: int) -> int:
        """Most steps (<= k) whose extra blocks, beyond step 0's, fit in ``free`` blocks."""
        table = self.tables.decode_arr
        base = int(table[ctx + 1].sum())

        def extra(steps: int) -> int:
            return int(table[ctx + steps].sum()) - base

        if extra(k) <= free:
            return k
        lo, hi = 1, k  # extra() is non-decreasing in steps: extra(lo) fits, extra(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if extra(mid) <= free else (lo, mid)
        return lo

    # ------------------------------------------------------------------ completion
    def complete(self) -> list[Seq]:
        """Apply the planned work at its end time; return the sequences that finished."""
        w = self.work
        assert w is not None
        self.work = None
        end, k = w.end_s, w.steps
        done: list[Seq] = []
        handed: list[Seq] = []
        for s in w.decodes:
            s.computed += k
            s.generated += k
            if s.generated == s.out:
                done.append(s)
        for s in w.prefills:
            s.computed += s.scheduled
            if self.cfg.prefix_caching:
                self._register(s)
            if s.computed == s.total:
                s.generated += 1
                if s.first_token_s < 0:
                    s.first_token_s = end
                target = self.tables.decode[s.stored]
                if s.held > target:  # compression after prefill (eviction, merged vision tokens)
                    self.bm.shrink(s, s.held - target)
                if s.generated == s.out:
                    done.append(s)
                elif self.handoff is not None:
                    handed.append(s)
        if done:
            for s in done:
                s.finish_s = end
                self.bm.free(s)
            finished = set(map(id, done))
            self.running = [s for s in self.running if id(s) not in finished]
            for s in done:
                self.on_finish(s)
        if handed and self.handoff is not None:
            gone = set(map(id, handed))
            self.running = [s for s in self.running if id(s) not in gone]
            for s in handed:
                self.handoff(s)
        if self.cfg.check:
            self.bm.check([*self.running, *self.parked])
        return done

    def _register(self, s: Seq, private: bool = False) -> None:
        """Newly full blocks become prefix-cached under their keys: those with content keys as they
        fill, and with ``private`` the rest too (a sequence about to be preempted). vLLM caches every
        full block as it fills, but a block under a key private to its request can only ever be hit by
        that request again, i.e. after a preemption, so kvsim registers those then: the same hits, and
        a finished sequence frees its private blocks in one run."""
        n_full = min(s.computed // self.block_size, len(s.cache_keys if private else s.keys))
        if n_full <= s.registered:
            return
        user = s.req.user_id
        for key in s.keys[s.registered:n_full]:  # who first cached a content block (the side channel)
            if not self.bm.is_cached(key):
                self.owner[key] = user
        self.bm.cache(s, s.cache_keys[s.registered:n_full])
        s.registered = n_full
        if len(self.owner) > 4 * self.bm.num_blocks:  # forget owners of evicted blocks
            self.owner = {k: u for k, u in self.owner.items() if self.bm.is_cached(k)}
