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
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from kvsim.kv.layout import KVLayout
from kvsim.memory import MemoryPlan
from kvsim.serve.workload import Request, chain_hash, expand_block_hashes


class CacheKeys(Sequence[int]):
    """The prefix-cache key of every full block a sequence will hold: its prompt's content keys
    (shareable, a SharingPolicy's), then keys private to the request for the rest of the prompt and
    its generated tokens. vLLM hashes every full block of a request, generated tokens included
    (vllm/v1/core/kv_cache_manager.py cache_blocks, on num_computed_tokens), and a preempted request's
    freed blocks stay cached until evicted, so a sequence preempted by recompute finds its own blocks
    again when it is admitted again. Private keys lie at and above 2**64 x (request id + 1), outside
    every content key (64-bit hashes), so no other request can hit them. Built lazily: a 32k-token
    prompt's 2,000 keys are not stored."""

    __slots__ = ("content", "base", "n")

    def __init__(self, content: tuple[int, ...], request_id: int, n_blocks: int) -> None:
        self.content = content
        self.base = (request_id + 1) << 64
        self.n = max(n_blocks, len(content))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # noqa: ANN001, ANN204 - int -> int, slice -> tuple
        c, base = self.content, self.base
        if isinstance(i, slice):
            start, stop, step = i.indices(self.n)
            if step != 1:
                raise ValueError("CacheKeys slices are contiguous")
            k = len(c)
            return c[start:min(stop, k)] + tuple(range(base + max(start, k), base + stop))
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        return c[i] if i < len(c) else base + i


class Seq:
    """Mutable engine state of one request (plain slots class: the scheduler touches it every step)."""

    __slots__ = ("req", "prompt", "out", "dropped", "keys", "cache_keys", "computed", "generated", "held",
                 "block_keys", "registered", "ready_s", "swapped_blocks", "first_token_s", "finish_s", "hit_tokens",
                 "cross_user_hit", "doc_tokens", "preemptions", "replica", "scheduled", "scheduled_s", "first_plan")

    def __init__(self, req: Request, prompt: int, out: int, dropped: int, keys: tuple[int, ...],
                 cache_keys: Sequence[int] | None = None) -> None:
        self.req = req
        self.prompt = prompt  # tokens to prefill: text + image tokens
        self.out = out  # output tokens to generate (clamped to the context)
        self.dropped = dropped  # prompt tokens merged away after prefill (LightKV vision tokens)
        self.keys = keys  # prefix-cache content keys of the prompt's full blocks (engine block size)
        # the keys its blocks are cached under (CacheKeys where prefix caching is on; else the content keys)
        self.cache_keys: Sequence[int] = keys if cache_keys is None else cache_keys
        self.computed = 0  # tokens whose KV is in the cache
        self.generated = 0  # output tokens sampled
        self.held = 0  # blocks held (BlockManager protocol)
        self.block_keys: list[int] = []  # cached blocks held (BlockManager protocol)
        self.registered = 0  # leading cache keys whose blocks this sequence holds as cached
        self.ready_s = 0.0  # MatKV: when the document KV has arrived from SSD
        self.swapped_blocks = 0  # blocks parked in host memory by a swap preemption
        self.first_token_s = -1.0
        self.finish_s = -1.0
        self.hit_tokens = -1  # prefix-cache hit tokens at the first admission (-1: never admitted)
        self.cross_user_hit = False  # the first admission hit blocks another user cached
        self.doc_tokens = 0  # MatKV: prompt tokens loaded from SSD instead of prefilled
        self.preemptions = 0
        self.replica = -1
        self.scheduled = 0  # tokens scheduled in the step being planned
        self.scheduled_s = -1.0  # start of the step that first admitted it (-1: never admitted)
        self.first_plan = 0  # the first of its replica's plans that may admit it (Replica.enqueue)

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


class SharingPolicy:
    """Prefix-cache keys of a prompt's full blocks under a SafeKV sharing policy (arXiv 2508.08438).

    * ``global``: the content hash; any user hits any user's blocks (vLLM's default).
    * ``user``: every key salted by the user id; only the same user hits (per-user isolation).
    * ``selective``: blocks the privacy detector passes are shared, the others private to their
      user. kvsim cannot read prompts, so it stands in for the detector with what the workload
      shows: content is non-sensitive once two different users have sent it (a system prompt, a
      template), and private to its first sender until then. From the first private block on, a
      prompt's keys are private (their prefix contains it), as in SafeKV's radix tree. The
      first-sender table remembers the ``memory_keys`` most recently seen blocks.

    Requests without a user id form one anonymous user.
    """

    PUBLIC = ""  # marker in the first-sender table: sent by two users, shared from now on

    def __init__(self, policy: str, block_size: int, memory_keys: int) -> None:
        self.policy = policy
        self.block_size = block_size
        self.memory_keys = memory_keys
        self._first_sender: OrderedDict[int, str] = OrderedDict()

    def keys(self, req: Request) -> tuple[int, ...]:
        if not req.prefix_hashes:
            return ()
        bs = self.block_size
        keys: Sequence[int] = req.prefix_hashes
        if req.prefix_block_tokens != bs:
            keys = expand_block_hashes(keys, req.prefix_block_tokens, bs, req.input_tokens)
        if self.policy == "global" or not keys:
            return tuple(keys)
        user = req.user_id or "anonymous"
        private = 0 if self.policy == "user" else self._shared_blocks(keys, user)
        salt = _salt(user)
        return tuple(keys[:private]) + tuple(chain_hash(salt, k) for k in keys[private:])

    def _shared_blocks(self, keys: Sequence[int], user: str) -> int:
        """Leading blocks that are public; records this user as the first sender of the rest."""
        table = self._first_sender
        n = len(keys)
        for i, k in enumerate(keys):
            sender = table.get(k)
            if sender is None:
                table[k] = user
            elif sender != self.PUBLIC and sender != user:
                table[k] = self.PUBLIC  # a second user sent it: shared template content
            else:
                table.move_to_end(k)
            if table[k] != self.PUBLIC and n == len(keys):
                n = i  # the first private block; later blocks are only recorded
        while len(table) > self.memory_keys:
            table.popitem(last=False)
        return n


def reusable(layout: KVLayout, prompt: int, image_tokens: int) -> bool:
    """A prompt whose stored KV is not its token stream (merged vision tokens) cannot be shared."""
    return int(layout.stored_tokens(np.array([prompt]), image_tokens)[0]) == prompt
