"""The decoder on the Pallas kernels: a few interpreted decode steps on tiny shapes agree with the
xla backend token for token, and the verify step of a Llama-3.1-8B-shaped target layer (one
decoder layer, 16-token verify over the paged attention kernel) AOT-compiles for v5p."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.config import TargetConfig, RopeScaling
from models.decoding import SpeculativeDecoder, generate_autoregressive
from models.draft import DraftModel
from models.ops import get_ops
from models.target import TargetModel
from models.testing import (OracleProposer, perturb_norms, tiny_draft_config,
                            tiny_target_config)
from pallas_ops.aot import lower_for_tpu
from tests.tpu_harness import require_libtpu

TCFG = tiny_target_config(num_layers=2, vocab_size=64)
TARGET = perturb_norms(TargetModel(TCFG, rngs=nnx.Rngs(10)), seed=11)
DRAFT = perturb_norms(DraftModel(tiny_draft_config(TCFG, num_layers=1, target_layer_ids=(0, 1)),
                                 rngs=nnx.Rngs(12)), seed=13)
PROMPTS = [[5, 9, 2, 33, 7], [41, 1, 17]]
MAX_NEW = 7


def _pallas(bs, **kw):
    return SpeculativeDecoder(TARGET, DRAFT, max_batch=2, max_seq_len=24, page_size=16,
                              backend="pallas", prefill_chunk=8, block_size=bs, poison=True, **kw)


@pytest.fixture(scope="module")
def reference():
    return generate_autoregressive(TARGET, PROMPTS, max_new_tokens=MAX_NEW, max_batch=2,
                                   max_seq_len=24, backend="xla", poison=True)


def test_pallas_decode_matches_xla(reference):
    """Random draft (mostly rejections) on the Pallas kernels, interpreted: same tokens."""
    got = _pallas(4).generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert got.tokens == reference.tokens


def test_pallas_decode_all_accepted(reference):
    """Oracle proposals: full blocks accepted and the bonus token taken, on the kernels."""
    oracle = OracleProposer(reference.tokens, vocab_size=TCFG.vocab_size)
    got = _pallas(4, proposal_override=oracle).generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert got.tokens == reference.tokens
    assert all(seq[0] == 4 for seq in got.acceptance_lengths)


def test_pallas_sampled_drafts_filters_and_logprobs_match_xla():
    """Drafts sampled from the draft's distribution (verify_accept's draft_probs path), top-k /
    top-p / min-p (the thresholds kernel) and logprobs on the interpreted kernels: the xla
    backend's tokens and logprobs."""
    kw = dict(max_new_tokens=MAX_NEW, temperature=[0.9, 1.2], top_k=[8, 0], top_p=[1.0, 0.8],
              min_p=0.02, seed=3, logprobs=True)
    want = SpeculativeDecoder(TARGET, DRAFT, max_batch=2, max_seq_len=24, page_size=16,
                              backend="xla", prefill_chunk=8, block_size=4, poison=True,
                              draft_sampling=True).generate(PROMPTS, **kw)
    got = _pallas(4, draft_sampling=True).generate(PROMPTS, **kw)
    assert got.tokens == want.tokens
    for a, b in zip(got.logprobs, want.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-4)


LLAMA31_8B_LAYER = TargetConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=1, num_heads=32,
    num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), model_type="llama")


@pytest.mark.tpu_compile
def test_llama31_8b_layer_verify_step_compiles_for_v5p():
    """One Llama-3.1-8B decoder layer + lm_head: 8 sequences x 16-token verify blocks over 4k
    contexts in 16-token pages, bf16, with the Pallas paged attention kernel, AOT for v5p."""
    cfg, bs, batch, ctx, page = LLAMA31_8B_LAYER, 16, 8, 4096, 16
    model = nnx.eval_shape(lambda: TargetModel(cfg, dtype=jnp.bfloat16))
    graphdef, state = nnx.split(model)
    ops = get_ops("pallas", chip="v5p", interpret=False)     # Mosaic, not the interpreter
    pages_per_seq = ctx // page
    num_pages = batch * pages_per_seq

    def verify_step(state, caches, tokens, positions, kv_lens, page_indices, cu_q_lens,
                    num_seqs):
        target = nnx.merge(graphdef, state)
        h, _, caches = target.forward(tokens, positions, caches, kv_lens, page_indices,
                                      cu_q_lens, num_seqs, ops=ops)
        return target.logits(h), caches

    sds = jax.ShapeDtypeStruct
    kv = sds((cfg.num_kv_heads, num_pages, page, cfg.head_dim), jnp.bfloat16)
    state_specs = jax.tree.map(lambda a: sds(a.shape, a.dtype), state)
    args = (state_specs, ((kv, kv),), sds((batch * bs,), jnp.int32),
            sds((batch * bs,), jnp.int32), sds((batch,), jnp.int32),
            sds((batch, pages_per_seq), jnp.int32), sds((batch + 1,), jnp.int32),
            sds((), jnp.int32))
    logits, caches = jax.eval_shape(verify_step, *args)
    assert logits.shape == (batch * bs, cfg.vocab_size) and caches[0][0].shape == kv.shape
    require_libtpu()
    lowered = lower_for_tpu(verify_step, *args, chip="v5p")
    # write_kv_pages + paged_attention: the layer's two Mosaic kernels
    assert lowered.as_text().count("tpu_custom_call") == 2
    lowered.compile()
