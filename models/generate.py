"""Command line: DFlash speculative generation from checkpoints.

    python -m models.generate --target DIR --draft DIR --prompt-ids 1,2,3 [--prompt-ids 4,5]
        [--tokenizer DIR --prompt "text"] [--max-new-tokens 128] [--temperature 0]
        [--top-k K] [--top-p P] [--min-p M] [--logprobs] [--[no-]draft-sampling]
        [--backend xla|pallas] [--compare-ar] [--kv-cache-dtype int8|float8_e4m3fn|float8_e5m2]

--temperature, --top-k, --top-p and --min-p take one value for every prompt or a comma-separated
list with one value per prompt (in the order of --prompt-ids, then --prompt). The filters apply to
sampling sequences (T > 0): top-k keeps the k most likely tokens (0 = off), top-p the smallest set
of most likely tokens reaching probability p (1 = off), min-p the tokens at least m times as
likely as the most likely (0 = off). --logprobs prints each token's log-probability under the
distribution it was emitted from. --draft-sampling samples the drafts of sampling sequences from
the draft model's own distribution and verifies with it (full speculative sampling; exact, but
other samples than autoregressive sampling's); --no-draft-sampling drafts greedily.

Prints each sequence's generated ids (and text with --tokenizer, which needs the `tokenizers`
package), the acceptance figures (mean tau, per-step histogram) and timings; progress goes to
stderr every --progress-every steps. `--tiny-random` runs random tiny models instead of
checkpoints (a smoke test / a measure of the loop's own overhead); with `--oracle-draft` the draft's
proposals are replaced by the target's own greedy continuation, so every block is accepted.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", ",").split(",") if t]
    except ValueError as e:
        raise SystemExit(f"--prompt-ids: expected comma-separated integers, got {text!r}") from e
    if not ids:
        raise SystemExit("--prompt-ids: empty prompt")
    return ids


_SAMPLING_FLAGS = {"temperature": float, "top_k": int, "top_p": float, "min_p": float}


def _parse_values(flag: str, text, kind):
    """One value or a comma-separated list (one per prompt) of `kind`; None stays None."""
    if text is None:
        return None
    try:
        vals = [kind(t) for t in str(text).replace(" ", ",").split(",") if t]
    except ValueError as e:
        raise SystemExit(f"{flag}: expected {'an integer' if kind is int else 'a number'} or a "
                         f"comma-separated list of them (one per prompt), got {text!r}") from e
    if not vals:
        raise SystemExit(f"{flag}: no value given")
    return vals[0] if len(vals) == 1 else vals


def sampling_arguments(args, n_prompts: int) -> dict:
    """generate()'s temperature / top_k / top_p / min_p / logprobs from the flags, checked
    (`models.decoding.params`): SystemExit naming the flag on a bad value or count."""
    from models.decoding.params import per_prompt

    kw = {}
    for name, kind in _SAMPLING_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        value = _parse_values(flag, getattr(args, name), kind)
        try:
            per_prompt(name, value, n_prompts)
        except ValueError as e:
            raise SystemExit(f"{flag}: {e}") from e
        kw[name] = value
    if kw["temperature"] is None:
        kw["temperature"] = 0.0
    kw["logprobs"] = bool(args.logprobs)
    return kw


def _tokenizer(path):
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise SystemExit("--tokenizer needs the `tokenizers` package (pip install tokenizers)") \
            from e
    f = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    return Tokenizer.from_file(f)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m models.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="target checkpoint directory (HF Llama-3.x / Qwen3)")
    p.add_argument("--draft", help="DFlash draft checkpoint directory (z-lab naming)")
    p.add_argument("--tiny-random", action="store_true",
                   help="random tiny target + draft instead of checkpoints")
    p.add_argument("--prompt-ids", action="append", default=[],
                   help="comma-separated token ids; repeat for a batch")
    p.add_argument("--prompt", action="append", default=[], help="text prompt (needs --tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer.json or a directory holding it")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", default="0",
                   help="0 = greedy; one value, or a comma-separated list with one per prompt")
    p.add_argument("--top-k", default=None, help="keep the k most likely tokens (0 = off); one "
                   "value or one per prompt (comma-separated)")
    p.add_argument("--top-p", default=None, help="nucleus: keep the most likely tokens up to "
                   "probability p, in (0, 1] (1 = off); one value or one per prompt")
    p.add_argument("--min-p", default=None, help="keep tokens at least m times as likely as the "
                   "most likely, in [0, 1) (0 = off); one value or one per prompt")
    p.add_argument("--logprobs", action="store_true",
                   help="print each generated token's log-probability (and a summary)")
    p.add_argument("--draft-sampling", action=argparse.BooleanOptionalAction, default=None,
                   help="T > 0: sample drafts from the draft's own distribution and verify with "
                        "it (full speculative sampling); --no-draft-sampling: greedy drafts "
                        "(default: the decoder's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eos-token-id", type=int, action="append", default=None)
    p.add_argument("--backend", choices=("xla", "pallas"), default="xla")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="parameter dtype (default: the checkpoint's)")
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--kv-cache-dtype", choices=("int8", "float8_e4m3fn", "float8_e5m2"),
                   default=None, help="8-bit KV caches (target pages and draft context, with a "
                   "scale per head and token); default: the model dtype")
    p.add_argument("--block-size", type=int, default=None, help="default: the draft's")
    p.add_argument("--compare-ar", action="store_true",
                   help="also run plain autoregressive decoding; report both and compare")
    p.add_argument("--oracle-draft", action="store_true",
                   help="replace proposals by the target's greedy continuation (implies "
                        "--compare-ar; temperature 0)")
    p.add_argument("--repeat", type=int, default=1, help="timed repetitions after a warm-up")
    p.add_argument("--progress-every", type=int, default=16)
    return p


def main(argv=None):
    from pallas_ops.host import quiet_libtpu_off_tpu

    quiet_libtpu_off_tpu()   # before jax starts a backend: no libtpu start-up errors off TPU
    args = build_parser().parse_args(argv)
    import jax.numpy as jnp
    from flax import nnx

    from models.decoding import AutoregressiveDecoder, SpeculativeDecoder, print_progress

    dtype = jnp.dtype(args.dtype) if args.dtype else None
    if args.tiny_random:
        from models.draft import DraftModel
        from models.target import TargetModel
        from models.testing import tiny_draft_config, tiny_target_config

        tcfg = tiny_target_config()
        target = TargetModel(tcfg, dtype=dtype or jnp.float32, rngs=nnx.Rngs(0))
        draft = DraftModel(tiny_draft_config(tcfg), dtype=dtype or jnp.float32,
                           rngs=nnx.Rngs(1))
    else:
        if not args.target or not args.draft:
            raise SystemExit("give --target and --draft checkpoint directories (or --tiny-random)")
        from models.loading import load_draft, load_target

        target = load_target(args.target, dtype=dtype)
        draft = load_draft(args.draft, dtype=dtype or target.dtype)

    tok = _tokenizer(args.tokenizer) if args.tokenizer else None
    prompts = [_parse_ids(t) for t in args.prompt_ids]
    if args.prompt:
        if tok is None:
            raise SystemExit("--prompt needs --tokenizer")
        prompts += [tok.encode(t).ids for t in args.prompt]
    if not prompts:
        raise SystemExit("give at least one --prompt-ids (or --prompt with --tokenizer)")
    if args.oracle_draft:
        args.compare_ar, args.temperature = True, "0"
    sampling = sampling_arguments(args, len(prompts))
    temps = sampling["temperature"]
    greedy = not any(t > 0 for t in (temps if isinstance(temps, list) else [temps]))

    bs = args.block_size or draft.config.block_size
    max_batch = args.max_batch or len(prompts)
    max_seq_len = args.max_seq_len or max(len(p) for p in prompts) + args.max_new_tokens
    common = dict(max_new_tokens=args.max_new_tokens, seed=args.seed,
                  eos_token_id=args.eos_token_id, **sampling)

    def timed(dec, label):
        dec.generate(prompts, **common)                              # warm-up (compiles)
        best = None
        for _ in range(max(1, args.repeat)):
            t0 = time.perf_counter()
            out = dec.generate(prompts, progress=print_progress(args.progress_every), **common)
            wall = time.perf_counter() - t0
            n = sum(len(t) for t in out.tokens)
            if best is None or wall < best[1]:
                best = (out, wall, n)
        out, wall, n = best
        print(f"{label}: {n} tokens in {wall * 1e3:.1f} ms = {wall / n * 1e3:.2f} ms/token "
              f"(decode steps {out.num_steps}, {out.decode_seconds / max(out.num_steps, 1) * 1e3:.2f}"
              f" ms/step)")
        return out, wall / n

    ar_out = None
    if args.compare_ar:
        ar = AutoregressiveDecoder(target, max_batch=max_batch, max_seq_len=max_seq_len,
                                   page_size=args.page_size, backend=args.backend,
                                   kv_cache_dtype=args.kv_cache_dtype)
        ar_out, ar_tpt = timed(ar, f"autoregressive [{args.backend}]")
    override = None
    if args.oracle_draft:
        from models.testing import OracleProposer

        override = OracleProposer(ar_out.tokens, vocab_size=target.config.vocab_size)
    mode = {} if args.draft_sampling is None else dict(draft_sampling=args.draft_sampling)
    spec = SpeculativeDecoder(target, draft, max_batch=max_batch, max_seq_len=max_seq_len,
                              page_size=args.page_size, backend=args.backend, block_size=bs,
                              proposal_override=override, kv_cache_dtype=args.kv_cache_dtype,
                              **mode)
    out, sp_tpt = timed(spec, f"dflash bs={bs} [{args.backend}]"
                        + (" (oracle draft)" if override else ""))
    for i, (p, toks) in enumerate(zip(prompts, out.tokens)):
        print(f"[{i}] prompt {len(p)} tokens -> {len(toks)} new ({out.finish_reasons[i]}): {toks}")
        if out.logprobs is not None:
            lp = out.logprobs[i]
            print("    logprobs: [" + ", ".join(f"{x:.4f}" for x in lp) + "]")
            if lp:
                print(f"    mean logprob {np.mean(lp):.4f} (perplexity {np.exp(-np.mean(lp)):.3f})")
        if tok is not None:
            print("    " + tok.decode(toks).replace("\n", "\n    "))
    taus = [t for seq in out.acceptance_lengths for t in seq]
    if taus:
        hist = collections.Counter(taus)
        print(f"acceptance: mean tau {np.mean(taus):.2f} over {len(taus)} sequence-steps; "
              "histogram " + " ".join(f"{k}:{hist[k]}" for k in sorted(hist)))
    if ar_out is not None:
        same = ar_out.tokens == out.tokens
        other_samples = spec.draft_sampling and not greedy
        verdict = ("identical" if same else
                   "differ (expected: sampled drafts draw other samples than AR sampling)"
                   if other_samples else "DIFFER")
        print(f"speedup vs autoregressive: {ar_tpt / sp_tpt:.2f}x; outputs {verdict}")
        if greedy and not same:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
