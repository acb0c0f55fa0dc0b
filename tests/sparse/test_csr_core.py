"""CSR head math, losses, schedule and the upstream traps, on small hand-checkable tensors (no data needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seqtopk.sparse.coding.sae import TopKSAE
from seqtopk.sparse.coding.losses import auxk_loss, info_nce, normalized_mse, supervised_contrastive
from seqtopk.sparse.coding.sparse_coding import dead_latent_fraction, topk_relu
from seqtopk.sparse.csr.train import TrainConfig, k_at_step


def test_topk_relu_keeps_k_largest_then_relu_without_touching_input():
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-4.0, -3.0, -2.0, 1.0]])
    before = pre.clone()
    codes = topk_relu(pre, 2)
    assert torch.equal(codes, torch.tensor([[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))  # -2 is top-2 but ReLU'd
    assert torch.equal(pre, before)


def _head_with_dead_latents(seed: int = 0) -> tuple[TopKSAE, torch.Tensor]:
    torch.manual_seed(seed)
    head = TopKSAE(input_dim=8, hidden_dim=32, k=2, k_aux=8, dead_threshold=3).train()
    head.stats_last_nonzero[:16] = 100  # half the latents are dead
    return head, torch.randn(6, 8)


class InPlaceMaskHead(TopKSAE):
    """Reproduces the sentence-transformers < 6 order of passes: top-k, then the AuxK mask written into the
    shared pre-activations in place (`x.data *= dead_mask`), then top-4k from what is left."""

    def forward(self, features, max_active_dims=None):
        x = features["sentence_embedding"]
        pre = self.pre_activations(x)
        codes = topk_relu(pre, self.k)
        pre.data *= self.dead_mask()
        features.update(csr_input=x, csr_codes_aux=topk_relu(pre, self.k_aux), csr_codes_4k=topk_relu(pre, 4 * self.k))
        features["sentence_embedding"] = codes
        return features


@pytest.mark.parametrize(
    "head_class",
    [TopKSAE, pytest.param(InPlaceMaskHead, marks=pytest.mark.xfail(strict=True, reason="the trap this test catches"))],
)
def test_4k_codes_are_top_4k_of_unmasked_preactivations(head_class):
    head, x = _head_with_dead_latents()
    head.__class__ = head_class
    features = head({"sentence_embedding": x})
    pre = TopKSAE.pre_activations(head, x)
    assert torch.allclose(features["csr_codes_4k"], topk_relu(pre, 8))
    assert torch.allclose(features["sentence_embedding"], topk_relu(pre, 2))
    # every latent of the top-k code is also in the top-4k code
    assert ((features["sentence_embedding"] > 0) <= (features["csr_codes_4k"] > 0)).all()


def test_aux_codes_come_from_dead_latents_only():
    head, x = _head_with_dead_latents()
    aux = head({"sentence_embedding": x})["csr_codes_aux"]
    dead = torch.arange(32) < 16
    assert aux is not None and (aux[:, ~dead] == 0).all() and (aux[:, dead] > 0).any()


def test_only_the_topk_code_counts_as_firing_once_per_step():
    head, x = _head_with_dead_latents()
    head.stats_last_nonzero.zero_()
    features = head({"sentence_embedding": x})
    fired_k = (features["sentence_embedding"] > 0).any(dim=0)
    fired_only_in_4k = (features["csr_codes_4k"] > 0).any(dim=0) & ~fired_k
    assert fired_only_in_4k.any()
    assert (head.stats_last_nonzero[fired_k] == 0).all()
    assert (head.stats_last_nonzero[fired_only_in_4k] == 1).all()  # not reset by the 4k pass, counted once


def test_no_aux_and_zero_auxk_loss_without_dead_latents():
    head, x = _head_with_dead_latents()
    head.stats_last_nonzero.zero_()
    features = head({"sentence_embedding": x})
    assert features["csr_codes_aux"] is None
    assert auxk_loss(torch.randn(4, 8), None).item() == 0.0


def test_eval_forward_matches_upstream_module_and_roundtrips():
    head, x = _head_with_dead_latents()
    head.eval()
    upstream = head.to_upstream()
    with torch.inference_mode():
        ours = head({"sentence_embedding": x.clone()})["sentence_embedding"]
        theirs = upstream({"sentence_embedding": x.clone()})["sentence_embedding"]
    assert torch.equal(ours, theirs)
    assert type(upstream).__module__.startswith("sentence_transformers.")
    back = TopKSAE.from_upstream(upstream)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), head.state_dict().values()))


def test_normalized_mse_is_fraction_of_variance_unexplained():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    assert normalized_mse(torch.zeros_like(x), x).item() == pytest.approx(1.0)  # predicting the mean explains nothing
    assert normalized_mse(x, x).item() == 0.0


def test_info_nce_hand_checked():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # cosine logits / 0.5: diagonal 2, off-diagonal 0 -> loss = log(1 + e^-2) both directions
    assert info_nce(a, a, temperature=0.5).item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)


def test_supervised_contrastive_uses_labels():
    z = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    grouped = supervised_contrastive(z, torch.tensor([0, 0, 1, 1]), temperature=0.1)
    shuffled = supervised_contrastive(z, torch.tensor([0, 1, 0, 1]), temperature=0.1)
    assert grouped.item() < 0.01 < shuffled.item()
    # hand check for the first anchor: its only positive is row 1
    logits = F.normalize(z, dim=-1) @ F.normalize(z, dim=-1).T / 0.1
    row = torch.cat([logits[0, 1:]])
    expected_first = -(logits[0, 1] - torch.logsumexp(row, dim=0))
    per_anchor = [expected_first]
    for i, j in ((1, 0), (2, 3), (3, 2)):
        others = torch.cat([logits[i, :i], logits[i, i + 1 :]])
        per_anchor.append(-(logits[i, j] - torch.logsumexp(others, dim=0)))
    assert grouped.item() == pytest.approx(torch.stack(per_anchor).mean().item(), rel=1e-5)


@pytest.mark.parametrize("labels", [None, torch.tensor([0, 1, 2])])
def test_supervised_contrastive_refuses_missing_or_mismatched_labels(labels):
    with pytest.raises(ValueError, match="one label per embedding"):
        supervised_contrastive(torch.randn(4, 3), labels, temperature=0.1)


def test_k_anneal_schedule():
    assert [k_at_step(s, 10, 100, 2) for s in (0, 7, 9)] == [100, 2, 2]  # 70% of 10 steps = 7
    assert k_at_step(3, 10, 100, 2) == round(100 - 98 * 3 / 7)
    config = TrainConfig(k=2, method="csrv2", k_init=1000)
    assert config.k_start(hidden=1536) == 384  # capped at hidden/4
    assert TrainConfig(k=2, method="csrv2").k_start(1536) == 64 and TrainConfig(k=32, method="csrv2").k_start(1536) == 384
    assert TrainConfig(k=2, method="csr").k_start(1536) == 2
    assert TrainConfig(k=2, method="csrv2").supervised and not TrainConfig(k=2).supervised


def test_dead_latent_fraction():
    codes = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    assert dead_latent_fraction(codes) == 0.5


@pytest.mark.parametrize("kwargs", [{"k": 0}, {"k": 4, "method": "csr3"}, {"k": 4, "max_steps": 0}, {"k": 4, "finetune_steps": -1}])
def test_train_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        TrainConfig(**kwargs)


def test_k_above_hidden_is_refused():
    with pytest.raises(ValueError, match="exceeds the hidden size"):
        TrainConfig(k=2000).hidden_dim(384)
    with pytest.raises(ValueError, match="k must be between"):
        TopKSAE(8, 16, k=17)


def test_tiny_head_learns_to_reconstruct():
    """A few hundred real optimisation steps on a toy low-rank dataset cut the k-reconstruction error."""
    from seqtopk.sparse.csr.train import batch_loss

    torch.manual_seed(0)
    basis = F.normalize(torch.randn(16, 8), dim=-1)
    x = F.normalize(torch.rand(256, 16).pow(4) @ basis, dim=-1)
    head = TopKSAE(8, 32, k=4, k_aux=8).train()
    config = TrainConfig(k=4)
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
    first = None
    for _ in range(300):
        loss, parts = batch_loss(head, torch.cat([x[:128], x[128:]]), 128, np.arange(128), 4, config)
        first = first or parts["mse_k"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert parts["mse_k"] < 0.5 * first


def test_heldout_split_and_batches():
    from seqtopk.sparse.data.batches import epoch_batches, split_heldout
    from seqtopk.sparse.data.readers import TrainingSet

    rng = np.random.default_rng(0)
    pairs = np.array([[2 * i, 2 * i + 1] for i in range(50)])
    a = TrainingSet("a", [f"a{i}" for i in range(100)], np.arange(100) // 2, pairs, heldout=["a-dev", "a3"])
    b = TrainingSet("b", [f"b{i}" for i in range(60)], np.arange(60) % 3)
    split = split_heldout([a, b], 0.2, rng)
    assert "a-dev" in split.heldout_texts and not set(split.heldout_texts) & set(split.texts)
    assert 0 < len(split.heldout_texts) - 1 < 60  # about 20% of 160 texts, plus the dev text
    for anchors, positives, labels in epoch_batches(split, 16, rng):
        assert len({split.texts[i][0] for i in np.concatenate([anchors, positives])}) == 1  # one dataset per batch
        owner = a if split.texts[anchors[0]][0] == "a" else b
        original = {t: lab for t, lab in zip(owner.texts, owner.labels)}
        assert [original[split.texts[i]] for i in anchors] == list(labels) == [original[split.texts[i]] for i in positives]


def test_only_the_contrastive_term_reaches_a_finetuned_backbone():
    from dataclasses import replace

    from seqtopk.sparse.csr.train import batch_loss

    torch.manual_seed(0)
    head = TopKSAE(8, 32, k=4, k_aux=8).train()
    config = TrainConfig(k=4)
    for weight, reaches in ((0.0, False), (1.0, True)):
        x = F.normalize(torch.randn(16, 8), dim=-1).requires_grad_()  # stands for a backbone's output
        loss, _ = batch_loss(head, x, 8, np.arange(8), 4, replace(config, weights=replace(config.weights, contrastive=weight)))
        loss.backward()
        assert (x.grad is not None and x.grad.abs().sum() > 0) == reaches
        head.zero_grad()


def test_firing_recorded_from_ids_equals_from_a_mask():
    """SSR's sparse training step records firing by latent ids, CSR's forward by a mask: one bookkeeping."""
    by_mask, _ = _head_with_dead_latents()
    by_ids, _ = _head_with_dead_latents()
    ids = torch.tensor([[3, 20], [20, 31]])  # a latent may fire in several rows
    mask = torch.zeros(32, dtype=torch.bool)
    mask[[3, 20, 31]] = True
    by_mask.record_firing(mask)
    by_ids.record_firing(ids)
    assert torch.equal(by_mask.stats_last_nonzero, by_ids.stats_last_nonzero)
    assert by_ids.stats_last_nonzero[[3, 20, 31]].tolist() == [0, 0, 0] and by_ids.stats_last_nonzero[0] == 101
