"""The target's own greedy continuations of corpus prompts: the drafter's training sequences.
"""
from __future__ import annotations

import time

import numpy as np

from models.training import data as train_data
from models.target import TargetModel

# ------------------------------------------------------------------------------------------------
# optimizer


def make_rollouts(target: TargetModel, prompts: np.ndarray, gen_len: int, *, batch: int = 64,
                  backend: str = "xla", log=None) -> np.ndarray:
    """Greedy continuations of int32 prompts [N, P]: returns int32 [N, P + gen_len]."""
    from models.decoding import generate_autoregressive

    out = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        res = generate_autoregressive(target, [list(p) for p in chunk], max_new_tokens=gen_len,
                                      max_batch=batch, backend=backend)
        for p, toks in zip(chunk, res.tokens):
            toks = (list(toks) + [train_data.EOS_ID] * gen_len)[:gen_len]
            out.append(np.concatenate([p, np.asarray(toks, np.int32)]))
        if log:
            n = min(i + batch, len(prompts))
            log(f"rollouts {n}/{len(prompts)} ({time.perf_counter() - t0:.0f}s)")
    return np.stack(out).astype(np.int32)


# ------------------------------------------------------------------------------------------------
# CLI plumbing
