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
"""

from __future__ import annotations

from collections import OrderedDict

from kvsim.serve.sequence import Seq

ROUTERS = ("round_robin", "least_outstanding_tokens", "prefix_affinity")

# SGLang Model Gateway defaults for --policy cache_aware (--cache-threshold 0.3,
# --balance-abs-threshold 64, --balance-rel-threshold 1.5).
CACHE_THRESHOLD = 0.3
BALANCE_ABS = 64
BALANCE_REL = 1.5


class Router:
    """Picks a replica per request and tracks the load it has sent to each."""

    def __init__(self, policy: str, replicas: int, block_size: int, mirror_blocks: int) -> None:
        if policy not in ROUTERS:
            raise ValueError(f"policy(={policy!r}) must be one of {ROUTERS}")
        self.policy = policy
        self.n = replicas
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
        self.tokens[seq.replica] -= seq.prompt + seq.out
        self.requests[seq.replica] -= 1

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
