"""The discrete-event serving simulation: an arrival stream, a router and replicas, driven by one
event heap.

Events are arrivals (read lazily from the stream, one ahead) and replica step ends. At equal times
arrivals come first, so a step starting at time t sees every request that arrived at or before t.
A replica plans a step when the previous one ends, or when a request reaches it while idle; a
fast-forwarded run of decode steps never spans the next arrival (see :mod:`kvsim.serve.replica`),
so every replica is at a true step boundary whenever the router acts.

The model is SimPy's: an arrival process plus one engine process per replica that waits for its own
step to end. :meth:`Simulation.run_simpy` runs it as SimPy processes; :meth:`Simulation.run` (the
default) runs the same schedule from a plain heap of ``(time, order, replica)``, without SimPy's
per-event generator and callback overhead. ``tests/test_sim.py`` checks that both give identical
results; ``benchmarks/bench_sim.py`` times both.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import simpy
from simpy.core import URGENT

from kvsim.cost.model import CostModel
from kvsim.kv.layout import KVLayout
from kvsim.memory import BatchLimits, MemoryPlan
from kvsim.serve.closed_loop import ClosedLoop
from kvsim.serve.dp import DPGroup
from kvsim.serve.metrics import COMPLETED, REJECT_BATCH, REJECT_CONTEXT, REJECT_KV, UNFINISHED, Recorder
from kvsim.serve.replica import INF, EngineConfig, Replica
from kvsim.serve.router import Router, dp_rank
from kvsim.serve.sequence import BlockTables, CacheKeys, Seq, SharingPolicy, reusable
from kvsim.serve.workload import Request
from kvsim.spec.parallel import gathers_tokens


@dataclass(frozen=True)
class Deployment:
    """What one replica runs: the KV layout, its memory plan (blocks) and its cost model (steps)."""

    layout: KVLayout
    plan: MemoryPlan
    cost: CostModel
    max_model_len: int
    num_gpu_blocks: int  # the plan's, unless overridden (vLLM --num-gpu-blocks-override)
    limits: BatchLimits  # the engine's token budget, sequence limit and chunked prefill, given or vLLM's defaults


class Admission:
    """Turns an arriving request into a sequence, or names why it can never be served."""

    def __init__(self, dep: Deployment, cfg: EngineConfig, tables: BlockTables,
                 sharing: SharingPolicy | None, decode_side: tuple[BlockTables, int] | None = None) -> None:
        self.dep, self.cfg, self.tables = dep, cfg, tables
        self.sharing = sharing  # None: no request needs cache keys
        # disaggregated serving: the decode instances' block tables and blocks. The prefill side then
        # holds only the prompt; the decode side holds the sequence to its last token.
        self.decode_side = decode_side
        self.truncated = 0

    def __call__(self, req: Request) -> Seq | str:
        dep = self.dep
        prompt = req.input_tokens + req.image_tokens
        # vLLM rejects a prompt that leaves no room in the context and stops generation at
        # max_model_len (finish reason "length"): outputs are clamped, and counted.
        out = min(req.output_tokens, dep.max_model_len - prompt)
        if out < 1:
            return REJECT_CONTEXT
        if not self.cfg.enable_chunked_prefill:
            # Without chunked prefill a sequence is (re)computed in one step, so vLLM's
            # max_num_batched_tokens "effectively limits the maximum sequence length"
            # (vllm/config/scheduler.py, SchedulerConfig.verify_max_model_len): a longer prompt is
            # rejected and generation stops there, so a preempted sequence can always be recomputed.
            out = min(out, self.cfg.max_num_batched_tokens - prompt)
            if out < 1:
                return REJECT_BATCH
        dropped = 0
        if req.image_tokens:
            dropped = prompt - int(dep.layout.stored_tokens(_one(prompt), req.image_tokens)[0])
        t = self.tables
        t.ensure(prompt + out)
        if self.decode_side is None:
            if max(t.prefill[prompt], t.decode[prompt + out - 1 - dropped]) > dep.num_gpu_blocks:
                return REJECT_KV
        else:
            dt, blocks = self.decode_side
            dt.ensure(prompt + out)
            if t.prefill[prompt] > dep.num_gpu_blocks or dt.decode[prompt + out - 1 - dropped] > blocks:
                return REJECT_KV
        if out < req.output_tokens:
            self.truncated += 1
        keys: tuple[int, ...] = ()
        shareable = not req.image_tokens or reusable(dep.layout, prompt, req.image_tokens)
        if self.sharing is not None and shareable:
            keys = self.sharing.keys(req)
        if self.cfg.prefix_caching and shareable and not self.cfg.doc_kv_from_ssd:
            # every full block has a key, the prompt's past its content keys and the generated ones too,
            # so a preempted sequence finds its own blocks (MatKV's keys name documents to load: content only)
            cache_keys = CacheKeys(keys, req.request_id, (prompt + out) // self.tables.block_size)
            return Seq(req, prompt, out, dropped, keys, cache_keys)
        return Seq(req, prompt, out, dropped, keys)


def _one(n: int) -> np.ndarray:
    return np.array([n], dtype=np.int64)


def admit_and_route(req: Request, admission: Admission, recorder: Recorder, loop: ClosedLoop | None,
                    router: Router, replicas: list[Replica]) -> int | None:
    """Turn an arrival into a sequence on the replica the router picks (its index), or record why
    it can never be served (None; a closed loop's client then sends its next request)."""
    seq = admission(req)
    if isinstance(seq, str):
        recorder.request(Seq(req, req.input_tokens + req.image_tokens, 0, 0, ()), seq)
        if loop is not None:
            loop.request_done(req.arrival_s)
        return None
    r = router.pick(seq)
    if router.dp > 1:  # the replica's DP ranks: vLLM's front end picks one
        r *= router.dp
        r += dp_rank(replicas[r:r + router.dp])
    replicas[r].enqueue(seq)
    return r


class _Urgent(simpy.Event):
    """A timeout scheduled with SimPy's URGENT priority (ahead of normal events at the same time),
    built the way ``simpy.Timeout`` is."""

    def __init__(self, env: simpy.Environment, delay: float) -> None:
        super().__init__(env)
        self._ok = True
        self._value = None
        env.schedule(self, URGENT, delay)


class ReplicaTotals:
    """Engine steps and preemptions summed over a simulation's ``replicas``."""

    replicas: list[Replica]

    @property
    def steps(self) -> int:
        return sum(r.steps for r in self.replicas)

    @property
    def preemptions(self) -> int:
        return sum(r.preemptions for r in self.replicas)


class Simulation(ReplicaTotals):
    """Replicas behind a router, fed by a request stream. Build, then :meth:`run` once."""

    def __init__(self, dep: Deployment, cfg: EngineConfig, replicas: int = 1, router: str = "round_robin", *,
                 timeseries_interval_s: float = 1.0, record_steps: bool = True,
                 tables: BlockTables | None = None) -> None:
        self.dep, self.cfg = dep, cfg
        self.tables = tables or BlockTables(dep.plan)
        bs = dep.plan.engine.block_size
        par = dep.plan.parallel
        ranks = replicas * par.dp  # every DP rank of every replica: its own scheduler and KV cache
        sharing = None
        if cfg.prefix_caching or cfg.doc_kv_from_ssd or router == "prefix_affinity":
            # the first-sender table remembers as many blocks as all replicas can cache
            sharing = SharingPolicy(dep.layout.runtime.prefix_sharing, bs, ranks * dep.num_gpu_blocks)
        self.admission = Admission(dep, cfg, self.tables, sharing)
        self.router = Router(router, replicas, bs, par.dp * dep.num_gpu_blocks, par.dp)
        self.recorder = Recorder(ranks, timeseries_interval_s, record_steps)
        # a MoE model's DP ranks step together (kvsim.serve.dp): one event-loop unit per replica
        coupled = gathers_tokens(dep.plan.model, par)
        rank_cfg = replace(cfg, fast_forward=False) if coupled else cfg
        self.replicas = [Replica(i, rank_cfg, dep.num_gpu_blocks, dep.plan.block_bytes, dep.cost, self.tables,
                                 self._finished, None if coupled else self.recorder.observe) for i in range(ranks)]
        self.units: list[Replica] | list[DPGroup] = self.replicas
        self._unit_of = list(range(ranks))  # rank -> the event-loop unit that steps it
        if coupled:
            self.units = [DPGroup(g, self.replicas[g * par.dp:(g + 1) * par.dp], self.recorder.observe)
                          for g in range(replicas)]
            self._unit_of = [i // par.dp for i in range(ranks)]
        self.arrived = 0
        self.end_s = 0.0
        self.loop: ClosedLoop | None = None  # a closed-loop stream, told when each request ends

    def _finished(self, seq: Seq) -> None:
        self.router.done(seq)
        self.recorder.request(seq, COMPLETED)
        if seq.finish_s > self.end_s:
            self.end_s = seq.finish_s
        if self.loop is not None:
            self.loop.request_done(seq.finish_s)

    def run(self, stream: Iterable[Request],
            progress: Callable[[float, int], None] | None = None) -> Simulation:
        """Simulate until every request of ``stream`` has finished or been rejected."""
        heap: list[tuple[float, int, int, int]] = []  # (time, order, unit, version)
        units, unit_of = self.units, self._unit_of
        version = [0] * len(units)
        pending = [INF] * len(units)  # time of each unit's live event
        order = 0
        it: Iterator[Request] = iter(stream)
        self.loop = stream if isinstance(stream, ClosedLoop) else None
        nxt = next(it, None)
        events = 0
        while nxt is not None or heap:
            events += 1
            if progress is not None and events % 4096 == 0:
                progress(nxt.arrival_s if nxt is not None else heap[0][0], self.arrived)
            if nxt is not None and (not heap or nxt.arrival_s <= heap[0][0]):
                now = nxt.arrival_s
                r = self._arrive(nxt)
                nxt = next(it, None)
                if r is not None:
                    r = unit_of[r]
                if r is not None and not units[r].busy and pending[r] > now:  # idle: wake it now
                    version[r] += 1
                    pending[r] = now
                    heapq.heappush(heap, (now, order, r, version[r]))
                    order += 1
                continue
            now, _, r, ver = heapq.heappop(heap)
            if ver != version[r]:
                continue  # superseded by an earlier wake-up
            pending[r] = INF
            wake = self._boundary(units[r], now, nxt.arrival_s if nxt is not None else INF)
            if nxt is None and self.loop is not None:  # a request ended: its client sent the next
                nxt = next(it, None)
            if wake < INF:
                version[r] += 1
                pending[r] = wake
                heapq.heappush(heap, (wake, order, r, version[r]))
                order += 1
        self._report_unfinished()
        return self

    def _report_unfinished(self) -> None:
        """Record every sequence still queued or running when the events ran out, so that each
        request ends completed, rejected or unfinished (the summary's counts add up)."""
        for rep in self.replicas:
            for seq in [*rep.running, *rep.waiting]:
                self.recorder.request(seq, UNFINISHED)

    def _boundary(self, rep: Replica | DPGroup, now: float, next_arrival_s: float) -> float:
        """A step boundary of ``rep`` at ``now``: finish the step that ends, plan the next one;
        return when ``rep`` needs to act again (infinity: when a request reaches it)."""
        if rep.busy:
            rep.complete()
            if self.loop is not None:  # requests its completions released arrive now
                next_arrival_s = min(next_arrival_s, self.loop.next_arrival_s())
        work = rep.plan(now, next_arrival_s)
        return work.end_s if work is not None else rep.next_ready_s(now)

    def _arrive(self, req: Request) -> int | None:
        """Admit and route one arrival; the replica it went to, or None if rejected."""
        self.arrived += 1
        return admit_and_route(req, self.admission, self.recorder, self.loop, self.router, self.replicas)

    def run_simpy(self, stream: Iterable[Request]) -> Simulation:
        """The same simulation as :meth:`run`, as SimPy processes: one arrival process and one
        engine loop per replica. Arrivals are URGENT events, so at equal times they come first, as in
        :meth:`run`; replicas plan at their own step-end times (SimPy's clock is only used to order
        events, so float round-off in its ``now + delay`` cannot change a step time)."""
        import simpy

        if isinstance(stream, ClosedLoop):
            raise NotImplementedError("closed-loop streams run in Simulation.run")
        if self.units is not self.replicas:
            raise NotImplementedError("lockstep data-parallel ranks run in Simulation.run")
        env = simpy.Environment()
        it: Iterator[Request] = iter(stream)
        peek: list[Request | None] = [next(it, None)]
        wakeup = [env.event() for _ in self.replicas]

        def arrivals():  # noqa: ANN202 - a SimPy process
            while peek[0] is not None:
                req = peek[0]
                yield _Urgent(env, max(req.arrival_s - env.now, 0.0))
                peek[0] = next(it, None)
                r = self._arrive(req)
                if r is not None and not wakeup[r].triggered:
                    wakeup[r].succeed(req.arrival_s)

        def engine(rep: Replica):  # noqa: ANN202 - a SimPy process
            now = 0.0
            while True:
                nxt = peek[0].arrival_s if peek[0] is not None else INF
                wake = self._boundary(rep, now, nxt)
                if rep.busy:
                    yield env.timeout(max(wake - env.now, 0.0))
                    now = wake
                    continue
                wakeup[rep.index] = env.event()
                if wake < INF:  # a document load finishes then
                    timer = env.timeout(max(wake - env.now, 0.0), wake)
                    fired = yield wakeup[rep.index] | timer
                    now = min(fired.values())
                else:
                    now = yield wakeup[rep.index]

        env.process(arrivals())
        for rep in self.replicas:
            env.process(engine(rep))
        env.run()
        self._report_unfinished()
        return self


