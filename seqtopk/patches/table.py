"""Every transformers MoE family seqtopk knows: one row each, patched or refused with the reason.

Most families copy one of a few router shapes (transformers' modular files make them literal copies), so a row
names a shape and the family's block class; a family with its own twist spells out what differs. The support
table (docs/families.md, patches/README.md) is generated from these rows (`python scripts/support_table.py --write`).
Scoring objects live in seqtopk.routing.scoring; nothing here decides how tokens compete.
"""

from __future__ import annotations

import dataclasses

import torch

from seqtopk.patches._base import Family, attr, given_logits, ids_first, linear, logits_first
from seqtopk.routing.scoring import build_scoring


def _flag(router, name, default=True) -> bool:
    return bool(getattr(router, name, default))


# --------------------------------------------------------------------------------------------- shapes


def softmax_topk(name, module, block, *, renormalize="norm_topk_prob", cast="logits", router="gate",
                 logits=None, **kw) -> Family:
    """Softmax over all experts, top-k, renormalised always (True), never (False) or iff router.<attr>."""
    if isinstance(renormalize, str):
        scoring = lambda r, b: build_scoring("softmax", renormalize=_flag(r, renormalize))  # noqa: E731
        how = f"renormalised iff {renormalize}"
    else:
        scoring = lambda r, b: build_scoring("softmax", renormalize=renormalize)  # noqa: E731
        how = "renormalised" if renormalize else "not renormalised"
    return Family(name, (block,), router, logits or linear(), scoring, logits_first(cast),
                  scheme=f"softmax, top-k, {how}", module=module, **kw)


def deepseek_v3_style(name, module, block, **kw) -> Family:
    """Sigmoid, selection-only bias, top-k within the topk_group best groups (sum of each group's two best
    biased scores), renormalised iff norm_topk_prob, times routed_scaling_factor. Shared experts untouched."""

    def scoring(r, b):
        groups = int(r.num_group) if r.num_group else 1
        return build_scoring("sigmoid", bias=r.e_score_correction_bias, n_group=groups,
                             topk_group=int(r.topk_group) if r.num_group else 1,
                             renormalize=bool(r.norm_topk_prob), scaling=float(r.routed_scaling_factor))

    return Family(name, (block,), "gate", linear(upcast="input"), scoring, logits_first(),
                  scheme="sigmoid + selection bias, group-limited top-k, renormalised iff norm_topk_prob, "
                         "x routed_scaling_factor", module=module, **kw)


def sigmoid_biased(name, module, block, *, bias, scaling=None, renormalize=True, eps=0.0, upcast="weight",
                   cast=None, softcap=None, router="gate", scheme_extra="", **kw) -> Family:
    """Sigmoid, top-k on scores plus a selection-only bias (`bias`: path from the block, or from the router
    with "router."), no groups; weights renormalised (eps added) and scaled by router.<scaling>."""

    def scoring(r, b):
        found = attr(b, bias) if bias else None
        return build_scoring("sigmoid", bias=found, renormalize=_flag(r, renormalize) if isinstance(renormalize, str)
                             else renormalize, eps=eps,
                             scaling=float(getattr(r, scaling)) if scaling else 1.0)

    how = (f"renormalised iff {renormalize}" if isinstance(renormalize, str)
           else "renormalised" if renormalize else "not renormalised")
    return Family(name, (block,), router, linear(upcast=upcast, softcap=softcap), scoring, logits_first(cast),
                  scheme=f"sigmoid + selection bias{scheme_extra}, top-k, {how}"
                         + (f", x {scaling}" if scaling else ""), module=module, **kw)


def chosen_softmax(name, module, block, *, outputs=None, upcast="output", bias=None, router="router",
                   **kw) -> Family:
    """Top-k on the logits, then softmax over the chosen logits only."""
    return Family(name, (block,), router, linear(bias=bias, upcast=upcast), lambda r, b: build_scoring("chosen_softmax"),
                  outputs or ids_first(), scheme="top-k on logits, softmax over the chosen", module=module, **kw)


def _gemma4_logits(router, hidden, *_):
    """Gemma 4 scores a parameter-free RMS norm of the hidden states, rescaled (router.scale / sqrt(hidden))."""
    h = router.norm(hidden.reshape(-1, router.hidden_size)) * router.scale * router.scalar_root_size
    return router.proj(h)


def _gemma4_outputs(router, logits, weights, ids, dtype):
    """(probabilities, weights x per-expert scale, ids); unchosen slots (-1) keep weight 0."""
    scale = router.per_expert_scale[ids.clamp(min=0)]
    return torch.softmax(logits, dim=-1, dtype=torch.float32), weights * scale, ids


def refused(name, module, block, why, router="gate") -> Family:
    return Family(name, (block,), router, unsupported=why, module=module)


# --------------------------------------------------------------------------------------------- families

_DEEPSEEK_V3_COPIES = [
    ("deepseek_v3", "DeepseekV3MoE"), ("deepseek_v32", "DeepseekV32MoE"), ("dots1", "Dots1MoE"),
    ("exaone_moe", "ExaoneMoeSparseMoEBlock"), ("glm4_moe", "Glm4MoeMoE"), ("glm4_moe_lite", "Glm4MoeLiteMoE"),
    ("glm_moe_dsa", "GlmMoeDsaMoE"), ("kimi_linear", "KimiLinearMoE"), ("mimo_v2_flash", "MiMoV2FlashMoE"),
    ("nemotron_h", "NemotronHMoE"), ("solar_open", "SolarOpenMoE"), ("hy_v4", "HYV4MoE"), ("axk1", "AXK1MoE"),
    ("axk2", "AXK2MoE"),
]


def _deepseek_v2_scoring(r, b):
    grouped = getattr(r, "topk_method", "greedy") == "group_limited_greedy"
    return build_scoring("softmax", n_group=int(r.num_group) if grouped else 1,
                         topk_group=int(r.topk_group) if grouped else 1, group_score="max",
                         scaling=float(r.routed_scaling_factor))


def _mistral4_scoring(r, b):
    return build_scoring("softmax", n_group=int(r.num_group), topk_group=int(r.topk_group),
                         renormalize=bool(r.norm_topk_prob), scaling=float(r.routed_scaling_factor))


def _ernie_scoring(r, b):
    return build_scoring("softmax", bias=r.moe_statics.e_score_correction_bias.squeeze(),
                         renormalize=True, eps=0.0, min_total=float(r.norm_min))


def _cohere2_scoring(r, b):
    if r.expert_selection_fn == "softmax":
        return build_scoring("chosen_softmax")
    # top-k on logits then sigmoid of the chosen: the order of the logits is the order of their sigmoids
    return build_scoring("sigmoid", renormalize=bool(r.norm_topk_prob), eps=0.0)


def _lfm2_scoring(r, b):
    return build_scoring("sigmoid", bias=b.expert_bias if r.use_expert_bias else None, renormalize=bool(r.norm_topk_prob),
                         eps=1e-6, scaling=float(r.routed_scaling_factor))


def _dbrx_scoring(block, _):
    p = block.moe_normalize_expert_weights
    return build_scoring("softmax", renormalize=p is not None, eps=0.0,
                         norm_p=float(p) if p is not None else None)


FAMILIES: list[Family] = [
    # softmax, top-k
    softmax_topk("mixtral", "mixtral", "MixtralSparseMoeBlock", renormalize=True, cast=None),
    softmax_topk("qwen2_moe", "qwen2_moe", "Qwen2MoeSparseMoeBlock"),
    softmax_topk("qwen3_moe", "qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    softmax_topk("olmoe", "olmoe", "OlmoeSparseMoeBlock"),
    softmax_topk("flex_olmo", "flex_olmo", "FlexOlmoSparseMoeBlock"),
    softmax_topk("qwen3_next", "qwen3_next", "Qwen3NextSparseMoeBlock"),
    softmax_topk("qwen3_5_moe", "qwen3_5_moe", "Qwen3_5MoeSparseMoeBlock", renormalize=True),
    # the text block of the vision-language model (tested through Qwen3VLMoeForConditionalGeneration, text only)
    softmax_topk("qwen3_vl_moe", "qwen3_vl_moe", "Qwen3VLMoeTextSparseMoeBlock", renormalize=True),
    # Gemma 4 routes in its decoder layer (dense layers of a dense Gemma 4 have no router and are left alone)
    Family("gemma4", ("Gemma4TextDecoderLayer",), "router", _gemma4_logits,
           lambda r, b: build_scoring("softmax", renormalize=True), _gemma4_outputs,
           scheme="softmax over a normalised, rescaled input, top-k, renormalised, x per-expert scale",
           top_k_attr="config.top_k_experts", num_experts_attr="config.num_experts", module="gemma4"),
    softmax_topk("minimax", "minimax", "MiniMaxSparseMoeBlock", renormalize=True, cast=None),
    softmax_topk("mellum", "mellum", "MellumSparseMoeBlock"),
    softmax_topk("hunyuan_v1_moe", "hunyuan_v1_moe", "HunYuanMoEV1Moe", renormalize=True,
                 logits=linear("wg.weight", upcast="weight")),
    Family("jamba", ("JambaSparseMoeBlock",), "", given_logits(1), lambda r, b: build_scoring("softmax"),
           lambda r, logits, w, ids, dtype: (ids, w.to(dtype)), scheme="softmax, top-k, not renormalised",
           route_method="route_tokens_to_experts", module="jamba"),
    Family("dbrx", ("DbrxFFN",), "", given_logits(0), _dbrx_scoring,
           lambda r, logits, w, ids, dtype: (w.to(logits.dtype), ids),
           scheme="softmax, top-k, divided by their moe_normalize_expert_weights-norm",
           route_method="route_tokens_to_experts", num_experts_attr="experts.num_experts", module="dbrx"),
    # softmax with a twist
    Family("deepseek_v2", ("DeepseekV2Moe",), "gate", linear(upcast="input"), _deepseek_v2_scoring, logits_first(),
           scheme="softmax, top-k (group-limited by each group's best score if topk_method says so), "
                  "x routed_scaling_factor", module="deepseek_v2"),
    Family("mistral4", ("Mistral4MoE",), "gate", linear(), _mistral4_scoring, logits_first(),
           scheme="softmax, group-limited top-k, renormalised iff norm_topk_prob, x routed_scaling_factor",
           module="mistral4"),
    Family("ernie4_5_moe", ("Ernie4_5_MoeSparseMoeBlock",), "gate", linear(upcast="input"), _ernie_scoring,
           logits_first("input"), scheme="softmax + selection bias, top-k, renormalised (denominator >= "
                                         "moe_norm_min)", module="ernie4_5_moe"),
    # sigmoid with a selection bias
    *[deepseek_v3_style(name, name, block) for name, block in _DEEPSEEK_V3_COPIES],
    Family("afmoe", ("AfmoeSparseMoeBlock",), "router", linear("gate.weight", upcast="output"),
           lambda r, b: build_scoring("sigmoid", bias=b.expert_bias, renormalize=True, scaling=float(r.route_scale)),
           logits_first(), scheme="sigmoid + selection bias, top-k, renormalised, x route_scale", module="afmoe"),
    sigmoid_biased("hy_v3", "hy_v3", "HYV3MoE", bias="e_score_correction_bias", scaling="router_scaling_factor",
                   eps=1e-20, upcast="input"),
    sigmoid_biased("minimax_m2", "minimax_m2", "MiniMaxM2SparseMoeBlock", bias="e_score_correction_bias"),
    # MiniMax-M3's text block; Step-3.7's (a multimodal model without a causal LM in transformers 5.19) is the
    # same code (tests/hf/test_families.py checks the two sources match)
    dataclasses.replace(
        sigmoid_biased("minimax_m3_vl", "minimax_m3_vl", "MiniMaxM3VLSparseMoeBlock", bias="gate.e_score_correction_bias"),
        block_classes=("MiniMaxM3VLSparseMoeBlock", "Step3p7SparseMoeBlock")),
    sigmoid_biased("laguna", "laguna", "LagunaSparseMoeBlock", bias="gate.e_score_correction_bias",
                   upcast="output", cast="input", softcap="router_logit_softcapping",
                   scheme_extra=" (tanh soft-capped logits)"),
    Family("lfm2_moe", ("Lfm2MoeSparseMoeBlock",), "gate", linear(), _lfm2_scoring, logits_first("logits"),
           scheme="sigmoid (+ selection bias iff use_expert_bias), top-k, renormalised iff norm_topk_prob, "
                  "x routed_scaling_factor", module="lfm2_moe"),
    # top-k on logits, then softmax over the chosen
    Family("gpt_oss", ("GptOssMLP",), "router", linear(bias="bias"), lambda r, b: build_scoring("chosen_softmax"),
           logits_first(), scheme="top-k on biased logits, softmax over the chosen", module="gpt_oss"),
    chosen_softmax("granitemoe", "granitemoe", "GraniteMoeMoE"),
    chosen_softmax("aria", "aria", "AriaTextMoELayer", upcast="none", outputs=ids_first(None)),
    chosen_softmax("granitemoe_swa", "granitemoe_swa", "GraniteMoeSWAMoE", outputs=logits_first("input")),
    chosen_softmax("granitemoehybrid", "granitemoehybrid", "GraniteMoeHybridMoE"),
    chosen_softmax("granitemoeshared", "granitemoeshared", "GraniteMoeSharedMoE"),
    Family("cohere2_moe", ("Cohere2MoeSparseMoeBlock",), "gate", linear(), _cohere2_scoring, logits_first("input"),
           scheme="top-k on logits, then softmax over the chosen, or sigmoid (renormalised iff norm_topk_prob), "
                  "by expert_selection_fn", module="cohere2_moe"),
    # refused: SeqTopK has no per-expert score to rank across a sequence, or the block cannot take its choice
    refused("phimoe", "phimoe", "PhimoeSparseMoeBlock",
            "Phi-MoE's sparsemixer routing chooses its two experts sequentially and has no per-expert score to "
            "rank across a sequence", router="router"),
    refused("switch_transformers", "switch_transformers", "SwitchTransformersSparseMLP",
            "Switch Transformers routes top-1 in an encoder-decoder with expert capacity: tokens past an "
            "expert's capacity are dropped, so a token's experts depend on the batch, not on its scores",
            router="router"),
    refused("nllb_moe", "nllb_moe", "NllbMoeSparseMLP",
            "NLLB-MoE routes top-2 in an encoder-decoder with expert capacity and a sampled second expert: "
            "tokens are dropped by position, not by score", router="router"),
    refused("jetmoe", "jetmoe", "JetMoeMoE",
            "JetMoE's router sorts and dispatches tokens itself (and its attention experts route the same way): "
            "there is no separate experts call to hand a variable choice to", router="router"),
    refused("doge", "doge", "DogeCDMoE",
            "Doge picks experts by product keys (the best of num_keys x num_keys sums of two half-scores) and "
            "runs them inside the same module: there is no full per-expert score nor a separate experts call",
            router="router_gate"),
    refused("deepseek_v4", "deepseek_v4", "DeepseekV4SparseMoeBlock",
            "DeepSeek-V4 routes some layers by a hash of the token id, which has no score to rank; its score "
            "layers are not patched alone so that a model is never half SeqTopK"),
    refused("zaya", "zaya", "ZayaSparseMoeBlock",
            "ZAYA's router carries state from layer to layer and has a skip expert that costs nothing: the "
            "budget would count a no-op, and its choice depends on the previous layer's router"),
    refused("llama4", "llama4", "Llama4TextMoe",
            "Llama 4 runs every expert on every token, scaled by sigmoid(score) (zero outside the top-k): a "
            "variable choice would not change its compute, and SeqTopK is not verified on it", router="router"),
    refused("inkling", "inkling", "InklingMoE",
            "Inkling normalises the chosen experts' weights together with the shared experts' gates (one "
            "log-sigmoid softmax): not yet expressed by a scoring object"),
    refused("longcat_flash", "longcat_flash", "LongcatFlashMoE",
            "LongCat-Flash's zero-computation experts take part in the top-k: counting them in the budget "
            "would spend it on identity experts; not yet adapted", router="router"),
    # not yet adapted: expressible, but each needs a piece the table does not have yet
    refused("ernie4_5_vl_moe", "ernie4_5_vl_moe", "Ernie4_5_VLMoeSparseMoeBlock",
            "ERNIE 4.5-VL sends text and image tokens to separate expert sets in one layer: a per-sequence budget "
            "across modalities is not defined yet"),
    refused("openai_privacy_filter", "openai_privacy_filter", "OpenAIPrivacyFilterMLP",
            "OpenAI's privacy filter is a token classifier, not a generative model: not yet adapted", router="router"),
    refused("vitpose_backbone", "vitpose_backbone", "VitPoseNaiveMoe",
            "ViTPose's experts are chosen by the dataset index of the image, not by a router: nothing to rank",
            router="experts"),
    dataclasses.replace(refused("diffusion_gemma", "diffusion_gemma", "DiffusionGemmaDecoderTextLayer",
            "DiffusionGemma denoises blocks of tokens in parallel steps, not left to right: the streaming rule "
            "does not apply (its router is Gemma 4's)", router="router"),
        block_classes=("DiffusionGemmaDecoderTextLayer", "DiffusionGemmaEncoderTextLayer")),
]


# Blocks of other models that are literal copies of a row's block and router: patched through recognize.py
# (no fixture of their own). The support table lists what each is recognised as.
RECOGNISED_COPIES = [
    ("glm4v_moe", "Glm4vMoeTextMoE"), ("glm5_next", "Glm5NextTextMoE"), ("deepseek_ocr2", "DeepseekOcr2TextMoe"),
    ("qwen3_omni_moe", "Qwen3OmniMoeThinkerTextSparseMoeBlock"), ("qwen3_omni_moe", "Qwen3OmniMoeTalkerTextSparseMoeBlock"),
    ("qwen4_exp", "Qwen4ExpTextSparseMoeBlock"),
]
