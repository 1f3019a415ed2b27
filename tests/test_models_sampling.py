"""Sampling (T > 0): the speculative decoder's first generated tokens follow the target's own
distribution exactly (chi-square against probabilities computed from a dense forward), whether
drafts are mostly rejected (random draft) or mostly accepted (a draft proposing the target's
modes), with greedy drafts (one-hot proposals) or drafts sampled from the draft's distribution
(draft_probs); the plain sampler too; with top-k / top-p / min-p the filtered distribution, and
filtered-out tokens never appear; same seed -> same output, independent of batch layout; with
one-hot drafts the speculative decoder emits the autoregressive samples; logprobs are the
filtered, tempered log-softmax; per-prompt values."""
from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from models.decoding import SpeculativeDecoder, generate_autoregressive
from models.draft import DraftModel
from models.target import TargetModel
from models.testing import perturb_norms, tiny_draft_config, tiny_target_config

V = 8
TCFG = tiny_target_config(vocab_size=V, num_layers=2)
TARGET = perturb_norms(TargetModel(TCFG, rngs=nnx.Rngs(20)), seed=21)
DRAFT = DraftModel(tiny_draft_config(TCFG, num_layers=1, target_layer_ids=(0, 1)),
                   rngs=nnx.Rngs(22))
PROMPT = [1, 5, 2, 6]
TEMP = 1.0
BATCH = 32
CALLS = 100                      # BATCH * CALLS samples of the first 3 generated tokens
ALPHA = 1e-4


@pytest.fixture(scope="module")
def exact():
    """p(t1), p(t2 | t1), p(t3 | t1, t2) at temperature TEMP, from a dense forward."""
    seqs = jnp.asarray([PROMPT + [a, b] for a, b in itertools.product(range(V), repeat=2)],
                       jnp.int32)
    h, _ = nnx.jit(TargetModel.dense_forward)(TARGET, seqs)
    logits = np.asarray(TARGET.logits(h), np.float64) / TEMP
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    n = len(PROMPT)
    p1 = probs[0, n - 1]
    p2 = probs[::V, n].reshape(V, V)                   # [t1, t2]
    p3 = probs[:, n + 1].reshape(V, V, V)              # [t1, t2, t3]
    joint = p1[:, None, None] * p2[:, :, None] * p3
    assert np.isclose(joint.sum(), 1.0)
    return p1, p2, p3, joint


def _chi2_pvalue(counts, expected):
    counts, expected = counts.ravel(), expected.ravel()
    order = np.argsort(expected)
    merged_c, merged_e, acc_c, acc_e = [], [], 0.0, 0.0
    for i in order:                                    # merge bins with expected count < 5
        acc_c += counts[i]
        acc_e += expected[i]
        if acc_e >= 5:
            merged_c.append(acc_c)
            merged_e.append(acc_e)
            acc_c = acc_e = 0.0
    if acc_e > 0:
        merged_c[-1] += acc_c
        merged_e[-1] += acc_e
    assert len(merged_c) >= 20, "too few bins for a meaningful test"
    merged_e = np.asarray(merged_e) * (np.sum(merged_c) / np.sum(merged_e))
    return stats.chisquare(merged_c, merged_e).pvalue


def _sample(generate):
    counts = np.zeros((V, V, V))
    for call in range(CALLS):
        out = generate(seed=call)
        for toks in out.tokens:
            assert len(toks) == 3
            counts[tuple(toks)] += 1
    return counts


def _spec(proposal_override=None, draft_sampling=False):
    return SpeculativeDecoder(TARGET, DRAFT, max_batch=BATCH, max_seq_len=16, page_size=16,
                              backend="xla", block_size=4, poison=True,
                              proposal_override=proposal_override, draft_sampling=draft_sampling)


def test_speculative_sampling_matches_target_random_draft(exact):
    dec = _spec()
    counts = _sample(lambda seed: dec.generate([PROMPT] * BATCH, max_new_tokens=3,
                                               temperature=TEMP, seed=seed))
    assert _chi2_pvalue(counts, exact[3] * counts.sum()) > ALPHA


def _mode_proposals(p2, p3):
    """proposal_override drafting the target's most likely next tokens (p2 [V, V], p3 [V, V, V]:
    the next-token distributions after one and two generated tokens)."""
    def modes(request, generated, n):
        if len(generated) == 1:
            a = generated[0]
            b = int(np.argmax(p2[a]))
            prop = [b, int(np.argmax(p3[a, b]))]
        else:
            prop = [int(np.argmax(p3[generated[0], generated[1]]))]
        return prop + [0] * (n - len(prop))
    return modes


def test_speculative_sampling_matches_target_mode_draft(exact):
    """Drafts = the target's most likely next tokens, so many are accepted: the accept path and
    the tokens emitted after accepted drafts must still follow the target distribution."""
    _, p2, p3, _ = exact
    accepted = []

    modes = _mode_proposals(p2, p3)

    dec = _spec(modes)

    def gen(seed):
        out = dec.generate([PROMPT] * BATCH, max_new_tokens=3, temperature=TEMP, seed=seed)
        accepted.extend(t for seq in out.acceptance_lengths for t in seq)
        return out
    counts = _sample(gen)
    assert _chi2_pvalue(counts, exact[3] * counts.sum()) > ALPHA
    assert np.mean(np.asarray(accepted) >= 2) > 0.2       # the accept path really ran


def test_autoregressive_sampling_matches_target(exact):
    counts = _sample(lambda seed: generate_autoregressive(
        TARGET, [PROMPT] * BATCH, max_new_tokens=3, temperature=TEMP, seed=seed,
        max_batch=BATCH, max_seq_len=16, backend="xla"))
    assert _chi2_pvalue(counts, exact[3] * counts.sum()) > ALPHA


@pytest.mark.parametrize("draft_sampling", [False, True])
def test_same_seed_same_output_independent_of_batch_layout(draft_sampling):
    dec = _spec(draft_sampling=draft_sampling)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, V, n)] for n in (3, 6, 5, 1)]
    kw = dict(max_new_tokens=10, temperature=0.8)
    a = dec.generate(prompts, seed=123, **kw)
    b = dec.generate(prompts, seed=123, **kw)
    c = dec.generate(prompts, seed=124, **kw)
    assert a.tokens == b.tokens and a.acceptance_lengths == b.acceptance_lengths
    assert a.tokens != c.tokens
    # request 0 in a different batch (other companions): same tokens
    d = dec.generate([prompts[0], prompts[3]], seed=123, **kw)
    assert d.tokens[0] == a.tokens[0]


def _assert_spec_matches_ar(prompts, ar, kw):
    """Greedy-drafted speculative sampling emits the autoregressive samples, whether its drafts
    are rejected (the untrained draft) or accepted (drafts taken from the AR output itself)."""
    def from_ar(request, generated, n):
        ahead = ar.tokens[request][len(generated):len(generated) + n]
        return list(ahead) + [0] * (n - len(ahead))

    for override in (None, from_ar):
        dec = SpeculativeDecoder(TARGET, DRAFT, max_batch=8, max_seq_len=32, page_size=16,
                                 backend="xla", block_size=4, poison=True,
                                 proposal_override=override, draft_sampling=False)
        out = dec.generate(prompts, **kw)
        assert out.tokens == ar.tokens
        if override is not None:     # the accept path ran: whole blocks accepted
            assert max(t for seq in out.acceptance_lengths for t in seq) == 4


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_speculative_sampling_emits_the_autoregressive_samples(temperature):
    """Both decoders draw the token after position p by Gumbel-max with the noise of (seed, p)
    (`pallas_ops.rng`): exact speculative sampling with one-hot drafts accepts a draft iff it is
    that sample and otherwise emits that sample, so for the same seeds DFlash emits exactly the
    autoregressive samples, whether its drafts are rejected (the untrained draft) or accepted
    (drafts taken from the autoregressive output itself)."""
    rng_ = np.random.default_rng(5)
    prompts = [[int(t) for t in rng_.integers(0, V, n)] for n in (4, 1, 7, 3, 5, 2)]
    kw = dict(max_new_tokens=12, temperature=temperature, seed=77)
    ar = generate_autoregressive(TARGET, prompts, max_batch=8, max_seq_len=32, backend="xla", **kw)

    _assert_spec_matches_ar(prompts, ar, kw)


# -- filters (top-k / top-p / min-p), draft sampling, logprobs -----------------------------------

FILTERS = {"top_k": dict(top_k=3), "top_p": dict(top_p=0.6), "min_p": dict(min_p=0.3),
           "all": dict(top_k=5, top_p=0.8, min_p=0.1)}


def _filtered_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """float64 softmax(logits / T) over the filters' kept set (reference.verify's threshold),
    per row of logits [..., V]."""
    from reference.verify import filter_threshold

    y = np.asarray(logits, np.float64) / temperature
    flat = y.reshape(-1, y.shape[-1])
    out = np.zeros_like(flat)
    for i, row in enumerate(flat):
        kept = row >= filter_threshold(row, top_k, top_p, min_p)
        w = np.where(kept, np.exp(row - row.max()), 0.0)
        out[i] = w / w.sum()
    return out.reshape(y.shape)


@pytest.fixture(scope="module")
def dense_logits():
    """The target's float64 logits after PROMPT + [a, b] for every a, b: [V * V, n + 2, V]."""
    seqs = jnp.asarray([PROMPT + [a, b] for a, b in itertools.product(range(V), repeat=2)],
                       jnp.int32)
    h, _ = nnx.jit(TargetModel.dense_forward)(TARGET, seqs)
    return np.asarray(TARGET.logits(h), np.float64)


def _joint(dense_logits, **filt):
    """p(t1, t2, t3) of filtered sampling at TEMP."""
    probs = _filtered_probs(dense_logits, TEMP, **filt)
    n = len(PROMPT)
    p1, p2 = probs[0, n - 1], probs[::V, n].reshape(V, V)
    p3 = probs[:, n + 1].reshape(V, V, V)
    joint = p1[:, None, None] * p2[:, :, None] * p3
    assert np.isclose(joint.sum(), 1.0)
    return joint


@pytest.mark.parametrize("name", ["none", "all"])
def test_draft_sampling_follows_the_filtered_target_distribution(dense_logits, name):
    """Drafts sampled from the (untrained) draft's own filtered distribution and verified with
    it as draft_probs: the first 3 tokens follow the filtered target distribution (chi-square),
    filtered-out tokens never appear, and drafts are accepted often (the draft_probs accept
    path ran)."""
    filt = FILTERS.get(name, {})
    joint = _joint(dense_logits, **filt)
    dec = SpeculativeDecoder(TARGET, DRAFT, max_batch=BATCH, max_seq_len=16, page_size=16,
                             backend="xla", block_size=4, poison=True, draft_sampling=True)
    accepted = []

    def gen(seed):
        out = dec.generate([PROMPT] * BATCH, max_new_tokens=3, temperature=TEMP, seed=seed,
                           **filt)
        accepted.extend(t for seq in out.acceptance_lengths for t in seq)
        return out
    counts = _sample(gen)
    assert counts[joint == 0].sum() == 0
    if filt:
        assert (joint == 0).mean() > 0.3           # the filters really cut the support
    assert _chi2_pvalue(counts, joint * counts.sum()) > ALPHA
    assert np.mean(np.asarray(accepted) >= 2) > 0.2


def test_draft_sampling_with_overridden_proposals_stays_exact(dense_logits):
    """proposal_override's drafts are verified as one-hot proposals in the draft_probs path
    (q = their one-hot): proposals of the target's modes, mostly accepted, and still the
    filtered target distribution."""
    filt = FILTERS["top_k"]
    joint = _joint(dense_logits, **filt)
    probs = _filtered_probs(dense_logits, TEMP, **filt)
    n = len(PROMPT)
    p2, p3 = probs[::V, n].reshape(V, V), probs[:, n + 1].reshape(V, V, V)

    modes = _mode_proposals(p2, p3)

    dec = SpeculativeDecoder(TARGET, DRAFT, max_batch=BATCH, max_seq_len=16, page_size=16,
                             backend="xla", block_size=4, poison=True, draft_sampling=True,
                             proposal_override=modes)
    counts = _sample(lambda seed: dec.generate([PROMPT] * BATCH, max_new_tokens=3,
                                               temperature=TEMP, seed=seed, **filt))
    assert counts[joint == 0].sum() == 0
    assert _chi2_pvalue(counts, joint * counts.sum()) > ALPHA


def test_autoregressive_filtered_sampling_matches_target(dense_logits):
    filt = FILTERS["all"]
    joint = _joint(dense_logits, **filt)
    counts = _sample(lambda seed: generate_autoregressive(
        TARGET, [PROMPT] * BATCH, max_new_tokens=3, temperature=TEMP, seed=seed,
        max_batch=BATCH, max_seq_len=16, backend="xla", **filt))
    assert counts[joint == 0].sum() == 0
    assert _chi2_pvalue(counts, joint * counts.sum()) > ALPHA


@pytest.mark.parametrize("name", list(FILTERS) + ["per-prompt"])
def test_speculative_and_autoregressive_emit_the_same_tokens_with_filters(name):
    """With one-hot drafts (draft_sampling=False) both decoders draw the token after position p
    from the same filtered Gumbel-max sample, so they emit the same tokens for the same seeds,
    with drafts rejected (the untrained draft) or accepted (drafts from the AR output)."""
    rng_ = np.random.default_rng(6)
    prompts = [[int(t) for t in rng_.integers(0, V, n)] for n in (4, 1, 7, 3, 5, 2)]
    filt = (dict(top_k=[3, 0, 5, 2, 0, 4], top_p=[1.0, 0.5, 0.9, 1.0, 0.7, 0.95],
                 min_p=[0.0, 0.0, 0.2, 0.1, 0.0, 0.3], temperature=[0.9, 1.3, 0.0, 0.7, 1.0, 1.1])
            if name == "per-prompt" else dict(FILTERS[name], temperature=1.0))
    kw = dict(max_new_tokens=12, seed=78, **filt)
    ar = generate_autoregressive(TARGET, prompts, max_batch=8, max_seq_len=32, backend="xla",
                                 **kw)
    plain = generate_autoregressive(TARGET, prompts, max_batch=8, max_seq_len=32, backend="xla",
                                    max_new_tokens=12, seed=78, temperature=filt["temperature"])
    assert ar.tokens != plain.tokens                   # the filters changed the samples

    _assert_spec_matches_ar(prompts, ar, kw)


def _dense_next_logits(prompt, tokens, length=32):
    """float64 target logits at every position of prompt + tokens (padded to one shape)."""
    seq = list(prompt) + list(tokens)
    h, _ = nnx.jit(TargetModel.dense_forward)(TARGET, jnp.asarray([seq + [0] * (length -
                                                                                len(seq))]))
    return np.asarray(TARGET.logits(h[0]), np.float64)[:len(seq)]


@pytest.mark.parametrize("decoder", ["autoregressive", "one-hot drafts", "sampled drafts"])
def test_logprobs_are_the_filtered_tempered_log_softmax(decoder):
    """Every emitted token's logprob == a float64 log-softmax of the target's logits / T over
    the filters' kept set, recomputed here from a dense forward (greedy prompts: the plain
    log-softmax); and every token is in its kept set."""
    from reference.verify import filter_threshold

    rng_ = np.random.default_rng(7)
    prompts = [[int(t) for t in rng_.integers(0, V, n)] for n in (4, 1, 7, 3)]
    temps, ks, ps, ms = [0.8, 0.0, 1.3, 1.0], [3, 2, 0, 6], [1.0, 0.5, 0.7, 0.9], \
        [0.0, 0.1, 0.05, 0.2]
    kw = dict(max_new_tokens=12, seed=9, temperature=temps, top_k=ks, top_p=ps, min_p=ms,
              logprobs=True)
    if decoder == "autoregressive":
        out = generate_autoregressive(TARGET, prompts, max_batch=8, max_seq_len=32,
                                      backend="xla", **kw)
    else:
        dec = SpeculativeDecoder(TARGET, DRAFT, max_batch=8, max_seq_len=32, page_size=16,
                                 backend="xla", block_size=4, poison=True,
                                 draft_sampling=decoder == "sampled drafts")
        out = dec.generate(prompts, **kw)
    for i, (p, toks, lps) in enumerate(zip(prompts, out.tokens, out.logprobs)):
        assert len(lps) == len(toks) == 12
        logits = _dense_next_logits(p, toks)
        for j, (t, lp) in enumerate(zip(toks, lps)):
            x = logits[len(p) - 1 + j]
            if temps[i] == 0:
                y, tau = x, -np.inf
                assert t == int(np.argmax(x))
            else:
                y = x / temps[i]
                tau = filter_threshold(y, ks[i], ps[i], ms[i])
            kept = y[y >= tau]
            assert y[t] >= tau
            want = y[t] - (kept.max() + np.log(np.exp(kept - kept.max()).sum()))
            assert abs(lp - want) < 2e-4, (i, j, lp, want)


def test_per_prompt_values_equal_the_same_values_given_once():
    """temperature / top_k / ... per prompt: each prompt gets exactly its own values (its
    output equals a call giving those values to every prompt)."""
    rng_ = np.random.default_rng(8)
    prompts = [[int(t) for t in rng_.integers(0, V, n)] for n in (3, 5, 2)]
    dec = _spec(draft_sampling=True)
    settings_ = [dict(temperature=0.9, top_k=2), dict(temperature=0.0),
                 dict(temperature=1.2, top_p=0.6, min_p=0.1)]
    per = {name: [s.get(name, off) for s in settings_]
           for name, off in (("temperature", 0.0), ("top_k", 0), ("top_p", 1.0),
                             ("min_p", 0.0))}
    mixed = dec.generate(prompts, max_new_tokens=10, seed=4, **per)
    for i, s in enumerate(settings_):
        alone = dec.generate(prompts, max_new_tokens=10, seed=4, **s)
        assert mixed.tokens[i] == alone.tokens[i]
