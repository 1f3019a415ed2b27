"""`python -m models.generate`: loads checkpoints, generates, reports acceptance, compares with
plain decoding."""
from __future__ import annotations

import re

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
