"""`make demo`: the shipped tiny code model pair, decoded speculatively and autoregressively.

    python -m bench.demo [--prompts 8] [--max-new-tokens 128] [--temperature 0.7] [--batch 16]
    python -m bench.demo --backend pallas --steps 4      # the interpreted Pallas kernels

Loads the target (a 6-layer byte-level code LM, HF naming) and its DFlash drafter (z-lab naming)
from bench/assets/, takes a handful of prompts from held-out stdlib files (never trained on, see
models/training/data.py), and decodes them in one run with `SpeculativeDecoder` and with
`generate_autoregressive`, in three runs: latency (one request at a time, as the paper measures:
ms/token and tokens/s of each, speedup, tau, acceptance by block position), sampling at
--temperature (exact speculative sampling, per-prompt seeds), and throughput at --batch. It
asserts that the greedy outputs are identical, prints generated text, and writes a PNG plot of the
latency run (acceptance by position, tau per prompt) plus the text output next to it (--out-dir,
default ./demo_output).

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
             max_batch=None, warmup=True, queue=False, ar_result=None, repeats=1,
             temperature=0.0, seed=0, kv_cache_dtype=None, draft_sampling=None):
    """Decode `prompts` speculatively and autoregressively (same kernels, same cache).

    Returns a dict with both GenerationOutputs, wall times (after a warm-up call that compiles;
    with `repeats` > 1 the fastest of that many alternating runs, which also leaves out the
    compiles of prefill shapes first met in the first run, e.g. with queue=True), tau,
    acceptance by position, tokens/s and per-step times. `ar_result` = (output, seconds) of an
    earlier autoregressive run to reuse. temperature > 0 samples (same per-prompt seeds in both
    decoders: the same noise, see `models.sampling`). kv_cache_dtype: both decoders' caches
    (None: the model dtype; int8 / float8_e4m3fn / float8_e5m2: `models.kv_cache`).
    draft_sampling: the speculative decoder's drafting mode at T > 0 (None: its default; True
    samples drafts from the draft's distribution, so the outputs are other samples than AR's)."""
    from models.decoding import SpeculativeDecoder, generate_autoregressive

    max_batch = max_batch or len(prompts)
    max_seq_len = max(len(p) for p in prompts) + max_new_tokens
    mode = {} if draft_sampling is None else dict(draft_sampling=draft_sampling)
    spec = SpeculativeDecoder(target, draft, max_batch=max_batch, max_seq_len=max_seq_len,
                              backend=backend, block_size=block_size,
                              kv_cache_dtype=kv_cache_dtype, **mode)
    bs = spec.block_size
    ar_kw = dict(max_batch=max_batch, max_seq_len=max_seq_len, backend=backend,
                 kv_cache_dtype=kv_cache_dtype)
    gen_kw = dict(temperature=temperature, seed=seed)
    if warmup:      # compile prefill and step functions (short generations, same shapes)
        spec.generate(prompts[:max_batch], max_new_tokens=min(2 * bs + 1, max_new_tokens),
                      **gen_kw)
        if ar_result is None:
            generate_autoregressive(target, prompts[:max_batch],
                                    max_new_tokens=min(3, max_new_tokens), **ar_kw, **gen_kw)
    ar, t_ar = ar_result if ar_result is not None else (None, float("inf"))
    sp, t_sp = None, float("inf")
    for _ in range(repeats):    # alternate AR and DFlash runs; keep the fastest of each
        if ar_result is None:
            t0 = time.perf_counter()
            res = _ar(target, prompts, max_new_tokens, ar_kw, queue, gen_kw)
            dt = time.perf_counter() - t0
            if dt < t_ar:
                ar, t_ar = res, dt
        t0 = time.perf_counter()
        res = spec.generate(prompts, max_new_tokens=max_new_tokens, queue=queue, **gen_kw)
        dt = time.perf_counter() - t0
        if dt < t_sp:
            sp, t_sp = res, dt
    n_ar = sum(len(t) for t in ar.tokens)
    n_sp = sum(len(t) for t in sp.tokens)
    per_pos, hist = acceptance_by_position(sp.acceptance_lengths, bs)
    return dict(
        ar=ar, spec=sp, block_size=bs, draft_sampling=spec.draft_sampling,
        identical=ar.tokens == sp.tokens,
        differing_prompts=sum(a != b for a, b in zip(ar.tokens, sp.tokens)),
        tau=sp.mean_acceptance,
        tau_per_prompt=[float(np.mean(a)) if a else float("nan") for a in sp.acceptance_lengths],
        acceptance_by_position=per_pos, acceptance_length_hist=hist,
        ar_seconds=t_ar, spec_seconds=t_sp, ar_tokens=n_ar, spec_tokens=n_sp,
        ar_tok_s=n_ar / t_ar, spec_tok_s=n_sp / t_sp, speedup=(n_sp / t_sp) / (n_ar / t_ar),
        ar_steps=ar.num_steps, spec_steps=sp.num_steps,
        ar_ms_per_token=1e3 * t_ar / n_ar, spec_ms_per_token=1e3 * t_sp / n_sp,
        ar_ms_per_step=1e3 * ar.decode_seconds / max(ar.num_steps, 1),
        spec_ms_per_step=1e3 * sp.decode_seconds / max(sp.num_steps, 1))


def _ar(target, prompts, max_new_tokens, ar_kw, queue, gen_kw):
    from models.decoding import AutoregressiveDecoder, generate_autoregressive

    if not queue:
        return generate_autoregressive(target, prompts, max_new_tokens=max_new_tokens, **ar_kw,
                                       **gen_kw)
    dec = AutoregressiveDecoder(target, max_batch=ar_kw["max_batch"],
                                max_seq_len=ar_kw["max_seq_len"], backend=ar_kw["backend"],
                                kv_cache_dtype=ar_kw["kv_cache_dtype"])
    return dec.generate(prompts, max_new_tokens=max_new_tokens, queue=True, **gen_kw)


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


def _summary(r, label, out):
    """The figures of one run_pair result, as lines."""
    out(f"{label}: tau {r['tau']:.2f} (tokens per target step); acceptance by block position "
        f"k=1..{r['block_size'] - 1}: " + " ".join(f"{x:.2f}" for x in r["acceptance_by_position"]))
    out(f"  autoregressive {r['ar_ms_per_token']:.2f} ms/token ({r['ar_tok_s']:.0f} tokens/s); "
        f"DFlash {r['spec_ms_per_token']:.2f} ms/token ({r['spec_tok_s']:.0f} tokens/s): "
        f"speedup {r['speedup']:.2f}x")
    out("  " + explain(r))


def _show_text(items, r, out, train_data, limit):
    for i, ((path, ptoks), gen) in enumerate(zip(items, r["spec"].tokens)):
        if i >= limit:
            break
        out(f"--- prompt {i} ({path}, {len(ptoks)} bytes; tau {r['tau_per_prompt'][i]:.2f}) ---")
        out("  ..." + train_data.decode(ptoks)[-160:].replace("\n", "\n  "))
        out("  >>> generated:")
        out("  " + train_data.decode(gen).replace("\n", "\n  "))


def _pallas_steps(target, draft, items, args, out, train_data):
    """A few speculative steps on the interpreted Pallas kernels (correctness, not speed)."""
    from models.decoding import GenerationOutput

    items = items[:2]
    prompts = [t for _, t in items]
    out(f"backend pallas: the hand-written Pallas kernels in the TPU interpreter (slow on CPU): "
        f"{args.steps} speculative steps for {len(items)} prompts")
    # size the generation so that the first prompt takes about --steps speculative steps: the xla
    # run tells how many tokens those steps emit; its greedy output is the AR reference
    r0 = run_pair(target, draft, prompts, max_new_tokens=args.max_new_tokens, backend="xla",
                  warmup=False)
    max_new = int(1 + sum(r0["spec"].acceptance_lengths[0][:args.steps]))
    ar0 = r0["ar"]
    ar_cut = GenerationOutput([t[:max_new] for t in ar0.tokens], [[] for _ in ar0.tokens],
                              ar0.finish_reasons)
    r = run_pair(target, draft, prompts, max_new_tokens=max_new, backend="pallas",
                 warmup=False, ar_result=(ar_cut, r0["ar_seconds"]))
    _show_text(items, r, out, train_data, len(items))
    assert r["identical"], "speculative greedy output differs from autoregressive decoding"
    out(f"greedy outputs identical to autoregressive decoding (xla reference): True; tau "
        f"{r['tau']:.2f}; {r['spec_steps']} steps in {r['spec_seconds']:.0f} s (incl. tracing; "
        f"the TPU interpreter runs a Python callback per load/store/DMA: no speed is claimed)")
    return r


def main(argv=None):
    from pallas_ops.host import quiet_libtpu_off_tpu

    quiet_libtpu_off_tpu()   # before jax starts a backend: no libtpu start-up errors off TPU
    p = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("xla", "pallas"), default="xla")
    p.add_argument("--prompts", type=int, default=8, help="latency and sampling runs")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="the sampling run")
    p.add_argument("--batch", type=int, default=16, help="the throughput run's batch (0: skip)")
    p.add_argument("--throughput-prompts", type=int, default=32)
    p.add_argument("--show", type=int, default=3, help="prompts whose text is printed")
    p.add_argument("--steps", type=int, default=4,
                   help="pallas backend: speculative steps to run (2 prompts)")
    p.add_argument("--seed", type=int, default=0, help="which held-out prompts; sampling seed")
    p.add_argument("--assets", default=ASSETS)
    p.add_argument("--out-dir", default="demo_output")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    from models.training import data as train_data

    target, draft = load_pair(args.assets)
    tc, dc = target.config, draft.config
    os.makedirs(args.out_dir, exist_ok=True)
    lines = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    out(f"target: {tc.num_layers} layers, hidden {tc.hidden_size}, vocab {tc.vocab_size} (bytes); "
        f"draft: {dc.num_layers} layers, block size {dc.block_size}, reads target layers "
        f"{list(dc.target_layer_ids)}")
    items = train_data.heldout_prompts(args.prompts, prompt_len=args.prompt_len, seed=args.seed)
    if args.backend == "pallas":
        r = _pallas_steps(target, draft, items, args, out, train_data)
        title = f"DFlash demo, interpreted Pallas kernels: tau {r['tau']:.2f}"
    else:
        out("backend xla: plain-jnp twins of the Pallas kernels (same numerics contract; the "
            "interpreted kernels are too slow on a CPU for a full demo: --backend pallas)")
        prompts = [t for _, t in items]
        run = dict(max_new_tokens=args.max_new_tokens, backend="xla", max_batch=1, queue=True,
                   repeats=2)

        out()
        out(f"== Latency: one request at a time, as the paper measures ({len(prompts)} held-out "
            f"prompts, {args.max_new_tokens} new bytes each, greedy)")
        r = run_pair(target, draft, prompts, **run)
        _show_text(items, r, out, train_data, args.show)
        assert r["identical"], "speculative greedy output differs from autoregressive decoding"
        out(f"greedy outputs identical to autoregressive decoding: True ({r['spec_tokens']} "
            f"tokens)")
        _summary(r, "latency, batch 1", out)
        title = (f"DFlash demo, batch 1: tau {r['tau']:.2f}, speedup {r['speedup']:.2f}x over "
                 f"autoregressive ({len(prompts)} held-out prompts)")

        if args.temperature > 0:
            out()
            out(f"== Sampling at T = {args.temperature} (exact speculative sampling, per-prompt "
                f"seeds; batch 1)")
            rs = run_pair(target, draft, prompts, temperature=args.temperature, seed=args.seed,
                          **run)
            _show_text(items, rs, out, train_data, min(2, args.show))
            same = sum(a == b for a, b in zip(rs["ar"].tokens, rs["spec"].tokens))
            if rs["draft_sampling"]:
                out("drafts sampled from the draft's own distribution and verified with it "
                    "(full speculative sampling: exact, other samples than autoregressive "
                    f"sampling's; same tokens for {same} of {len(prompts)} prompts)")
            else:
                out(f"same tokens as autoregressive sampling with the same seeds: {same} of "
                    f"{len(prompts)} prompts (both decoders draw the token after position p "
                    f"with the noise of (seed, p); see models/sampling.py)")
            _summary(rs, f"sampling, T = {args.temperature}", out)

        if args.batch > 0:
            out()
            tp_items = train_data.heldout_prompts(args.throughput_prompts,
                                                  prompt_len=args.prompt_len, seed=args.seed + 1)
            out(f"== Throughput: batch {args.batch}, {len(tp_items)} prompts through the slots "
                f"(greedy)")
            rt = run_pair(target, draft, [t for _, t in tp_items],
                          **dict(run, max_batch=args.batch))
            assert rt["identical"], "speculative greedy output differs from autoregressive"
            _summary(rt, f"throughput, batch {args.batch}", out)
            out("  (at batch 16 a step waits for its slowest sequence and this CPU's cost grows "
                "with the 16 verified and 16 drafted tokens per sequence; on a TPU a 16-token "
                "verify costs about one decode step, weight loads dominating)")

    png = os.path.join(args.out_dir, f"demo_acceptance_{args.backend}.png")
    plot(r, png, title)
    with open(os.path.join(args.out_dir, f"demo_output_{args.backend}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {png} and demo_output_{args.backend}.txt in {args.out_dir}/ "
          f"(total {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
