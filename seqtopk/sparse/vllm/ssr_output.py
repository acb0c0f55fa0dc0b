"""vLLM IO-processor plugin: an SSR encoder's per-token sparse codes from POST /pooling.

An SSR folder names this plugin in its config.json, so a server started on it offers it with no flag.

    POST /pooling  {"model": ..., "data": {"input": "text" | ["text", ...], "kind": "query" | "document"}}
    -> {"data": {"object": "sparse_token_codes_list", "dim": h, "kind": ...,
                 "data": [{"index": i, "tokens": [{"position": p, "token_id": t, "indices": [...],
                                                   "values": [...]}, ...]}, ...],
                 "usage": {"prompt_tokens": n}}, ...}

The plugin tokenises and truncates like the Python encoder (32 tokens for queries, 180 for documents,
special tokens included), the engine runs the `token_embed` task, and the plugin keeps the tokens the
Python encoder keeps (seqtopk.sparse.ssr.tokens.keep_mask), numbered by `position` among them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
from vllm.config import VllmConfig
from vllm.outputs import PoolingRequestOutput
from vllm.plugins.io_processors.interface import IOProcessor
from vllm.pooling_params import PoolingParams

from seqtopk.sparse.coding.folder_format import SSR_SPARSE_IO_PLUGIN
from seqtopk.sparse.ssr.tokens import KINDS, keep_mask, max_tokens, punctuation_ids
from seqtopk.sparse.vllm.sparse_output import check_fields, request_texts, to_sparse


def plugin_class() -> str:
    """Entry point of `vllm.io_processor_plugins`: the processor class, by qualified name."""
    return f"{__name__}.SSRTokenCodesProcessor"


def parse_ssr_request(data: object) -> tuple[list[str], str]:
    """(texts, kind), or ValueError (HTTP 400) saying what a valid request looks like."""
    usage = (f'expected "data": {{"input": "text" or ["text", ...], "kind": "query" or "document"}} for the '
             f"{SSR_SPARSE_IO_PLUGIN} plugin")
    check_fields(data, usage, allowed={"input", "kind"})
    kind = data.get("kind", "document")
    if kind not in KINDS:
        raise ValueError(f"'kind' must be 'query' or 'document', got {kind!r}")
    texts = request_texts(data, usage)
    return texts, kind


class SSRTokenCodesProcessor(IOProcessor[tuple, dict]):
    def __init__(self, vllm_config: VllmConfig, renderer) -> None:
        super().__init__(vllm_config, renderer)
        from transformers import AutoTokenizer

        config = vllm_config.model_config
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer, local_files_only=True)
        self.special_ids = np.array(self.tokenizer.all_special_ids, dtype=np.int64)
        self.punct_ids = punctuation_ids(self.tokenizer)
        self._kinds: dict[str | None, str] = {}  # request id -> kind, from pre_process to post_process
        self._lock = threading.Lock()

    def parse_data(self, data: object) -> tuple[list[str], str]:
        return parse_ssr_request(data)

    def merge_pooling_params(self, params: PoolingParams | None = None) -> PoolingParams:
        return PoolingParams(task="token_embed")

    def pre_process(self, prompt: tuple[list[str], str], request_id: str | None = None, **kwargs):
        texts, kind = prompt
        with self._lock:
            self._kinds[request_id] = kind
        ids = self.tokenizer(texts, truncation=True, max_length=max_tokens(kind))["input_ids"]
        return [{"prompt_token_ids": list(row)} for row in ids]

    def post_process(self, model_output: Sequence[PoolingRequestOutput], request_id: str | None = None, **kwargs) -> dict:
        with self._lock:
            kind = self._kinds.pop(request_id, "document")
        items, tokens, dim = [], 0, 0
        for index, output in enumerate(model_output):
            codes = output.outputs.data  # (n_tokens, h)
            dim = int(codes.shape[-1])
            token_ids = np.asarray(output.prompt_token_ids or [], dtype=np.int64)
            kept = np.flatnonzero(keep_mask(token_ids, kind, self.special_ids, self.punct_ids))
            items.append({"index": index, "tokens": [
                {"position": position, "token_id": int(token_ids[row]), **to_sparse(codes[row])}
                for position, row in enumerate(kept)]})
            tokens += len(token_ids)
        return {"object": "sparse_token_codes_list", "dim": dim, "kind": kind, "data": items,
                "usage": {"prompt_tokens": tokens}}
