"""Data-parallel attention and expert parallelism of a MoE deployment, as vLLM runs them
(``--data-parallel-size``, ``--enable-expert-parallel``).

A data-parallel group is ``dp`` engine ranks behind one endpoint, each a TP group of ``tp`` GPUs
running its own scheduler, batch and KV cache; attention and the dense parts of the model
(embeddings, LM head, attention, shared experts, dense MLPs) are replicated per DP rank and
TP-sharded within it. The routed experts are spread over all ``dp x tp`` GPUs (vLLM
vllm/config/parallel.py ``ParallelConfig.data_parallel_size``: "MoE layers will be sharded according
to the product of the tensor [...] and data parallel sizes"; FusedMoEParallelConfig in
vllm/model_executor/layers/fused_moe/config.py):

* expert parallelism on: an EP group of ``dp x tp`` GPUs, each holding whole experts; vLLM's
  ``determine_expert_map`` (vllm/model_executor/layers/fused_moe/layer.py) gives each rank
  ``E // ep`` experts and the first ``E % ep`` ranks one more, so an uneven split is allowed;
* off (with ``dp > 1``): every GPU holds every expert, each expert's intermediate dimension split
  over the flattened ``dp x tp`` ranks.

Either way each MoE layer first gathers the hidden states of every DP rank's tokens and afterwards
scatters the summed outputs back: vLLM's default all-to-all backend on one node,
``allgather_reducescatter`` (``ParallelConfig.all2all_backend``; ``AgRsAll2AllManager`` in
vllm/distributed/device_communicators/all2all.py: ``all_gatherv`` over the DP group to dispatch,
``reduce_scatterv`` to combine). A dense model's DP ranks are independent engines sharing one load
balancer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvsim.errors import KvsimError
from kvsim.spec.model import ModelSpec


@dataclass(frozen=True)
class Parallel:
    """vLLM's ``--data-parallel-size`` (``dp``) and ``--enable-expert-parallel`` of one deployment;
    the TP degree is passed beside it, as everywhere in kvsim."""

    dp: int = 1
    expert_parallel: bool = False

    def ep_size(self, tp: int) -> int:
        """GPUs the routed experts are spread over as whole experts (1: none, experts TP-sharded)."""
        return self.dp * tp if self.expert_parallel else 1


SINGLE = Parallel()  # one engine rank, experts TP-sharded: what kvsim modelled before DP and EP


def expert_shard(model: ModelSpec, tp: int, par: Parallel) -> tuple[int, int]:
    """(routed experts one GPU holds, the split of each expert's intermediate dimension) on the GPU
    holding the most experts (``determine_expert_map``: the first ``E % ep`` ranks hold one more)."""
    assert model.moe is not None
    ep = par.ep_size(tp)
    if ep > 1:
        return -(-model.moe.num_experts // ep), 1
    return model.moe.num_experts, tp * par.dp


def gathers_tokens(model: ModelSpec, par: Parallel) -> bool:
    """Whether each MoE layer all-gathers every DP rank's tokens (and the ranks step in lockstep)."""
    return par.dp > 1 and model.moe is not None and any(layer.moe for layer in model.layers)


def check_parallel(model: ModelSpec, tp: int, par: Parallel, max_gpus: int) -> None:
    """The bad inputs vLLM refuses, or kvsim cannot express, as one-line errors."""
    if isinstance(par.dp, bool) or not isinstance(par.dp, int) or par.dp < 1:
        raise KvsimError("must be a positive integer", field="data_parallel_size", value=par.dp)
    if par.expert_parallel and model.moe is None:
        raise KvsimError(f"{model.name} is a dense model: it has no experts to spread over GPUs",
                         field="expert_parallel", value=True)
    if tp > max_gpus:  # vLLM spans nodes only with a Ray or multi-node launch, whose links kvsim does not price
        raise KvsimError(f"more than one node's {max_gpus} GPUs (kvsim models single-node tensor parallelism)",
                         field="tp", value=tp)
    if tp * par.dp > max_gpus:
        raise KvsimError(f"tp x data_parallel_size = {tp} x {par.dp} = {tp * par.dp} GPUs, more than one node's "
                         f"{max_gpus} (kvsim models single-node data parallelism)",
                         field="data_parallel_size", value=par.dp)
    ep = par.ep_size(tp)
    if model.moe is not None and ep > model.moe.num_experts:
        raise KvsimError(f"the EP group (tp x data_parallel_size = {ep} GPUs) is larger than {model.name}'s "
                         f"{model.moe.num_experts} routed experts: some GPUs would hold none",
                         field="data_parallel_size", value=par.dp)


def max_rank_load(mean: np.ndarray, ranks: int, most: np.ndarray) -> np.ndarray:
    """Expected token-expert pairs on the most loaded of ``ranks`` EP ranks when each holds on
    average ``mean`` pairs, at most ``most``. kvsim assumes uniform routing (every expert equally
    likely, as an auxiliary balancing loss or EPLB aims for): the maximum of ``ranks`` bins filled by
    ``m`` balls is m/n + sqrt(2 (m/n) ln n) (Raab and Steger, "Balls into Bins - A Simple and Tight
    Analysis", RANDOM 1998, theorem 1, the heavily loaded case). Skewed real routing is worse: the
    DeepSeek-V3 report (arXiv 2412.19437 sec. 3.4) replicates hot experts for that reason."""
    if ranks <= 1:
        return mean
    spread = np.sqrt(2.0 * np.maximum(mean, 0.0) * math.log(ranks))
    return np.minimum(mean + spread, np.maximum(most, mean))
