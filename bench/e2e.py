"""End-to-end DFlash measurement of the shipped pair over many held-out prompts.

    python -m bench.e2e [--prompts 200] [--block-sizes 8,16] [--batch 16] [--prompt-len 64]
        [--temperature 0] [--draft-sampling on|off]
        [--max-new-tokens 128]
        [--backend xla] [--repeats 3] [--out bench/assets/e2e]

For each block size: every prompt (from held-out stdlib files, models/training/data.py) is decoded
by `SpeculativeDecoder` and by autoregressive decoding over the same kernels and cache, `--batch`
sequences at a time (slots refilled as sequences finish); the greedy outputs must be identical
(checked). Reports tau (mean acceptance length, i.e. tokens per target step, against the target's
own greedy continuation), acceptance by block position, tokens/s of each, the speedup and the
per-step costs that explain it. Writes OUT.json and OUT.md (a markdown table for the README).

A drafter runs at a block size other than the one it was trained for by truncating (or extending)
its block; the training block size is reported alongside.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from bench.demo import ASSETS, explain, load_pair, run_pair


def main(argv=None):
    from pallas_ops.host import quiet_libtpu_off_tpu

    quiet_libtpu_off_tpu()   # before jax starts a backend: no libtpu start-up errors off TPU
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--block-sizes", default="8,16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--backend", choices=("xla", "pallas"), default="xla")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3,
                   help="alternating AR / DFlash runs per block size; the fastest of each is "
                        "reported (the first run also compiles prefill shapes met only then)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="> 0: exact speculative sampling (per-prompt seeds from --seed); with "
                        "--draft-sampling off the outputs equal AR sampling with the same seeds "
                        "up to float differences between a verify block's logits and a decode "
                        "step's: counted, not required")
    p.add_argument("--draft-sampling", choices=("on", "off"), default=None,
                   help="T > 0: on samples the drafts from the draft's own tempered distribution "
                        "and verifies with it (full speculative sampling; other samples than "
                        "AR's, not compared); off drafts greedily (one-hot proposals); default: "
                        "the decoder's")
    p.add_argument("--kv-cache-dtype", choices=("int8", "float8_e4m3fn", "float8_e5m2"),
                   default=None, help="8-bit KV caches for both decoders (default: model dtype)")
    p.add_argument("--assets", default=ASSETS)
    p.add_argument("--draft", default=None, help="draft dir (default: ASSETS/draft)")
    p.add_argument("--out", default=os.path.join(ASSETS, "e2e"))
    args = p.parse_args(argv)

    from models.training import data as train_data
    from models.loading import load_draft

    target, draft = load_pair(args.assets)
    if args.draft:
        draft = load_draft(args.draft)
    items = train_data.heldout_prompts(args.prompts, prompt_len=args.prompt_len, seed=args.seed)
    prompts = [t for _, t in items]
    rows = []
    ar_result = None
    for bs in [int(x) for x in args.block_sizes.split(",")]:
        t0 = time.perf_counter()
        r = run_pair(target, draft, prompts, max_new_tokens=args.max_new_tokens,
                     backend=args.backend, block_size=bs, max_batch=args.batch, queue=True,
                     ar_result=ar_result, repeats=args.repeats,
                     kv_cache_dtype=args.kv_cache_dtype, temperature=args.temperature,
                     seed=args.seed, draft_sampling=None if args.draft_sampling is None
                     else args.draft_sampling == "on")
        ar_result = (r["ar"], r["ar_seconds"])
        exact = args.kv_cache_dtype is None and args.temperature == 0
        sampled_drafts = r["draft_sampling"] and args.temperature > 0
        if not r["identical"] and exact:
            raise SystemExit(f"bs {bs}: speculative output differs from autoregressive decoding")
        if not r["identical"] and not sampled_drafts:
            # 8-bit caches: K/V of a token computed in a verify block and in a decode step differ
            # in the last float bits (different reduction shapes); rounding to 8 bits can turn
            # that into a different value, which can flip a near-tie argmax later. Reported.
            print(f"bs {bs}: {r['differing_prompts']} of {len(prompts)} outputs differ from "
                  f"autoregressive decoding" + (f" over the same {args.kv_cache_dtype} cache"
                                                if args.kv_cache_dtype else
                                                " sampling with the same seeds"), flush=True)
        row = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()
               if k not in ("ar", "spec")}
        row.update(block_size=bs, trained_block_size=draft.config.block_size,
                   prompts=len(prompts), batch=args.batch, prompt_len=args.prompt_len,
                   max_new_tokens=args.max_new_tokens, backend=args.backend,
                   kv_cache_dtype=args.kv_cache_dtype or "model dtype",
                   temperature=args.temperature, draft_sampling=sampled_drafts,
                   wall_seconds=time.perf_counter() - t0,
                   tau_p10_p50_p90=np.percentile(
                       [t for t in r["tau_per_prompt"] if t == t], [10, 50, 90]).tolist())
        rows.append(row)
        print(f"bs {bs}: tau {r['tau']:.2f}; acceptance by position "
              + " ".join(f"{x:.2f}" for x in r["acceptance_by_position"]), flush=True)
        print(f"  AR {r['ar_tok_s']:.1f} tok/s, DFlash {r['spec_tok_s']:.1f} tok/s, speedup "
              f"{r['speedup']:.2f}x; " + explain(r), flush=True)
    meta = dict(target=os.path.join(args.assets, "target"),
                draft=args.draft or os.path.join(args.assets, "draft"),
                prompt_rule="train_data.heldout_prompts(seed=%d): held-out stdlib files "
                            "(crc32(path) %% 20 == 0), line-aligned" % args.seed,
                cpu_count=os.cpu_count())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    md = ["| block size | prompts | batch | tau | acceptance by position (k=1..) | AR tok/s | "
          "DFlash tok/s | speedup | ms/step AR / DFlash |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['block_size']} (trained {r['trained_block_size']}) | {r['prompts']} | "
                  f"{r['batch']} | {r['tau']:.2f} | "
                  + " ".join(f"{x:.2f}" for x in r["acceptance_by_position"])
                  + f" | {r['ar_tok_s']:.0f} | {r['spec_tok_s']:.0f} | {r['speedup']:.2f}x | "
                  f"{r['ar_ms_per_step']:.1f} / {r['spec_ms_per_step']:.1f} |")
    md.append("")
    differ = sum(r["differing_prompts"] for r in rows)
    sampled_drafts = any(r["draft_sampling"] for r in rows)
    if sampled_drafts:
        check = ("drafts sampled from the draft's own distribution (full speculative sampling): "
                 "other samples than autoregressive sampling's, not compared")
    elif not differ:
        check = ("outputs identical to autoregressive decoding (checked)"
                 if args.temperature == 0 else
                 "outputs identical to autoregressive sampling with the same seeds (checked)")
    elif args.kv_cache_dtype:
        check = (f"{differ} outputs differ from autoregressive decoding over the same "
                 f"{args.kv_cache_dtype} cache (last-bit K/V differences rounded to 8 bits)")
    else:
        check = (f"{differ} outputs differ from autoregressive sampling with the same seeds "
                 f"(last-bit logit differences between a verify block and a decode step)")
    cache = f"; {args.kv_cache_dtype} KV caches" if args.kv_cache_dtype else ""
    mode = (f"exact speculative sampling at T = {args.temperature}" if args.temperature > 0
            else "greedy")
    if args.temperature > 0:
        mode += (", drafts sampled from the draft's distribution (draft_probs)" if sampled_drafts
                 else ", greedy drafts (one-hot proposals)")
    md.append(f"Backend {args.backend} on {os.cpu_count()} CPU cores; {mode}{cache}; "
              f"{args.prompt_len}-byte prompts from held-out stdlib files, {args.max_new_tokens} "
              f"new bytes each; {check}.")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
