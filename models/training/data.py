"""The training corpus: this machine's Python standard library sources, as bytes.

Tokens are bytes (ids 0..255) plus a few specials above them (`MASK_ID` is the DFlash draft's mask
token); `VOCAB_SIZE` = 264 keeps the vocabulary a multiple of 8.

Held-out rule (fixed, documented, independent of the machine's file order): a file is held out
when `zlib.crc32(relative_path.encode()) % HELD_OUT_MODULUS == 0`, the relative path taken from
the stdlib root with '/' separators (e.g. "json/decoder.py"). Files under `site-packages` are
never used. With modulus 20 about 5% of the files are held out; prompts for the demo and the
end-to-end benchmark come from held-out files only, training windows from the others.
"""
from __future__ import annotations

import dataclasses
import os
import sysconfig
import zlib

import numpy as np

BYTE_VOCAB = 256
MASK_ID = 256          # the DFlash draft's mask token
EOS_ID = 257           # end of a file (separates files in the training stream)
VOCAB_SIZE = 264
HELD_OUT_MODULUS = 20


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def is_held_out(rel_path: str) -> bool:
    """The fixed held-out rule: crc32 of the '/'-separated relative path, modulo 20, is 0."""
    return zlib.crc32(rel_path.replace(os.sep, "/").encode()) % HELD_OUT_MODULUS == 0


def list_files(root: str | None = None) -> list[str]:
    """Relative paths of every .py file of the stdlib (site-packages excluded), sorted."""
    root = root or stdlib_root()
    out = []
    for d, dirs, files in os.walk(root):
        rel_d = os.path.relpath(d, root)
        if rel_d.split(os.sep)[0] in ("site-packages", "__pycache__"):
            dirs[:] = []
            continue
        dirs[:] = [x for x in dirs if x not in ("site-packages", "__pycache__")]
        for f in files:
            if f.endswith(".py"):
                out.append(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"))
    return sorted(out)


def encode(text: str | bytes) -> np.ndarray:
    b = text.encode("utf-8") if isinstance(text, str) else text
    return np.frombuffer(b, np.uint8).astype(np.int32)


def decode(ids) -> str:
    """Byte ids -> text (special ids are dropped; invalid UTF-8 is replaced)."""
    return bytes(int(t) for t in ids if 0 <= int(t) < BYTE_VOCAB).decode("utf-8", "replace")


@dataclasses.dataclass
class Corpus:
    """All files of one split concatenated (EOS between files) as one int32 token stream."""
    tokens: np.ndarray          # int32 [N]
    files: list[str]
    offsets: np.ndarray         # int64 [len(files) + 1] start of each file in `tokens`

    def file_tokens(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1] - 1]   # without the EOS


def load_corpus(split: str, root: str | None = None, *, max_bytes: int | None = None) -> Corpus:
    """split: "train" or "heldout". max_bytes caps the stream (files taken in sorted order)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    root = root or stdlib_root()
    want_held = split == "heldout"
    chunks, files, offsets, n = [], [], [0], 0
    for rel in list_files(root):
        if is_held_out(rel) != want_held:
            continue
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        if not data.strip():
            continue
        arr = np.frombuffer(data, np.uint8).astype(np.int32)
        chunks += [arr, np.array([EOS_ID], np.int32)]
        files.append(rel)
        n += arr.size + 1
        offsets.append(n)
        if max_bytes is not None and n >= max_bytes:
            break
    if not files:
        raise ValueError(f"no {split} files found under {root}")
    return Corpus(np.concatenate(chunks), files, np.asarray(offsets, np.int64))


def random_windows(corpus: Corpus, rng: np.random.Generator, batch: int, length: int):
    """`batch` windows of `length` tokens at uniform random offsets of the stream: int32 [B, n]."""
    starts = rng.integers(0, corpus.tokens.size - length, size=batch)
    return np.stack([corpus.tokens[s:s + length] for s in starts])


def heldout_prompts(num: int, *, prompt_len: int = 128, seed: int = 0, root: str | None = None,
                    min_file_bytes: int = 512):
    """`num` prompts of `prompt_len` bytes from held-out files, each starting at the beginning of
    a line at a random place of a random held-out file (deterministic in `seed`).

    Returns [(relative path, int32 token array)]."""
    corpus = load_corpus("heldout", root)
    rng = np.random.default_rng(seed)
    ok = [i for i in range(len(corpus.files))
          if corpus.offsets[i + 1] - corpus.offsets[i] > max(min_file_bytes, 2 * prompt_len)]
    out = []
    while len(out) < num:
        i = int(rng.choice(ok))
        toks = corpus.file_tokens(i)
        s = int(rng.integers(0, toks.size - prompt_len))
        nl = np.flatnonzero(toks[s:toks.size - prompt_len] == ord("\n"))
        if nl.size:
            s += int(nl[0]) + 1
        if s + prompt_len > toks.size:
            continue
        out.append((corpus.files[i], toks[s:s + prompt_len].copy()))
    return out
