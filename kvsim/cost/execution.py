"""How an engine executes a priced step, beyond its kernels: which all-reduce it runs, the CUDA
graph sizes a step's token count is padded to, and the host (CPU) time of each engine step.

vLLM (``VllmConfig._set_cudagraph_sizes``) captures CUDA graphs for token counts ``[1, 2, 4] +
range(8, 256, 8) + range(256, max_graph_size + 1, 16)`` (0.12+: ``vllm/config/vllm.py`` of the 0.12.0,
0.18.0 and 0.24.0 wheels; 0.10.2 and 0.11.0, ``vllm/config/__init__.py``: multiples of 8 all the way,
``[1, 2, 4] + range(8, max_graph_size + 1, 8)``) with ``max_graph_size = min(max_num_seqs * 2, 512)``
(SchedulerConfig's default ``cuda_graph_sizes``), keeping those at most ``max_num_batched_tokens``. A
step of at most the largest size runs the graph of the next captured size up: the model's
token-count work (GEMMs, norms, rotary, activations, all-reduce) is done for the padded count, while
KV writes and sampling touch only the real tokens. Larger steps run without a captured graph.

Host time per step (:class:`HostStep`): vLLM's V1 engine core runs, for every step, the scheduler
(``Scheduler.schedule``), the input preparation of the model runner, the copy of the sampled token ids
to the host and ``Scheduler.update_from_output``; detokenization and streaming run in the separate
front-end process and overlap. Without async scheduling these run between GPU steps (a step takes
GPU + host time); with it, the scheduler works one step ahead of the GPU (vLLM PR #19970, after
NanoFlow, arXiv 2408.12757) and a step takes the longer of the two. Async scheduling is off by default
up to vLLM 0.12 (``vllm/config/scheduler.py``: ``async_scheduling: bool = False``, commit
01230b40128e) and on by default from 0.14 (vLLM issue #27679 "Async Scheduling Plan", PR #27614;
PR #31998 of 2026-01-08 extends the default to speculative decoding); 0.13 is not modelled.

The reference engine of ``validation/`` captures a graph at each exact size and all-reduces with
NCCL: a cost model built without an :class:`Execution` prices it that way.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

from kvsim.cost.collectives import AllReducePricing, vllm_allreduce
from kvsim.errors import KvsimError
from kvsim.spec.hardware import HardwareSpec

# PRIOR (not measured by kvsim, not fitted to any serving result): the engine loop's CPU time per
# step, as a fixed part plus a part per scheduled sequence, for versions whose host time kvsim has not
# fitted (async scheduling, 0.14+: it counts only where it outlasts the GPU's step).
#  - per sequence: 12.7 us, the V1 scheduler's all-decode cost per running request at the batch cap
#    (openfabric-systems/simllm PR #204, a cProfile of vLLM 0.27.1's engine loop; a CPU build, and the
#    study marks its absolute figures uncertified: run-to-run drift 29.5%).
#  - fixed: the whole loop measured with a no-op model (tenstorrent/vllm PR #305: 0.62 ms per step at
#    32 sequences, a vLLM V1 fork with its own model runner) less 32 x the per-sequence part.
# Both are host-CPU figures of other machines; the real figure depends on the host CPU and TP.
HOST_PER_SEQUENCE_S = 12.7e-6
HOST_FIXED_S = 0.62e-3 - 32 * HOST_PER_SEQUENCE_S
HOST_SOURCE = ("prior: engine-loop CPU time 0.21 ms + 12.7 us per sequence (no-op-model loop, tenstorrent/vllm "
               "PR #305; V1 scheduler cost per request, openfabric-systems/simllm PR #204)")
SYNC_UNTIL = (0, 13, 0)  # async scheduling off by default before this version
ASYNC_FROM = (0, 14, 0)  # on by default from this one
# Versions without async scheduling: the time between GPU steps fitted on real vLLM 0.12 runs
# (scripts/fit_host_step.py writes it, with its source; tests check it is a fresh fit).
HOST_FIT_FILE = "kvsim/data/vllm_host_step.yaml"


@dataclass(frozen=True)
class HostStep:
    """The engine loop's CPU time per step and whether it overlaps the GPU (async scheduling)."""

    fixed_s: float
    per_sequence_s: float
    overlapped: bool
    source: str

    def seconds(self, sequences: float) -> float:
        return self.fixed_s + self.per_sequence_s * sequences


def vllm_host_step(vllm_version: str, async_scheduling: bool | None = None) -> HostStep:
    """The host time of a vLLM version's engine step: with ``--async-scheduling`` as given
    (``async_scheduling``), else the version's default scheduling mode."""
    from kvsim.memory import V1_FROM, default_vllm_version, parse_version

    version = vllm_version or default_vllm_version()
    v = parse_version(version)
    # vLLM's V1 engine takes --async-scheduling (vllm/config/scheduler.py ``async_scheduling`` in the 0.10.2,
    # 0.11.0 and 0.12.0 wheels); the V0 engine of 0.6.x has no such flag
    if async_scheduling and v < V1_FROM:
        raise KvsimError(f"vLLM {version} has no --async-scheduling (its V1 engine, 0.10.2+ in kvsim, has)",
                         field="async_scheduling", value=async_scheduling)
    if async_scheduling is None and SYNC_UNTIL <= v < ASYNC_FROM:
        raise KvsimError("whether async scheduling is on by default in vLLM 0.13 is not modelled (off up to 0.12, "
                         "on from 0.14; kvsim/cost/execution.py): set engine.async_scheduling",
                         field="vllm_version", value=version)
    overlapped = v >= ASYNC_FROM if async_scheduling is None else async_scheduling
    mode = "async scheduling: overlaps the GPU" if overlapped else "no async scheduling: adds to the GPU time"
    mode += "" if async_scheduling is None else " (as set)"
    fit = None if overlapped else sync_host_fit()
    if fit is None:
        return HostStep(HOST_FIXED_S, HOST_PER_SEQUENCE_S, overlapped, f"{HOST_SOURCE}; vLLM {version}, {mode}")
    return replace(fit, source=f"{fit.source}; vLLM {version}, {mode}")


@functools.cache
def sync_host_fit() -> HostStep | None:
    """The fitted host time of vLLM without async scheduling (HOST_FIT_FILE), or None before one is
    fitted (scripts/fit_host_step.py fits it against the prior)."""
    from kvsim.fileio import data_file, load_data_file

    if not data_file(HOST_FIT_FILE).is_file():
        return None
    data = load_data_file(HOST_FIT_FILE)["sync"]
    return HostStep(float(data["fixed_s"]), float(data["per_sequence_s"]), False, str(data["source"]))


# vLLM --enforce-eager launches every kernel of a step from the CPU: the CPU time per decoder layer,
# fitted by scripts/fit_eager_launch.py on kvsim's reference engine (a labelled prior for vLLM).
EAGER_FIT_FILE = "kvsim/data/eager_launch.yaml"


@functools.cache
def eager_launch() -> tuple[float, str]:
    """(seconds per decoder layer, source) of launching an eager step's kernels (EAGER_FIT_FILE)."""
    from kvsim.fileio import load_data_file

    data = load_data_file(EAGER_FIT_FILE)["eager"]
    return float(data["layer_s"]), str(data["source"])


@dataclass(frozen=True)
class Execution:
    """An engine's all-reduce, CUDA-graph padding and per-step host time."""

    allreduce: AllReducePricing
    cuda_graph_sizes: tuple[int, ...]  # ascending; empty: every step runs at its own size
    host: HostStep
    eager: bool = False  # --enforce-eager: no CUDA graphs, every kernel launched from the CPU

    def padded_tokens(self, tokens: float) -> float:
        """The token count a step of ``tokens`` runs at (its captured graph's size)."""
        sizes = self.cuda_graph_sizes
        if not sizes or tokens > sizes[-1] or not float(tokens).is_integer():
            return tokens
        return float(sizes[bisect.bisect_left(sizes, int(tokens))])


STEP_16_FROM = (0, 12, 0)  # graphs every 16 tokens past 256 from this version (module docstring)


def vllm_graph_sizes(max_num_seqs: int, max_num_batched_tokens: int,
                     capture_sizes: Sequence[int] | None = None, vllm_version: str = "") -> tuple[int, ...]:
    """The token counts vLLM captures graphs for: its default list for ``vllm_version`` ("": kvsim's
    default version), or ``--cudagraph-capture-sizes`` (sorted, without repeats), keeping those at most
    ``max_num_batched_tokens``."""
    from kvsim.memory import default_vllm_version, parse_version

    if capture_sizes is not None:
        return tuple(s for s in sorted(set(capture_sizes)) if s <= max_num_batched_tokens)
    largest = min(max_num_seqs * 2, 512)
    past_256 = 16 if parse_version(vllm_version or default_vllm_version()) >= STEP_16_FROM else 8
    sizes = [1, 2, 4, *range(8, 256, 8), *range(256, largest + 1, past_256)]
    return tuple(s for s in sizes if s <= min(largest, max_num_batched_tokens))


def vllm_execution(hw: HardwareSpec, tp: int, max_num_seqs: int, max_num_batched_tokens: int,
                   vllm_version: str, capture_sizes: Sequence[int] | None = None,
                   enforce_eager: bool = False, async_scheduling: bool | None = None) -> Execution:
    """vLLM's execution of a TP group of ``hw`` GPUs with these scheduler limits (``vllm_version``
    "": the default modelled version; ``capture_sizes``: ``--cudagraph-capture-sizes``, None for
    vLLM's default list; ``enforce_eager``: ``--enforce-eager``, which captures no graph, so no step is
    padded; ``async_scheduling``: ``--async-scheduling`` on or off, None for the version's default)."""
    sizes = () if enforce_eager else vllm_graph_sizes(max_num_seqs, max_num_batched_tokens, capture_sizes,
                                                      vllm_version)
    return Execution(vllm_allreduce(hw, tp), sizes, vllm_host_step(vllm_version, async_scheduling), enforce_eager)
