"""The sharded decode steps AOT-compiled for real TPU slices: collectives, memory, weights per chip.

    python -m bench sharded [--case NAME ...] [--all] [--batch 8] [--max-seq-len 4096]
        [--json PATH] [--tables]

Each case builds the target and its DFlash drafter as abstract models (bf16 weights as
`jax.ShapeDtypeStruct`s, nothing allocated), an abstract `SpeculativeDecoder` and
`AutoregressiveDecoder` over a `pallas_ops.aot.tpu_mesh` of the slice, lowers their decode
steps with the Pallas kernels compiled for the chip (`models.aot.lower_step`: draft + target
verify of the block + verify/accept + commit; the one-token AR step) and reports from the
compiled programs (`bench.collectives`): every collective and its bytes per device, per-device
memory (`memory_analysis()`) and the weights one chip holds.

The collectives the design needs, per speculative step, over the "model" axis:
- draft: 1 + 2 x (draft layers) all-reduces of [B/d, bs, H] (embedding, then after o_proj and
  after down_proj in every layer) and 2 of [B/d, bs-1] (the vocabulary-sharded argmax: max, then
  the lowest index reaching it);
- target verify: 1 + 2 x (target layers) all-reduces of [B/d * bs, H];
- verify/accept: 1 all-gather of per-row partials of every vocabulary shard (int32, a few per
  row and position: max, argmax, the Gumbel winner, ...), never of logits.
The AR step: 1 + 2 x (target layers) all-reduces of [B/d, H] and the small argmax / sampling
partials. Nothing crosses the "data" axis.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

# Public Hugging Face configs of the targets; the drafters follow z-lab's DFlash recipe (5 layers
# of the target's width, block size 16, 5 target features spread from the 2nd to the
# third-to-last layer). The 70B drafter is of that recipe, not a published checkpoint.
MODELS = {
    "llama3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                        rope_theta=500000.0, model_type="llama"),
    "qwen3-8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
                     num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
                     qk_norm=True, model_type="qwen3"),
    "llama3.3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                         num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                         rope_theta=500000.0, model_type="llama"),
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    model: str
    topology: str
    data: int
    model_axis: int


CASES = {c.name: c for c in (
    Case("llama3.1-8b/v5p-4chips-tp4", "llama3.1-8b", "v5p:2x2x1", 1, 4),
    Case("qwen3-8b/v5p-4chips-tp4", "qwen3-8b", "v5p:2x2x1", 1, 4),
    Case("qwen3-8b/v5p-4chips-dp2xtp2", "qwen3-8b", "v5p:2x2x1", 2, 2),
    Case("llama3.3-70b/v5p-8chips-tp8", "llama3.3-70b", "v5p:2x2x2", 1, 8),
    Case("qwen3-8b/v6e-4chips-tp4", "qwen3-8b", "v6e:2x2", 1, 4),
)}


def configs(model: str):
    from models.config import DraftConfig, TargetConfig

    kw = MODELS[model]
    t = TargetConfig(**kw)
    n = t.num_layers
    ids = tuple(1 + round(i * (n - 4) / 4) for i in range(5))      # 2nd .. third-to-last
    d = DraftConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                    intermediate_size=t.intermediate_size, num_layers=5, num_heads=t.num_heads,
                    num_kv_heads=t.num_kv_heads, head_dim=t.head_dim, block_size=16,
                    mask_token_id=t.vocab_size - 1, target_layer_ids=ids, num_target_layers=n,
                    rope_theta=t.rope_theta)
    return t, d


def run_case(case: Case, *, batch: int, max_seq_len: int):
    """Compile both steps of one case; returns a JSON-able dict."""
    import jax.numpy as jnp

    from bench.collectives import collectives, memory_report
    from models.aot import abstract_models, lower_step, weights_per_device
    from models.decoding import AutoregressiveDecoder, SpeculativeDecoder
    from pallas_ops.aot import tpu_mesh

    tcfg, dcfg = configs(case.model)
    target, draft = abstract_models(tcfg, dcfg, dtype=jnp.bfloat16)
    mesh = tpu_mesh(case.topology, {"data": case.data, "model": case.model_axis})
    chip = case.topology.split(":")[0]
    out = dict(case=case.name, model=case.model, topology=case.topology, data=case.data,
               model_axis=case.model_axis, batch=batch, max_seq_len=max_seq_len, steps={})
    decoders = {
        "speculative": SpeculativeDecoder(target, draft, max_batch=batch, max_seq_len=max_seq_len,
                                          backend="pallas", mesh=mesh, abstract=True),
        "autoregressive": AutoregressiveDecoder(target, max_batch=batch, max_seq_len=max_seq_len,
                                                backend="pallas", mesh=mesh, abstract=True),
    }
    for kind, dec in decoders.items():
        t0 = time.perf_counter()
        compiled = lower_step(dec, chip=chip).compile()
        secs = time.perf_counter() - t0
        recs = collectives(compiled, mesh)
        by_kind = {}
        for r in recs:
            k = by_kind.setdefault(r.kind, {"ops": 0, "bytes": 0, "axes": set(), "shapes": {}})
            k["ops"] += 1
            k["bytes"] += r.bytes or 0
            k["axes"].update(r.mesh_axes or ())
            shape = " ".join(r.shapes) if isinstance(r.shapes, (list, tuple)) else str(r.shapes)
            k["shapes"][shape] = k["shapes"].get(shape, 0) + 1
        for k in by_kind.values():
            k["axes"] = sorted(k["axes"])
        mem = memory_report(compiled)
        out["steps"][kind] = dict(
            compile_seconds=round(secs, 1), collectives=by_kind,
            weights_per_chip=weights_per_device(dec),
            memory={f: getattr(mem, f) for f in ("argument_bytes", "output_bytes", "temp_bytes",
                                                  "alias_bytes", "generated_code_bytes",
                                                  "peak_bytes") if hasattr(mem, f)},
            kv_cache_per_chip=_cache_bytes(dec))
    return out


def _cache_bytes(dec) -> int:
    import jax
    import numpy as np

    trees = [dec.target_cache] + ([dec.draft_cache] if dec.has_draft else [])
    total = 0
    for leaf in jax.tree.leaves(trees):
        total += int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
    return total


def _gib(n):
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def format_rows(results) -> str:
    lines = ["| case | step | compile s | all-reduce ops (MiB/device) | other collectives | "
             "weights/chip | KV caches/chip | arguments | temporaries |",
             "|---|---|---:|---|---|---:|---:|---:|---:|"]
    for r in results:
        for kind, s in r["steps"].items():
            col = s["collectives"]
            ar = col.get("all-reduce", {"ops": 0, "bytes": 0, "axes": []})
            other = "; ".join(f"{k}: {v['ops']} ({v['bytes']} B, {'/'.join(v['axes'])})"
                              for k, v in col.items() if k != "all-reduce") or "none"
            m = s["memory"]
            lines.append(f"| {r['case']} | {kind} | {s['compile_seconds']} | {ar['ops']} "
                         f"({ar['bytes'] / 2**20:.2f}, over {'/'.join(ar['axes'])}) | {other} | "
                         f"{_gib(s['weights_per_chip'])} | {_gib(s['kv_cache_per_chip'])} | "
                         f"{_gib(m.get('argument_bytes'))} | {_gib(m.get('temp_bytes'))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench sharded", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", action="append", choices=sorted(CASES))
    p.add_argument("--all", action="store_true")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--json", default=None)
    p.add_argument("--tables", action="store_true",
                   help="also print every collective of every step (bench.collectives tables)")
    args = p.parse_args(argv)
    names = sorted(CASES) if args.all or not args.case else args.case
    results = []
    for name in names:
        r = run_case(CASES[name], batch=args.batch, max_seq_len=args.max_seq_len)
        results.append(r)
        print(f"{name}: compiled ({', '.join(f'{k} {v['compile_seconds']} s' for k, v in r['steps'].items())})",
              file=sys.stderr, flush=True)
    print(format_rows(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
