"""Compile kernels for a TPU generation in a subprocess whose libtpu dumps its final schedule.

libtpu reads `LIBTPU_INIT_ARGS=--xla_jf_dump_to=DIR` once, when it starts, so every compile runs in
a child process (`python -m bench.static.dump JOBS DUMP OUT RESULTS`) started with that
environment. `compile_and_dump` is the parent side; the child keeps, per HLO `tpu_custom_call`,
the dump files `bench.static.parse` reads.
"""
from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import traceback

from pallas_ops.host import quiet_libtpu_off_tpu

_REPO = pathlib.Path(__file__).resolve().parents[2]
_JOB_TIMEOUT_S = 300


def build_catalogue(kernel: str, shape: str, chip: str):
    from bench.kernels import find_shape, load_module

    mod, reason = load_module(kernel)
    if mod is None:
        raise RuntimeError(reason)
    return mod.build(find_shape(kernel, shape, mod), chip=chip)


_CUSTOM_CALL_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*\bcustom-call\(.*"
                             r"custom_call_target=\"tpu_custom_call\"")
_OP_NAME_RE = re.compile(r'op_name="([^"]*)"')


def _custom_calls(hlo_text: str) -> list[dict]:
    calls = []
    for line in hlo_text.splitlines():
        m = _CUSTOM_CALL_RE.match(line)
        if m:
            op = _OP_NAME_RE.search(line)
            calls.append({"name": m.group(1), "op_name": op.group(1) if op else ""})
    return calls


_FUSION_RE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=.*\bfusion\(", re.M)
_COST_KEYS = ("bytes accessed", "flops", "transcendentals", "optimal_seconds")


def _cost(compiled) -> dict:
    """XLA's cost analysis of the whole compiled program (libtpu's TPU cost model): bytes
    accessed, flops, transcendentals and its `optimal_seconds` estimate; {} if unavailable."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - optional figures
        return {}
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return {k: float(ca[k]) for k in _COST_KEYS if k in (ca or {})}


def _dump_files(dump_dir: pathlib.Path, new: set[str], instr: str) -> dict:
    """{key: file name} of the dump files `bench.static.parse` reads, for HLO instruction
    `instr` (file kinds from the installed libtpu's `DumpFormat.files`)."""
    from bench.static.parse import dump_format

    key_of = {kind: key for key, kind in dump_format().files}
    pat = re.compile(r"^\d+-" + re.escape(instr) + r"-\d+-(.*)\.txt$")
    found = {}
    for f in sorted(new):
        m = pat.match(f)
        if m and m.group(1) in key_of:
            found[key_of[m.group(1)]] = f
    return found


def _resolve(factory: str):
    mod, _, attr = factory.partition(":")
    return getattr(importlib.import_module(mod), attr)


def _worker(jobs_path: str, dump_dir: str, out_dir: str, results_path: str) -> None:
    """Compile each job (`factory(**kwargs, chip=chip) -> (fn, args)`), keep its dump files."""
    from pallas_ops.aot import compile_for_tpu

    dump = pathlib.Path(dump_dir)
    out = pathlib.Path(out_dir)
    jobs = json.loads(pathlib.Path(jobs_path).read_text())
    for job in jobs:
        rec = {"id": job["id"], "calls": [], "error": None}
        try:
            before = set(os.listdir(dump)) if dump.exists() else set()
            fn, args = _resolve(job["factory"])(**job.get("kwargs", {}), chip=job["chip"])
            compiled = compile_for_tpu(fn, *args, chip=job["chip"])
            new = set(os.listdir(dump)) - before if dump.exists() else set()
            jdir = out / f"job{job['id']}"
            jdir.mkdir(parents=True, exist_ok=True)
            rec["cost"] = _cost(compiled)
            hlo = compiled.as_text()
            rec["fusions"] = len(_FUSION_RE.findall(hlo))
            for call in _custom_calls(hlo):
                files = _dump_files(dump, new, call["name"])
                for key, f in files.items():
                    shutil.copy(dump / f, jdir / f)
                    files[key] = str(jdir / f)
                rec["calls"].append({**call, "files": files})
            for f in new:  # keep the tmp dir small between jobs
                try:
                    os.remove(dump / f)
                except OSError:
                    pass
        except Exception as e:  # noqa: BLE001 - report, go on with the next job
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc(limit=8)
        with open(results_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")


def _worker_env(dump_dir: str) -> dict:
    env = dict(os.environ)
    flags = env.get("LIBTPU_INIT_ARGS", "")
    env["LIBTPU_INIT_ARGS"] = (flags + " " if flags else "") + f"--xla_jf_dump_to={dump_dir}"
    # Quiet libtpu's start-up on a host without a TPU, and let several processes on this host
    # load it at once (other compiles, test runs): AOT compiles need no TPU.
    quiet_libtpu_off_tpu(env)
    # A compile served from jax's persistent cache would write no dump.
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    env["PYTHONPATH"] = str(_REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def compile_and_dump(jobs: list[dict], out_dir: str, *, log=None) -> dict[int, dict]:
    """Compile `jobs` in subprocesses with libtpu dumping; returns {job id: record}.

    A job is {"id": int, "factory": "module:function", "kwargs": {...}, "chip": "v5p"}; the
    function returns (fn, args) as a bench module's `build` does. A record has "calls" (each
    HLO `tpu_custom_call`: name, op_name, files {bundles, schedule_analysis, allocations}) and
    "error". One subprocess runs them all in turn; if it dies, the job it died on is recorded as
    an error and a new subprocess takes the rest.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records: dict[int, dict] = {}
    pending = list(jobs)
    attempt = 0
    while pending:
        attempt += 1
        jobs_path = out / f"jobs{attempt}.json"
        results_path = out / f"results{attempt}.jsonl"
        jobs_path.write_text(json.dumps(pending))
        with tempfile.TemporaryDirectory(prefix="xla_jf_dump_") as dump_dir:
            cmd = [sys.executable, "-m", "bench.static.dump", str(jobs_path), dump_dir,
                   str(out), str(results_path)]
            try:
                proc = subprocess.run(cmd, env=_worker_env(dump_dir), cwd=str(_REPO),
                                      capture_output=True, text=True,
                                      timeout=_JOB_TIMEOUT_S * len(pending))
                failure = None if proc.returncode == 0 else (
                    f"compile subprocess exited with {proc.returncode}: "
                    + (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1])
            except subprocess.TimeoutExpired:
                failure = "compile subprocess timed out"
        if results_path.exists():
            for line in results_path.read_text().splitlines():
                rec = json.loads(line)
                records[rec["id"]] = rec
        remaining = [j for j in pending if j["id"] not in records]
        if remaining and failure is None:
            failure = "compile subprocess ended without reporting"
        if remaining:
            records[remaining[0]["id"]] = {"id": remaining[0]["id"], "calls": [],
                                           "error": failure}
            if log:
                log(f"{remaining[0]}: {failure}")
        pending = remaining[1:]
    return records


if __name__ == "__main__":
    _worker(*sys.argv[1:5])
