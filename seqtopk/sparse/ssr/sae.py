"""The SSR token code: a tied top-k SAE applied to every token vector, codes L2-normalised for scoring.

The code itself is CSR's (seqtopk.sparse.csr.sparse_coding: pre-bias, latent bias, top-k then ReLU, tied
decoder); this module adds what SSR needs around it: unit-norm codes for MaxSim, dead-latent bookkeeping
over training steps, AuxK codes, and sparse (indices, values) output per token.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seqtopk.sparse.csr.sparse_coding import decode, pre_activations, topk_relu
from seqtopk.sparse.index.rows import SparseRows


class TokenSAE(nn.Module):
    """token vectors (n, d) -> k-sparse codes (n, h). `encode` gives the unit-norm codes that get indexed."""

    def __init__(self, input_dim: int, hidden_dim: int, k: int, k_aux: int = 256, dead_threshold: int = 50) -> None:
        super().__init__()
        if not 1 <= k <= hidden_dim:
            raise ValueError(f"k must be between 1 and the number of latents ({hidden_dim}), got {k}")
        self.input_dim, self.hidden_dim, self.k = input_dim, hidden_dim, k
        self.k_aux, self.dead_threshold = k_aux, dead_threshold
        weight = torch.randn(hidden_dim, input_dim)
        self.weight = nn.Parameter(F.normalize(weight, dim=-1))  # unit rows: every latent starts on one scale
        self.pre_bias = nn.Parameter(torch.zeros(input_dim))
        self.latent_bias = nn.Parameter(torch.zeros(hidden_dim))
        self.register_buffer("steps_since_fired", torch.zeros(hidden_dim, dtype=torch.long))

    def config(self) -> dict:
        return {"input_dim": self.input_dim, "hidden_dim": self.hidden_dim, "k": self.k, "k_aux": self.k_aux,
                "dead_threshold": self.dead_threshold}

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return pre_activations(x, self.weight, self.pre_bias, self.latent_bias)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Raw top-k codes (what the decoder reconstructs from)."""
        return topk_relu(self.pre_activations(x), self.k)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return decode(codes, self.weight, self.pre_bias)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm codes: <q_i, d_j> of two of them is a cosine, and MaxSim sums those."""
        return F.normalize(self.codes(x), dim=-1)

    def dead_mask(self) -> torch.Tensor:
        return self.steps_since_fired > self.dead_threshold

    @torch.no_grad()
    def count_firing(self, codes: torch.Tensor) -> None:
        fired = (codes > 0).any(dim=0)
        self.steps_since_fired += 1
        self.steps_since_fired[fired] = 0

    @torch.no_grad()
    def count_firing_ids(self, fired_ids: torch.Tensor) -> None:
        """The same bookkeeping from the ids of the latents that fired (sparse training path)."""
        self.steps_since_fired += 1
        self.steps_since_fired[fired_ids.unique()] = 0

    def aux_codes(self, pre: torch.Tensor) -> torch.Tensor | None:
        """AuxK: the top-k_aux pre-activations among dead latents (None when none is dead)."""
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if not n_dead:
            return None
        return topk_relu(pre.masked_fill(~dead, float("-inf")), min(self.k_aux, n_dead))

    @torch.inference_mode()
    def sparse_codes(self, vectors: np.ndarray, chunk: int = 2048, progress: bool = False) -> SparseRows:
        """Unit-norm codes of token vectors as SparseRows (exactly the non-zero entries, latent ids ascending).

        One fp32 GEMM per chunk of rows, then top-k on that chunk while it is still in cache: the dense
        (n, h) codes are never formed, and nothing runs per token in Python. `vectors` may be float16 or a
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
