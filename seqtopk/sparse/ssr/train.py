"""Train an SSR token SAE: reconstruction + AuxK + in-batch contrastive loss on the sparse codes' MaxSim.

Data: SciFact train queries and their relevant documents (train split only). Each step takes `batch_pairs`
(query, document) pairs; every token of both is reconstructed, and each query's MaxSim against the batch's
documents (its own document the positive, the others negatives) feeds a cross-entropy at temperature 0.2.
MaxSim is divided by the query's token count inside the loss only, so the temperature does not depend on
query length (rankings are unchanged by it). Weights follow the authors: recon 1.0, AuxK 0.1, contrastive 0.1.
With `finetune`, the backbone is trained jointly (its token outputs computed with gradients each step);
otherwise token vectors come from the on-disk cache and only the SAE trains.
Dead latents: those that never fire on the token vectors of held-out documents (SciFact documents judged
in neither split), reported as a fraction.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class SSRTrainConfig:
    k: int = 32
    latents: int = 4096
    max_steps: int = 300
    batch_pairs: int = 16
    lr: float = 1e-3
    k_aux: int = 256
    dead_threshold: int = 50  # steps without firing in the top-k code before a latent counts as dead (AuxK)
    recon_weight: float = 1.0
    aux_weight: float = 0.1
    contrastive_weight: float = 0.1
    temperature: float = 0.2
    finetune: bool = False
    backbone_lr: float = 2e-5
    heldout_docs: int = 200
    max_pairs: int | None = None  # a slice of the training pairs (tests)
    seed: int = 0

    def validate(self) -> None:
        if not 1 <= self.k <= self.latents:
            raise ValueError(f"--k must be between 1 and --latents ({self.latents}), got {self.k}")
        if self.max_steps < 1 or self.batch_pairs < 2:
            raise ValueError("--max-steps must be at least 1 and the batch at least 2 pairs (in-batch negatives)")


def training_pairs(max_pairs: int | None = None):
    """(queries, documents, pairs as (query index, doc index), held-out documents) from SciFact train."""
    from seqtopk.sparse.data import readers

    train = readers.scifact_train()
    queries = sorted({train.texts[a] for a, _ in train.pairs})
    docs = sorted({train.texts[b] for _, b in train.pairs})
    q_of, d_of = {t: i for i, t in enumerate(queries)}, {t: i for i, t in enumerate(docs)}
    pairs = np.array([(q_of[train.texts[a]], d_of[train.texts[b]]) for a, b in train.pairs], dtype=np.int64)
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
    return queries, docs, pairs, train.heldout


def maxsim_logits(sims, q_offsets, d_offsets):
    """(n_queries, n_docs) MaxSim from token similarities sims (n_doc_tokens, n_query_tokens), each divided
    by its query's token count."""
    import torch

    n_docs = len(d_offsets) - 1
    lengths = torch.from_numpy(np.diff(d_offsets))
    longest = int(lengths.max())
    mask = torch.arange(longest)[None, :] < lengths[:, None]
    padded = sims.new_full((n_docs, longest, sims.shape[1]), float("-inf"))
    padded = padded.masked_scatter(mask[:, :, None].expand_as(padded), sims)
    best = padded.amax(dim=1)  # (n_docs, n_query_tokens)
    owner = torch.repeat_interleave(torch.arange(len(q_offsets) - 1), torch.from_numpy(np.diff(q_offsets)))
    summed = best.new_zeros(n_docs, len(q_offsets) - 1).index_add_(1, owner, best)
    return (summed / torch.from_numpy(np.diff(q_offsets)).clamp_min(1).to(summed.dtype)).T


def sparse_topk(pre, k: int):
    """(ids, values) of each row's k largest pre-activations after ReLU: the top-k code without its zeros."""
    values, ids = pre.topk(k, dim=-1)
    return ids, values.relu()


def token_similarities(q_ids, q_vals, d_ids, d_vals, hidden: int):
    """(n_doc_tokens, n_query_tokens) dot products of unit sparse codes, never forming dense doc codes."""
    import torch
    import torch.nn.functional as F

    q_unit, d_unit = F.normalize(q_vals, dim=-1), F.normalize(d_vals, dim=-1)
    q_dense = q_unit.new_zeros(len(q_ids), hidden).scatter(1, q_ids, q_unit)  # few query tokens: dense is cheap
    # Each doc token's dot with every query token: gather the query columns of its k latents.
    return torch.einsum("nk,nkq->nq", d_unit, q_dense.T[d_ids])


def _stack(batch, picks):
    """Rows of TokenBatch texts `picks`, concatenated, and their offsets."""
    parts = [batch.text(i) for i in picks]
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    return np.concatenate(parts), offsets


def train_ssr(backbone: Path, out: Path, config: SSRTrainConfig, overwrite: bool = False, progress: bool = True) -> dict:
    """Train and save an SSR encoder folder (seqtopk.sparse.ssr.folder); returns the training summary."""
    config.validate()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from seqtopk.sparse.coding.losses import auxk_loss, normalized_mse
    from seqtopk.sparse.coding.sae import TopKSAE
    from seqtopk.sparse.ssr.folder import save_ssr_folder
    from seqtopk.sparse.ssr.tokens import TokenEncoder

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    started = time.perf_counter()
    queries, docs, pairs, heldout = training_pairs(config.max_pairs)
    if len(pairs) < config.batch_pairs:
        raise ValueError(f"only {len(pairs)} training pairs for batches of {config.batch_pairs}")
    encoder = TokenEncoder(backbone)
    used_q = sorted(set(pairs[:, 0]))
    used_d = sorted(set(pairs[:, 1]))
    q_tokens = encoder.encode([queries[i] for i in used_q], "query", progress=progress, desc="train query tokens")
    d_tokens = encoder.encode([docs[i] for i in used_d], "document", progress=progress, desc="train document tokens")
    q_row, d_row = {q: n for n, q in enumerate(used_q)}, {d: n for n, d in enumerate(used_d)}

    sae = TopKSAE(encoder.dim, config.latents, config.k, config.k_aux, dead_threshold=config.dead_threshold)
    sae.initialise(torch.from_numpy(d_tokens.vectors.mean(axis=0)))
    params = [{"params": sae.parameters(), "lr": config.lr}]
    if config.finetune:
        encoder.transformer.train()
        params.append({"params": encoder.transformer.parameters(), "lr": config.backbone_lr})
    optimizer = torch.optim.Adam(params)
    history = []
    bar = tqdm(range(config.max_steps), desc="ssr train", disable=not progress)
    order, cursor = rng.permutation(len(pairs)), 0
    for step in bar:
        if cursor + config.batch_pairs > len(order):
            order, cursor = rng.permutation(len(pairs)), 0
        batch = pairs[order[cursor:cursor + config.batch_pairs]]
        cursor += config.batch_pairs
        # A document relevant to two queries of the batch would be a false negative: keep its first pair only.
        batch = batch[np.unique(batch[:, 1], return_index=True)[1]]
        if config.finetune:
            q_list, _ = encoder.forward([queries[i] for i in batch[:, 0]], "query", grad=True)
            d_list, _ = encoder.forward([docs[i] for i in batch[:, 1]], "document", grad=True)
            q_off = np.concatenate([[0], np.cumsum([len(v) for v in q_list])])
            d_off = np.concatenate([[0], np.cumsum([len(v) for v in d_list])])
            xq, xd = torch.cat(q_list), torch.cat(d_list)
        else:
            xq, q_off = _stack(q_tokens, [q_row[i] for i in batch[:, 0]])
            xd, d_off = _stack(d_tokens, [d_row[i] for i in batch[:, 1]])
            xq, xd = torch.from_numpy(xq), torch.from_numpy(xd)
        x = torch.cat([xq, xd])
        pre = sae.pre_activations(x)
        ids, vals = sparse_topk(pre, sae.k)
        # Tied decoder on the k active latents only (an embedding bag), not a dense (n, h) @ (h, d).
        x_hat = F.embedding_bag(ids, sae.weight, per_sample_weights=vals, mode="sum") + sae.pre_bias
        aux = sae.aux_codes(pre)
        recon = normalized_mse(x_hat, x)
        aux_loss = auxk_loss(x - x_hat, None if aux is None else aux @ sae.weight)
        n_q = len(xq)
        sims = token_similarities(ids[:n_q], vals[:n_q], ids[n_q:], vals[n_q:], sae.hidden_dim)
        logits = maxsim_logits(sims, q_off, d_off) / config.temperature
        contrastive = F.cross_entropy(logits, torch.arange(len(batch)))
        loss = config.recon_weight * recon + config.aux_weight * aux_loss + config.contrastive_weight * contrastive
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            sae.record_firing(ids[vals > 0])
        row = {"step": step + 1, "loss": loss.item(), "recon": recon.item(), "auxk": aux_loss.item(),
               "contrastive": contrastive.item(), "dead": int(sae.dead_mask().sum())}
        history.append(row)
        bar.set_postfix(recon=f"{row['recon']:.3f}", con=f"{row['contrastive']:.3f}", dead=row["dead"])

    sae.eval()
    if config.finetune:
        encoder.transformer.eval()
        encoder._stores.clear()  # the cache holds the old backbone's outputs
        encoder.use_cache = False
    held = encoder.encode(heldout[: config.heldout_docs], "document", progress=progress, desc="held-out tokens")
    with torch.inference_mode():
        x = torch.from_numpy(held.vectors)
        held_codes = sae.codes(x)
        fired = (held_codes > 0).any(dim=0)
        held_fvu = normalized_mse(sae.decode_codes(held_codes), x).item()
    summary = {
        "method": "ssr", "k": config.k, "hidden_dim": config.latents, "config": asdict(config),
        "backbone": str(backbone), "train_pairs": int(len(pairs)),
        "train_tokens": int(len(q_tokens.vectors) + len(d_tokens.vectors)),
        "heldout_texts": len(held), "heldout_tokens": int(len(held.vectors)),
        "dead_latent_fraction_heldout": float(1.0 - fired.float().mean().item()),
        "heldout_unexplained_variance": held_fvu,
        "train_seconds": time.perf_counter() - started, "final": history[-1],
        "history": history[:: max(1, len(history) // 50)],
    }
    save_ssr_folder(out, encoder.st_model, sae, summary, overwrite=overwrite)
    return summary


def read_summary(folder: Path) -> dict:
    path = Path(folder) / "ssr_training.json"
    return json.loads(path.read_text()) if path.is_file() else {}
