"""Sampling (T > 0): the speculative decoder's first generated tokens follow the target's own
distribution exactly (chi-square against probabilities computed from a dense forward), whether
drafts are mostly rejected (random draft) or mostly accepted (a draft proposing the target's
modes); the plain sampler too; same seed -> same output, independent of batch layout."""
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


def _spec(proposal_override=None):
    return SpeculativeDecoder(TARGET, DRAFT, max_batch=BATCH, max_seq_len=16, page_size=16,
                              backend="xla", block_size=4, poison=True,
                              proposal_override=proposal_override)


def test_speculative_sampling_matches_target_random_draft(exact):
    dec = _spec()
    counts = _sample(lambda seed: dec.generate([PROMPT] * BATCH, max_new_tokens=3,
                                               temperature=TEMP, seed=seed))
    assert _chi2_pvalue(counts, exact[3] * counts.sum()) > ALPHA


def test_speculative_sampling_matches_target_mode_draft(exact):
    """Drafts = the target's most likely next tokens, so many are accepted: the accept path and
    the tokens emitted after accepted drafts must still follow the target distribution."""
    _, p2, p3, _ = exact
    accepted = []

    def modes(request, generated, n):
        if len(generated) == 1:
            a = generated[0]
            b = int(np.argmax(p2[a]))
            prop = [b, int(np.argmax(p3[a, b]))]
        else:
            prop = [int(np.argmax(p3[generated[0], generated[1]]))]
        return prop + [0] * (n - len(prop))

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


def test_same_seed_same_output_independent_of_batch_layout():
    dec = _spec()
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

    def from_ar(request, generated, n):
        ahead = ar.tokens[request][len(generated):len(generated) + n]
        return list(ahead) + [0] * (n - len(ahead))

    for override in (None, from_ar):
        dec = SpeculativeDecoder(TARGET, DRAFT, max_batch=8, max_seq_len=32, page_size=16,
                                 backend="xla", block_size=4, poison=True,
                                 proposal_override=override)
        out = dec.generate(prompts, **kw)
        assert out.tokens == ar.tokens
        if override is not None:     # the accept path ran: whole blocks accepted
            assert max(t for seq in out.acceptance_lengths for t in seq) == 4
