"""DFlash model layer: target and draft models, the speculative decode loop, loading, training.

Modules:
  config          HF / z-lab config.json -> TargetConfig, DraftConfig
  layers          RMSNorm, RoPE (llama3 scaling), SwiGLU MLP, attention projections (Flax NNX)
  target          TargetModel: Llama-3.x / Qwen3 over the paged KV cache
  draft           DraftModel: the DFlash block-diffusion draft over its static context cache
  ops             backend dispatch: "pallas" (pallas_ops kernels) or "xla" (their jnp twins)
  kv_cache        device caches; page_allocator: the host-side page allocator
  decoding/       SpeculativeDecoder, AutoregressiveDecoder, generate_autoregressive (engine:
                  slots, pages, prefill, the host loop; speculative; autoregressive)
  sampling        first-token / autoregressive sampler (Gumbel-max with verify_accept's noise)
  loading         safetensors checkpoints (HF naming for targets, z-lab naming for drafts)
  generate        the CLI: python -m models.generate
  testing         test doubles (OracleProposer) and tiny configs
  training/       drafter (and demo target) training: python -m models.training
"""
