"""`python -m models.generate`: loads checkpoints, generates, reports acceptance, compares with
plain decoding; the sampling flags (--top-k / --top-p / --min-p, per prompt, --logprobs,
--[no-]draft-sampling) reach generate, bad values exit naming the flag."""
from __future__ import annotations

import re

import numpy as np
import pytest
from flax import nnx

from models.decoding import generate_autoregressive
from models.draft import DraftModel
from models.generate import main
from models.loading import save_checkpoint
from models.target import TargetModel
from models.testing import perturb_norms, tiny_draft_config, tiny_target_config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_target_config()
    target = perturb_norms(TargetModel(cfg, rngs=nnx.Rngs(30)), seed=31)
    save_checkpoint(target, root / "target")
    save_checkpoint(DraftModel(tiny_draft_config(cfg), rngs=nnx.Rngs(32)), root / "draft")
    return root, target


def test_cli_generates_and_matches_autoregressive(checkpoints, capsys):
    root, target = checkpoints
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    rc = main(["--target", str(root / "target"), "--draft", str(root / "draft"),
               "--prompt-ids", "1,2,3,4,5", "--prompt-ids", "9 8 7", "--max-new-tokens", "12",
               "--max-batch", "8", "--max-seq-len", "64", "--compare-ar", "--repeat", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "outputs identical" in out and "mean tau" in out and "ms/token" in out
    want = generate_autoregressive(target, prompts, max_new_tokens=12, max_batch=8,
                                   max_seq_len=64)
    for i, toks in enumerate(want.tokens):
        line = re.search(rf"^\[{i}\] .*: (\[.*\])$", out, re.M).group(1)
        assert line == str(toks)


def test_cli_bad_arguments(checkpoints):
    root, _ = checkpoints
    with pytest.raises(SystemExit, match="prompt"):
        main(["--target", str(root / "target"), "--draft", str(root / "draft")])
    with pytest.raises(SystemExit, match="integers"):
        main(["--tiny-random", "--prompt-ids", "1,x"])
    with pytest.raises(SystemExit, match="--target"):
        main(["--prompt-ids", "1"])


def test_cli_sampling_flags_reach_generate(checkpoints, capsys, monkeypatch):
    from models.decoding.engine import Engine

    root, target = checkpoints
    seen = []
    original = Engine.generate

    def spy(self, prompts, **kw):
        seen.append((type(self).__name__, getattr(self, "draft_sampling", None), kw))
        return original(self, prompts, **kw)

    monkeypatch.setattr(Engine, "generate", spy)
    base = ["--target", str(root / "target"), "--draft", str(root / "draft"),
            "--prompt-ids", "1,2,3,4,5", "--prompt-ids", "9 8 7", "--max-new-tokens", "10",
            "--max-batch", "8", "--max-seq-len", "64", "--repeat", "1",
            "--temperature", "0.7,0", "--top-k", "5", "--top-p", "0.9,1", "--min-p", "0.05"]
    rc = main(base + ["--logprobs", "--no-draft-sampling", "--compare-ar"])
    out = capsys.readouterr().out
    assert rc == 0 and "outputs identical" in out        # one-hot drafts: the AR samples
    assert {name for name, _, _ in seen} == {"AutoregressiveDecoder", "SpeculativeDecoder"}
    for name, ds, kw in seen:
        assert (kw["temperature"], kw["top_k"], kw["top_p"], kw["min_p"], kw["logprobs"]) == \
            ([0.7, 0.0], 5, [0.9, 1.0], 0.05, True)
        assert ds is (False if name == "SpeculativeDecoder" else None)
    want = generate_autoregressive(target, [[1, 2, 3, 4, 5], [9, 8, 7]], max_new_tokens=10,
                                   max_batch=8, max_seq_len=64, temperature=[0.7, 0.0], top_k=5,
                                   top_p=[0.9, 1.0], min_p=0.05, logprobs=True)
    printed = re.findall(r"^    logprobs: \[(.*)\]$", out, re.M)
    assert len(printed) == 2 and "perplexity" in out
    for line, lp in zip(printed, want.logprobs):
        np.testing.assert_allclose([float(x) for x in line.split(",")], lp, atol=2e-4)
    seen.clear()
    assert main(base + ["--draft-sampling"]) == 0
    assert {ds for _, ds, _ in seen} == {True}
    assert "logprobs:" not in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["--top-k", "-1"], "--top-k: top_k must be an int >= 0"),
    (["--top-k", "2.5"], "--top-k: expected an integer"),
    (["--top-p", "0.5,0.5,0.5"], "--top-p: top_p has 3 values for 2 prompts"),
    (["--top-p", "0"], r"--top-p: top_p must be a number in \(0, 1\]"),
    (["--min-p", "1"], r"--min-p: min_p must be a number in \[0, 1\)"),
    (["--temperature", "0.5,-1"], r"--temperature: temperature\[1\] \(prompt 1\)"),
])
def test_cli_bad_sampling_flags(argv, match):
    with pytest.raises(SystemExit, match=match):
        main(["--tiny-random", "--prompt-ids", "1,2", "--prompt-ids", "3"] + argv)
