"""The public Python API, exported from ``kvsim`` (documented with an executed example in
docs/api.md). Models and GPUs are given by catalogue name, by file path, or as loaded specs;
KV methods as the CLI's method strings (``"snapkv:budget=2048+kivi:bits=2"``). Bad input raises
:class:`kvsim.errors.KvsimError`, whose text is the one line the CLI prints."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kvsim.memory import EngineMemoryConfig, MemoryPlan
from kvsim.spec.hardware import HardwareSpec, load_hardware
from kvsim.spec.model import ModelSpec, check_context, load_model

if TYPE_CHECKING:  # the simulator is imported by run_scenario only (predict stays quick to start)
    from kvsim.scenario import RunResult, Scenario


def _specs(model: str | ModelSpec, hardware: str | HardwareSpec) -> tuple[ModelSpec, HardwareSpec]:
    return (load_model(model) if isinstance(model, str) else model,
            load_hardware(hardware) if isinstance(hardware, str) else hardware)


def plan_memory(model: str | ModelSpec, hardware: str | HardwareSpec, method: str = "bf16", tp: int = 1,
                engine: EngineMemoryConfig | None = None) -> MemoryPlan:
    """One replica's memory sized the way vLLM does (``kvsim memory``): weights, activation peak,
    engine overheads and what is left for KV blocks. ``engine`` defaults to vLLM's arguments.

    The plan answers ``fits``, ``num_gpu_blocks``, ``kv_capacity_tokens(context_tokens)``,
    ``max_concurrency(context_tokens)`` and ``max_context(batch)``."""
    from kvsim.kv import layout_for
    from kvsim.memory import plan_memory as plan

    m, hw = _specs(model, hardware)
    return plan(m, hw, layout_for(m, method), tp, engine)


def predict(model: str | ModelSpec, hardware: str | HardwareSpec, batch: int | Sequence[int],
            context: int | Sequence[int] | None = None, prompt: int | None = None, method: str = "bf16",
            tp: int = 1, calibration: str | None = None, data_parallel_size: int = 1,
            expert_parallel: bool = False) -> list[dict]:
    """Step times from the calibrated roofline (``kvsim predict``): one dict per (batch, context)
    with ``decode_step_s``, ``tokens_per_s``, ``breakdown`` (seconds per term) and ``fits``;
    with ``prompt``, also ``prefill_s`` for prefilling ``batch`` prompts of that length. Without
    ``context``, the prefill alone (``prompt`` is then required). ``calibration``: None (the GPU's
    profile), ``"none"`` (pure roofline) or a profile path; each point names the profile used in
    ``calibration``, with ``decode_kernel``: whether decode attention is priced from this method's
    measured kernel, derived from a measured neighbour (by the rule it names), or from a prior, and
    ``cost_notes``: every other term priced by a rule rather than a measured kernel, and how quantized
    weights and routed experts are priced (a prior says PRIOR).
    ``data_parallel_size`` and ``expert_parallel``: vLLM's ``--data-parallel-size`` and
    ``--enable-expert-parallel`` (kvsim.spec.parallel); a point is then one DP rank's step, every rank
    carrying ``batch`` sequences."""
    from kvsim.cost import Batch, CostModel
    from kvsim.cost.execution import vllm_execution
    from kvsim.errors import KvsimError
    from kvsim.kv import layout_for
    from kvsim.memory import VLLM_DEFAULTS
    from kvsim.memory import plan_memory as plan
    from kvsim.spec.parallel import Parallel

    batches = [batch] if isinstance(batch, int) else list(batch)
    contexts = [context] if context is None or isinstance(context, int) else list(context)
    if context is None and prompt is None:
        raise KvsimError("give a context (price decode steps) and/or a prompt (price the prefill)",
                         field="context", value=None)
    m, hw = _specs(model, hardware)
    for c in contexts:
        if c is not None:
            check_context(m, c)
    if prompt is not None:
        check_context(m, prompt, "--prompt")
    layout = layout_for(m, method)
    engine = VLLM_DEFAULTS.resolved(m, hw)  # `vllm serve`'s step limits on this GPU
    par = Parallel(data_parallel_size, expert_parallel)
    mem = plan(m, hw, layout, tp, engine, par)
    budget, seqs = engine.batch
    cost = CostModel(m, hw, layout, tp, calibration, vllm_execution(hw, tp, seqs, budget, engine.vllm_version), par)
    assert cost.allreduce is not None  # vllm_execution prices the all-reduce
    label = {"kind": cost.cal.kind, "label": cost.cal.label, "gpu": cost.cal.gpu, "engine": cost.cal.engine,
             "note": cost.cal.note,
             "allreduce": cost.allreduce.source, "decode_kernel": cost.decode_kernel.as_dict(),
             # the method's rules, then how weights and experts are priced (priors labelled PRIOR)
             "cost_notes": list(cost.cost_notes) + list(cost.notes)}
    points = []
    for b in batches:
        for c in contexts:
            held = c if c is not None else prompt  # tokens each sequence holds in the KV cache
            assert held is not None  # a prompt is given where a context is not (checked above)
            fits = mem.fits and int(mem.max_concurrency(held)[0]) >= b
            point: dict = {"batch": b, "context": c, "fits": fits}
            if c is not None:
                step = cost.step(Batch(decode_context=np.full(b, c, dtype=np.int64)))
                point.update({"decode_step_s": step.total_s, "tokens_per_s": b / step.total_s,
                              "breakdown": step.breakdown, "bound": {o.name: o.bound for o in step.ops}})
            if not fits:
                point["reason"] = mem.reason if not mem.fits else \
                    f"{b} sequences of {held} tokens exceed the {mem.num_gpu_blocks} KV blocks"
            if prompt:
                pre = cost.step(Batch(prefill_tokens=np.full(b, prompt), prefill_context=np.zeros(b)))
                point["prefill_s"] = pre.total_s
                point["prefill_breakdown"] = pre.breakdown
            point["calibration"] = label
            points.append(point)
    return points


def run_scenario(scenario: str | Path | dict | Scenario, overrides: Sequence[str] = (), *,
                 progress: bool = False) -> RunResult:
    """Simulate a serving scenario (``kvsim run``): a scenario YAML path, a mapping of the same
    keys (docs/scenario.md), or a loaded :class:`~kvsim.scenario.Scenario`; ``overrides`` are
    ``--set``-style ``"key=value"`` strings. The result's ``summary`` is the JSON ``kvsim run``
    prints; ``kvsim.scenario.write_outputs(result, folder)`` writes its files."""
    from kvsim.scenario import Scenario, load_scenario, scenario_from_dict
    from kvsim.scenario import run_scenario as run

    if isinstance(scenario, dict):
        from kvsim.scenario.load import apply_sets

        scenario = scenario_from_dict(apply_sets(scenario, overrides, "<dict>"), "<dict>")
    elif not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario, overrides)
    return run(scenario, progress=progress)
