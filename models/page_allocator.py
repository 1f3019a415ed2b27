"""Host-side page allocator for the target's paged KV cache.

Pages are handed out per slot (a row of the page table) and returned when the slot's sequence
finishes, so a finished slot can take a new prompt. Pure Python/NumPy: nothing here touches the
device.
"""
from __future__ import annotations

import numpy as np


class OutOfPages(RuntimeError):
    """Not enough free pages for a request."""


class PageAllocator:
    """Free-list allocator over `num_pages` pages for `max_slots` page-table rows.

    `page_table` is int32 [max_slots, pages_per_seq]; entries a slot does not own hold
    `unused_index` (0 by default; tests use a huge index so a stray read fails loudly).

    `parts` > 1 (data parallelism, `models.parallel`): the slots form `parts` contiguous groups
    of max_slots / parts, each with its own pool of num_pages / parts pages, and page ids in the
    table are local to the group's pool (what its device's kernels index).
    """

    def __init__(self, num_pages: int, page_size: int, max_slots: int, pages_per_seq: int, *,
                 unused_index: int = 0, parts: int = 1):
        if num_pages <= 0 or page_size <= 0 or max_slots <= 0 or pages_per_seq <= 0:
            raise ValueError("num_pages, page_size, max_slots and pages_per_seq must be positive")
        if parts <= 0 or num_pages % parts or max_slots % parts:
            raise ValueError(f"parts={parts} must divide num_pages={num_pages} and "
                             f"max_slots={max_slots}")
        self.num_pages, self.page_size = num_pages, page_size
        self.pages_per_seq = pages_per_seq
        self.unused_index = unused_index
        self.parts, self.slots_per_part = parts, max_slots // parts
        per = num_pages // parts                     # pop() hands out low pages first
        self._pools = [list(range(per - 1, -1, -1)) for _ in range(parts)]
        self._owned: list[list[int]] = [[] for _ in range(max_slots)]
        self.page_table = np.full((max_slots, pages_per_seq), unused_index, np.int32)

    def _pool(self, slot: int) -> list[int]:
        return self._pools[slot // self.slots_per_part]

    @property
    def num_free(self) -> int:
        return sum(len(p) for p in self._pools)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def owned(self, slot: int) -> list[int]:
        return list(self._owned[slot])

    def can_allocate(self, slot: int, num_tokens: int) -> bool:
        need = self.pages_for(num_tokens) - len(self._owned[slot])
        return need <= len(self._pool(slot)) and self.pages_for(num_tokens) <= self.pages_per_seq

    def ensure(self, slot: int, num_tokens: int) -> None:
        """Make `slot` own enough pages for `num_tokens` tokens (positions 0..num_tokens-1)."""
        want = self.pages_for(num_tokens)
        if want > self.pages_per_seq:
            raise OutOfPages(f"{num_tokens} tokens need {want} pages > pages_per_seq="
                             f"{self.pages_per_seq}")
        owned = self._owned[slot]
        need = want - len(owned)
        pool = self._pool(slot)
        if need > len(pool):
            raise OutOfPages(f"slot {slot} needs {need} more pages, {len(pool)} free")
        for _ in range(max(need, 0)):
            page = pool.pop()
            self.page_table[slot, len(owned)] = page
            owned.append(page)

    def free(self, slot: int) -> None:
        """Return all pages of `slot` to the free list."""
        self._pool(slot).extend(reversed(self._owned[slot]))
        self._owned[slot] = []
        self.page_table[slot, :] = self.unused_index
