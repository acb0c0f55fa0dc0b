"""The top-k SAE as vLLM runs it, for both served models: CSR (one pooled vector per text) and SSR (every
token vector). Torch only, so the vLLM engine process never imports sentence-transformers.

vector (n, d) -> [L2-normalise] -> top-k code (n, h) -> [L2-normalise], in float32 whatever the backbone dtype.
CSR normalises the input only when the folder has a Normalize module before the head, and serves the raw
code; SSR always normalises token vectors and serves unit-norm codes (what MaxSim scores).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from seqtopk.sparse.coding.folder_format import tied_weight_name
from seqtopk.sparse.coding.sparse_coding import pre_activations, topk_relu

PARAMETERS = ("weight", "pre_bias", "latent_bias")


class SAEHeadLayer(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, k: int, normalize_input: bool, normalize_codes: bool) -> None:
        super().__init__()
        self.k, self.normalize_input, self.normalize_codes = k, normalize_input, normalize_codes
        self.weight = nn.Parameter(torch.empty(hidden_dim, input_dim, dtype=torch.float32), requires_grad=False)
        self.pre_bias = nn.Parameter(torch.empty(input_dim, dtype=torch.float32), requires_grad=False)
        self.latent_bias = nn.Parameter(torch.empty(hidden_dim, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.normalize_input:
            x = F.normalize(x, p=2, dim=-1)  # sentence-transformers' Normalize module
        codes = topk_relu(pre_activations(x, self.weight, self.pre_bias, self.latent_bias), self.k)
        return F.normalize(codes, dim=-1) if self.normalize_codes else codes

    def load_saved(self, safetensors_file: Path, prefix: str) -> set[str]:
        """Copy in the weights of a saved SparseAutoEncoder (a checked folder's); the names vLLM should count
        as loaded, under `prefix`."""
        from safetensors.torch import load_file

        state = load_file(str(safetensors_file))
        saved = {"weight": state[tied_weight_name(state)], "pre_bias": state["pre_bias"], "latent_bias": state["latent_bias"]}
        with torch.no_grad():
            for name in PARAMETERS:
                getattr(self, name).copy_(saved[name])
        return {f"{prefix}.{name}" for name in PARAMETERS}
