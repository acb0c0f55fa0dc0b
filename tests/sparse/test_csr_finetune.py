"""Backbone fine-tuning's schedule, checkpoints and resume, and the MRL dense reference, on real training steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.sparse.fixtures import needs_shared_data, scratch_dir, tiny_training_file

from seqtopk.sparse.csr.finetune import backbone_rate


def test_backbone_rate_warms_up_then_decays_to_zero():
    rates = [backbone_rate(step, 20, 0.1, "linear") for step in range(20)]
    assert rates[:2] == [0.5, 1.0] and rates[2] == 1.0
    assert all(a > b for a, b in zip(rates[2:], rates[3:])) and rates[-1] == pytest.approx(1 / 18)
    cosine = [backbone_rate(step, 20, 0.1, "cosine") for step in range(20)]
    assert cosine[2] == 1.0 and 0 < cosine[-1] < rates[-1]
    assert [backbone_rate(step, 20, 0.0, "constant") for step in (0, 19)] == [1.0, 1.0]


def _config(**overrides):
    from seqtopk.sparse.csr.train import TrainConfig

    settings = dict(k=4, method="csrv2", max_steps=6, batch_size=32, finetune_steps=3, finetune_batch_size=4,
                    checkpoint_every=2, data=[str(tiny_training_file())])
    return TrainConfig(**{**settings, **overrides})


@needs_shared_data
def test_a_run_stopped_at_its_time_limit_resumes_to_the_same_folder():
    """Stopped once in each stage (time limit 0: stop after the next step), resumed: bit for bit the weights
    and held-out count of one uninterrupted run."""
    from safetensors.numpy import load_file

    from seqtopk.sparse.backbone import default_backbone
    from seqtopk.sparse.csr.train import train_head

    config = _config(max_steps=2, finetune_steps=2, finetune_batch_size=2, checkpoint_every=100)
    whole = train_head(default_backbone(), scratch_dir() / "whole", config, progress=False)
    out = scratch_dir() / "resumed"
    stops = [train_head(default_backbone(), out, config, progress=False, time_limit_s=0)]
    stops.append(train_head(default_backbone(), out, config, progress=False, resume=True, time_limit_s=0))
    assert [(s["stage"], s["step"]) for s in stops] == [("head", 1), ("finetune", 1)]
    resumed = train_head(default_backbone(), out, config, progress=False, resume=True)
    assert resumed["history"] == whole["history"]
    assert resumed["dead_latent_fraction_heldout"] == whole["dead_latent_fraction_heldout"]
    a, b = load_file(str(scratch_dir() / "whole" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(np.array_equal(a[name], b[name]) for name in a)


@needs_shared_data
def test_a_checkpoint_is_never_silently_dropped_or_mixed_with_other_settings():
    from seqtopk.sparse.backbone import default_backbone
    from seqtopk.sparse.csr.train import train_head

    out = scratch_dir() / "checkpointed"
    assert train_head(default_backbone(), out, _config(), progress=False, time_limit_s=0)["paused"]
    with pytest.raises(ValueError, match="pass --resume"):
        train_head(default_backbone(), out, _config(), progress=False)
    with pytest.raises(ValueError, match="backbone_lr differ"):
        train_head(default_backbone(), out, _config(backbone_lr=1e-4), progress=False, resume=True)
    (out.parent / "checkpointed.checkpoint" / "state.pt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        train_head(default_backbone(), out, _config(), progress=False, resume=True)
    assert not out.exists()


@needs_shared_data
def test_mrl_reference_is_a_sentence_transformer_folder_with_its_dense_head():
    from sentence_transformers import SentenceTransformer

    from seqtopk.sparse.backbone import CachedBackbone, backbone_fingerprint, default_backbone
    from seqtopk.sparse.csr.train import train_head

    out = scratch_dir() / "mrl-32"
    summary = train_head(default_backbone(), out, _config(method="mrl", k=32, max_steps=20, finetune_steps=0), progress=False)
    assert summary["hidden_dim"] == 32 and summary["mean_active_heldout"] == 32 and summary["config"]["supervised"]
    assert summary["history"][-1]["loss"] < summary["history"][0]["loss"]
    model = SentenceTransformer(str(out), device="cpu", local_files_only=True)
    texts = ["How do I top up my card?", "My card has not arrived yet."]
    embeddings = model.encode(texts, convert_to_tensor=True)
    assert embeddings.shape == (2, 32) and model.similarity_fn_name == "cosine"
    # the backbone under the head is the frozen one: the same cache fingerprint, and the head is linear on it
    assert backbone_fingerprint(out) == backbone_fingerprint(default_backbone())
    dense = torch.from_numpy(CachedBackbone(default_backbone()).encode(texts))
    assert torch.allclose(embeddings, model[-1]({"sentence_embedding": dense})["sentence_embedding"], atol=1e-5)


@needs_shared_data
def test_speed_script_times_encode_and_search_of_csrv2_k2_against_dense_and_mrl(tmp_path):
    """evals/csr_speed.py at toy size on real SciFact text, with a fine-tuned CSRv2 k=2 head and an MRL-32 head
    trained here: every model encoded the same texts each round, the sparse index holds two latents a document,
    and the ratios are the quotients of the figures they name."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests.figures import assert_png

    from seqtopk.sparse.backbone import default_backbone
    from seqtopk.sparse.csr.train import train_head

    csr, mrl = tmp_path / "csrv2-ft-k2", tmp_path / "mrl-32"
    train_head(default_backbone(), csr, _config(k=2, max_steps=4, finetune_steps=2, finetune_batch_size=2), progress=False)
    train_head(default_backbone(), mrl, _config(method="mrl", k=32, max_steps=4, finetune_steps=0), progress=False)
    out = tmp_path / "speed.json"
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(repo / "evals" / "csr_speed.py"), "--csr", str(csr), "--mrl", str(mrl),
                           "--docs", "200", "--queries", "20", "--rounds", "2", "--encode-texts", "16", "--out", str(out)],
                          cwd=repo, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    names = ["dense 384-d", "MRL-32", "CSRv2 k=2"]
    assert list(result["encode"]) == names and result["docs"] == 200 and 0 < result["queries"] <= 20
    assert all(len(result["encode"][n]["texts_per_s_rounds"]) == 2 for n in names)
    search = result["search"]
    assert search["CSRv2 k=2"]["active_dims_per_doc"] <= 2 and search["MRL-32"]["active_dims_per_doc"] == 32
    assert search["dense 384-d"]["index_bytes"] == 200 * 384 * 4
    for n in names:
        assert search[n]["us_median"] > 0 and 0 <= search[n]["ndcg_at_10"] <= 100
        ratio = result["ratios"][n]
        assert ratio["search_speedup_vs_dense"] == pytest.approx(
            search["dense 384-d"]["us_median"] / search[n]["us_median"], rel=0.02)
        assert ratio["index_bytes_vs_dense"] == pytest.approx(search[n]["index_bytes"] / (200 * 384 * 4), abs=1e-4)
    assert search["dense 384-d"]["ndcg_at_10"] > 50  # the real MiniLM on real SciFact text
    assert_png(out.with_suffix(".png"))
