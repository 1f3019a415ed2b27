"""The two KV-cache layouts the paged attention kernel reads, behind one interface.

- `SPLIT` (`paged_attention`): k_pages, v_pages [Hkv, P, page_size, D]. One DMA per page and per
  array moves the page of `hb` heads ([hb, page_size, D], strided over the head dim) into
  [2 (slot), hb, kv_tokens, D] VMEM buffers; K of head h is the buffer's row block h.
- `INTERLEAVED` (`ragged_paged_attention`, jax's layout): kv_pages [P, page_size, 2 Hkv, D], K of
  head h at combined head 2h, V at 2h + 1. The wrapper views it as [P, page_size * 2 Hkv, D]
  (merging two major dims: XLA makes it a bitcast, no data moves), so one contiguous DMA per
  page moves every head's K and V into a [2 (slot), kv_tokens * 2 Hkv, D] buffer; K and V of
  head h are strided loads of it (`InterleavedKV`). The cache is read where it lies: no
  transpose or copy in HBM. A grid step takes every KV head (hb = Hkv).

The kernel body (`pallas_ops.paged.kernel`) only calls the methods below, so both layouts share
its schedule: the work list, the double buffering, the tail chunks and the online softmax.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

SPLIT = "split"
INTERLEAVED = "interleaved"


class SplitKV:
    """K and V in two arrays, heads leading: the buffers are [2, hb, kv_tokens, D] each."""

    def __init__(self, k_hbm, v_hbm, k_buf, v_buf, sems):
        self.k_hbm, self.v_hbm, self.k_buf, self.v_buf, self.sems = k_hbm, v_hbm, k_buf, v_buf, sems
        self.dtype = k_buf.dtype
        self.total_pages = k_hbm.shape[1]
        self.hb = k_buf.shape[1]

    def copies(self, page, dst, slot, h0):
        """The DMAs of one page (all hb heads from h0) into token rows `dst` of buffer `slot`."""
        ck = pltpu.make_async_copy(self.k_hbm.at[pl.ds(h0, self.hb), page],
                                   self.k_buf.at[slot, :, dst], self.sems.at[0, slot])
        cv = pltpu.make_async_copy(self.v_hbm.at[pl.ds(h0, self.hb), page],
                                   self.v_buf.at[slot, :, dst], self.sems.at[1, slot])
        return ck, cv

    def wait(self, slot, rows):
        """Wait for the bytes of token rows `rows` of buffer `slot` (sizes matter only)."""
        for kv, buf in ((0, self.k_buf), (1, self.v_buf)):
            dst = buf.at[slot, :, rows]
            pltpu.make_async_copy(dst, dst, self.sems.at[kv, slot]).wait()

    def prepare(self, slot):
        """Nothing to do: K and V of a head are whole row blocks of the buffers."""

    def k(self, slot, h):
        return self.k_buf[slot, h]          # [kv_tokens, D]

    def v(self, slot, h):
        return self.v_buf[slot, h]          # [kv_tokens, D]

    def keep_rows(self, slot, rows, n_rows, keep):
        """Zero V token rows `rows` (n_rows of them) of buffer `slot` from row `keep` on."""
        row = lax.broadcasted_iota(jnp.int32, (n_rows, self.v_buf.shape[-1]), 0)
        for h in range(self.hb):
            v = self.v_buf[slot, h, rows]
            self.v_buf[slot, h, rows] = jnp.where(row < keep, v, jnp.zeros_like(v))

    def zero_rows(self, slot, rows, n_rows):
        """Zero V token rows `rows` (n_rows of them) of buffer `slot`."""
        for h in range(self.hb):
            self.v_buf[slot, h, rows] = jnp.zeros((n_rows, self.v_buf.shape[-1]),
                                                  self.v_buf.dtype)


class InterleavedKV:
    """K and V interleaved per head in one array, viewed as [P, page_size * 2 Hkv, D] (row =
    token * 2 Hkv + combined head): the buffer is [2, kv_tokens * 2 Hkv, D], every KV head.

    32-bit caches: K of head h is the sublane-strided load of rows 2h, 2h + 2 Hkv, ... (one
    vector load per 8 tokens). 16-bit caches pack rows 2h and 2h + 1 (K and V of head h) into
    one 32-bit word, and Mosaic's strided loads of packed types take a row at a time: so
    `prepare` stores the block once as 32-bit words (`words`, [kv_tokens * Hkv, D] uint32, row
    = token * Hkv + h), and K / V of head h are the strided word loads, low / high halves.
    """

    def __init__(self, kv_hbm, kv_buf, sems, words, *, num_kv_heads):
        self.kv_hbm, self.kv_buf, self.sems, self.words = kv_hbm, kv_buf, sems, words
        self.dtype = kv_buf.dtype
        self.total_pages = kv_hbm.shape[0]
        self.hb = num_kv_heads
        self.c = 2 * num_kv_heads                  # rows per token
        self.kv_tokens = kv_buf.shape[1] // self.c
        self.page_rows = kv_hbm.shape[1]           # page_size * c

    def _rows(self, tokens):
        """Token rows (a pl.ds starting at a whole page) as rows of the flat buffer."""
        start = tokens.start * self.c
        if not isinstance(start, int):
            start = pl.multiple_of(start, self.page_rows)
        return pl.ds(start, tokens.size * self.c)

    def copies(self, page, dst, slot, h0):
        del h0   # every head: the whole page, one contiguous DMA
        return (pltpu.make_async_copy(self.kv_hbm.at[page], self.kv_buf.at[slot, self._rows(dst)],
                                      self.sems.at[0, slot]),)

    def wait(self, slot, rows):
        dst = self.kv_buf.at[slot, self._rows(rows)]
        pltpu.make_async_copy(dst, dst, self.sems.at[0, slot]).wait()

    def prepare(self, slot):
        if self.words is not None:   # [kv_tokens * 2 Hkv, D] 16-bit -> [kv_tokens * Hkv, D] words
            self.words[...] = pltpu.bitcast(self.kv_buf[slot], jnp.uint32)

    def _words(self, h):
        return self.words[pl.ds(h, self.kv_tokens, stride=self.hb), :]   # [kv_tokens, D] u32

    def k(self, slot, h):   # [kv_tokens, D]
        if self.words is None:
            return self.kv_buf[slot, pl.ds(2 * h, self.kv_tokens, stride=self.c), :]
        return pltpu.bitcast(self._words(h).astype(jnp.uint16), self.dtype)     # low halves

    def v(self, slot, h):
        if self.words is None:
            return self.kv_buf[slot, pl.ds(2 * h + 1, self.kv_tokens, stride=self.c), :]
        return pltpu.bitcast((self._words(h) >> 16).astype(jnp.uint16), self.dtype)

    def keep_rows(self, slot, rows, n_rows, keep):
        """Zero token rows (K and V of every head: one store) from row `keep` on."""
        flat = self._rows(rows)
        row = lax.broadcasted_iota(jnp.int32, (n_rows * self.c, self.kv_buf.shape[-1]), 0)
        kv = self.kv_buf[slot, flat]
        self.kv_buf[slot, flat] = jnp.where(row < keep * self.c, kv, jnp.zeros_like(kv))

    def zero_rows(self, slot, rows, n_rows):
        self.kv_buf[slot, self._rows(rows)] = jnp.zeros((n_rows * self.c, self.kv_buf.shape[-1]),
                                                        self.kv_buf.dtype)
