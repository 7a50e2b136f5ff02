"""A request inside the engine (its token counters, blocks and timestamps), the per-sequence block
tables every KV method reduces to, and the prefix-cache keys of a prompt under a SafeKV policy.

Token accounting follows vLLM v1: ``computed`` tokens have KV in the cache; the sequence knows
``prompt + generated`` tokens; a step schedules ``total - computed`` of them (a prefill chunk, or the
one token of a decode step) and, once ``computed`` catches up with ``total``, samples one new token.
A decode step is therefore the special case "one token to compute, at least one already sampled",
and recomputation after a preemption is just a longer prefill over prompt + generated tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from kvsim.kv.layout import KVLayout
from kvsim.memory import MemoryPlan
from kvsim.serve.workload import Request, chain_hash, expand_block_hashes, mix64

_M64 = float(2**64)


class Seq:
    """Mutable engine state of one request (plain slots class: the scheduler touches it every step)."""

    __slots__ = ("req", "prompt", "out", "dropped", "keys", "computed", "generated", "held", "block_keys",
                 "registered", "ready_s", "swapped_blocks", "first_token_s", "finish_s", "hit_tokens",
                 "cross_user_hit", "doc_tokens", "preemptions", "admissions", "replica", "scheduled")

    def __init__(self, req: Request, prompt: int, out: int, dropped: int, keys: tuple[int, ...]) -> None:
        self.req = req
        self.prompt = prompt  # tokens to prefill: text + image tokens
        self.out = out  # output tokens to generate (clamped to the context)
        self.dropped = dropped  # prompt tokens merged away after prefill (LightKV vision tokens)
        self.keys = keys  # prefix-cache keys of the prompt's full blocks (engine block size)
        self.computed = 0  # tokens whose KV is in the cache
        self.generated = 0  # output tokens sampled
        self.held = 0  # blocks held (BlockManager protocol)
        self.block_keys: list[int] = []  # cached blocks held (BlockManager protocol)
        self.registered = 0  # leading keys whose blocks this sequence holds as cached
        self.ready_s = 0.0  # MatKV: when the document KV has arrived from SSD
        self.swapped_blocks = 0  # blocks parked in host memory by a swap preemption
        self.first_token_s = -1.0
        self.finish_s = -1.0
        self.hit_tokens = -1  # prefix-cache hit tokens at the first admission (-1: never admitted)
        self.cross_user_hit = False  # the first admission hit blocks another user cached
        self.doc_tokens = 0  # MatKV: prompt tokens loaded from SSD instead of prefilled
        self.preemptions = 0
        self.admissions = 0
        self.replica = -1
        self.scheduled = 0  # tokens scheduled in the step being planned

    @property
    def total(self) -> int:
        return self.prompt + self.generated

    @property
    def decoding(self) -> bool:
        """One token to compute and at least one sampled: a decode step."""
        return self.generated > 0 and self.computed + 1 == self.prompt + self.generated

    @property
    def stored(self) -> int:
        """KV entries held once the prompt is prefilled (what a decode step attends over)."""
        return self.computed - self.dropped


class BlockTables:
    """Blocks one sequence holds as a function of its tokens, read from the memory plan.

    ``decode[t]`` is ``plan.blocks_for(t)`` (after any compression: eviction budgets, quantization
    residual windows, offload tiers, sliding windows), ``prefill[t]`` is
    ``plan.prefill_blocks_for(t)`` (the transient view while a prompt is written). Tables grow on
    demand, so a 10M-token context model costs only the lengths requests actually reach.
    """

    def __init__(self, plan: MemoryPlan, initial_tokens: int = 4096) -> None:
        self.plan = plan
        self.block_size = plan.engine.block_size
        self.size = 0
        self.decode_arr = np.zeros(0, dtype=np.int64)
        self.prefill_arr = np.zeros(0, dtype=np.int64)
        self.decode: list[int] = []
        self.prefill: list[int] = []
        self.ensure(initial_tokens)

    def ensure(self, tokens: int) -> None:
        """Make both tables cover ``0..tokens``."""
        if tokens < self.size:
            return
        n = max(tokens + 1, 2 * self.size)
        t = np.arange(n, dtype=np.int64)
        self.decode_arr = self.plan.blocks_for(t)
        self.prefill_arr = self.plan.prefill_blocks_for(t)
        self.decode = self.decode_arr.tolist()
        self.prefill = self.prefill_arr.tolist()
        self.size = n

    @property
    def token_paged(self) -> bool:
        """Whether memory is paged by token blocks (block i holds tokens i*bs..(i+1)*bs-1 of every
        layer, before and after prefill): only then can a block be shared by prefix hash."""
        t = np.arange(self.size, dtype=np.int64)
        pages = -(-t // self.block_size)
        return bool(np.array_equal(self.decode_arr, pages) and np.array_equal(self.prefill_arr, pages))


def _salt(text: str) -> int:
    # Python's hash() of str is salted per process; blake2b gives the same salt in every run.
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def prompt_keys(req: Request, block_size: int, policy: str, sensitive_fraction: float,
                seed: int) -> tuple[int, ...]:
    """Prefix-cache keys of ``req``'s full prompt blocks of ``block_size`` tokens, under a SafeKV
    sharing policy (arXiv 2508.08438):

    * ``global``: the content hash, shared by every user;
    * ``user``: salted by the user id, so only the same user can hit (per-user isolation);
    * ``selective``: the privacy detector flags each block as sensitive with probability
      ``sensitive_fraction`` (drawn from the block hash and ``seed``, so it is the same block in
      every request); from the first flagged block on, keys are salted by user (a later block's
      prefix contains the private one), while the blocks before it stay shared.

    Requests without a user id form one anonymous user.
    """
    if not req.prefix_hashes:
        return ()
    if req.prefix_block_tokens == block_size:
        keys: Sequence[int] = req.prefix_hashes
    else:
        keys = expand_block_hashes(req.prefix_hashes, req.prefix_block_tokens, block_size, req.input_tokens)
    if policy == "global" or not keys:
        return tuple(keys)
    user = _salt(req.user_id or "")
    first_private = 0
    if policy == "selective":
        label_salt = mix64(seed ^ 0x5AFE)
        threshold = sensitive_fraction * _M64
        first_private = next((i for i, k in enumerate(keys) if mix64(k ^ label_salt) < threshold), len(keys))
    return tuple(keys[:first_private]) + tuple(chain_hash(user, k) for k in keys[first_private:])


def reusable(layout: KVLayout, prompt: int, image_tokens: int) -> bool:
    """A prompt whose stored KV is not its token stream (merged vision tokens) cannot be shared."""
    return int(layout.stored_tokens(np.array([prompt]), image_tokens)[0]) == prompt
