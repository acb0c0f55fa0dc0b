"""The top-k SAE code as plain tensor functions (torch only), shared by seqtopk.sparse.coding.sae.TopKSAE (CSR
and SSR training and encoding) and the layer vLLM serves (seqtopk.sparse.vllm.sae_layer).

z = W (x - b_pre) + b_lat; keep the k largest entries of z, then ReLU; x_hat = W^T z + b_pre (tied decoder).
`weight` has nn.Linear's layout: (hidden_dim, input_dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pre_activations(x: torch.Tensor, weight: torch.Tensor, pre_bias: torch.Tensor, latent_bias: torch.Tensor) -> torch.Tensor:
    return F.linear(x - pre_bias, weight, latent_bias)


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Zero everything but the k largest entries of each row, then ReLU (so at most k entries are non-zero).

    Builds a new tensor and never writes into `pre`, so several passes (k, 4k, AuxK) can share one `pre`.
    """
    k = min(int(k), pre.shape[-1])
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def decode(codes: torch.Tensor, weight: torch.Tensor, pre_bias: torch.Tensor) -> torch.Tensor:
    return codes @ weight + pre_bias


def dead_latent_fraction(codes: torch.Tensor) -> float:
    """Fraction of latents that never fire (stay zero) on every row of `codes` (rows: held-out samples)."""
    fired = (codes > 0).any(dim=0)
    return 1.0 - fired.float().mean().item()
