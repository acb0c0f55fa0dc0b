"""The tied top-k sparse autoencoder CSR and SSR both train and encode with: one module, one dead-latent count,
one AuxK selection.

The code is seqtopk.sparse.coding.sparse_coding's (pre-bias, latent bias, top-k then ReLU, tied decoder). CSR
applies it to a sentence embedding, SSR to every token vector; neither adds code of its own around it.

`TopKSAE` is a sentence-transformers SparseAutoEncoder (the same parameters, buffer and saved files), so a
trained one is saved as the plain upstream module (`to_upstream`) and both folders load without seqtopk.
Upstream's training pass has two traps avoided here:
- the AuxK mask was applied to the pre-activations in place (OpenAI's original `x.data *= dead_mask`) before
  the 4k pass, so the "top-4k" came from dead latents only and the 1/8 MSE(x, x_hat_4k) term was degenerate;
  sentence-transformers 6.2 multiplies out of place, but still
- counts the 4k pass as firing when it updates the dead-latent counters (and counts each step twice), so a
  latent that only ever appears beyond the top k is never "dead" and AuxK never revives it.
Here every pass reads the same untouched pre-activations, only the top-k code counts as firing (once a
step, `record_firing`), and AuxK codes exist only when some latent is dead.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers.sparse_encoder.modules import SparseAutoEncoder

from seqtopk.sparse.coding.sparse_coding import decode, pre_activations, topk_relu
from seqtopk.sparse.index.rows import SparseRows


class TopKSAE(SparseAutoEncoder):
    """Tied top-k SAE with pre-bias: input vectors (n, d) -> k-sparse codes (n, hidden_dim).

    In training mode (with gradients) its forward also returns the 4k and AuxK codes CSR's loss needs and
    records which latents fired; SSR's training calls the same pieces on token vectors directly.
    """

    def __init__(self, input_dim: int, hidden_dim: int = 1536, k: int = 8, k_aux: int = 512,
                 normalize: bool = False, dead_threshold: int = 30) -> None:
        if normalize:
            raise ValueError("normalize=True (a LayerNorm inside the head) is not supported; normalise the input vectors instead")
        if not 1 <= k <= hidden_dim:
            raise ValueError(f"k must be between 1 and hidden_dim={hidden_dim}, got {k}")
        super().__init__(input_dim, hidden_dim, k, k_aux, normalize, dead_threshold)

    @property
    def weight(self) -> torch.Tensor:
        """The tied weight (hidden_dim, input_dim): encoder rows, decoder columns."""
        return self.encoder.weight

    @torch.no_grad()
    def initialise(self, data_mean: torch.Tensor) -> None:
        """The top-k SAE recipe: unit-norm latent directions (every latent starts on one scale), the pre-bias at
        the data mean, no latent bias."""
        weight = torch.randn_like(self.encoder.weight)
        self.encoder.weight.copy_(F.normalize(weight, dim=-1))
        self.pre_bias.copy_(data_mean)
        self.latent_bias.zero_()

    # The code
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return pre_activations(x, self.encoder.weight, self.pre_bias, self.latent_bias)

    def codes(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Top-k codes, zeros included (what the decoder reconstructs from)."""
        return topk_relu(self.pre_activations(x), k or self.k)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return decode(codes, self.encoder.weight, self.pre_bias)

    # Dead latents and AuxK
    def dead_mask(self) -> torch.Tensor:
        """Latents that have not fired in the top-k code for more than `dead_threshold` training steps."""
        return self.stats_last_nonzero > self.dead_threshold

    @torch.no_grad()
    def record_firing(self, fired: torch.Tensor) -> None:
        """One training step of dead-latent bookkeeping: every latent ages a step, those that fired in the top-k
        code go back to zero. `fired`: a boolean mask over latents, or the ids of the latents that fired."""
        self.stats_last_nonzero += 1
        self.stats_last_nonzero[fired] = 0

    def aux_codes(self, pre: torch.Tensor) -> torch.Tensor | None:
        """AuxK: the top-k_aux pre-activations among dead latents only (the others pushed to -inf, out of place,
        so `pre` stays usable by other passes); None when no latent is dead."""
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if not n_dead:
            return None
        return topk_relu(pre.masked_fill(~dead, float("-inf")), min(self.k_aux, n_dead))

    def forward(self, features: dict[str, torch.Tensor], max_active_dims: int | None = None) -> dict[str, torch.Tensor]:
        k = max_active_dims or self.k
        x = features["sentence_embedding"]
        pre = self.pre_activations(x)
        codes = topk_relu(pre, k)
        if self.training and torch.is_grad_enabled():
            features["csr_input"] = x
            features["csr_codes_4k"] = topk_relu(pre, 4 * k)
            features["csr_codes_aux"] = self.aux_codes(pre)
            self.record_firing((codes > 0).any(dim=0))
        features["sentence_embedding"] = codes
        return features

    # Encoding many vectors
    @torch.inference_mode()
    def sparse_codes(self, vectors: np.ndarray, chunk: int = 2048, progress: bool = False) -> SparseRows:
        """Unit-norm codes of many vectors as SparseRows (exactly the non-zero entries, latent ids ascending).

        One fp32 GEMM per chunk of rows, then top-k on that chunk while it is still in cache: the dense
        (n, h) codes are never formed, and nothing runs per row in Python. `vectors` may be float16 or a
        memory map; each chunk is cast as it is read.
        """
        from tqdm.auto import tqdm

        n, k = len(vectors), self.k
        indptr = np.zeros(n + 1, np.int64)
        indices = np.empty(n * k, np.int32)
        values = np.empty(n * k, np.float32)
        done = 0
        for start in tqdm(range(0, n, chunk), desc="SAE codes", unit="chunk", disable=not progress):
            x = torch.from_numpy(np.ascontiguousarray(vectors[start:start + chunk], dtype=np.float32))
            top, ids = self.pre_activations(x).topk(k, dim=-1, sorted=False)
            ids, order = ids.sort(dim=-1)  # latent ids ascending within each row
            top = top.gather(-1, order).relu_()
            top /= top.norm(dim=-1, keepdim=True).clamp_min_(1e-12)  # F.normalize of the dense code
            kept = top > 0
            rows = kept.sum(dim=-1).numpy()
            m = int(rows.sum())
            np.cumsum(rows, out=indptr[start + 1:start + 1 + len(rows)])
            indptr[start + 1:start + 1 + len(rows)] += done
            indices[done:done + m] = ids[kept].numpy()
            values[done:done + m] = top[kept].numpy()
            done += m
        return SparseRows(indptr, indices[:done].copy(), values[:done].copy(), self.hidden_dim)

    # Saved form: the plain upstream module
    def to_upstream(self) -> SparseAutoEncoder:
        """A plain sentence-transformers SparseAutoEncoder with these weights (what CSR and SSR folders save)."""
        plain = SparseAutoEncoder(self.input_dim, self.hidden_dim, self.k, self.k_aux, False, self.dead_threshold)
        plain.load_state_dict(self.state_dict())
        return plain.to(self.pre_bias.device)

    @classmethod
    def from_upstream(cls, module: SparseAutoEncoder) -> "TopKSAE":
        sae = cls(module.input_dim, module.hidden_dim, module.k, module.k_aux, module.normalize, module.dead_threshold)
        sae.load_state_dict(module.state_dict())
        return sae.to(module.pre_bias.device)
