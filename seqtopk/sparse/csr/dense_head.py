"""The MRL-32 reference of the CSR comparison: a linear k-dimensional dense head on the backbone.

It is trained like a CSR head, with the same data and loss (tied reconstruction x_hat = W^T z + b_pre, and
the contrastive term on z), but z = W (x - b_pre) + b_lat keeps all k dimensions with their signs: no top-k,
no ReLU. So it answers "what do k dense dimensions learnt on this data give", next to CSR's k active out of
1,536. It is not a Matryoshka-trained backbone: MRL trains one embedding so that every prefix (8, 16, 32, ...)
is a usable embedding and needs no head; here one head learns one 32-d projection, and without fine-tuning
the backbone under it stays as it was. It saves as a plain sentence-transformers Dense module (identity
activation), so the folder loads with SentenceTransformer(path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearHead(nn.Module):
    """The interface coding.losses.batch_loss uses on a TopKSAE (codes, decode_codes, weight, a 4k code, AuxK), dense."""

    is_dense = True

    def __init__(self, input_dim: int, dims: int) -> None:
        super().__init__()
        self.input_dim, self.hidden_dim, self.k = input_dim, dims, dims
        self.encoder = nn.Linear(input_dim, dims)
        self.pre_bias = nn.Parameter(torch.zeros(input_dim))

    @property
    def weight(self) -> torch.Tensor:
        return self.encoder.weight

    @torch.no_grad()
    def initialise(self, data_mean: torch.Tensor) -> None:
        """Orthonormal rows (a random rotation onto `dims` directions), the pre-bias at the data mean."""
        self.encoder.weight.copy_(torch.linalg.qr(torch.randn(self.input_dim, self.hidden_dim)).Q.T)
        self.encoder.bias.zero_()
        self.pre_bias.copy_(data_mean)

    def codes(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        return self.encoder(x - self.pre_bias)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.encoder.weight + self.pre_bias

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        codes = self.codes(features["sentence_embedding"])
        features["csr_codes_4k"] = codes  # every dimension is active: the "4k" code is the code
        features["csr_codes_aux"] = None  # and no dimension is dead
        features["sentence_embedding"] = codes
        return features

    def to_upstream(self):
        """A sentence-transformers Dense module computing the same z (the pre-bias folded into the bias)."""
        from sentence_transformers.sentence_transformer.modules import Dense

        with torch.no_grad():
            weight = self.encoder.weight.detach().clone()
            bias = self.encoder.bias.detach() - F.linear(self.pre_bias.detach(), weight)
        return Dense(self.input_dim, self.hidden_dim, bias=True, activation_function=nn.Identity(),
                     init_weight=weight, init_bias=bias)
