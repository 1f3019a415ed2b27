"""verify_accept on vocabulary shards (`vocab_axis_name=`), inside `jax.shard_map` on 2, 4 and 8
CPU devices: token for token the unsharded call's result and the float64 reference's.

Runs in its own process with `XLA_FLAGS=--xla_force_host_platform_device_count=8`
(tests/test_multi_device.py starts it; collected only when PALLAS_DFLASH_MULTI_DEVICE=1).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from pallas_ops.verify import VerifyAcceptBlockSizes, verify_accept
from pallas_ops.verify import xla as verify_xla
from reference import verify as ref

V = 768                      # 8 x 96: shards of 96, 192, 384 columns (none a multiple of 128)
B, BS = 4, 5


def _mesh(n):
    assert jax.device_count() >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    return Mesh(np.array(jax.devices()[:n]), ("model",))


def _sharded(impl, n, with_probs):
    fn = verify_accept if impl == "kernel" else verify_xla.verify_accept
    kw = dict(block_sizes=VerifyAcceptBlockSizes(2, 128)) if impl == "kernel" else {}

    def local(logits, drafts, temperature, seed, position, num_seqs, *probs):
        return fn(logits, drafts, temperature=temperature, seed=seed, position=position,
                  num_seqs=num_seqs, draft_probs=probs[0] if probs else None,
                  vocab_axis_name="model", **kw)

    vocab = P(None, None, "model")
    specs = (vocab, P(), P(), P(), P(), P()) + ((vocab,) if with_probs else ())
    return jax.jit(jax.shard_map(local, mesh=_mesh(n), in_specs=specs, out_specs=P(),
                                 check_vma=False))


def _case(seed, *, sampling, probs=False, ties=False, bad_rows=False):
    r = np.random.default_rng(seed)
    x = r.normal(size=(B, BS, V)).astype(np.float32) * 2
    am = x.argmax(-1)
    d = am[:, :-1].astype(np.int32).copy()
    flip = r.random(d.shape) < 0.3
    d[flip] = r.integers(-1, V + 3, size=flip.sum())
    if ties:   # the row maximum copied into other shards: the lowest global index must win
        for b in range(B):
            for j in range(BS):
                top = x[b, j].max()
                for k in r.choice(V, size=3, replace=False):
                    x[b, j, k] = top
        d = x.argmax(-1)[:, :-1].astype(np.int32)
        d[0, 1] = int(np.flatnonzero(x[0, 1] == x[0, 1].max())[-1])   # a tied, higher index
    if bad_rows:
        x[1, 2, V - 5] = np.nan                       # a NaN in the last shard only
        x[2, 0, :] = -np.inf                          # a row of -inf in every shard
    t = np.where(r.random(B) < 0.5, r.uniform(0.5, 1.5, B), 0.0).astype(np.float32) if sampling \
        else np.zeros(B, np.float32)
    s = r.integers(0, 2 ** 31 - 1, B).astype(np.int32)
    pos = r.integers(0, 1000, B).astype(np.int32)
    q = None
    if probs:
        q = r.dirichlet(np.full(V, 0.3), size=(B, BS - 1)).astype(np.float32)
        # drafts drawn from q, so acceptance and rejection both happen
        d = np.array([[r.choice(V, p=q[b, j] / q[b, j].sum()) for j in range(BS - 1)]
                      for b in range(B)], np.int32)
    return x, d, t, s, pos, q


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("impl", ["kernel", "xla"])
@pytest.mark.parametrize("kind", ["greedy-ties", "greedy-bad-rows", "sampling", "draft-probs"])
def test_sharded_equals_unsharded_and_reference(n, impl, kind):
    x, d, t, s, pos, q = _case(n * 10 + len(kind), sampling=kind in ("sampling", "draft-probs"),
                               probs=kind == "draft-probs", ties=kind == "greedy-ties",
                               bad_rows=kind == "greedy-bad-rows")
    num_seqs = np.int32(B - 1 if kind == "greedy-bad-rows" else B)   # a padding sequence
    temperature = None if kind.startswith("greedy") else t
    args = [jnp.asarray(x), jnp.asarray(d), jnp.asarray(t), jnp.asarray(s), jnp.asarray(pos),
            jnp.asarray(num_seqs)]
    if q is not None:
        args.append(jnp.asarray(q))
    if temperature is None:        # greedy rows: T = 0 is greedy in every implementation
        args[2] = jnp.zeros(B, jnp.float32)
    got = _sharded(impl, n, q is not None)(*args)

    fn = verify_accept if impl == "kernel" else verify_xla.verify_accept
    whole = fn(jnp.asarray(x), jnp.asarray(d), temperature=args[2], seed=args[3],
               position=args[4], num_seqs=int(num_seqs),
               draft_probs=None if q is None else jnp.asarray(q))
    want = ref.verify_accept(x.astype(np.float64), d, temperature=np.asarray(args[2]),
                             seed=s, position=pos, num_seqs=int(num_seqs),
                             draft_probs=None if q is None else q.astype(np.float64))
    for res in (whole, want):
        np.testing.assert_array_equal(np.asarray(got.num_accepted), np.asarray(res.num_accepted))
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(res.tokens))
    if kind == "greedy-ties":      # the contract itself, by hand: lowest tied index, exactly
        am = x.argmax(-1)
        assert got.tokens[0, 0] == am[0, 0]
        assert got.num_accepted[0] == 1 and got.tokens[0, 1] == am[0, 1]  # tied draft rejected
    if kind == "greedy-bad-rows":
        assert (np.asarray(got.tokens)[1:] == -1).all()   # NaN row, -inf row, padding
