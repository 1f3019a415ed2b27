"""The sharded decode steps AOT-compiled for a 4-chip v5p slice (libtpu, no TPU): the compiled
programs hold exactly the collectives the design needs (`bench.sharded`'s docstring), of the
right sizes, and nothing crosses the data axis."""
import jax.numpy as jnp
import pytest

from bench.collectives import collectives
from models.aot import abstract_models, lower_step, weights_per_device
from models.decoding import AutoregressiveDecoder, SpeculativeDecoder
from models.testing import tiny_draft_config, tiny_target_config
from pallas_ops.aot import tpu_mesh

H, V, B, BS = 256, 512, 4, 8
TCFG = tiny_target_config(num_heads=4, num_kv_heads=2, head_dim=128, hidden_size=H,
                          vocab_size=V, num_layers=3)
DCFG = tiny_draft_config(TCFG, num_heads=4, num_kv_heads=2, head_dim=128, block_size=BS,
                         num_layers=2)


@pytest.fixture(scope="module")
def models():
    return abstract_models(TCFG, DCFG, dtype=jnp.bfloat16)


def _compile(dec, chip="v5p"):
    return lower_step(dec, chip=chip).compile()


@pytest.mark.parametrize("data,model", [(2, 2), (1, 4)])
def test_speculative_step_collectives(models, data, model):
    target, draft = models
    mesh = tpu_mesh("v5p:2x2x1", {"data": data, "model": model})
    dec = SpeculativeDecoder(target, draft, max_batch=B, max_seq_len=128, backend="pallas",
                             mesh=mesh, abstract=True)
    recs = collectives(_compile(dec), mesh)
    assert all(r.mesh_axes == ("model",) for r in recs), [(r.name, r.mesh_axes) for r in recs]
    bl = B // data
    reduces = sorted(r.shapes[0] for r in recs if r.kind == "all-reduce")
    want = sorted([f"bf16[{bl},{BS},{H}]"] * (1 + 2 * DCFG.num_layers)      # draft
                  + [f"bf16[{bl * BS},{H}]"] * (1 + 2 * TCFG.num_layers)    # target verify
                  + [f"f32[{bl},{BS - 1}]", f"s32[{bl},{BS - 1}]"])         # draft argmax
    assert reduces == want
    others = [r for r in recs if r.kind != "all-reduce"]
    assert [r.kind for r in others] == ["all-gather"]          # verify/accept's row partials
    assert others[0].bytes <= 64 * bl * BS                     # a few int32 per row, no logits


def test_autoregressive_step_collectives_and_weights(models):
    target, _ = models
    mesh = tpu_mesh("v5p:2x2x1", {"data": 1, "model": 4})
    dec = AutoregressiveDecoder(target, max_batch=B, max_seq_len=128, backend="pallas",
                                mesh=mesh, abstract=True)
    recs = collectives(_compile(dec), mesh)
    big = [r for r in recs if r.kind == "all-reduce" and r.shapes[0] == f"bf16[{B},{H}]"]
    assert len(big) == 1 + 2 * TCFG.num_layers
    small = [r for r in recs if r not in big]
    # the argmax / Gumbel-max partials (max, then lowest index; XLA pairs the greedy and the
    # sampled ones into tuple all-reduces): one value per row each
    assert small and all(r.kind == "all-reduce" and all(s.endswith(f"[{B}]") for s in r.shapes)
                         for r in small)
    one = AutoregressiveDecoder(target, max_batch=B, max_seq_len=128, backend="pallas",
                                abstract=True)
    # norms replicated; k/v projections: 2 KV heads replicated to 4, one head's columns per
    # device; everything else split 4 ways
    L, D = TCFG.num_layers, TCFG.head_dim
    norms = (2 * L + 1) * H * 2 + L * 2 * D * 2
    kv_whole = L * 2 * H * TCFG.num_kv_heads * D * 2
    kv_device = L * 2 * H * D * 2
    assert weights_per_device(dec) == \
        (weights_per_device(one) - norms - kv_whole) // 4 + norms + kv_device


def test_v6e_slice_compiles(models):
    target, draft = models
    mesh = tpu_mesh("v6e:2x2", {"data": 1, "model": 4})
    dec = SpeculativeDecoder(target, draft, max_batch=B, max_seq_len=128, backend="pallas",
                             mesh=mesh, abstract=True)
    assert sum(r.kind == "all-reduce" for r in collectives(_compile(dec, "v6e"), mesh)) == \
        1 + 2 * DCFG.num_layers + 1 + 2 * TCFG.num_layers + 2


def test_lowering_for_a_chip_needs_the_pallas_backend(models):
    target, _ = models
    dec = AutoregressiveDecoder(target, max_batch=B, max_seq_len=128, abstract=True)
    with pytest.raises(ValueError, match="backend='pallas'"):
        lower_step(dec, chip="v5p")
    with pytest.raises(RuntimeError, match="abstract decoder"):
        dec.generate([[1, 2]], max_new_tokens=2)
