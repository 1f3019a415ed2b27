"""The speculative decoder (xla backend): lossless greedy decoding, the all-accepted/bonus paths,
draft state after mixed accept lengths, slot reuse, no retracing, sampling, bad input.

Tiny random-weight f32 models. Decoders over models of the same structure share their compiled
step functions (process-wide cache), so new decoders with the same shapes cost no compile.
"""
from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jax.numpy as jnp

from models.decoding import (AutoregressiveDecoder, SpeculativeDecoder, TRACE_COUNTS,
                            generate_autoregressive)
from models.draft import DraftModel
from models.target import TargetModel
from models.testing import (OracleProposer, perturb_norms, tiny_draft_config,
                            tiny_target_config)

MAX_BATCH = 8
CACHE_LEN = 80          # max_seq_len + block_size, kept constant so every bs shares cache shapes
MAX_TOTAL = 64          # prompt + max_new_tokens in these tests
BLOCK_SIZES = (4, 10, 16)

TCFG = tiny_target_config()
TARGET = perturb_norms(TargetModel(TCFG, rngs=nnx.Rngs(0)), seed=1)
DRAFT = perturb_norms(DraftModel(tiny_draft_config(TCFG), rngs=nnx.Rngs(2)), seed=3)


def spec(bs, **kw):
    kw.setdefault("poison", True)
    return SpeculativeDecoder(TARGET, DRAFT, max_batch=MAX_BATCH, max_seq_len=CACHE_LEN - bs,
                              page_size=16, backend="xla", prefill_chunk=64, block_size=bs, **kw)


def ar(prompts, max_new, **kw):
    return generate_autoregressive(TARGET, prompts, max_new_tokens=max_new, max_batch=MAX_BATCH,
                                   max_seq_len=MAX_TOTAL, backend="xla", poison=True, **kw)


@nnx.jit
def _dense_features(target, draft, tokens):
    """Dense target forward of tokens [1, CACHE_LEN] -> (next-token argmax [CACHE_LEN], per draft
    layer (k, v) of the context projections [CACHE_LEN, Hkv, D])."""
    h, feats = target.dense_forward(tokens, feature_layers=draft.config.target_layer_ids)
    ctx = draft.context(feats)
    pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    kvs = [tuple(x[0] for x in draft.context_kv(i, ctx, pos))
           for i in range(draft.config.num_layers)]
    return jnp.argmax(target.logits(h[0]), -1), kvs


def dense_reference(tokens):
    """Causal, so padding at the end changes nothing before it: pad to one compiled shape."""
    assert len(tokens) <= CACHE_LEN
    padded = jnp.asarray([list(tokens) + [0] * (CACHE_LEN - len(tokens))], jnp.int32)
    return _dense_features(TARGET, DRAFT, padded)


def make_prompts(rng, lengths):
    return [[int(t) for t in rng.integers(0, TCFG.vocab_size - 1, n)] for n in lengths]


@st.composite
def requests(draw, max_batch=MAX_BATCH):
    b = draw(st.integers(1, max_batch))
    lengths = draw(st.lists(st.integers(1, 30), min_size=b, max_size=b))
    max_new = draw(st.integers(1, MAX_TOTAL - 30 - 16))
    seed = draw(st.integers(0, 2**16))
    return make_prompts(np.random.default_rng(seed), lengths), max_new


def check_taus(out, bs, max_new):
    for toks, taus, why in zip(out.tokens, out.acceptance_lengths, out.finish_reasons):
        assert all(1 <= t <= bs for t in taus)
        assert why in ("eos", "length")
        if why == "length":
            assert len(toks) == max_new
            # the first token comes from prefill; each step adds tau tokens (the last one cut)
            assert len(toks) <= 1 + sum(taus) < len(toks) + bs


@pytest.mark.parametrize("bs", BLOCK_SIZES)
@given(req=requests())
def test_greedy_lossless_with_random_draft(bs, req):
    prompts, max_new = req
    want = ar(prompts, max_new)
    got = spec(bs).generate(prompts, max_new_tokens=max_new)
    assert got.tokens == want.tokens
    assert got.finish_reasons == want.finish_reasons
    check_taus(got, bs, max_new)


@pytest.mark.parametrize("bs", (10, 16))
@settings(max_examples=6)
@given(req=requests())
def test_greedy_lossless_with_oracle_draft_all_accepted(bs, req):
    """A draft proposing the target's own greedy tokens: every block is accepted in full and the
    bonus token is emitted (tau = bs), except where the generation ends."""
    prompts, max_new = req
    want = ar(prompts, max_new)
    oracle = OracleProposer(want.tokens, vocab_size=TCFG.vocab_size)
    got = spec(bs, proposal_override=oracle).generate(prompts, max_new_tokens=max_new)
    assert got.tokens == want.tokens
    check_taus(got, bs, max_new)
    for toks, taus in zip(got.tokens, got.acceptance_lengths):
        # all steps accept everything; only the proposals past the end of the known
        # continuation may be rejected, and those only matter in the last step
        assert all(t == bs for t in taus[:-1])
    assert oracle.calls > 0 or max_new == 1


@pytest.mark.parametrize("bs", (4, 16))
@settings(max_examples=6)
@given(req=requests(), corrupt=st.sampled_from([0.3, 0.7]))
def test_greedy_lossless_with_mixed_accept_lengths(bs, req, corrupt):
    prompts, max_new = req
    want = ar(prompts, max_new)
    oracle = OracleProposer(want.tokens, vocab_size=TCFG.vocab_size, corrupt=corrupt, seed=5)
    got = spec(bs, proposal_override=oracle).generate(prompts, max_new_tokens=max_new)
    assert got.tokens == want.tokens
    check_taus(got, bs, max_new)


def test_draft_state_follows_accepted_tokens():
    """After a mix of accept lengths, each sequence's draft context holds exactly the features of
    its committed tokens (a draft fed only accepted tokens from scratch), nothing past it."""
    bs = 10
    rng = np.random.default_rng(7)
    prompts = make_prompts(rng, [5, 17, 1, 30, 9])
    max_new = 30
    want = ar(prompts, max_new)
    oracle = OracleProposer(want.tokens, vocab_size=TCFG.vocab_size, corrupt=0.6, seed=11)
    dec = spec(bs, proposal_override=oracle)
    got = dec.generate(prompts, max_new_tokens=max_new)
    assert got.tokens == want.tokens
    taus = {t for seq in got.acceptance_lengths for t in seq}
    assert len(taus) >= 3 and bs in taus, taus        # really a mix, including full blocks
    for slot, (p, toks, seq_taus) in enumerate(zip(prompts, got.tokens, got.acceptance_lengths)):
        length = int(dec.slot_len[slot])
        assert length == len(p) + sum(seq_taus)       # moved by exactly a+1 per step
        committed = dec.slot_tokens[slot]
        assert len(committed) == length
        full = p + toks
        assert committed[:min(length, len(full))] == full[:length]
        # from scratch: target features of the committed tokens, then the draft's K/V
        _, kvs = dense_reference(committed)
        for layer, (k_ref, v_ref) in enumerate(kvs):                 # [CACHE_LEN, Hkv, D]
            k_c, v_c = dec.draft_cache[layer]                        # [B, Hkv, S, D]
            k_got = np.asarray(k_c[slot, :, :length]).transpose(1, 0, 2)
            v_got = np.asarray(v_c[slot, :, :length]).transpose(1, 0, 2)
            np.testing.assert_allclose(k_got, np.asarray(k_ref[:length]), rtol=2e-4, atol=2e-4)
            np.testing.assert_allclose(v_got, np.asarray(v_ref[:length]), rtol=2e-4, atol=2e-4)
            # nothing was written past the committed length (poisoned cache: still NaN)
            assert np.isnan(np.asarray(k_c[slot, :, length:])).all()
            assert np.isnan(np.asarray(v_c[slot, :, length:])).all()


def test_queue_reuses_finished_slots_and_eos():
    rng = np.random.default_rng(3)
    prompts = make_prompts(rng, rng.integers(1, 25, 13))
    max_new = 24
    plain = ar(prompts[:8], max_new)
    # an EOS that some sequences hit early: a token from the middle of a first output
    eos = plain.tokens[0][len(plain.tokens[0]) // 2]
    want = [ar(prompts[i:i + 8], max_new, eos_token_id=eos) for i in (0, 8)]
    want_tokens = want[0].tokens + want[1].tokens
    dec = spec(10)
    got = dec.generate(prompts, max_new_tokens=max_new, eos_token_id=eos, queue=True)
    assert got.tokens == want_tokens
    assert got.finish_reasons == want[0].finish_reasons + want[1].finish_reasons
    assert "eos" in got.finish_reasons
    assert dec.allocator.num_free == dec.num_pages          # every page came back
    with pytest.raises(ValueError, match="max_batch"):
        dec.generate(prompts, max_new_tokens=max_new)      # without queue=True


def test_no_retrace_after_warmup():
    dec = spec(16)
    rng = np.random.default_rng(0)
    # warm-up: prompt totals in every prefill bucket (8, 16, 32, 64) and both step variants
    for lengths in ([3], [12], [20], [30, 30]):
        dec.generate(make_prompts(rng, lengths), max_new_tokens=4)
    before = dict(TRACE_COUNTS)
    for lengths in ([5, 1], [9, 4], [17, 2, 5], [25, 13, 3, 1]):
        dec.generate(make_prompts(rng, lengths), max_new_tokens=7)
    fresh = spec(16)                                     # same structure: shares compilations
    fresh.generate(make_prompts(rng, [11]), max_new_tokens=5)
    assert dict(TRACE_COUNTS) == before


def test_prefill_chunks_long_prompts_across_calls():
    """Prompts longer than the prefill chunk are prefilled in several chunks (ragged: one
    sequence may straddle two chunks) with the same result."""
    rng = np.random.default_rng(4)
    prompts = make_prompts(rng, [40, 3, 35])
    want = ar(prompts, 12)
    dec = SpeculativeDecoder(TARGET, DRAFT, max_batch=MAX_BATCH, max_seq_len=CACHE_LEN - 16,
                             page_size=16, backend="xla", prefill_chunk=16, poison=True)
    got = dec.generate(prompts, max_new_tokens=12)
    assert got.tokens == want.tokens


def test_paged_target_forward_matches_dense():
    """Prefill through the paged cache then AR decoding == argmax of a dense causal forward."""
    rng = np.random.default_rng(9)
    prompts = make_prompts(rng, [6, 19])
    out = ar(prompts, 6)
    for p, toks in zip(prompts, out.tokens):
        dense_next, _ = dense_reference(p + toks)
        assert list(np.asarray(dense_next)[len(p) - 1:len(p) + len(toks) - 1]) == toks


def test_llama_target_paged_matches_dense():
    """A Llama-3 style target (no q/k norm, llama3 RoPE scaling, tied embeddings)."""
    from models.config import RopeScaling

    cfg = tiny_target_config(model_type="llama", qk_norm=False, num_layers=2,
                             tie_word_embeddings=True, rope_theta=500000.0,
                             rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16))
    llama = perturb_norms(TargetModel(cfg, rngs=nnx.Rngs(4)), seed=5)
    prompt = [int(t) for t in np.random.default_rng(8).integers(0, 95, 29)]
    out = generate_autoregressive(llama, [prompt], max_new_tokens=12, backend="xla",
                                  poison=True)
    h, _ = nnx.jit(TargetModel.dense_forward)(llama, jnp.asarray([prompt + out.tokens[0]]))
    dense_next = np.asarray(jnp.argmax(llama.logits(h[0]), -1))
    assert list(dense_next[len(prompt) - 1:-1]) == out.tokens[0]


@pytest.mark.parametrize("windows", [None, (6, None)], ids=["full", "sliding"])
def test_draft_cached_forward_matches_dense(windows):
    """The draft over its static cache (append_context + block_attention) == the z-lab formula
    computed densely on [context ; block] (also with a sliding-window layer)."""
    from models.ops import get_ops
    from models.kv_cache import make_context_cache

    ops = get_ops("xla")
    draft = DRAFT
    if windows:
        draft = DraftModel(tiny_draft_config(TCFG, sliding_windows=windows), rngs=nnx.Rngs(2))
        nnx.update(draft, nnx.state(DRAFT))
    rng = np.random.default_rng(1)
    b, c, bs = 3, 21, 10
    feats = jnp.asarray(rng.standard_normal((b, c, 2 * TCFG.hidden_size)), jnp.float32)
    blk = jnp.asarray(rng.standard_normal((b, bs, TCFG.hidden_size)), jnp.float32)
    cfg = draft.config
    n1 = jnp.asarray([7, 13, 21], jnp.int32)

    @nnx.jit
    def both(draft, feats, blk):
        caches = make_context_cache(cfg.num_layers, b, cfg.num_kv_heads, 48, cfg.head_dim,
                                    jnp.float32, float("nan"))
        # append in two uneven pieces, as the decoder would after prefill and one step
        pos = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
        caches = draft.append_context(feats, pos, caches, jnp.zeros(b, jnp.int32), n1, ops=ops)
        idx = jnp.minimum(n1[:, None] + jnp.arange(c), c - 1)
        rest = jnp.take_along_axis(feats, idx[..., None], axis=1)
        caches = draft.append_context(rest, n1[:, None] + pos, caches, n1, c - n1, ops=ops)
        bpos = c + jnp.broadcast_to(jnp.arange(bs, dtype=jnp.int32), (b, bs))
        got = draft(blk, bpos, caches, jnp.full(b, c, jnp.int32), ops=ops)
        return got, draft.dense_forward(feats, blk, c)

    got, want = both(draft, feats, blk)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    if windows:     # the window really changes the result
        full = nnx.jit(lambda d, f, b: d.dense_forward(f, b, c))(DRAFT, feats, blk)
        assert not np.allclose(np.asarray(full), np.asarray(want), atol=1e-3)


def test_bad_input():
    dec = spec(16)
    with pytest.raises(ValueError, match="empty"):
        dec.generate([[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_seq_len"):
        dec.generate([[1] * 60], max_new_tokens=10)
    with pytest.raises(ValueError, match="max_batch"):
        dec.generate([[1]] * (MAX_BATCH + 1), max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        dec.generate([[1, 2]], max_new_tokens=2, temperature=-0.5)
    with pytest.raises(ValueError, match="temperature"):
        dec.generate([[1, 2]], max_new_tokens=2, temperature=float("nan"))
    with pytest.raises(ValueError, match="token ids"):
        dec.generate([[1, TCFG.vocab_size]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate([[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="no prompts"):
        dec.generate([], max_new_tokens=2)


@pytest.mark.parametrize("change, match", [
    (dict(hidden_size=32), "hidden_size"),
    (dict(vocab_size=128, mask_token_id=127), "vocab_size"),
    (dict(target_layer_ids=(0, 3)), "target_layer_ids"),
])
def test_mismatched_draft_is_refused(change, match):
    cfg = tiny_draft_config(TCFG, **change)
    draft = nnx.eval_shape(lambda: DraftModel(cfg))
    with pytest.raises(ValueError, match=match):
        SpeculativeDecoder(TARGET, draft, max_batch=2, max_seq_len=32)


def test_autoregressive_decoder_reuse():
    rng = np.random.default_rng(2)
    prompts = make_prompts(rng, [4, 9, 2])
    dec = AutoregressiveDecoder(TARGET, max_batch=MAX_BATCH, max_seq_len=MAX_TOTAL,
                                backend="xla", poison=True)
    a = dec.generate(prompts, max_new_tokens=8)
    b = dec.generate(prompts, max_new_tokens=8)
    assert a.tokens == b.tokens == ar(prompts, 8).tokens
    assert dec.allocator.num_free == dec.num_pages


def test_generate_autoregressive_sees_changed_weights():
    """generate_autoregressive reuses its decoder per target; new weights must still be used."""
    other = TargetModel(TCFG, rngs=nnx.Rngs(99))
    prompts = make_prompts(np.random.default_rng(6), [7, 3])
    before = ar(prompts, 10)
    assert generate_autoregressive(other, prompts, max_new_tokens=10, max_batch=MAX_BATCH,
                                   max_seq_len=MAX_TOTAL, poison=True).tokens != before.tokens
    nnx.update(other, nnx.state(TARGET))
    assert generate_autoregressive(other, prompts, max_new_tokens=10, max_batch=MAX_BATCH,
                                   max_seq_len=MAX_TOTAL, poison=True).tokens == before.tokens


def test_pages_come_back_after_an_error():
    def broken(request, generated, n):
        raise KeyError("proposer failed")

    dec = spec(16, proposal_override=broken)
    with pytest.raises(KeyError):
        dec.generate(make_prompts(np.random.default_rng(1), [4, 6]), max_new_tokens=8)
    assert dec.allocator.num_free == dec.num_pages


def test_bad_sampling_arguments_fail_before_anything_runs():
    """temperature / top_k / top_p / min_p: one value or one per prompt, checked (ValueError
    naming the argument and the prompt) before any step traces or any page is taken."""
    dec = spec(16)
    prompts = [[1, 2], [3]]
    bad = [
        (dict(temperature=[0.5]), "temperature has 1 values for 2 prompts"),
        (dict(temperature=[0.5, -1.0]), r"temperature\[1\] \(prompt 1\) must be a finite"),
        (dict(temperature=[0.5, float("inf")]), r"temperature\[1\]"),
        (dict(temperature="0.5"), "temperature must be"),
        (dict(top_k=-1), "top_k must be an int >= 0"),
        (dict(top_k=2.5), "top_k must be an int"),
        (dict(top_k=True), "top_k must be an int"),
        (dict(top_k=[1, 2, 3]), "top_k has 3 values for 2 prompts"),
        (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
        (dict(top_p=[0.5, 1.5]), r"top_p\[1\] \(prompt 1\)"),
        (dict(top_p=float("nan")), "top_p must be"),
        (dict(min_p=1.0), r"min_p must be a number in \[0, 1\)"),
        (dict(min_p=[-0.1, 0.0]), r"min_p\[0\] \(prompt 0\)"),
        (dict(logprobs="yes"), "logprobs must be a bool"),
    ]
    before = dict(TRACE_COUNTS)
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            dec.generate(prompts, max_new_tokens=2, **kw)
        with pytest.raises(ValueError, match=match):
            generate_autoregressive(TARGET, prompts, max_new_tokens=2, **kw)
    assert dict(TRACE_COUNTS) == before
    assert dec.allocator.num_free == dec.num_pages
    with pytest.raises(ValueError, match="draft_sampling must be a bool"):
        spec(16, draft_sampling="on")
    # numpy values and arrays are accepted
    out = dec.generate(prompts, max_new_tokens=3, temperature=np.array([0.5, 0.0]),
                       top_k=np.int64(3), top_p=np.array([0.9, 1.0], np.float32), min_p=0.0)
    assert [len(t) for t in out.tokens] == [3, 3]


@pytest.mark.parametrize("draft_sampling", [False, True])
def test_step_variants_are_compiled_apart_and_values_traced(draft_sampling):
    """Filters on / off, logprobs on / off and the drafting mode are separate compiled steps
    (a step compiled for one must not serve another: top_k = 1 after an unfiltered call is
    greedy decoding), and new filter values or temperatures do not retrace."""
    prompts = make_prompts(np.random.default_rng(11), [6, 11, 3])
    greedy = ar(prompts, 12)
    plain = ar(prompts, 12, temperature=1.0, seed=3)
    dec = spec(10, draft_sampling=draft_sampling)
    kw = dict(max_new_tokens=12, seed=3)
    a = dec.generate(prompts, temperature=1.0, **kw)
    assert a.logprobs is None
    # greedy drafts: the AR samples; sampled drafts: other samples
    assert (a.tokens == plain.tokens) != draft_sampling
    b = dec.generate(prompts, temperature=1.0, top_k=1, **kw)
    assert b.tokens == greedy.tokens                    # top-1 sampling is greedy decoding
    c = dec.generate(prompts, temperature=1.0, logprobs=True, **kw)
    assert c.tokens == a.tokens
    assert all(len(lp) == len(t) for lp, t in zip(c.logprobs, c.tokens))
    assert max(x for lp in c.logprobs for x in lp) <= 0
    assert np.mean([x for lp in c.logprobs for x in lp]) < -0.5   # T = 1, V = 96: not all ~0
    before = dict(TRACE_COUNTS)
    d = dec.generate(prompts, temperature=[0.7, 1.3, 1.0], top_k=[3, 0, 9], top_p=0.9,
                     min_p=[0.0, 0.1, 0.02], **kw)
    e = dec.generate(prompts, temperature=[1.2, 0.9, 0.5], top_k=[40, 2, 0], top_p=0.7,
                     min_p=0.05, **kw)
    dec.generate(prompts, temperature=[0.5, 2.0, 1.0], logprobs=True, **kw)
    assert dict(TRACE_COUNTS) == before
    assert d.tokens != e.tokens != b.tokens
