"""Real MTEB runs on tasks built from ../shared/data, with the dense backbone and a trained head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.sparse.fixtures import TINY_K, needs_shared_data, tiny_head

pytestmark = needs_shared_data


@pytest.fixture(scope="module")
def backbone():
    from seqtopk.sparse.backbone import CachedBackbone
    from seqtopk.sparse.backbone import default_backbone

    return CachedBackbone(default_backbone())


def test_local_tasks_hold_the_test_splits():
    from seqtopk.sparse.mteb.tasks import local_tasks

    scifact, stsb, sickr, banking = local_tasks()
    for task in (scifact, stsb, sickr, banking):
        task.load_data()
    split = scifact.dataset["default"]["test"]
    assert (len(split["corpus"]), len(split["queries"]), sum(map(len, split["relevant_docs"].values()))) == (5183, 300, 339)
    assert len(stsb.dataset["default"]["test"]) == 1379
    assert len(sickr.dataset["default"]["test"]) == 4927  # the SemEval test split, not all 9,927 pairs
    assert (len(banking.dataset["default"]["train"]), len(banking.dataset["default"]["test"])) == (10003, 3080)


def test_dense_minilm_reproduces_its_published_stsb_score(backbone):
    """MTEB on the local STS-B test split gives all-MiniLM-L6-v2's published STSBenchmark score (82.03)."""
    from seqtopk.sparse.mteb.models import DenseBaselineModel, run_tasks
    from seqtopk.sparse.mteb.tasks import local_tasks

    scores = run_tasks(DenseBaselineModel(backbone), local_tasks(["stsb"]))
    assert scores["STSBenchmark-local"] == pytest.approx(0.8203, abs=0.002)
    truncated = run_tasks(DenseBaselineModel(backbone, dims=8), local_tasks(["stsb"]))
    assert truncated["STSBenchmark-local"] < scores["STSBenchmark-local"] - 0.05


def test_head_wrapper_is_sparse_and_matches_sparse_encoder(backbone):
    from mteb.models.sentence_transformer_wrapper import SparseEncoderWrapper

    from seqtopk.sparse.backbone import CachedBackbone
    from seqtopk.sparse.mteb.models import CSRHeadModel

    head_dir = tiny_head()
    model = CSRHeadModel(head_dir, CachedBackbone(head_dir))
    assert isinstance(model, SparseEncoderWrapper)  # MTEB scores it as a sparse model
    texts = ["card payment declined", "where is my new card", "exchange rate for euros"]
    cached = model.encode_texts(texts)
    direct = model.model.encode(texts, convert_to_tensor=True).to_dense()
    assert torch.allclose(cached, direct, atol=1e-5)
    # similarity is the head's cosine, not a dot product: rescaling one code leaves it unchanged
    sparse = cached.to_sparse()
    assert torch.allclose(model.similarity(sparse, sparse).to_dense(), model.similarity((3 * cached).to_sparse(), sparse).to_dense(), atol=1e-5)


def test_head_on_retrieval_and_sts_through_mteb():
    """A real MTEB retrieval run (SciFact test queries against their judged documents plus 300 others)."""
    from seqtopk.sparse.backbone import CachedBackbone
    from seqtopk.sparse.mteb.models import CSRHeadModel, run_tasks
    from seqtopk.sparse.mteb.tasks import SciFactLocal, local_tasks

    head_dir = tiny_head()
    model = CSRHeadModel(head_dir, CachedBackbone(head_dir))
    scores = run_tasks(model, [SciFactLocal(extra_docs=300), *local_tasks(["stsb"])])
    assert 0.05 < scores["SciFact-local"] <= 1.0
    assert 0.2 < scores["STSBenchmark-local"] < 0.82  # a 60-step k=8 head: clearly learned, below dense


def test_retrieval_embeddings_are_sparse_tensors():
    from seqtopk.sparse.backbone import CachedBackbone
    from seqtopk.sparse.mteb.models import CSRHeadModel
    from seqtopk.sparse.mteb.tasks import SciFactLocal

    head_dir = tiny_head()
    model = CSRHeadModel(head_dir, CachedBackbone(head_dir))
    batch = [{"text": ["a claim about proteins", "another claim"]}]
    out = model.encode(batch, task_metadata=SciFactLocal.metadata, hf_split="test", hf_subset="default")
    assert out.is_sparse and ((out.to_dense() > 0).sum(dim=1) <= TINY_K).all()
    dense_out = model.encode(batch, task_metadata=SciFactLocal.metadata.model_copy(update={"type": "STS"}), hf_split="test", hf_subset="default")
    assert isinstance(dense_out, np.ndarray)
