"""bench.quality.loop_rate: the demo target's loop measure, on strings worked out by hand."""
import numpy as np

from bench.quality import loop_rate


def b(s):
    return np.frombuffer(s.encode("latin-1"), np.uint8)


def test_a_copy_of_the_prompt_is_covered_the_fresh_bytes_are_not():
    assert loop_rate(b("abcdefgh"), b("abcdefgh12345678")) == (8, 16)


def test_a_repeat_further_back_than_the_lookback_does_not_count():
    filler = "".join(chr(100 + i) for i in range(60))     # 60 distinct bytes, no repeat
    ctx = b("abcdefgh" + filler)
    assert loop_rate(ctx, b("abcdefgh")) == (0, 8)         # 68 bytes back: outside 64
    near = b("abcdefgh" + filler[:56])
    assert loop_rate(near, b("abcdefgh")) == (8, 8)        # 64 bytes back: inside


def test_a_short_period_loop_is_covered_after_its_first_eight_bytes():
    assert loop_rate(b(""), b("ab" * 20)) == (32, 40)


def test_the_window_straddling_prompt_and_generation_counts_only_generated_bytes():
    # "xyz12345" occurs in the prompt; generated "xyz12345" starts 3 bytes before the boundary
    ctx = b("xyz12345" + "ABCDEFGHIJ" + "xyz")
    assert loop_rate(ctx, b("12345" + "QRSTUVW")) == (5, 12)


def test_text_without_repeats_has_rate_zero():
    x = np.random.default_rng(0).permutation(256)
    assert loop_rate(x[:64], x[64:]) == (0, 192)
