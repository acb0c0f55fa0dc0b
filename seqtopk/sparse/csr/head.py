"""The CSR head as a sentence-transformers module, with the upstream module's training traps fixed.

sentence-transformers' SparseAutoEncoder computes the k, 4k and AuxK passes from shared pre-activations.
Its training pass has two traps we avoid here:
- the AuxK mask was applied to the pre-activations in place (OpenAI's original `x.data *= dead_mask`) before
  the 4k pass, so the "top-4k" came from dead latents only and the 1/8 MSE(x, x_hat_4k) term was degenerate;
  sentence-transformers 6.2 multiplies out of place, but still
- counts the 4k pass as firing when it updates the dead-latent counters (and counts each step twice), so a
  latent that only ever appears beyond the top k is never "dead" and AuxK never revives it.
Here every pass reads the same untouched pre-activations, only the top-k code counts as firing, and
AuxK runs only when there are dead latents.

Inference is identical to the upstream module, so `to_upstream()` hands back a plain SparseAutoEncoder and
the saved folder loads with `SparseEncoder(path)` whether or not seqtopk is installed.
"""

from __future__ import annotations

import torch
from sentence_transformers.sparse_encoder.modules import SparseAutoEncoder

from seqtopk.sparse.csr.sparse_coding import decode, pre_activations, topk_relu


class CSRSparseAutoEncoder(SparseAutoEncoder):
    """Tied top-k SAE with pre-bias. In training its forward adds the 4k and AuxK codes to the features."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int = 1536,
        k: int = 8,
        k_aux: int = 512,
        normalize: bool = False,
        dead_threshold: int = 30,
    ) -> None:
        if normalize:
            raise ValueError("normalize=True (a LayerNorm inside the head) is not supported; normalise the backbone output instead")
        if not 1 <= k <= hidden_dim:
            raise ValueError(f"k must be between 1 and hidden_dim={hidden_dim}, got {k}")
        super().__init__(input_dim, hidden_dim, k, k_aux, normalize, dead_threshold)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return pre_activations(x, self.encoder.weight, self.pre_bias, self.latent_bias)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return decode(codes, self.encoder.weight, self.pre_bias)

    def dead_mask(self) -> torch.Tensor:
        """Latents that have not fired in the top-k code for more than `dead_threshold` training steps."""
        return self.stats_last_nonzero > self.dead_threshold

    def forward(self, features: dict[str, torch.Tensor], max_active_dims: int | None = None) -> dict[str, torch.Tensor]:
        k = max_active_dims or self.k
        x = features["sentence_embedding"]
        pre = self.pre_activations(x)
        codes = topk_relu(pre, k)
        if self.training and torch.is_grad_enabled():
            dead = self.dead_mask()
            n_dead = int(dead.sum())
            features["csr_input"] = x
            features["csr_codes_4k"] = topk_relu(pre, 4 * k)
            # AuxK: the top-k_aux pre-activations among dead latents only (others pushed to -inf, out of place).
            features["csr_codes_aux"] = (
                topk_relu(pre.masked_fill(~dead, float("-inf")), min(self.k_aux, n_dead)) if n_dead else None
            )
            self._count_firing(codes)
        features["sentence_embedding"] = codes
        return features

    @torch.no_grad()
    def _count_firing(self, codes: torch.Tensor) -> None:
        fired = (codes > 0).any(dim=0)
        self.stats_last_nonzero += 1
        self.stats_last_nonzero[fired] = 0

    def to_upstream(self) -> SparseAutoEncoder:
        """A plain sentence-transformers SparseAutoEncoder with these weights (what we save)."""
        plain = SparseAutoEncoder(self.input_dim, self.hidden_dim, self.k, self.k_aux, False, self.dead_threshold)
        plain.load_state_dict(self.state_dict())
        return plain.to(self.pre_bias.device)

    @classmethod
    def from_upstream(cls, module: SparseAutoEncoder) -> "CSRSparseAutoEncoder":
        head = cls(module.input_dim, module.hidden_dim, module.k, module.k_aux, module.normalize, module.dead_threshold)
        head.load_state_dict(module.state_dict())
        return head.to(module.pre_bias.device)
