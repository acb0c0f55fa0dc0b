"""Training losses of the top-k SAE as plain functions of tensors (testable without a model).

SSR's training uses the reconstruction and AuxK terms (its contrastive term, on sparse MaxSim, is its own);
CSR / CSRv2 use all of them, put together by `batch_loss`.

Reconstruction terms are MSEs normalised by the batch variance of their target (the fraction of variance
left unexplained, as in the top-k SAE code CSR builds on), which keeps them on the same scale as the
contrastive term whatever the norm of the backbone's embeddings.
Similarity is cosine everywhere: the contrastive terms train it, the saved SparseEncoder declares it
(similarity_fn_name="cosine") and the evaluation scores with it, so training and evaluation cannot drift
apart between dot product and cosine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    """Weights of the terms next to MSE(x, x_hat_k), and the contrastive temperatures.

    contrastive=0.1 was picked on the STS-B dev and SICK trial splits (1.0 let the contrastive term
    swamp reconstruction: worse dev Spearman, more dead latents). Temperatures are the usual ones:
    0.05 for InfoNCE (SimCSE) and 0.1 for supervised contrastive (Khosla et al.).
    """

    four_k: float = 1.0 / 8.0  # MSE(x, x_hat_4k), the published 1/8
    aux: float = 1.0 / 32.0  # AuxK, as in the top-k SAE recipe
    contrastive: float = 0.1
    temperature: float = 0.05  # InfoNCE (CSR): cosine similarities are divided by this
    supcon_temperature: float = 0.1  # supervised contrastive (CSRv2)


def normalized_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the batch divided by the target's batch variance."""
    variance = (target - target.mean(dim=0, keepdim=True)).pow(2).sum(dim=-1).mean()
    error = (prediction - target).pow(2).sum(dim=-1).mean()
    return error / variance.clamp_min(1e-12)


def auxk_loss(residual: torch.Tensor, aux_reconstruction: torch.Tensor | None) -> torch.Tensor:
    """Reconstruct the (detached) residual x - x_hat_k from the dead latents' top-k_aux code.

    `aux_reconstruction` is W^T z_aux without the pre-bias (the residual already excludes it); None means
    no latent is dead, and then there is nothing to revive and the loss is zero.
    """
    if aux_reconstruction is None:
        return residual.new_zeros(())
    return normalized_mse(aux_reconstruction, residual.detach())


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE on cosine similarity: row i's positive is row i, every other row a negative."""
    logits = F.normalize(anchors, dim=-1) @ F.normalize(positives, dim=-1).T / temperature
    targets = torch.arange(len(anchors), device=anchors.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def supervised_contrastive(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon (Khosla et al. 2020) on cosine similarity: every other sample with the same label is a positive.

    Averages -log p(positive) over all (anchor, positive) pairs of anchors that have at least one positive.
    """
    if labels is None or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            "supervised contrastive loss needs one label per embedding; got "
            f"{None if labels is None else tuple(labels.shape)} for {embeddings.shape[0]} embeddings"
        )
    z = F.normalize(embeddings, dim=-1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - logits.logsumexp(dim=-1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    if not positive.any():
        raise ValueError("supervised contrastive loss: no two samples in the batch share a label")
    return -log_prob.masked_fill(~positive, 0.0).sum() / positive.sum()


def reconstruction_terms(
    x: torch.Tensor, x_hat_k: torch.Tensor, x_hat_4k: torch.Tensor, aux_reconstruction: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The three reconstruction terms of CSR, unweighted."""
    return {
        "mse_k": normalized_mse(x_hat_k, x),
        "mse_4k": normalized_mse(x_hat_4k, x),
        "auxk": auxk_loss(x - x_hat_k, aux_reconstruction),
    }


def batch_loss(head, x, n_pairs: int, labels, k: int, config):
    """Total loss and its parts for a batch whose rows are [anchors; positives] dense embeddings (config: the
    run's seqtopk.sparse.csr.train.TrainConfig).

    Reconstruction sees the embeddings detached, so when the backbone is fine-tuned only the contrastive
    term reaches it; otherwise the backbone could make its embeddings easier to reconstruct from k
    latents at the expense of what they mean.
    """
    head.k = k
    target = x.detach()
    features = head({"sentence_embedding": target})
    codes = features["sentence_embedding"]
    aux = features["csr_codes_aux"]
    parts = reconstruction_terms(
        target,
        head.decode_codes(codes),
        head.decode_codes(features["csr_codes_4k"]),
        None if aux is None else aux @ head.weight,
    )
    if x.requires_grad:  # backbone fine-tuning: the same codes, computed from the live embeddings
        codes = head.codes(x, k)
    w = config.weights
    if config.supervised:
        both = torch.as_tensor(numpy.concatenate([labels, labels]), device=codes.device)
        parts["contrastive"] = supervised_contrastive(codes, both, w.supcon_temperature)
    else:
        parts["contrastive"] = info_nce(codes[:n_pairs], codes[n_pairs:], w.temperature)
    total = parts["mse_k"] + w.four_k * parts["mse_4k"] + w.aux * parts["auxk"] + w.contrastive * parts["contrastive"]
    return total, {name: float(value.detach()) for name, value in parts.items()}
