"""vLLM IO-processor plugin: the CSR code as (indices, values) from POST /pooling, zeros left out.

A saved head names this plugin in its config.json (`io_processor_plugin`), so a server started on the
folder offers it with no extra flag. Request and response:

    POST /pooling  {"model": ..., "data": {"input": "text" | ["text", ...]}}
    -> {"data": {"object": "sparse_embedding_list", "dim": h,
                 "data": [{"index": i, "indices": [...], "values": [...]}, ...],
                 "usage": {"prompt_tokens": n}}, ...}

The engine runs the ordinary `embed` task (the same code as /v1/embeddings); this plugin only checks
the request and keeps the non-zero entries, indices ascending.
"""

from __future__ import annotations

from collections.abc import Sequence

from vllm.config import VllmConfig
from vllm.outputs import PoolingRequestOutput
from vllm.plugins.io_processors.interface import IOProcessor
from vllm.pooling_params import PoolingParams

from seqtopk.sparse.coding.folder_format import SPARSE_IO_PLUGIN

MAX_INPUTS = 2048


def plugin_class() -> str:
    """Entry point of `vllm.io_processor_plugins`: the processor class, by qualified name."""
    return f"{__name__}.SparseEmbeddingProcessor"


def parse_sparse_request(data: object) -> list[str]:
    """The request's texts, or ValueError (HTTP 400) saying what a valid request looks like."""
    usage = f'expected "data": {{"input": "text" or ["text", ...]}} for the {SPARSE_IO_PLUGIN} plugin'
    check_fields(data, usage, allowed={"input"})
    return request_texts(data, usage)


def check_fields(data: object, usage: str, allowed: set[str]) -> None:
    """`data` is an object with "input" and no field outside `allowed`, or ValueError naming the problem."""
    if not isinstance(data, dict) or "input" not in data:
        raise ValueError(f"missing 'input': {usage}")
    extra = sorted(set(data) - allowed)
    if extra:
        raise ValueError(f"unknown field(s) {extra}: {usage}")


def request_texts(data: dict, usage: str) -> list[str]:
    """data["input"] as a non-empty list of non-empty strings (at most MAX_INPUTS), or ValueError."""
    texts = data["input"]
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts:
        raise ValueError(f"'input' must be a non-empty string or a non-empty list of strings: {usage}")
    if len(texts) > MAX_INPUTS:
        raise ValueError(f"'input' holds {len(texts)} texts; send at most {MAX_INPUTS} per request")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"input[{i}] is {type(text).__name__}, not a string: {usage}")
        if not text.strip():
            raise ValueError(f"input[{i}] is empty; every input needs some text")
    return texts


def to_sparse(vector) -> dict:
    """One code as ascending indices and their values."""
    indices = vector.nonzero().flatten()
    return {"indices": indices.tolist(), "values": vector[indices].float().tolist()}


class SparseEmbeddingProcessor(IOProcessor[list, dict]):
    def __init__(self, vllm_config: VllmConfig, renderer) -> None:
        super().__init__(vllm_config, renderer)

    def parse_data(self, data: object) -> list[str]:
        return parse_sparse_request(data)

    def merge_pooling_params(self, params: PoolingParams | None = None) -> PoolingParams:
        # Run the model's ordinary embed task; only the output format differs.
        return PoolingParams(task="embed")

    def pre_process(self, prompt: list[str], request_id: str | None = None, **kwargs) -> Sequence[str]:
        return prompt

    def post_process(self, model_output: Sequence[PoolingRequestOutput], request_id: str | None = None, **kwargs) -> dict:
        items, tokens, dim = [], 0, 0
        for index, output in enumerate(model_output):
            vector = output.outputs.data
            dim = int(vector.shape[-1])
            items.append({"index": index, **to_sparse(vector)})
            tokens += len(output.prompt_token_ids or [])
        return {"object": "sparse_embedding_list", "dim": dim, "data": items, "usage": {"prompt_tokens": tokens}}
