"""`make demo`: the shipped tiny code model pair, decoded speculatively and autoregressively.

    python -m bench.demo [--prompts 6] [--max-new-tokens 128] [--backend xla]
    python -m bench.demo --backend pallas --steps 4      # the interpreted Pallas kernels

Loads the target (a 4-layer byte-level code LM, HF naming) and its DFlash drafter (z-lab naming)
from bench/assets/, takes a handful of prompts from held-out stdlib files (never trained on, see
models/training/data.py), and decodes them in one run with `SpeculativeDecoder` and with
`generate_autoregressive`. It asserts that the greedy outputs are identical, prints the generated
text, tau (mean acceptance length), acceptance by block position, tokens/s of each and the
speedup, and writes a PNG plot (acceptance by position, tau per prompt) plus the text output next
to it (--out-dir, default ./demo_output).

The default backend is "xla" (plain-jnp twins of the kernels: same numerics contract, fast on
CPU). `--backend pallas` runs the hand-written kernels (paged attention, write_kv_pages, block
attention, append_context, verify_accept) in the TPU interpreter on this CPU: correct but slow, so
it decodes only `--steps` speculative steps for two prompts.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def acceptance_by_position(acceptance_lengths, block_size):
    """Fraction of speculative steps whose k-th draft token was accepted, k = 1..bs-1, and the
    fraction of steps with each acceptance length."""
    taus = np.asarray([t for seq in acceptance_lengths for t in seq], np.int64)
    if taus.size == 0:
        return np.zeros(block_size - 1), np.zeros(block_size)
    per_pos = np.array([(taus - 1 >= k).mean() for k in range(1, block_size)])
    hist = np.bincount(taus, minlength=block_size + 1)[1:block_size + 1] / taus.size
    return per_pos, hist


def load_pair(assets=ASSETS):
    from models.loading import load_draft, load_target

    target = load_target(os.path.join(assets, "target"))
    draft = load_draft(os.path.join(assets, "draft"))
    return target, draft


def run_pair(target, draft, prompts, *, max_new_tokens, backend, block_size=None,
             max_batch=None, warmup=True, queue=False, ar_result=None, repeats=1):
    """Decode `prompts` speculatively and autoregressively (same kernels, same cache).

    Returns a dict with both GenerationOutputs, wall times (after a warm-up call that compiles;
    with `repeats` > 1 the fastest of that many alternating runs, which also leaves out the
    compiles of prefill shapes first met in the first run, e.g. with queue=True), tau,
    acceptance by position, tokens/s and per-step times. `ar_result` = (output, seconds) of an
    earlier autoregressive run to reuse."""
    from models.decoding import SpeculativeDecoder, generate_autoregressive

    max_batch = max_batch or len(prompts)
    max_seq_len = max(len(p) for p in prompts) + max_new_tokens
    spec = SpeculativeDecoder(target, draft, max_batch=max_batch, max_seq_len=max_seq_len,
                              backend=backend, block_size=block_size)
    bs = spec.block_size
    ar_kw = dict(max_batch=max_batch, max_seq_len=max_seq_len, backend=backend)
    if warmup:      # compile prefill and step functions (short generations, same shapes)
        spec.generate(prompts[:max_batch], max_new_tokens=min(2 * bs + 1, max_new_tokens))
        if ar_result is None:
            generate_autoregressive(target, prompts[:max_batch],
                                    max_new_tokens=min(3, max_new_tokens), **ar_kw)
    ar, t_ar = ar_result if ar_result is not None else (None, float("inf"))
    sp, t_sp = None, float("inf")
    for _ in range(repeats):    # alternate AR and DFlash runs; keep the fastest of each
        if ar_result is None:
            t0 = time.perf_counter()
            res = _ar(target, prompts, max_new_tokens, ar_kw, queue)
            dt = time.perf_counter() - t0
            if dt < t_ar:
                ar, t_ar = res, dt
        t0 = time.perf_counter()
        res = spec.generate(prompts, max_new_tokens=max_new_tokens, queue=queue)
        dt = time.perf_counter() - t0
        if dt < t_sp:
            sp, t_sp = res, dt
    n_ar = sum(len(t) for t in ar.tokens)
    n_sp = sum(len(t) for t in sp.tokens)
    per_pos, hist = acceptance_by_position(sp.acceptance_lengths, bs)
    return dict(
        ar=ar, spec=sp, block_size=bs, identical=ar.tokens == sp.tokens,
        tau=sp.mean_acceptance,
        tau_per_prompt=[float(np.mean(a)) if a else float("nan") for a in sp.acceptance_lengths],
        acceptance_by_position=per_pos, acceptance_length_hist=hist,
        ar_seconds=t_ar, spec_seconds=t_sp, ar_tokens=n_ar, spec_tokens=n_sp,
        ar_tok_s=n_ar / t_ar, spec_tok_s=n_sp / t_sp, speedup=(n_sp / t_sp) / (n_ar / t_ar),
        ar_steps=ar.num_steps, spec_steps=sp.num_steps,
        ar_ms_per_step=1e3 * ar.decode_seconds / max(ar.num_steps, 1),
        spec_ms_per_step=1e3 * sp.decode_seconds / max(sp.num_steps, 1))


def _ar(target, prompts, max_new_tokens, ar_kw, queue):
    from models.decoding import AutoregressiveDecoder, generate_autoregressive

    if not queue:
        return generate_autoregressive(target, prompts, max_new_tokens=max_new_tokens, **ar_kw)
    dec = AutoregressiveDecoder(target, max_batch=ar_kw["max_batch"],
                                max_seq_len=ar_kw["max_seq_len"], backend=ar_kw["backend"])
    return dec.generate(prompts, max_new_tokens=max_new_tokens, queue=True)


def explain(r) -> str:
    """Speedup from the step counts and the step costs, both at the same batch: tokens/s ratio ~
    (AR steps / DFlash steps) / (DFlash step time / AR step time), plus prefill and host time.
    AR steps / DFlash steps is below tau when sequences finish at different steps (a batch step
    with few active slots) and when a sequence's last block is cut at max_new_tokens."""
    cost = r["spec_ms_per_step"] / r["ar_ms_per_step"]
    steps = r["ar_steps"] / max(r["spec_steps"], 1)
    return (f"one speculative step (draft + verify of {r['block_size']} tokens + accept) costs "
            f"{r['spec_ms_per_step']:.2f} ms vs {r['ar_ms_per_step']:.2f} ms for one "
            f"autoregressive step ({cost:.2f}x); tau {r['tau']:.2f} tokens per sequence and step, "
            f"{r['ar_steps']} AR vs {r['spec_steps']} DFlash batch steps ({steps:.2f}x fewer) -> "
            f"expected speedup {steps:.2f} / {cost:.2f} = {steps / cost:.2f}x "
            f"(measured {r['speedup']:.2f}x, prefill and host time included)")


def plot(r, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    pp = r["acceptance_by_position"]
    a1.bar(np.arange(1, len(pp) + 1), pp, color="tab:blue")
    a1.set_xlabel("draft position k in the block")
    a1.set_ylabel("fraction of steps accepting draft k")
    a1.set_ylim(0, 1)
    a1.set_title(f"acceptance by block position (bs={r['block_size']})")
    for k, v in enumerate(pp, 1):
        a1.text(k, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
    tp = r["tau_per_prompt"]
    a2.bar(np.arange(len(tp)), tp, color="tab:green")
    a2.axhline(r["tau"], color="k", ls="--", lw=1, label=f"mean tau {r['tau']:.2f}")
    a2.set_xlabel("prompt")
    a2.set_ylabel("tau (tokens per target step)")
    a2.set_title("tau per prompt")
    a2.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    from pallas_ops.host import quiet_libtpu_off_tpu

    quiet_libtpu_off_tpu()   # before jax starts a backend: no libtpu start-up errors off TPU
    p = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("xla", "pallas"), default="xla")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=4,
                   help="pallas backend: speculative steps to run (2 prompts)")
    p.add_argument("--seed", type=int, default=0, help="which held-out prompts")
    p.add_argument("--assets", default=ASSETS)
    p.add_argument("--out-dir", default="demo_output")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    from models.training import data as train_data

    target, draft = load_pair(args.assets)
    tc, dc = target.config, draft.config
    print(f"target: {tc.num_layers} layers, hidden {tc.hidden_size}, vocab {tc.vocab_size} "
          f"(bytes); draft: {dc.num_layers} layers, block size {dc.block_size}, reads target "
          f"layers {list(dc.target_layer_ids)}")
    items = train_data.heldout_prompts(args.prompts, prompt_len=args.prompt_len, seed=args.seed)
    max_new = args.max_new_tokens
    if args.backend == "pallas":
        items = items[:2]
        print(f"backend pallas: the hand-written Pallas kernels in the TPU interpreter (slow on "
              f"CPU): {args.steps} speculative steps for {len(items)} prompts")
    else:
        print("backend xla: plain-jnp twins of the Pallas kernels (same numerics contract; the "
              "interpreted kernels are too slow on a CPU for a full demo: --backend pallas)")
    prompts = [t for _, t in items]

    if args.backend == "pallas":
        # size the generation so that the first prompt takes about --steps speculative steps:
        # the xla run tells how many tokens those steps emit
        r0 = run_pair(target, draft, prompts, max_new_tokens=max_new, backend="xla",
                      warmup=False)
        acc = r0["spec"].acceptance_lengths[0]
        max_new = int(1 + sum(acc[:args.steps]))
        print(f"(xla reference run: the first {args.steps} steps emit {max_new} tokens)")
        # the autoregressive reference is the xla run's (same numerics contract), cut to length
        from models.decoding import GenerationOutput

        ar0 = r0["ar"]
        ar_cut = GenerationOutput([t[:max_new] for t in ar0.tokens],
                                  [[] for _ in ar0.tokens], ar0.finish_reasons)
        r = run_pair(target, draft, prompts, max_new_tokens=max_new, backend="pallas",
                     warmup=False, ar_result=(ar_cut, r0["ar_seconds"]))
    else:
        r = run_pair(target, draft, prompts, max_new_tokens=max_new, backend=args.backend)

    os.makedirs(args.out_dir, exist_ok=True)
    lines = []

    def out(s=""):
        print(s)
        lines.append(s)

    for i, ((path, ptoks), gen) in enumerate(zip(items, r["spec"].tokens)):
        out(f"--- prompt {i} ({path}, {len(ptoks)} bytes; tau {r['tau_per_prompt'][i]:.2f}) ---")
        tail = train_data.decode(ptoks)[-160:]
        out("  ..." + tail.replace("\n", "\n  "))
        out("  >>> generated:")
        out("  " + train_data.decode(gen).replace("\n", "\n  "))
    assert r["identical"], "speculative greedy output differs from autoregressive decoding"
    out()
    out(f"greedy outputs identical to autoregressive decoding: {r['identical']} "
        f"({len(prompts)} prompts, {r['spec_tokens']} tokens)")
    out(f"tau (mean acceptance length, tokens per target step): {r['tau']:.2f}")
    out("acceptance by block position k=1..{}: {}".format(
        r["block_size"] - 1, " ".join(f"{x:.2f}" for x in r["acceptance_by_position"])))
    if args.backend == "pallas":
        out(f"DFlash on the interpreted Pallas kernels: {r['spec_steps']} steps in "
            f"{r['spec_seconds']:.0f} s (incl. tracing; the TPU interpreter runs a Python callback "
            f"per load/store/DMA, so no speed is claimed here). Autoregressive reference: the xla "
            f"backend's greedy output.")
    else:
        out(f"autoregressive: {r['ar_tok_s']:.1f} tokens/s ({r['ar_steps']} steps); "
            f"DFlash: {r['spec_tok_s']:.1f} tokens/s ({r['spec_steps']} steps); "
            f"speedup {r['speedup']:.2f}x [backend {args.backend}, batch {len(prompts)}]")
        out(explain(r))
    png = os.path.join(args.out_dir, f"demo_acceptance_{args.backend}.png")
    speed = "" if args.backend == "pallas" else f", speedup {r['speedup']:.2f}x over autoregressive"
    plot(r, png, f"DFlash demo, backend {args.backend}: tau {r['tau']:.2f}{speed} "
                 f"({len(prompts)} held-out prompts)")
    with open(os.path.join(args.out_dir, f"demo_output_{args.backend}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {png} and demo_output_{args.backend}.txt in {args.out_dir}/ "
          f"(total {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
