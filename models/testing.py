"""Test doubles for the speculative decoder.

`OracleProposer` replaces the draft model's proposals by the target's own continuation (computed
beforehand, e.g. by `generate_autoregressive` at T=0), so the all-accepted and bonus paths run; with
`corrupt` > 0 it spoils a random draft position now and then, giving a mix of accept lengths.
Pass it as `SpeculativeDecoder(..., proposal_override=OracleProposer(...))`.
"""
from __future__ import annotations

import numpy as np


class OracleProposer:
    """Proposes continuation[len(generated) : len(generated) + n] for each request.

    continuations: per request index, the expected generated tokens (prompt excluded).
    corrupt: probability that a block gets one wrong draft at a uniformly chosen position.
    Past the end of a continuation it proposes `fill` (default: the last token again).
    """

    def __init__(self, continuations, *, vocab_size: int, corrupt: float = 0.0, seed: int = 0,
                 fill: int | None = None):
        self.continuations = [list(c) for c in continuations]
        self.vocab_size = vocab_size
        self.corrupt = corrupt
        self.fill = fill
        self.rng = np.random.default_rng(seed)
        self.calls = 0

    def __call__(self, request: int, generated: list[int], n: int):
        self.calls += 1
        cont = self.continuations[request]
        k = len(generated)
        prop = list(cont[k:k + n])
        pad = self.fill if self.fill is not None else (cont[-1] if cont else 0)
        prop += [pad] * (n - len(prop))
        prop = np.asarray(prop, np.int32)
        if self.corrupt > 0 and self.rng.random() < self.corrupt:
            j = int(self.rng.integers(0, n))
            prop[j] = (prop[j] + 1 + int(self.rng.integers(0, self.vocab_size - 1))) \
                % self.vocab_size
        return prop


def perturb_norms(model, seed: int = 0, scale: float = 0.1):
    """Give every RMSNorm weight (all-ones at init) random values, so tests notice a norm that is
    skipped, swapped or loaded into the wrong place."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from models.layers import RMSNorm

    key = jax.random.key(seed)
    for i, (_, m) in enumerate(nnx.iter_graph(model)):
        if isinstance(m, RMSNorm):
            w = m.weight.get_value()
            noise = jax.random.normal(jax.random.fold_in(key, i), w.shape, jnp.float32)
            m.weight.set_value((1.0 + scale * noise).astype(w.dtype))
    return model


def tiny_target_config(**kw):
    """A small Qwen3-like target config for tests (head_dim 64: the kernels' smallest)."""
    from models.config import TargetConfig

    base = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=2,
                num_kv_heads=1, head_dim=64, rms_norm_eps=1e-6, rope_theta=10000.0,
                qk_norm=True, model_type="qwen3")
    base.update(kw)
    return TargetConfig(**base)


def tiny_draft_config(target, **kw):
    """A small DFlash draft config fitting `target` (a TargetConfig)."""
    from models.config import DraftConfig

    base = dict(vocab_size=target.vocab_size, hidden_size=target.hidden_size,
                intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64,
                block_size=16, mask_token_id=target.vocab_size - 1,
                target_layer_ids=(0, target.num_layers - 1), num_target_layers=target.num_layers)
    base.update(kw)
    return DraftConfig(**base)
