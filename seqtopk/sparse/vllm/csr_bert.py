"""BERT backbone + sequence pooling + optional L2 normalisation + CSR top-k head, as a vLLM pooling model.

vLLM's own BertEmbeddingModel runs the backbone and reads the pooling mode from the folder's
sentence-transformers config; we only swap the pooler head for the CSR encoder, whose weights are read
from the SparseAutoEncoder subfolder of the same folder. The `embed` output is the full hidden-size code
(zeros included), equal to SparseEncoder.encode(...).to_dense(); the sparse form is served by
`vllm_sparse_output` through /pooling.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from pathlib import Path

import torch
from vllm.config import PoolerConfig, VllmConfig
from vllm.model_executor.layers.pooler import DispatchPooler, Pooler
from vllm.model_executor.layers.pooler.seqwise import SequencePooler, get_seq_pooling_method
from vllm.model_executor.layers.pooler.seqwise.heads import SequencePoolerHead
from vllm.model_executor.models.bert import BertEmbeddingModel
from vllm.model_executor.models.interfaces_base import default_pooling_type
from vllm.tasks import PoolingTask
from vllm.v1.pool.metadata import PoolingMetadata

from seqtopk.sparse.csr.serving_config import read_head_layout
from seqtopk.sparse.vllm.sae_layer import SAEHeadLayer


class CSRPoolerHead(SequencePoolerHead):
    def __init__(self, layer: SAEHeadLayer) -> None:
        super().__init__()
        self.layer = layer

    def get_supported_tasks(self) -> Set[PoolingTask]:
        return {"embed"}

    def forward(self, pooled_data, pooling_metadata: PoolingMetadata):
        if isinstance(pooled_data, list):
            pooled_data = torch.stack(pooled_data)
        return self.layer(pooled_data)


@default_pooling_type(seq_pooling_type="MEAN")
class CSRBertEmbeddingModel(BertEmbeddingModel):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        self._layout = read_head_layout(Path(vllm_config.model_config.model))
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def _build_pooler(self, pooler_config: PoolerConfig) -> Pooler:
        layout = self._layout
        # pooled (B, d) -> k-sparse codes (B, h), not normalised: the code SparseEncoder.encode gives
        self.csr_head = SAEHeadLayer(layout["input_dim"], layout["hidden_dim"], layout["k"],
                                     normalize_input=layout["normalize_input"], normalize_codes=False)
        pooling = get_seq_pooling_method(pooler_config.get_seq_pooling_type())
        return DispatchPooler({"embed": SequencePooler(pooling=pooling, head=CSRPoolerHead(self.csr_head))})

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = set(super().load_weights(weights))
        return loaded | self.csr_head.load_saved(self._layout["head_dir"] / "model.safetensors", "csr_head")
