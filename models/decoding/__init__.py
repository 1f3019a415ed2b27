"""The DFlash speculative decoder and the plain autoregressive baseline.

Both run on the same paged target KV cache and the same kernels (`backend="pallas"` or `"xla"`,
see `models.ops`). Jitted step functions with fixed shapes:

- prefill: a ragged batch of prompt chunks (total tokens padded to a power of two, so only
  O(log prefill_chunk) shapes ever trace); returns the first generated token of each sequence and,
  for the speculative decoder, appends the prompt's target features to the draft's context cache.
- speculative step (one per round, all slots at once): draft the block (greedily, or at T > 0
  sampled from the draft's own distribution, `draft_sampling`) -> verify it with the target (bs tokens per sequence at positions [L, L+bs)) -> `verify_accept` -> commit: each
  sequence's length L moves by its own a+1 and exactly the accepted positions' features are
  appended to the draft context (the draft never sees phantom tokens; RoPE offsets follow L).
- autoregressive step: one token per sequence.

Host state per slot: the committed length L (target KV and draft context both hold positions
0..L-1), the last emitted token (fed at position L next), pages (`PageAllocator`). Sequences
finish independently (EOS or max_new_tokens); their pages are freed and the slot can take a new
prompt.

    engine.py          Engine (slots, pages, prefill, the host loop), GenerationOutput
    speculative.py     SpeculativeDecoder
    autoregressive.py  AutoregressiveDecoder, generate_autoregressive
    params.py          per-request sampling parameters (temperature, top-k / top-p / min-p)
"""
from models.decoding.autoregressive import AutoregressiveDecoder, generate_autoregressive
from models.decoding.engine import TRACE_COUNTS, GenerationOutput, print_progress
from models.decoding.speculative import SpeculativeDecoder

__all__ = ["AutoregressiveDecoder", "GenerationOutput", "SpeculativeDecoder", "TRACE_COUNTS",
           "generate_autoregressive", "print_progress"]
