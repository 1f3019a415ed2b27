"""Tensor- and data-parallel decoding (`models.parallel`) on 8 host CPU devices: a 2-way and a
4-way "model" mesh and a 2x2 "data" x "model" mesh give the single-device decoder's tokens
(greedy, and sampling with the same seeds), with the xla twins for whole runs and the
interpreted Pallas kernels for a few steps. Bad meshes fail with ValueError before compiling.

Runs in its own process (tests/test_multi_device.py).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from models.decoding import SpeculativeDecoder, generate_autoregressive
from models.draft import DraftModel
from models.target import TargetModel
from models.testing import OracleProposer, perturb_norms, tiny_draft_config, tiny_target_config

# 4 q heads over 2 KV heads: split 2 ways, and at 4 ways each KV head replicated on 2 devices
TCFG = tiny_target_config(num_heads=4, num_kv_heads=2, num_layers=2)
DCFG = tiny_draft_config(TCFG, num_heads=4, num_kv_heads=2, block_size=8,
                         target_layer_ids=(0, 1))
MESHES = {"model2": (1, 2), "model4": (1, 4), "data2xmodel2": (2, 2), "data2": (2, 1)}


def _mesh(shape, names=("data", "model")):
    n = int(np.prod(shape))
    assert jax.device_count() >= n, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


@pytest.fixture(scope="module")
def pair():
    target = perturb_norms(TargetModel(TCFG, rngs=nnx.Rngs(3)), seed=1)
    draft = perturb_norms(DraftModel(DCFG, rngs=nnx.Rngs(4)), seed=2)
    return target, draft


def _prompts(n=6, seed=0):
    r = np.random.default_rng(seed)
    return [list(r.integers(0, TCFG.vocab_size - 1, size=int(r.integers(3, 20))))
            for _ in range(n)]


def _spec(pair, mesh, prompts, *, temperature=0.0, oracle=None, backend="xla", max_new=24,
          max_batch=4, draft_sampling=False, **kw):
    target, draft = pair
    dec = SpeculativeDecoder(target, draft, max_batch=max_batch, max_seq_len=64, backend=backend,
                             mesh=mesh, proposal_override=oracle, draft_sampling=draft_sampling)
    return dec.generate(prompts, max_new_tokens=max_new, temperature=temperature, seed=5,
                        queue=True, **kw)


@pytest.mark.parametrize("name", list(MESHES))
def test_greedy_tokens_equal_the_single_device_decoder(pair, name):
    prompts = _prompts()
    want = generate_autoregressive(pair[0], prompts, max_new_tokens=24,
                                   max_seq_len=64)
    got = _spec(pair, _mesh(MESHES[name]), prompts)
    one = _spec(pair, None, prompts)
    assert got.tokens == one.tokens == want.tokens
    assert got.acceptance_lengths == one.acceptance_lengths
    ar = generate_autoregressive(pair[0], prompts, max_new_tokens=24, max_seq_len=64,
                                 mesh=_mesh(MESHES[name]))
    assert ar.tokens == want.tokens


@pytest.mark.parametrize("name", ["model4", "data2xmodel2"])
def test_long_accepts_with_an_oracle_draft(pair, name):
    prompts = _prompts(5, seed=1)
    want = generate_autoregressive(pair[0], prompts, max_new_tokens=30,
                                   max_seq_len=64)
    oracle = OracleProposer(want.tokens, vocab_size=TCFG.vocab_size, corrupt=0.3, seed=0)
    got = _spec(pair, _mesh(MESHES[name]), prompts, oracle=oracle, max_new=30)
    assert got.tokens == want.tokens
    assert max(max(a) for a in got.acceptance_lengths) >= 4      # long blocks were accepted


@pytest.mark.parametrize("name", ["model2", "data2xmodel2"])
def test_sampling_gives_the_single_device_tokens_for_the_same_seeds(pair, name):
    prompts = _prompts(4, seed=2)
    one = _spec(pair, None, prompts, temperature=0.9)
    got = _spec(pair, _mesh(MESHES[name]), prompts, temperature=0.9)
    assert got.tokens == one.tokens
    ar1 = generate_autoregressive(pair[0], prompts, max_new_tokens=24, temperature=0.9, seed=5,
                                  max_seq_len=64)
    arm = generate_autoregressive(pair[0], prompts, max_new_tokens=24, temperature=0.9, seed=5,
                                  max_seq_len=64, mesh=_mesh(MESHES[name]))
    assert arm.tokens == ar1.tokens


def test_draft_sampling_and_logprobs_on_a_model_mesh(pair):
    """Drafts sampled from the draft's distribution (its probabilities split over the vocabulary
    shards, normalised across them) and logprobs: the single-device decoder's tokens and
    logprobs (to float rounding)."""
    prompts = _prompts(4, seed=5)
    kw = dict(temperature=[0.9, 0.0, 1.2, 0.7], draft_sampling=True, logprobs=True)
    one = _spec(pair, None, prompts, **kw)
    got = _spec(pair, _mesh(MESHES["model2"]), prompts, **kw)
    assert got.tokens == one.tokens
    np.testing.assert_allclose(np.concatenate(got.logprobs), np.concatenate(one.logprobs),
                               atol=1e-4)


def test_filters_need_whole_vocabulary_rows(pair):
    """top-k / top-p / min-p: refused with a model axis > 1 (before anything runs); over a
    data-only mesh the single-device tokens."""
    prompts = _prompts(4, seed=6)
    filt = dict(temperature=0.9, top_k=[5, 0, 20, 3], top_p=0.8, min_p=[0.0, 0.05, 0.0, 0.1])
    with pytest.raises(ValueError, match="model axis has size 2"):
        _spec(pair, _mesh(MESHES["model2"]), prompts, **filt)
    with pytest.raises(ValueError, match="model axis has size 2"):
        generate_autoregressive(pair[0], prompts, max_new_tokens=4, max_seq_len=64,
                                mesh=_mesh(MESHES["model2"]), top_p=0.5)
    for ds in (False, True):
        one = _spec(pair, None, prompts, draft_sampling=ds, **filt)
        got = _spec(pair, _mesh(MESHES["data2"]), prompts, draft_sampling=ds, **filt)
        assert got.tokens == one.tokens
    ar1 = generate_autoregressive(pair[0], prompts, max_new_tokens=24, seed=5, max_seq_len=64,
                                  **filt)
    arm = generate_autoregressive(pair[0], prompts, max_new_tokens=24, seed=5, max_seq_len=64,
                                  mesh=_mesh(MESHES["data2"]), **filt)
    assert arm.tokens == ar1.tokens


def test_interpreted_pallas_kernels_on_a_2x2_mesh(pair):
    prompts = _prompts(2, seed=3)
    want = generate_autoregressive(pair[0], prompts, max_new_tokens=10, max_batch=2,
                                   max_seq_len=64)
    got = _spec(pair, _mesh((2, 2)), prompts, backend="pallas", max_new=10, max_batch=2)
    assert got.tokens == want.tokens


def test_weights_and_caches_are_split_over_the_mesh(pair):
    target, draft = pair
    dec = SpeculativeDecoder(target, draft, max_batch=4, max_seq_len=64, mesh=_mesh((2, 2)))
    q = _leaf(dec._st["layers"][0]["self_attn"]["q_proj"]["kernel"])
    assert q.sharding.shard_shape(q.shape) == (TCFG.hidden_size,
                                              TCFG.num_heads * TCFG.head_dim // 2)
    k = dec.target_cache[0][0]                        # [Hkv, P, ps, D]: heads / 2, pages / 2
    assert k.sharding.shard_shape(k.shape)[:2] == (TCFG.num_kv_heads // 2, dec.num_pages // 2)
    # 4-way: 2 KV heads replicated to 4, one per device
    dec4 = SpeculativeDecoder(target, draft, max_batch=4, max_seq_len=64, mesh=_mesh((1, 4)))
    k4 = dec4.target_cache[0][0]
    assert k4.shape[0] == 4 and k4.sharding.shard_shape(k4.shape)[0] == 1
    kp = np.asarray(_leaf(dec4._st["layers"][0]["self_attn"]["k_proj"]["kernel"]))
    kw = np.asarray(target.layers[0].self_attn.k_proj.kernel[...])
    D = TCFG.head_dim
    for j in range(4):                                # device j holds KV head j // 2
        np.testing.assert_array_equal(kp[:, j * D:(j + 1) * D],
                                      kw[:, (j // 2) * D:(j // 2 + 1) * D])


def _leaf(node):
    (x,) = jax.tree.leaves(node)
    return x


@pytest.mark.parametrize("case", ["axis-names", "q-heads", "kv-heads", "batch", "vocab"])
def test_bad_meshes_raise_before_compiling(pair, case):
    target, draft = pair
    kw = dict(max_batch=4, max_seq_len=64)
    if case == "axis-names":
        mesh, match = _mesh((1, 2), ("batch", "tp")), "axes must be named"
    elif case == "q-heads":
        mesh, match = _mesh((1, 8)), "4 attention heads are not divisible"
    elif case == "kv-heads":
        t = TargetModel(tiny_target_config(num_heads=6, num_kv_heads=3), rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="3 KV heads and a model axis of 2"):
            generate_autoregressive(t, [[1, 2]], max_new_tokens=2, mesh=_mesh((1, 2)))
        return
    elif case == "batch":
        mesh, match, kw = _mesh((2, 1)), "max_batch=3 is not divisible", dict(kw, max_batch=3)
    else:
        t = TargetModel(tiny_target_config(vocab_size=98, num_heads=4, num_kv_heads=2),
                        rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="vocab_size=98 is not divisible"):
            generate_autoregressive(t, [[1, 2]], max_new_tokens=2, mesh=_mesh((1, 4)))
        return
    with pytest.raises(ValueError, match=match):
        SpeculativeDecoder(target, draft, mesh=mesh, **kw)


def test_sharded_argmax_and_sampling_equal_the_unsharded_ones():
    from jax.sharding import PartitionSpec as P

    from models.sampling import argmax_tokens, sample_tokens

    r = np.random.default_rng(0)
    logits = r.normal(size=(6, 96)).astype(np.float32)
    logits[0, [5, 50, 90]] = logits[0].max() + 1.0     # a tie across shards: lowest index wins
    logits[1, :40] = -np.inf
    temp = np.array([0, 0.7, 1.0, 0, 1.3, 0.5], np.float32)
    seed = r.integers(0, 2**31 - 1, 6).astype(np.int32)
    pos = r.integers(0, 100, 6).astype(np.int32)
    mesh = _mesh((1, 4))
    f = jax.jit(jax.shard_map(
        lambda x, t, s, p: (argmax_tokens(x, "model"), sample_tokens(x, t, s, p,
                                                                     vocab_axis="model")),
        mesh=mesh, in_specs=(P(None, "model"), P(), P(), P()), out_specs=P(), check_vma=False))
    am, smp = f(logits, temp, seed, pos)
    np.testing.assert_array_equal(np.asarray(am), logits.argmax(-1))
    assert int(am[0]) == 5
    np.testing.assert_array_equal(np.asarray(smp),
                                  np.asarray(sample_tokens(jnp.asarray(logits), temp, seed, pos)))


def test_int8_caches_on_a_2x2_mesh(pair):
    # 8-bit caches shard like the others (scales beside their values); same tokens as the
    # unsharded int8 decoder (deterministic inputs: a flip would be reproducible, not flaky)
    target, draft = pair
    prompts = _prompts(4, seed=4)
    outs = []
    for mesh in (None, _mesh((2, 2))):
        dec = SpeculativeDecoder(target, draft, max_batch=4, max_seq_len=64, mesh=mesh,
                                 kv_cache_dtype="int8")
        outs.append(dec.generate(prompts, max_new_tokens=20, queue=True).tokens)
        if mesh is not None:
            ks = dec.target_cache[0][2]                    # k scales [Hkv, P, ps]
            assert ks.sharding.shard_shape(ks.shape)[:2] == (TCFG.num_kv_heads // 2,
                                                             dec.num_pages // 2)
    assert outs[0] == outs[1]
