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

- `QuantSplitKV` (`paged_attention` over an 8-bit cache): `SPLIT`'s int8 / fp8 pages plus a scale
  per (KV head, token). The wrapper gathers the scales of each sequence's page table into
  [Hkv, S, L] f32 rows (a TPU DMA moves contiguous runs of a multiple of 512 bytes, and one
  page's scales are page_size * 4 bytes: too small to DMA page by page), and one DMA per KV
  block and array moves the block's [hb, kv_tokens (rounded up to 128)] scales, a lane vector
  per head. K and V are widened to the compute dtype in VMEM (int8 and fp8 values are exact in
  bf16); the K scale multiplies the score columns, the V scale multiplies p before p.V.

The kernel body (`pallas_ops.paged.kernel`) only calls the methods below, so the layouts share
its schedule: the work list, the double buffering, the tail chunks and the online softmax.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

SPLIT = "split"
INTERLEAVED = "interleaved"
QUANT_SPLIT = "quant_split"   # SPLIT over 8-bit pages with per-(head, token) scales


class _PlainCache:
    """The per-block hooks of an unscaled (bf16 / f32) cache: nothing to move, nothing to scale."""

    def block_copies(self, seq, first_slot, slot, h0):
        """DMAs made once per KV block (not per page): none for plain caches."""
        return ()

    def wait_block(self, slot):
        """Wait for `block_copies`."""

    def k_scale(self, slot, h):
        """[1, kv_tokens] f32 K scale per key, or None (plain cache)."""
        return None

    def v_scale(self, slot, h):
        return None

    def zero_scales(self, slot, begin, end):
        """Zero the V scales of keys outside [begin, end) (plain caches: nothing)."""


class SplitKV(_PlainCache):
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


class QuantSplitKV(SplitKV):
    """`SplitKV` over 8-bit pages, with per-(head, token) scales: K/V buffers [2, hb, kv_tokens,
    D] int8/fp8, scale buffers [2, hb, scale_lanes] f32 filled from the gathered scale rows
    [Hkv, S, L] (`scale_lanes` = kv_tokens rounded up to 128: whole 512-byte DMA runs)."""

    def __init__(self, k_hbm, v_hbm, ks_hbm, vs_hbm, k_buf, v_buf, ks_buf, vs_buf, sems, ssems, *,
                 compute_dtype, page_size):
        super().__init__(k_hbm, v_hbm, k_buf, v_buf, sems)
        self.ks_hbm, self.vs_hbm, self.ks_buf, self.vs_buf = ks_hbm, vs_hbm, ks_buf, vs_buf
        self.ssems = ssems
        self.dtype = compute_dtype
        self.page_size = page_size
        self.kv_tokens = k_buf.shape[2]
        self.lanes = ks_buf.shape[2]

    def block_copies(self, seq, first_slot, slot, h0):
        start = first_slot * self.page_size
        if not isinstance(start, int):
            start = pl.multiple_of(start, 128)
        src = pl.ds(start, self.lanes)
        return tuple(
            pltpu.make_async_copy(hbm.at[pl.ds(h0, self.hb), seq, src], buf.at[slot],
                                  self.ssems.at[i, slot])
            for i, (hbm, buf) in enumerate(((self.ks_hbm, self.ks_buf),
                                            (self.vs_hbm, self.vs_buf))))

    def wait_block(self, slot):
        for i, buf in enumerate((self.ks_buf, self.vs_buf)):
            pltpu.make_async_copy(buf.at[slot], buf.at[slot], self.ssems.at[i, slot]).wait()

    def _widen(self, x):
        # 8-bit -> f32 -> compute dtype: exact, and the path Mosaic lowers on every generation
        # (v5e / v5p have no fp8 MXU path: the matmuls run in the compute dtype).
        return x.astype(jnp.float32).astype(self.dtype)

    def k(self, slot, h):
        return self._widen(self.k_buf[slot, h])            # [kv_tokens, D]

    def v(self, slot, h):
        return self._widen(self.v_buf[slot, h])

    def k_scale(self, slot, h):
        return self.ks_buf[slot, pl.ds(h, 1), pl.ds(0, self.kv_tokens)]     # [1, kv_tokens]

    def v_scale(self, slot, h):
        return self.vs_buf[slot, pl.ds(h, 1), pl.ds(0, self.kv_tokens)]

    def zero_scales(self, slot, begin, end):
        # Keys without real data (pages not loaded, rows past kv_len; their page-table slots may
        # point anywhere) or left of a sliding window may have NaN scales and, in fp8, NaN / inf
        # values: zero their V scales and V rows, so p * scale * v stays 0 there (K scales are
        # masked with the scores). The whole buffer is selected at once: 8-bit rows tile by 32,
        # so page-sized row slices (16 rows) are not addressable on their own.
        lane = lax.broadcasted_iota(jnp.int32, (self.hb, self.lanes), 1)
        vs = self.vs_buf[slot]
        self.vs_buf[slot] = jnp.where((lane >= begin) & (lane < end), vs, 0.0)
        if self.v_buf.dtype != jnp.int8:   # int8 values are always finite
            row = lax.broadcasted_iota(jnp.int32, self.v_buf.shape[2:], 0)
            for h in range(self.hb):
                v = self.v_buf[slot, h]
                self.v_buf[slot, h] = jnp.where((row >= begin) & (row < end), v,
                                                jnp.zeros_like(v))

    def keep_rows(self, slot, rows, n_rows, keep):
        """Nothing: `zero_scales` sanitises the whole block."""

    def zero_rows(self, slot, rows, n_rows):
        """Nothing: `zero_scales` sanitises the whole block."""


class InterleavedKV(_PlainCache):
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
