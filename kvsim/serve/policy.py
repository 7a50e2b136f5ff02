"""Scheduling policies: what a replica runs in its next engine step.

A policy's :meth:`~Policy.schedule` picks the step's sequences and token counts, preempts and admits
through the replica's mechanics (:meth:`Replica.preempt`, :meth:`Replica.admit`, block commits on
``replica.bm``), and returns a :class:`StepPlan`; the replica prices it and fast-forwards runs of
identical decode steps (:mod:`kvsim.serve.replica`), whatever the policy.

* ``fcfs`` (:class:`VllmFcfs`, the default): vLLM v1's ``Scheduler.schedule``
  (``vllm/v1/core/sched/scheduler.py``): running sequences first, decodes then continuing prefills,
  in admission order, each taking what it needs of the token budget; a sequence whose blocks do not
  fit preempts the last running sequence (recompute, or swap to host memory); if nothing was
  preempted, waiting sequences in FCFS order (preempted ones at the front) while a sequence slot,
  budget and blocks last, stopping at the first that does not fit.
* ``lpm`` (:class:`LongestPrefixFirst`): the same, but waiting sequences are admitted longest
  cached prefix first, as SGLang's cache-aware ``lpm`` policy orders its queue
  (``python/sglang/srt/managers/schedule_policy.py``: ``CacheAwarePolicy.LPM``, and FCFS instead
  when more than 128 requests wait, where sorting costs more than it saves). SGLang's other
  differences (its radix tree's eviction order, the tokens it reserves for running requests) are
  not modelled.

SGLang's batching (``EngineConfig.prefill_alone``: engine kind sglang without ``--enable-mixed-chunk``,
SGLang's default): its scheduler runs a new prefill batch whenever one can be formed and the running
decodes wait for it (``Scheduler.get_next_batch_to_run``, python/sglang/srt/managers/scheduler.py: a
prefill batch takes precedence, and joins the running batch only under ``--enable-mixed-chunk``). A
prefill batch continues a chunked prompt first, then takes waiting prompts whole while they fit the
token budget (``--max-prefill-tokens``); only a batch's first prompt may be cut to the budget
(``PrefillAdder.add_one_req``, schedule_policy.py: a prompt past what is left waits unless the batch is
empty). Prefix hits are not counted against the budget when deciding whether a prompt fits (a prompt
whose uncached part would fit waits a batch). With ``--enable-mixed-chunk`` kvsim keeps vLLM's step:
decodes first, then prefill chunks.

Policies only order and select: they never name a KV method (those act through the block tables).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from kvsim.serve.replica import Replica
    from kvsim.serve.sequence import Seq

PolicyName = Literal["fcfs", "lpm"]
POLICIES: tuple[PolicyName, ...] = ("fcfs", "lpm")
DEFAULT_POLICY: PolicyName = "fcfs"  # vLLM's --scheduling-policy default
LPM_MAX_QUEUE = 128  # SGLang: above this many waiting requests, lpm falls back to FCFS


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step as scheduled: its decoding and prefilling sequences (each with ``scheduled`` tokens),
    the seconds of swap copies it waits for, whether anything was preempted, and whether a decode-only
    step repeats until a sequence ends or an outside event (what fast-forward relies on)."""

    decodes: list[Seq]
    prefills: list[Seq]
    transfer_s: float
    preempted: bool
    repeats: bool = True


class Policy(Protocol):
    def schedule(self, rep: Replica, now: float) -> StepPlan: ...


class VllmFcfs:
    """vLLM v1's scheduler (see the module docstring)."""

    def schedule(self, rep: Replica, now: float) -> StepPlan:
        # a sequence swapped out to host memory (a vLLM preemption mode SGLang lacks) comes back through
        # vLLM's step, which copies its blocks in: while any waits (it need not be first in the queue, when
        # swap space ran out and a later preemption recomputes), the replica takes vLLM's step
        if rep.cfg.prefill_alone and not rep.swap_used_blocks:
            step = self._prefill_batch(rep, now)
            if step is not None:
                return step
            decode = self._vllm_step(rep, now, admit=False)  # a decode batch: nothing could be prefilled
            # A waiting prompt refused its blocks was refused before this step's decodes took theirs, which
            # may evict a cached block and let it in at the next step (vLLM's step admits after its decodes,
            # so there fast-forward holds): this step does not repeat.
            refused = bool(rep.waiting) and rep.schedulable(rep.waiting[0]) and len(rep.running) < rep.cfg.max_num_seqs
            return replace(decode, repeats=not refused)
        return self._vllm_step(rep, now, admit=True)

    def _prefill_batch(self, rep: Replica, now: float) -> StepPlan | None:
        """SGLang's prefill batch (module docstring), or None when no prompt can be prefilled now."""
        bm, pre = rep.bm, rep.tables.prefill
        budget = rep.cfg.max_num_batched_tokens
        prefills: list[Seq] = []
        for s in rep.ready(now)[1]:  # a chunked prompt continues first
            n_new = min(s.prompt + s.generated - s.computed, budget)
            need = pre[s.computed + n_new] - s.held
            if need > bm.num_free:
                break
            if need > 0:
                bm.append(s, need)
            s.scheduled = n_new
            budget -= n_new
            prefills.append(s)
        for s in self.admission_order(rep):
            if budget <= 0 or len(rep.running) >= rep.cfg.max_num_seqs:
                break
            if prefills and s.total - s.computed > budget:
                break  # only the batch's first prompt is cut to the budget
            taken = rep.admit(s, now, budget)
            if taken is None:
                break
            n_new = taken[0]
            if n_new:
                prefills.append(s)
                budget -= n_new
        return StepPlan([], prefills, 0.0, False) if prefills else None

    def _vllm_step(self, rep: Replica, now: float, admit: bool) -> StepPlan:
        bm, tables = rep.bm, rep.tables
        dec, pre = tables.decode, tables.prefill
        budget = rep.cfg.max_num_batched_tokens
        dec_order, pre_order = rep.ready(now)
        order = dec_order + pre_order
        n_dec = len(dec_order)
        transfer_s = 0.0
        preempted = False
        i = 0
        while i < len(order) and budget > 0:
            s = order[i]
            if i < n_dec:
                n_new = 1
                need = dec[s.computed - s.dropped + 1] - s.held
            else:
                n_new = min(s.prompt + s.generated - s.computed, budget)
                need = pre[s.computed + n_new] - s.held
            if need > 0:
                while need > bm.num_free and len(order) > i + 1:  # preempt from the back, as v1 does
                    transfer_s += rep.preempt(order.pop())
                    preempted = True
                n_dec = min(n_dec, len(order))
                if need > bm.num_free:  # nothing left to preempt but itself
                    transfer_s += rep.preempt(order.pop())
                    preempted = True
                    break
                bm.append(s, need)
            s.scheduled = n_new
            budget -= n_new
            i += 1
        decodes = order[:min(i, n_dec)]
        prefills = order[n_dec:i]
        if admit and not preempted:
            for s in self.admission_order(rep):
                if budget <= 0 or len(rep.running) >= rep.cfg.max_num_seqs:
                    break
                taken = rep.admit(s, now, budget)
                if taken is None:
                    break  # vLLM stops at the first waiting request that does not fit
                n_new, copy_s = taken
                transfer_s += copy_s
                if n_new:
                    (decodes if s.decoding else prefills).append(s)
                    budget -= n_new
        return StepPlan(decodes, prefills, transfer_s, preempted)

    def admission_order(self, rep: Replica) -> Iterator[Seq]:
        """Waiting sequences in the order they are offered a place. FCFS offers the head of the
        queue again and again: an admitted sequence leaves it, and the first refusal ends the
        admission (no copy of the queue each step)."""
        waiting = rep.waiting
        while waiting and rep.schedulable(waiting[0]):  # under async scheduling the newest wait a step
            yield waiting[0]


class LongestPrefixFirst(VllmFcfs):
    """SGLang's ``lpm`` order of the waiting queue (see the module docstring)."""

    def admission_order(self, rep: Replica) -> Iterator[Seq]:
        waiting = [s for s in rep.waiting if rep.schedulable(s)]
        if len(waiting) > LPM_MAX_QUEUE or not rep.cfg.prefix_caching:
            yield from waiting
            return
        bm, bs = rep.bm, rep.block_size
        # swapped-out sequences keep the front (they hold no cached prefix to match); the rest by
        # cached prefix length, longest first, FCFS among equals (a stable sort)
        def cached_first(s: Seq) -> float:
            return -math.inf if s.swapped_blocks else -bm.match(s.cache_keys, (s.total - 1) // bs)

        yield from sorted(waiting, key=cached_first)


def make_policy(name: PolicyName) -> Policy:
    return {"fcfs": VllmFcfs, "lpm": LongestPrefixFirst}[name]()
