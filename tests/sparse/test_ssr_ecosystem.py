"""An SSR folder outside seqtopk: sentence-transformers' MultiVectorEncoder loads it (in a process where seqtopk
cannot be imported) and gives the same token codes as SSREncoder; a folder whose head is not in modules.json
is refused by name; `seqtopk ssr export` writes one engine row per token code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from tests.sparse.fixtures import needs_shared_data
from tests.sparse.ssr_fixtures import own_token_cache, scifact_slice, tiny_ssr

from seqtopk.cli import main

pytestmark = [needs_shared_data, pytest.mark.slow]

# Runs in a fresh interpreter with `seqtopk` made unimportable: only sentence-transformers reads the folder.
WITHOUT_SEQTOPK = """
import json, sys
sys.modules["seqtopk"] = None  # any `import seqtopk...` now raises ImportError
import numpy as np
from sentence_transformers import MultiVectorEncoder
folder, texts_file, out = sys.argv[1:4]
texts = json.load(open(texts_file))
model = MultiVectorEncoder(folder, device="cpu", local_files_only=True)
arrays = {}
for kind, encode in (("document", model.encode_document), ("query", model.encode_query)):
    for i, codes in enumerate(encode(texts[kind], convert_to_numpy=False)):
        arrays[f"{kind}-{i}"] = codes.numpy()
np.savez(out, **arrays)
"""


@pytest.fixture(scope="module", autouse=True)
def _own_token_cache():
    with own_token_cache():
        yield


def test_sentence_transformers_without_seqtopk_gives_the_same_codes_as_ssr_encoder(tmp_path):
    from seqtopk.sparse.ssr.encoder import SSREncoder

    data = scifact_slice()
    texts = {"document": data.doc_texts[:4] + ["Vitamin D, calcium; and bone density (n=1,200)."],
             "query": data.query_texts[:4]}
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    env_free = subprocess.run([sys.executable, "-c", WITHOUT_SEQTOPK, str(tiny_ssr()), str(tmp_path / "texts.json"),
                               str(tmp_path / "st.npz")], capture_output=True, text=True, timeout=300,
                              env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "HOME": os.environ.get("HOME", "/tmp"),
                                   "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert env_free.returncode == 0, env_free.stderr[-3000:]
    st = np.load(tmp_path / "st.npz")
    encoder = SSREncoder(tiny_ssr(), use_cache=False)  # full-precision token vectors, as the ST path has
    for kind, kind_texts in texts.items():
        ours = encoder.encode(kind_texts, kind)
        for i in range(len(kind_texts)):
            theirs, mine = st[f"{kind}-{i}"], ours.text(i)
            assert theirs.shape == (mine.n_rows, encoder.dim)  # the same tokens kept (specials, punctuation)
            rows, cols = np.nonzero(theirs)
            assert np.array_equal(np.bincount(rows, minlength=mine.n_rows), np.diff(mine.indptr))
            assert np.array_equal(cols, mine.indices)  # the same latents fire, token by token
            np.testing.assert_allclose(theirs[rows, cols], mine.values, atol=1e-5)


def test_a_folder_whose_head_is_not_in_modules_json_is_refused_by_name(tmp_path):
    from seqtopk.sparse.coding.folder_format import HeadFolderError
    from seqtopk.sparse.ssr.encoder import SSREncoder

    folder = tmp_path / "headless"
    shutil.copytree(tiny_ssr(), folder)
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps([m for m in modules if m["path"] != "ssr_head"]))
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(HeadFolderError, match=r"modules.json does not list the SparseAutoEncoder at ssr_head/"):
        SSREncoder(folder)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert main(["ssr", "index", str(folder), "--corpus", str(tmp_path / "none.jsonl"), "--out",
                 str(tmp_path / "x.idx")]) == 2


def test_ssr_export_writes_one_row_per_token_code(tmp_path, capsys):
    from seqtopk.sparse.export import open_engine
    from seqtopk.sparse.ssr.encoder import SSREncoder

    data = scifact_slice()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in zip(data.doc_ids[:12], data.doc_texts)))
    codes = SSREncoder(tiny_ssr()).encode(data.doc_texts[:12], "document")
    uri = str(tmp_path / "qdrant")
    where = ["--engine", "qdrant", "--uri", uri, "--collection", "tokens"]
    assert main(["ssr", "export", str(tiny_ssr()), "--corpus", str(corpus), *where, "--quiet"]) == 0
    assert f"exported {codes.codes.n_rows} codes" in capsys.readouterr().out
    with open_engine("qdrant", uri, "tokens") as engine:
        assert engine.count() == codes.codes.n_rows
        assert engine.info().vectors_per_doc == "many" and engine.info().dim == codes.codes.dim
        # a token's own code finds its own row first (unit codes: inner product 1 with itself)
        hit = engine.search(codes.text(3), k=1)[0][0]
        assert hit.doc_id == data.doc_ids[3] and hit.score == pytest.approx(1.0, abs=1e-5)
    assert main(["ssr", "export", str(tiny_ssr()), "--corpus", str(corpus), *where, "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err
