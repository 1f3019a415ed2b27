"""8-bit KV caches in the decoder (`kv_cache_dtype`): one option for the target's pages and the
draft's context cache. Verification reads the same quantized target cache as autoregressive
decoding, so greedy speculative output equals greedy autoregressive output over the same cache
dtype, token for token (xla backend for full runs, interpreted Pallas for a few steps), and
sampling gives the same tokens for the same seeds, whenever both decoders store the same K/V.

They store the same bits by construction with a ONE-layer target: its K/V are row-wise functions
of the token embeddings. From the second layer on, a token's K/V depend on attention computed in
a verify block or in a one-token step, which differ in the last float bits; rounding to 8 bits
can turn that into a different stored value and, rarely, a different greedy token (1 of 200 demo
prompts; `bench.e2e --kv-cache-dtype`). So the equality tests use a one-layer target; the
three-layer one checks the cache layout and a short fixed run.
"""
from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from models.decoding import AutoregressiveDecoder, SpeculativeDecoder, generate_autoregressive
from models.draft import DraftModel
from models.kv_cache import make_context_cache, make_paged_cache
from models.target import TargetModel
from models.testing import OracleProposer, perturb_norms, tiny_draft_config, tiny_target_config

CACHE_DTYPES = ("int8", "float8_e4m3fn", "float8_e5m2")
TCFG = tiny_target_config(num_layers=1)
TARGET = perturb_norms(TargetModel(TCFG, rngs=nnx.Rngs(0)), seed=1)
DRAFT = perturb_norms(DraftModel(tiny_draft_config(TCFG), rngs=nnx.Rngs(2)), seed=3)
TCFG3 = tiny_target_config()
TARGET3 = perturb_norms(TargetModel(TCFG3, rngs=nnx.Rngs(4)), seed=5)
DRAFT3 = perturb_norms(DraftModel(tiny_draft_config(TCFG3), rngs=nnx.Rngs(6)), seed=7)
MAX_BATCH, MAX_TOTAL = 4, 48


def _ar(prompts, max_new, dtype, **kw):
    return generate_autoregressive(TARGET, prompts, max_new_tokens=max_new, max_batch=MAX_BATCH,
                                   max_seq_len=MAX_TOTAL, backend="xla", poison=True,
                                   kv_cache_dtype=dtype, **kw)


def _spec(dtype, bs=8, backend="xla", **kw):
    return SpeculativeDecoder(TARGET, DRAFT, max_batch=MAX_BATCH, max_seq_len=MAX_TOTAL,
                              page_size=16, backend=backend, prefill_chunk=32, block_size=bs,
                              poison=True, kv_cache_dtype=dtype, **kw)


@st.composite
def requests(draw):
    n = draw(st.integers(1, MAX_BATCH))
    prompts = [draw(st.lists(st.integers(0, TCFG.vocab_size - 1), min_size=1, max_size=20))
               for _ in range(n)]
    return prompts, draw(st.integers(1, 24))


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
@settings(max_examples=4)
@given(req=requests())
def test_greedy_speculative_equals_greedy_autoregressive_over_the_same_cache(dtype, req):
    prompts, max_new = req
    want = _ar(prompts, max_new, dtype)
    got = _spec(dtype).generate(prompts, max_new_tokens=max_new)
    assert got.tokens == want.tokens
    assert got.finish_reasons == want.finish_reasons


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_oracle_draft_all_accepted_and_sampling_same_seeds(dtype):
    prompts = [[5, 9, 2, 33, 7], [41, 1, 17], [3] * 12]
    want = _ar(prompts, 20, dtype)
    oracle = OracleProposer(want.tokens, vocab_size=TCFG.vocab_size)
    got = _spec(dtype, proposal_override=oracle).generate(prompts, max_new_tokens=20)
    assert got.tokens == want.tokens
    assert all(t == 8 for taus in got.acceptance_lengths for t in taus[:-1])
    # T > 0, greedy drafts (one-hot proposals): the same per-prompt seeds give the same tokens
    # as autoregressive sampling
    want_t = _ar(prompts, 16, dtype, temperature=0.8, seed=11)
    got_t = _spec(dtype, draft_sampling=False).generate(prompts, max_new_tokens=16,
                                                        temperature=0.8, seed=11)
    assert got_t.tokens == want_t.tokens


def test_the_cache_really_is_8_bit():
    dec = SpeculativeDecoder(TARGET3, DRAFT3, max_batch=MAX_BATCH, max_seq_len=MAX_TOTAL,
                             page_size=16, backend="xla", prefill_chunk=32, block_size=8,
                             poison=True, kv_cache_dtype="int8")
    assert len(dec.target_cache) == 3 and len(dec.draft_cache) == 2
    k, v, ks, vs = dec.target_cache[0]
    assert k.dtype == np.int8 and v.dtype == np.int8 and ks.shape == k.shape[:-1]
    kc, vc, kcs, vcs = dec.draft_cache[0]
    assert kc.dtype == np.int8 and kcs.shape == kc.shape[:-1]
    plain = _spec(None)
    assert len(plain.target_cache[0]) == 2 and plain.target_cache[0][0].dtype == TARGET.dtype
    # distinct buffers (the step functions donate each one)
    assert len({id(a) for a in dec.target_cache[0]}) == 4
    # a short run on three layers: the decoder runs and agrees with AR on these prompts
    prompts = [[5, 9, 2, 33, 7], [41, 1, 17]]
    want = generate_autoregressive(TARGET3, prompts, max_new_tokens=12, max_batch=MAX_BATCH,
                                   max_seq_len=MAX_TOTAL, backend="xla", kv_cache_dtype="int8")
    assert dec.generate(prompts, max_new_tokens=12).tokens == want.tokens


def test_pallas_backend_a_few_steps_matches_xla():
    prompts = [[5, 9, 2, 33, 7], [41, 1, 17]]
    want = _ar(prompts, 6, "int8")
    got = SpeculativeDecoder(TARGET, DRAFT, max_batch=2, max_seq_len=24, page_size=16,
                             backend="pallas", prefill_chunk=8, block_size=4, poison=True,
                             kv_cache_dtype="int8").generate(prompts, max_new_tokens=6)
    assert got.tokens == want.tokens


@pytest.mark.parametrize("kw, match", [
    (dict(kv_cache_dtype="int4"), "kv_cache_dtype must be None"),
    (dict(kv_cache_dtype="float16"), "kv_cache_dtype must be None"),
    (dict(kv_cache_dtype="int8", page_size=48), "page_size=48 not supported"),
])
def test_bad_kv_cache_options(kw, match):
    kw.setdefault("page_size", 16)
    with pytest.raises(ValueError, match=match):
        AutoregressiveDecoder(TARGET, max_batch=2, max_seq_len=32, **kw)
    with pytest.raises(ValueError, match=match):
        SpeculativeDecoder(TARGET, DRAFT, max_batch=2, max_seq_len=32, **kw)
    with pytest.raises(ValueError, match="kv_cache_dtype must be None"):
        make_paged_cache(1, 2, 4, 16, 64, np.float32, kv_cache_dtype="uint8")
    with pytest.raises(ValueError, match="kv_cache_dtype must be None"):
        make_context_cache(1, 2, 2, 128, 64, np.float32, kv_cache_dtype="bool")
