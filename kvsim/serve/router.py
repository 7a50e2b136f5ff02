"""Routers that spread requests over replicas.

A router sees only what a real front end sees at arrival time: which requests it sent where and
which of them have finished (their completions), never a replica's internal step state. That
keeps routing exact under fast-forward (see :mod:`kvsim.serve.replica`).

* ``round_robin``: request i goes to replica i mod R.
* ``least_outstanding_tokens``: the replica with the fewest prompt + output tokens of requests sent
  to it and not finished (ties: lowest index).
* ``prefix_affinity``: SGLang Model Gateway's ``cache_aware`` policy (docs/getting-started/
  load-balancing.md of lightseekorg/smg): while the load is balanced, send a request to the replica
  whose cache (as mirrored by the router) matches the longest prefix of it, if that match covers
  at least ``CACHE_THRESHOLD`` of the prompt; otherwise, or when loads diverge by more than
  ``BALANCE_ABS`` requests and a factor ``BALANCE_REL``, to the least-loaded replica.

With data parallelism (``dp`` ranks per replica) the policy picks the replica and vLLM's own front end
picks the rank within it (:func:`dp_rank`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvsim.serve.sequence import Seq

if TYPE_CHECKING:
    from kvsim.serve.replica import Replica

ROUTERS = ("round_robin", "least_outstanding_tokens", "prefix_affinity")

# vLLM's data-parallel load balancer scores a rank by waiting x 4 + running requests
# (DPLBAsyncMPClient.get_core_engine_for_request, vllm/v1/engine/core_client.py).
DP_WAITING_WEIGHT = 4


def dp_rank(ranks: Sequence[Replica]) -> int:
    """The rank vLLM's front end sends a request to: the lowest ``waiting x 4 + running``, the first
    of equals (its scan starts at the client's index, 0 for one API server). vLLM reads the counts
    from the DP coordinator, published every 100 ms, plus its own sends since; kvsim reads them as
    they are at the arrival."""
    best, best_score = 0, -1
    for i, r in enumerate(ranks):
        score = DP_WAITING_WEIGHT * len(r.waiting) + len(r.running)
        if best_score < 0 or score < best_score:
            best, best_score = i, score
    return best


# SGLang Model Gateway defaults for --policy cache_aware (--cache-threshold 0.3,
# --balance-abs-threshold 64, --balance-rel-threshold 1.5).
CACHE_THRESHOLD = 0.3
BALANCE_ABS = 64
BALANCE_REL = 1.5


class Router:
    """Picks a replica per request and tracks the load it has sent to each."""

    def __init__(self, policy: str, replicas: int, block_size: int, mirror_blocks: int, dp: int = 1) -> None:
        if policy not in ROUTERS:
            raise ValueError(f"policy(={policy!r}) must be one of {ROUTERS}")
        self.policy = policy
        self.n = replicas
        self.dp = dp  # ranks per replica: a sequence's ``replica`` is its rank, replica x dp + rank
        self.block_size = block_size
        self.mirror_blocks = mirror_blocks  # keys remembered per replica: the most its cache holds
        self.tokens = [0] * replicas  # outstanding prompt + output tokens
        self.requests = [0] * replicas  # outstanding requests
        self.count = 0
        self.mirror: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(replicas)]

    def pick(self, seq: Seq) -> int:
        """Choose the replica of ``seq`` and count its load there."""
        if self.n == 1:
            r = 0
        elif self.policy == "round_robin":
            r = self.count % self.n
        elif self.policy == "least_outstanding_tokens" or not seq.keys:
            r = self._least_loaded()
        else:
            r = self._affinity(seq)
        self.count += 1
        self.tokens[r] += seq.prompt + seq.out
        self.requests[r] += 1
        if self.policy == "prefix_affinity" and seq.keys:
            self._remember(r, seq.keys)
        return r

    def done(self, seq: Seq) -> None:
        """``seq`` finished on its replica."""
        r = seq.replica // self.dp
        self.tokens[r] -= seq.prompt + seq.out
        self.requests[r] -= 1

    def _least_loaded(self) -> int:
        return min(range(self.n), key=self.tokens.__getitem__)

    def _affinity(self, seq: Seq) -> int:
        lo, hi = min(self.requests), max(self.requests)
        if hi - lo > BALANCE_ABS and hi > BALANCE_REL * lo:
            return self._least_loaded()
        best, best_match = -1, 0
        for r, keys in enumerate(self.mirror):
            n = 0
            for k in seq.keys:
                if k not in keys:
                    break
                n += 1
            if n > best_match or (n == best_match and n and self.tokens[r] < self.tokens[best]):
                best, best_match = r, n
        if best_match * self.block_size >= CACHE_THRESHOLD * seq.prompt:
            return best
        return self._least_loaded()

    def _remember(self, r: int, keys: tuple[int, ...]) -> None:
        mirror = self.mirror[r]
        for k in keys:
            mirror[k] = None
            mirror.move_to_end(k)
        while len(mirror) > self.mirror_blocks:
            mirror.popitem(last=False)
