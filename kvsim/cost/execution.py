"""How an engine executes a priced step, beyond its kernels: which all-reduce it runs, and the CUDA
graph sizes a step's token count is padded to.

vLLM (``vllm/config/vllm.py``, ``VllmConfig._set_cudagraph_sizes``, v0.10-v0.12) captures CUDA graphs
for token counts ``[1, 2, 4] + range(8, 256, 8) + range(256, max_graph_size + 1, 16)`` with
``max_graph_size = min(max_num_seqs * 2, 512)``, keeping those at most ``max_num_batched_tokens``. A
step of at most the largest size runs the graph of the next captured size up: the model's
token-count work (GEMMs, norms, rotary, activations, all-reduce) is done for the padded count, while
KV writes and sampling touch only the real tokens. Larger steps run without a captured graph.

The reference engine of ``validation/`` captures a graph at each exact size and all-reduces with
NCCL: a cost model built without an :class:`Execution` prices it that way.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from kvsim.cost.collectives import AllReducePricing, vllm_allreduce
from kvsim.spec.hardware import HardwareSpec


@dataclass(frozen=True)
class Execution:
    """An engine's all-reduce and CUDA-graph padding."""

    allreduce: AllReducePricing
    cuda_graph_sizes: tuple[int, ...]  # ascending; empty: every step runs at its own size

    def padded_tokens(self, tokens: float) -> float:
        """The token count a step of ``tokens`` runs at (its captured graph's size)."""
        sizes = self.cuda_graph_sizes
        if not sizes or tokens > sizes[-1] or not float(tokens).is_integer():
            return tokens
        return float(sizes[bisect.bisect_left(sizes, int(tokens))])


def vllm_graph_sizes(max_num_seqs: int, max_num_batched_tokens: int) -> tuple[int, ...]:
    largest = min(max_num_seqs * 2, 512)
    sizes = [1, 2, 4, *range(8, 256, 8), *range(256, largest + 1, 16)]
    return tuple(s for s in sizes if s <= min(largest, max_num_batched_tokens))


def vllm_execution(hw: HardwareSpec, tp: int, max_num_seqs: int, max_num_batched_tokens: int) -> Execution:
    """vLLM's execution of a TP group of ``hw`` GPUs with these scheduler limits."""
    return Execution(vllm_allreduce(hw, tp), vllm_graph_sizes(max_num_seqs, max_num_batched_tokens))
