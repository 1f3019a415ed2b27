"""The shape catalogue shared by the static schedule analysis and the wall-clock benchmarks
(`bench/micro/`).

Model shapes: Llama-3.1-8B (32 q heads, 8 KV heads, head dim 128, vocab 128256) and Qwen3-8B
(32 q heads, 8 KV heads, head dim 128, vocab 151936). Their DFlash drafters share the target's
attention geometry; block size 16 (Qwen3 drafters) and 10 (the Llama-3.1 drafter). Qwen3-4B
(the seeds' v5p benchmark) and its b16 drafter have Qwen3-8B's attention geometry too, so the
qwen3-8b drafter rows at b1 are also its rows; its verify/accept shape is its own (B = 1, bs 16).
"""
from __future__ import annotations

import dataclasses

CONTEXTS = (1024, 4096, 16384)


@dataclasses.dataclass(frozen=True)
class PagedAttentionShape:
    name: str
    num_seqs: int
    q_len: int            # new tokens per sequence (1 = decode, 16 = verify)
    kv_len: int           # keys per sequence, counting the new tokens
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    dtype: str = "bfloat16"
    mixed: bool = False   # True: a ragged batch (decode + verify + prefill chunk), see below
    cache_dtype: str | None = None   # an 8-bit KV cache (int8, float8_e4m3fn) with f32 scales

    @property
    def pages_per_seq(self) -> int:
        return -(-self.kv_len // self.page_size)


@dataclasses.dataclass(frozen=True)
class BlockAttentionShape:
    name: str
    batch: int
    block_size: int
    ctx_len: int
    max_ctx: int          # S_max, the static cache capacity
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"           # q, the block's K/V, the output (and a plain cache)
    cache_dtype: str | None = None    # a quantized context cache: int8 / float8_e4m3fn / ...
    scale_dtype: str = "float32"      # ... and its per (KV head, token) scales

    @property
    def quantized(self) -> bool:
        return self.cache_dtype is not None


@dataclasses.dataclass(frozen=True)
class VerifyAcceptShape:
    name: str
    batch: int
    block_size: int
    vocab: int
    dtype: str = "bfloat16"
    sampling: bool = False


def _paged() -> list[PagedAttentionShape]:
    out = []
    for page_size in (16, 64):
        for ctx in CONTEXTS:
            for b in (8, 64):
                out.append(PagedAttentionShape(f"decode-b{b}-ctx{ctx}-p{page_size}", b, 1, ctx,
                                               page_size=page_size))
            out.append(PagedAttentionShape(f"verify16-b8-ctx{ctx}-p{page_size}", 8, 16, ctx,
                                           page_size=page_size))
    # Mixed: 8 sequences at 4k context, 4 decoding, 3 verifying 16-token blocks, 1 prefill chunk
    # of 256 tokens. q_len/kv_len give the largest member; the builder lays out the batch.
    out.append(PagedAttentionShape("mixed-b8-ctx4096-p16", 8, 256, 4096, mixed=True))
    # Shapes users hit beyond the model grid above (issue 14): batch-1 decode and verify (the
    # latency case: the seeds' v5p benchmark ran Qwen3-4B, whose attention geometry, 32 / 8 /
    # 128, is Qwen3-8B's), 32k-key contexts, pages of 128 tokens, and head_dim 64 (Llama-3.2-1B:
    # 32 q heads, 8 KV heads).
    for q_len, tag in ((1, "decode"), (16, "verify16")):
        out.append(PagedAttentionShape(f"{tag}-b1-ctx4096-p16", 1, q_len, 4096))
        out.append(PagedAttentionShape(f"{tag}-b8-ctx32768-p16", 8, q_len, 32768))
        out.append(PagedAttentionShape(f"{tag}-b8-ctx4096-p128", 8, q_len, 4096, page_size=128))
        out.append(PagedAttentionShape(f"{tag}-b8-ctx4096-p16-hd64", 8, q_len, 4096,
                                       head_dim=64))
    out.append(PagedAttentionShape("decode-b64-ctx4096-p128", 64, 1, 4096, page_size=128))
    out.append(PagedAttentionShape("decode-b64-ctx4096-p16-hd64", 64, 1, 4096, head_dim=64))
    # 8-bit caches (per-(head, token) f32 scales), q and output bf16
    for cache, tag in (("int8", "int8"), ("float8_e4m3fn", "fp8")):
        for page_size in (16, 32, 64):
            out.append(PagedAttentionShape(f"decode-b64-ctx4096-p{page_size}-{tag}", 64, 1, 4096,
                                           page_size=page_size, cache_dtype=cache))
            out.append(PagedAttentionShape(f"verify16-b8-ctx4096-p{page_size}-{tag}", 8, 16,
                                           4096, page_size=page_size, cache_dtype=cache))
    return out


PAGED_ATTENTION: list[PagedAttentionShape] = _paged()

BLOCK_ATTENTION: list[BlockAttentionShape] = [
    BlockAttentionShape(f"qwen3-8b-drafter-b{b}-bs16-ctx{ctx}", b, 16, ctx, max(8192, ctx))
    for b in (1, 32) for ctx in (512, 2048, 8192, 32768)
] + [
    BlockAttentionShape(f"llama31-drafter-b{b}-bs10-ctx{ctx}", b, 10, ctx, max(8192, ctx))
    for b in (1, 32) for ctx in (512, 2048, 8192, 32768)
] + [
    # The Qwen3 drafter's context cache quantized (1-byte values, f32 scales per KV head and
    # token), beside the bf16 rows of the same name without the suffix.
    BlockAttentionShape(f"qwen3-8b-drafter-b32-bs16-ctx{ctx}-{tag}", 32, 16, ctx, 8192,
                        cache_dtype=cache_dtype)
    for ctx in (2048, 8192) for tag, cache_dtype in (("int8", "int8"), ("fp8", "float8_e4m3fn"))
]

VERIFY_ACCEPT: list[VerifyAcceptShape] = [
    VerifyAcceptShape("qwen3-b64-bs16-greedy", 64, 16, 151936),
    VerifyAcceptShape("qwen3-b64-bs16-sampling", 64, 16, 151936, sampling=True),
    VerifyAcceptShape("llama31-b1-bs10-greedy", 1, 10, 128256),
    VerifyAcceptShape("llama31-b1-bs10-sampling", 1, 10, 128256, sampling=True),
    # The seeds' v5p benchmark: Qwen3-4B (vocab 151936) with its 16-token drafter, batch 1.
    VerifyAcceptShape("qwen3-4b-b1-bs16-greedy", 1, 16, 151936),
    VerifyAcceptShape("qwen3-4b-b1-bs16-sampling", 1, 16, 151936, sampling=True),
]

CATALOGUE = {
    "paged_attention": PAGED_ATTENTION,
    "block_attention": BLOCK_ATTENTION,
    "verify_accept": VERIFY_ACCEPT,
}


def find(kernel: str, name: str):
    for shape in CATALOGUE[kernel]:
        if shape.name == name:
            return shape
    raise KeyError(f"no {kernel} shape named {name!r}; known: {[s.name for s in CATALOGUE[kernel]]}")
