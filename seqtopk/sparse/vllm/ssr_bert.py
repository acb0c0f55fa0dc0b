"""BERT backbone + the SSR token SAE, as a vLLM pooling model: one unit-norm sparse code per token.

vLLM's BertEmbeddingModel runs the backbone; the `token_embed` pooler hands each request's token states
(all tokens, [CLS] and [SEP] included) to the SSR head, which normalises each token vector, takes the top-k
SAE code and normalises it, exactly as seqtopk.sparse.ssr.encoder does. Which tokens a query or a document
keeps, and the sparse form, are the output plugin's job (seqtopk.sparse.vllm.ssr_output).
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from pathlib import Path

import torch
from vllm.config import PoolerConfig, VllmConfig
from vllm.model_executor.layers.pooler import DispatchPooler, Pooler
from vllm.model_executor.layers.pooler.tokwise import TokenPooler, TokenPoolerHead, get_tok_pooling_method
from vllm.model_executor.models.bert import BertEmbeddingModel
from vllm.model_executor.models.interfaces_base import default_pooling_type
from vllm.tasks import PoolingTask

from seqtopk.sparse.ssr.folder import HEAD_DIR, check_ssr_folder
from seqtopk.sparse.vllm.sae_layer import SAEHeadLayer


class SSRTokenHead(TokenPoolerHead):
    def __init__(self, layer: SAEHeadLayer) -> None:
        super().__init__()
        self.layer = layer

    def get_supported_tasks(self) -> Set[PoolingTask]:
        return {"token_embed"}

    def forward_chunk(self, pooled_data, pooling_param):
        return None if pooled_data is None else self.layer(pooled_data)  # None: an unfinished chunked prefill


@default_pooling_type(seq_pooling_type="MEAN", tok_pooling_type="ALL")
class SSRBertTokenModel(BertEmbeddingModel):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        self._folder = Path(vllm_config.model_config.model)
        self._head_config = check_ssr_folder(self._folder)  # a bad folder fails here, named
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def _build_pooler(self, pooler_config: PoolerConfig) -> Pooler:
        c = self._head_config
        # token states (n, d) -> unit-norm k-sparse codes (n, h), as SSREncoder gives them
        self.ssr_head = SAEHeadLayer(c["input_dim"], c["hidden_dim"], c["k"], normalize_input=True, normalize_codes=True)
        pooling = get_tok_pooling_method(pooler_config.get_tok_pooling_type())
        return DispatchPooler({"token_embed": TokenPooler(pooling=pooling, head=SSRTokenHead(self.ssr_head))})

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = set(super().load_weights(weights))
        return loaded | self.ssr_head.load_saved(self._folder / HEAD_DIR / "model.safetensors", "ssr_head")
