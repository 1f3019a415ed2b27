"""Training in JAX: small target LMs (for demos) and DFlash drafters for a frozen target.

    optim.py       AdamW + warmup/cosine, host-set learning rate
    objectives.py  target loss; the DFlash drafter's packed block loss, anchors, weights
    rollouts.py    the target's greedy continuations (drafter training data)
    loop.py        the shared training loop (steps or minutes, eval, saving)
    cli.py         `python -m models.training target|rollouts|draft`
    data.py        the stdlib byte corpus, held-out split, prompts
"""
