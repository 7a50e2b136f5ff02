"""Paged KV block manager with prefix caching (vLLM v1 ``BlockPool`` / ``KVCacheManager`` semantics).

Check-then-commit, in the shape of nano-vllm's ``BlockManager``: the scheduler asks
``can_allocate`` (or compares with ``num_free``) and only then calls ``allocate`` / ``append``;
nothing is half-done. Blocks are *counted*, not named: a sequence holds ``seq.held`` blocks, of which the
ones listed in ``seq.block_keys`` are prefix-cached (shared, reference counted) and the rest are
private. This keeps the per-step cost independent of the number of blocks.

Free blocks sit in one LRU queue, as in vLLM v1's ``FreeKVCacheBlockQueue``: never-used or
uncached blocks and cached blocks whose reference count fell to 0 ("evictable"). Allocation pops
from the front, evicting the hash of a cached block it pops; freeing appends to the back, the
sequence's tail first (vLLM frees a request's blocks in reverse so its prefix root is evicted
last). Runs of uncached blocks are stored as one queue entry (a negative key -> count), cached
blocks as one entry each (key -> 1), so the queue stays short.

Invariant (checked by :meth:`BlockManager.check`): ``used + free_uncached + evictable == total``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Protocol


class HoldsBlocks(Protocol):
    """What the block manager reads and writes on a sequence."""

    held: int  # blocks held, shared ones included
    block_keys: list[int]  # cache keys of the shared (prefix-cached) blocks held, prefix order


class BlockManager:
    """Counts the KV blocks of one replica (one TP group: every rank holds the same pages)."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks(={num_blocks}) must be > 0")
        self.num_blocks = num_blocks
        self.prefix_caching = enable_prefix_caching
        self.num_used = 0
        self.free_uncached = num_blocks
        self.evictable = 0  # cached blocks with no reference (in the free queue)
        self._ref: dict[int, int] = {}  # cache key -> reference count (0: in the free queue)
        # LRU free queue: key < 0 -> run of `count` uncached blocks; key >= 0 -> one cached block.
        self._queue: OrderedDict[int, int] = OrderedDict()
        self._run_id = 0
        if enable_prefix_caching:
            self._push_run(num_blocks)

    # ------------------------------------------------------------------ queries
    @property
    def num_free(self) -> int:
        """Blocks an allocation may take (evicting cached ones if needed)."""
        return self.free_uncached + self.evictable

    @property
    def free_before_eviction(self) -> int:
        """Blocks an allocation may take before it evicts a cached block (the uncached runs at
        the front of the LRU queue; every free block when prefix caching is off)."""
        if not self.prefix_caching:
            return self.free_uncached
        n = 0
        for key, count in self._queue.items():
            if key >= 0:
                break
            n += count
        return n

    def match(self, keys: Sequence[int], limit: int) -> int:
        """Number of leading ``keys`` (at most ``limit``) whose blocks are cached."""
        if not self.prefix_caching:
            return 0
        ref = self._ref
        n = 0
        for key in keys[:limit]:
            if key not in ref:
                break
            n += 1
        return n

    def is_cached(self, key: int) -> bool:
        return key in self._ref

    def can_allocate(self, new_blocks: int, hit_keys: Sequence[int] = ()) -> bool:
        """Whether ``new_blocks`` fresh blocks plus the ``hit_keys`` cached ones can be taken
        (hits on evictable blocks leave the free queue, so they count against it too)."""
        ref = self._ref
        evictable_hits = sum(1 for k in hit_keys if ref[k] == 0) if hit_keys else 0
        return new_blocks + evictable_hits <= self.num_free

    # ------------------------------------------------------------------ commits
    def allocate(self, seq: HoldsBlocks, new_blocks: int, hit_keys: Sequence[int] = ()) -> None:
        """Give ``seq`` references to the cached ``hit_keys`` and ``new_blocks`` private blocks."""
        if hit_keys:
            ref, queue = self._ref, self._queue
            for key in hit_keys:
                r = ref[key]
                if r == 0:
                    del queue[key]
                    self.evictable -= 1
                    self.num_used += 1
                ref[key] = r + 1
            seq.block_keys.extend(hit_keys)
            seq.held += len(hit_keys)
        if new_blocks > 0:
            self._take(new_blocks)
            seq.held += new_blocks

    def append(self, seq: HoldsBlocks, new_blocks: int) -> None:
        """Grow ``seq`` by ``new_blocks`` private blocks (decode crossing a page boundary)."""
        if new_blocks > 0:
            self._take(new_blocks)
            seq.held += new_blocks

    def release(self, blocks: int) -> None:
        """Return ``blocks`` private blocks (of a sequence that shrinks or is freed)."""
        if blocks > 0:
            self.num_used -= blocks
            self.free_uncached += blocks
            if self.prefix_caching:
                self._push_run(blocks)

    def cache(self, seq: HoldsBlocks, keys: Iterable[int]) -> int:
        """Register private blocks of ``seq`` as cached under ``keys`` (its newly full prompt
        blocks). A key already cached (another sequence computed the same block first) stays a
        private duplicate, as vLLM keeps duplicate blocks. Returns the blocks registered."""
        if not self.prefix_caching:
            return 0
        ref = self._ref
        n = 0
        for key in keys:
            if key in ref:
                continue
            ref[key] = 1
            seq.block_keys.append(key)
            n += 1
        return n

    def shrink(self, seq: HoldsBlocks, blocks: int) -> None:
        """Free ``blocks`` private blocks of ``seq`` (eviction after prefill, a sliding window)."""
        if blocks > 0:
            seq.held -= blocks
            self.release(blocks)

    def free(self, seq: HoldsBlocks) -> None:
        """Release every block of ``seq``: private ones first, then its cached ones from the
        last to the first (so a shared prefix root stays cached longest)."""
        private = seq.held - len(seq.block_keys)
        self.release(private)
        if seq.block_keys:
            ref, queue = self._ref, self._queue
            for key in reversed(seq.block_keys):
                r = ref[key] - 1
                ref[key] = r
                if r == 0:
                    queue[key] = 1
                    self.evictable += 1
                    self.num_used -= 1
            seq.block_keys = []
        seq.held = 0

    # ------------------------------------------------------------------ internals
    def _take(self, n: int) -> None:
        if n > self.num_free:
            raise RuntimeError(f"allocate({n}) with only {self.num_free} free blocks: check first")
        self.num_used += n
        if not self.prefix_caching:
            self.free_uncached -= n
            return
        queue, ref = self._queue, self._ref
        while n:
            key, count = queue.popitem(last=False)
            if key < 0:
                take = count if count <= n else n
                if count > take:
                    queue[key] = count - take
                    queue.move_to_end(key, last=False)
                self.free_uncached -= take
                n -= take
            else:
                del ref[key]  # evict the cached block's hash
                self.evictable -= 1
                n -= 1

    def _push_run(self, n: int) -> None:
        queue = self._queue
        if queue:
            last = next(reversed(queue))
            if last < 0:
                queue[last] += n
                return
        self._run_id -= 1
        queue[self._run_id] = n

    def check(self, seqs: Iterable[HoldsBlocks] = ()) -> None:
        """Assert the accounting invariants (test mode): nothing leaks, nothing is counted twice."""
        total = self.num_used + self.free_uncached + self.evictable
        assert total == self.num_blocks, f"blocks leak: used+free+cached={total} != {self.num_blocks}"
        assert min(self.num_used, self.free_uncached, self.evictable) >= 0
        if self.prefix_caching:
            runs = sum(c for k, c in self._queue.items() if k < 0)
            cached = sum(1 for k in self._queue if k >= 0)
            assert runs == self.free_uncached, (runs, self.free_uncached)
            assert cached == self.evictable == sum(1 for r in self._ref.values() if r == 0)
        seqs = list(seqs)
        if seqs or self.num_used == 0:
            private = sum(s.held - len(s.block_keys) for s in seqs)
            shared = sum(1 for r in self._ref.values() if r > 0)
            assert private >= 0 and private + shared == self.num_used, (private, shared, self.num_used)
            refs: dict[int, int] = {}
            for s in seqs:
                for k in s.block_keys:
                    refs[k] = refs.get(k, 0) + 1
            assert all(self._ref.get(k) == n for k, n in refs.items()), "reference counts disagree"
            assert sum(refs.values()) == sum(self._ref.values()), "reference counts disagree"
