"""The two KV-cache layouts the paged attention kernel reads, behind one interface.

- `SPLIT` (`paged_attention`): k_pages, v_pages [Hkv, P, page_size, D]. One DMA per page and per
  array moves the page of `hb` heads ([hb, page_size, D], strided over the head dim) into
  [2 (slot), hb, kv_tokens, D] VMEM buffers; K of head h is the buffer's row block h.
- `INTERLEAVED` (`ragged_paged_attention`, jax's layout): kv_pages [P, page_size, 2 Hkv, D], K of
  head h at combined head 2h, V at 2h + 1. One DMA per page moves the page's combined heads
  2 h0 .. 2 (h0 + hb) ([page_size, 2 hb, D]) into a [2 (slot), kv_tokens, 2 hb, D] buffer; K of
  head h is the strided sublane load buf[slot, :, 2h, :], V buf[slot, :, 2h + 1, :]. The cache
  is read where it lies: no transpose, no copy.

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
LAYOUTS = (SPLIT, INTERLEAVED)


def sublane_rows(dtype) -> int:
    """Rows of one (sublane) tile of the second-minor dim: 8 for 32-bit, 16 for bf16."""
    return 8 * (4 // jnp.dtype(dtype).itemsize)


class SplitKV:
    """K and V in two arrays, heads leading: the buffers are [2, hb, kv_tokens, D] each."""

    streams = 2   # DMA semaphores per buffer slot: one for K, one for V

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
    """K and V interleaved per head in one array: the buffer is [2, kv_tokens, 2 hb, D]."""

    streams = 1   # one DMA per page moves K and V

    def __init__(self, kv_hbm, kv_buf, sems):
        self.kv_hbm, self.kv_buf, self.sems = kv_hbm, kv_buf, sems
        self.dtype = kv_buf.dtype
        self.total_pages = kv_hbm.shape[0]
        self.hb = kv_buf.shape[2] // 2
        self.all_heads = kv_hbm.shape[2] == kv_buf.shape[2]

    def copies(self, page, dst, slot, h0):
        if self.all_heads:   # the whole page: no slice of the second-minor (sublane) dim
            src = self.kv_hbm.at[page]
        else:                # combined heads 2 h0 .. 2 (h0 + hb): whole sublane tiles
            c0 = pl.multiple_of(2 * h0, 2 * self.hb)
            src = self.kv_hbm.at[page, :, pl.ds(c0, 2 * self.hb)]
        return (pltpu.make_async_copy(src, self.kv_buf.at[slot, dst], self.sems.at[0, slot]),)

    def wait(self, slot, rows):
        dst = self.kv_buf.at[slot, rows]
        pltpu.make_async_copy(dst, dst, self.sems.at[0, slot]).wait()

    def k(self, slot, h):
        return self.kv_buf[slot, :, 2 * h, :]        # [kv_tokens, D], strided sublane load

    def v(self, slot, h):
        return self.kv_buf[slot, :, 2 * h + 1, :]    # [kv_tokens, D]

    def keep_rows(self, slot, rows, n_rows, keep):
        """Zero token rows (K and V of every head: one store) from row `keep` on."""
        _, _, c, d = self.kv_buf.shape
        row = lax.broadcasted_iota(jnp.int32, (n_rows, c, d), 0)
        kv = self.kv_buf[slot, rows]
        self.kv_buf[slot, rows] = jnp.where(row < keep, kv, jnp.zeros_like(kv))

    def zero_rows(self, slot, rows, n_rows):
        _, _, c, d = self.kv_buf.shape
        self.kv_buf[slot, rows] = jnp.zeros((n_rows, c, d), self.kv_buf.dtype)
