"""`seqtopk csr train` and the Python API on real data: real training steps, the saved folder, bad input."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from tests.sparse.fixtures import TINY_K, needs_shared_data, scratch_dir, tiny_finetuned_head, tiny_head, tiny_training_file

from seqtopk.cli import main as cli_main

pytestmark = needs_shared_data
TEXTS = ["How do I top up my card?", "My card has not arrived yet.", "What is the exchange rate?"]


def test_saved_head_is_a_sparse_encoder_folder_with_k_active_latents():
    from sentence_transformers import SparseEncoder

    from seqtopk.sparse.backbone import load_backbone

    head_dir = tiny_head()
    model = SparseEncoder(str(head_dir), device="cpu", local_files_only=True)
    assert type(model[-1]).__name__ == "SparseAutoEncoder" and type(model[-1]).__module__.startswith("sentence_transformers.")
    assert model.similarity_fn_name == "cosine"  # what the contrastive term trains, so what evaluation must use
    codes = model.encode(TEXTS, convert_to_tensor=True).to_dense()
    assert codes.shape == (3, 4 * 384)
    assert ((codes > 0).sum(dim=1) <= TINY_K).all() and ((codes > 0).sum(dim=1) > 0).all()
    # the codes are the head applied to the backbone's (normalised, mean-pooled) embedding
    dense = torch.from_numpy(load_backbone(head_dir).encode(TEXTS))
    with torch.inference_mode():
        expected = model[-1]({"sentence_embedding": dense})["sentence_embedding"]
    assert torch.allclose(codes, expected, atol=1e-5)

    config = json.loads((head_dir / "config.json").read_text())
    assert config["architectures"] == ["SeqtopkCSRBertModel"] and config["io_processor_plugin"] == "seqtopk_csr_sparse"
    summary = json.loads((head_dir / "csr_training.json").read_text())
    assert summary["final"]["step"] == 60
    # Recount the dead latents from the saved folder: the same held-out split (same seed), the backbone's
    # embeddings, the saved upstream module; a latent is dead when no held-out text gives it a non-zero value.
    from seqtopk.sparse.backbone import CachedBackbone, default_backbone
    from seqtopk.sparse.data.batches import split_heldout
    from seqtopk.sparse.data.readers import load_training_sets

    heldout = split_heldout(load_training_sets([str(tiny_training_file())]), 0.05, np.random.default_rng(0)).heldout_texts
    assert summary["heldout_texts"] == len(heldout) > 0
    with torch.inference_mode():
        heldout_codes = model[-1]({"sentence_embedding": torch.from_numpy(CachedBackbone(default_backbone()).encode(heldout))})
    fired = (heldout_codes["sentence_embedding"] > 0).any(dim=0)
    # float32 mean in training: within 1e-6, far below one latent in 1,536 (6.5e-4)
    assert summary["dead_latent_fraction_heldout"] == pytest.approx(1.0 - fired.sum().item() / fired.numel(), abs=1e-6)


def test_cli_train_runs_and_reports_dead_latents(capsys):
    out = scratch_dir() / "cli-head"
    code = cli_main(["csr", "train", "--k", "4", "--out", str(out), "--data", str(tiny_training_file()), "--max-steps", "10", "--batch-size", "32", "--quiet"])
    assert code == 0
    assert "dead latents on" in capsys.readouterr().out
    assert (out / "3_SparseAutoEncoder" / "config.json").is_file()
    assert json.loads((out / "3_SparseAutoEncoder" / "config.json").read_text())["k"] == 4


def _snapshot(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_existing_output_folder_is_refused_and_left_untouched(capsys):
    head_dir = tiny_head()
    before = _snapshot(head_dir)
    code = cli_main(["csr", "train", "--k", "4", "--out", str(head_dir), "--data", str(tiny_training_file()), "--max-steps", "5", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert _snapshot(head_dir) == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "sts-test"], "unknown training data"),
        (["--k", "5000"], "exceeds the hidden size"),
        (["--method", "csrv2", "--k", "0"], "k must be at least 1"),
    ],
)
def test_bad_arguments_give_one_line_errors_and_write_nothing(capsys, extra, message):
    out = scratch_dir() / "never-written"
    args = ["csr", "train", "--k", "4", "--out", str(out), "--max-steps", "5", "--quiet", *extra]
    assert cli_main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_jsonl_with_misnamed_label_key_is_an_error_not_silently_unlabelled(capsys):
    """The labels trap: a `labels` column must not be dropped quietly and train an unsupervised head."""
    bad = scratch_dir() / "misnamed.jsonl"
    bad.write_text(json.dumps({"text": "hello", "labels": "greeting"}) + "\n")
    out = scratch_dir() / "misnamed-head"
    assert cli_main(["csr", "train", "--k", "4", "--out", str(out), "--data", str(bad), "--quiet"]) == 2
    assert "expected keys anchor+positive or text+label" in capsys.readouterr().err
    assert not out.exists()


def test_supervised_batches_carry_the_dataset_labels():
    """The labels that reach the supervised contrastive loss are the dataset's, pair by pair."""
    from seqtopk.sparse.data.batches import Split, epoch_batches
    from seqtopk.sparse.data.readers import load_file

    training = load_file(tiny_training_file())
    rng = np.random.default_rng(0)
    for anchors, positives, labels in epoch_batches(Split([training], []), 32, rng):
        assert np.array_equal(labels, training.labels[anchors])
        assert np.array_equal(training.labels[anchors], training.labels[positives])


def test_cli_finetuning_on_real_data_changes_the_backbone_and_lowers_the_loss(capsys):
    """The training command's small version: CSRv2 with the backbone fine-tuned end to end on 300 Banking77
    train rows; the saved folder carries the changed backbone and the loss fell over the run."""
    from safetensors.numpy import load_file as load_safetensors

    from seqtopk.sparse.backbone import default_backbone

    out = scratch_dir() / "csrv2-ft"
    args = ["csr", "train", "--method", "csrv2", "--k", "4", "--out", str(out), "--data", str(tiny_training_file()),
            "--max-steps", "30", "--batch-size", "32", "--finetune-steps", "8", "--finetune-batch-size", "8",
            "--backbone-lr", "1e-4", "--quiet"]
    assert cli_main(args) == 0
    assert "dead latents on" in capsys.readouterr().out
    summary = json.loads((out / "csr_training.json").read_text())
    assert summary["backbone_finetuned"] and summary["config"]["k_start"] == 128
    history = summary["history"]
    assert history[0]["step"] == 1 and history[-1]["step"] == 30 + 8
    assert history[-1]["loss"] < 0.9 * history[0]["loss"]  # 2.10 -> 1.72 at seed 0
    assert history[-1]["backbone_lr"] == 0.0  # the linear decay ends at zero
    tuned = load_safetensors(str(out / "model.safetensors"))
    original = load_safetensors(str(default_backbone() / "model.safetensors"))
    changed = [name for name in original if not name.endswith("position_ids") and not np.array_equal(tuned[name], original[name])]
    assert "encoder.layer.0.attention.self.query.weight" in changed and len(changed) > 0.9 * len(original) - 2
    assert not (out.parent / "csrv2-ft.checkpoint").exists()  # a finished run leaves no checkpoint


def test_a_finetuned_folder_loads_with_plain_sparse_encoder_on_its_own_backbone():
    """One folder: SparseEncoder(path) encodes through the fine-tuned backbone it carries, not the original."""
    from sentence_transformers import SparseEncoder

    from seqtopk.sparse.backbone import backbone_fingerprint, default_backbone, load_backbone
    from seqtopk.sparse.csr.folder import check_head_folder

    folder = tiny_finetuned_head()
    assert check_head_folder(folder).k == TINY_K
    assert backbone_fingerprint(folder) != backbone_fingerprint(default_backbone())
    model = SparseEncoder(str(folder), device="cpu", local_files_only=True)
    codes = model.encode(TEXTS, convert_to_tensor=True).to_dense()
    tuned, original = (torch.from_numpy(load_backbone(path).encode(TEXTS)) for path in (folder, default_backbone()))
    assert not torch.allclose(tuned, original, atol=1e-4)
    with torch.inference_mode():
        expected = model[-1]({"sentence_embedding": tuned})["sentence_embedding"]
    assert torch.allclose(codes, expected, atol=1e-5) and ((codes > 0).sum(dim=1) <= TINY_K).all()


def test_embedding_cache_round_trips_digests_ending_in_zero_bytes(tmp_path, monkeypatch):
    """sha1 digests that end in 0x00 must survive the on-disk cache (a bytes array would strip them)."""
    from seqtopk.sparse.backbone import CachedBackbone, text_key
    from seqtopk.sparse.backbone import default_backbone

    monkeypatch.setenv("SEQTOPK_CACHE", str(tmp_path))
    text = next(f"text {i}" for i in range(10_000) if text_key(f"text {i}").endswith(b"\0"))
    first = CachedBackbone(default_backbone()).encode([text, "another text"])
    reader = CachedBackbone(default_backbone())
    reader._model = "not used"  # a fresh reader must answer from disk without a model
    assert np.array_equal(reader.encode([text, "another text"]), first)
