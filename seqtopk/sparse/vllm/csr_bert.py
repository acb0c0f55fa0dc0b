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
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from vllm.config import PoolerConfig, VllmConfig
from vllm.model_executor.layers.pooler import DispatchPooler, Pooler
from vllm.model_executor.layers.pooler.seqwise import SequencePooler, get_seq_pooling_method
from vllm.model_executor.layers.pooler.seqwise.heads import SequencePoolerHead
from vllm.model_executor.models.bert import BertEmbeddingModel
from vllm.model_executor.models.interfaces_base import default_pooling_type
from vllm.tasks import PoolingTask
from vllm.v1.pool.metadata import PoolingMetadata

from seqtopk.sparse.csr.serving_config import read_head_layout
from seqtopk.sparse.csr.sparse_coding import pre_activations, topk_relu


class CSRHeadLayer(nn.Module):
    """pooled (B, d) -> k-sparse codes (B, h), computed in float32 whatever the backbone dtype."""

    def __init__(self, input_dim: int, hidden_dim: int, k: int, normalize_input: bool) -> None:
        super().__init__()
        self.k = k
        self.normalize_input = normalize_input
        self.weight = nn.Parameter(torch.empty(hidden_dim, input_dim, dtype=torch.float32), requires_grad=False)
        self.pre_bias = nn.Parameter(torch.empty(input_dim, dtype=torch.float32), requires_grad=False)
        self.latent_bias = nn.Parameter(torch.empty(hidden_dim, dtype=torch.float32), requires_grad=False)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = pooled.float()
        if self.normalize_input:
            x = F.normalize(x, p=2, dim=-1)  # sentence-transformers' Normalize module
        return topk_relu(pre_activations(x, self.weight, self.pre_bias, self.latent_bias), self.k)


class CSRPoolerHead(SequencePoolerHead):
    def __init__(self, layer: CSRHeadLayer) -> None:
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
        self.csr_head = CSRHeadLayer(layout["input_dim"], layout["hidden_dim"], layout["k"], layout["normalize_input"])
        pooling = get_seq_pooling_method(pooler_config.get_seq_pooling_type())
        return DispatchPooler({"embed": SequencePooler(pooling=pooling, head=CSRPoolerHead(self.csr_head))})

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = set(super().load_weights(weights))
        state = load_file(str(self._layout["head_dir"] / "model.safetensors"))
        # The decoder is tied to the encoder, so safetensors keeps one copy, under either name.
        weight = state["encoder.weight"] if "encoder.weight" in state else state["decoder.linear.weight"]
        with torch.no_grad():
            self.csr_head.weight.copy_(weight)
            self.csr_head.pre_bias.copy_(state["pre_bias"])
            self.csr_head.latent_bias.copy_(state["latent_bias"])
        return loaded | {f"csr_head.{name}" for name in ("weight", "pre_bias", "latent_bias")}
