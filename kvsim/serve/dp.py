"""A data-parallel group of a MoE model: ``dp`` engine ranks that step in lockstep.

Every MoE layer gathers the tokens of all DP ranks (kvsim.spec.parallel), so no rank can run a
forward pass alone: vLLM's data-parallel engine loop makes a rank with nothing scheduled run a dummy
batch whenever another rank runs (``DPEngineCoreProc.run_busy_loop`` / ``execute_dummy_batch``,
vllm/v1/engine/core.py), and under CUDA graphs pads every rank to the busiest rank's token count
(``coordinate_batch_across_dp``, vllm/v1/worker/dp_utils.py). kvsim therefore plans one step on
every rank at once and ends them together, after the slowest rank's step: an idle rank's dummy
batch carries no attention work and never sets the pace. Ranks step one at a time here (no
fast-forward over decode runs), since another rank's arrivals change the shared step.

A dense model's DP ranks are independent engines (vLLM runs each as its own engine core), so they
need no group: the simulation schedules them as separate replicas.
"""

from __future__ import annotations

from collections.abc import Callable

from kvsim.serve.replica import INF, Replica, Work
from kvsim.serve.sequence import Seq


class DPGroup:
    """Ranks (replicas built without fast-forward and without an observer) stepping together; the
    event loop drives it as one replica (:meth:`plan`, :meth:`complete`, ``busy``)."""

    def __init__(self, index: int, ranks: list[Replica], observe: Callable[[Replica, Work], None] | None) -> None:
        assert all(not r.cfg.fast_forward and r.observe is None for r in ranks)
        self.index, self.ranks, self.observe = index, ranks, observe
        self.work: Work | None = None

    @property
    def busy(self) -> bool:
        return self.work is not None

    def next_ready_s(self, now: float) -> float:
        return min((r.next_ready_s(now) for r in self.ranks), default=INF)

    def plan(self, now: float, next_arrival_s: float) -> Work | None:
        """Plan one step on every rank; all of them end when the slowest does."""
        works = [(r, w) for r in self.ranks if (w := r.plan(now, next_arrival_s)) is not None]
        if not works:
            return None
        end = max(w.end_s for _, w in works)
        for r, w in works:
            w.end_s = end
            if self.observe is not None:
                self.observe(r, w)
        self.work = Work(now, end, 1, [], [])
        return self.work

    def complete(self) -> list[Seq]:
        """Finish the step on every rank that ran one."""
        self.work = None
        done: list[Seq] = []
        for r in self.ranks:
            if r.busy:
                done += r.complete()
        return done
