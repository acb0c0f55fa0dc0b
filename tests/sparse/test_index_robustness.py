"""Index files and head folders under faults: truncation, flipped bytes, missing or foreign files, writes that
fail or are killed halfway. A load either gives the index (or head) that was saved or raises an error naming
the file and the fix, never a half result, a crash of the process, or a parser's error from deep inside."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from seqtopk.cli import main as cli_main
from seqtopk.sparse.index import IndexFileError, InvertedIndex, SparseRows
from seqtopk.sparse.index import atomic
from seqtopk.sparse.index.storage import save_arrays

QUERY = (np.array([1, 5, 9, 20]), np.array([0.5, 0.2, 0.1, 0.7]))


def tiny_index(seed: int = 0, n: int = 40, dim: int = 24) -> InvertedIndex:
    rng = np.random.default_rng(seed)
    dense = (rng.random((n, dim)) < 0.2) * rng.random((n, dim))
    return InvertedIndex(SparseRows.from_dense(dense))


def same_results(a: InvertedIndex, b: InvertedIndex) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.search(*QUERY, k=10), b.search(*QUERY, k=10)))


def rewrite(path: Path, data: bytes) -> None:
    """Replace a file's content through a new inode, so copies made with hard links keep theirs."""
    path.unlink()
    path.write_bytes(data)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


class CutOffWriter(io.BufferedWriter):
    """A file that takes `limit` bytes, then calls `cut()`: raise as a full disk does, or die as a killed process."""

    def __init__(self, raw, limit: int, cut):
        super().__init__(raw)
        self.limit, self.cut, self.written = limit, cut, 0

    def write(self, data):
        data = bytes(data)
        if self.written + len(data) > self.limit:
            super().write(data[: self.limit - self.written])
            self.flush()
            self.cut()
        self.written += len(data)
        return super().write(data)


def disk_full():
    raise OSError(28, "No space left on device (injected)")


# ------------------------------------------------------------------------------------------ index files


@pytest.mark.parametrize("use_numba", [True, False])
def test_a_saved_index_loads_and_searches_the_same(tmp_path, use_numba):
    index = tiny_index()
    index.save(tmp_path / "docs.idx")
    loaded = InvertedIndex.load(tmp_path / "docs.idx", use_numba=use_numba)
    assert loaded.n_docs == index.n_docs and loaded.dim == index.dim
    assert same_results(loaded, index)
    assert (tmp_path / "docs.idx").stat().st_mode & 0o777 == 0o666 & ~current_umask(), "the umask decides, as for open()"


def test_an_index_truncated_at_any_byte_is_refused(tmp_path):
    path = tmp_path / "docs.idx"
    tiny_index().save(path)
    data = path.read_bytes()
    for size in range(len(data)):
        path.write_bytes(data[:size])
        with pytest.raises(IndexFileError, match=f"{path}.*rebuild it"):
            InvertedIndex.load(path)


def test_an_index_with_any_byte_flipped_is_refused(tmp_path):
    path = tmp_path / "docs.idx"
    tiny_index().save(path)
    data = path.read_bytes()
    for at in range(len(data)):
        flipped = bytearray(data)
        flipped[at] ^= 0x5A
        path.write_bytes(bytes(flipped))
        with pytest.raises(IndexFileError, match=str(path)):
            InvertedIndex.load(path)


def test_other_files_are_refused_with_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no index file at .*InvertedIndex.save"):
        InvertedIndex.load(tmp_path / "absent.idx")
    np.save(tmp_path / "array.npy", np.arange(100))
    (tmp_path / "empty.idx").write_bytes(b"")
    for name in ("array.npy", "empty.idx"):
        with pytest.raises(IndexFileError, match="does not start like a seqtopk inverted index"):
            InvertedIndex.load(tmp_path / name)


def test_a_checksummed_file_with_impossible_postings_is_refused(tmp_path):
    """The compiled search trusts offsets and doc ids; a file that is whole but wrong must not reach it."""
    index = tiny_index()
    arrays = {"indptr": index.indptr, "doc_ids": index.doc_ids, "values": index.values}
    for name, broken, n_docs, message in [
        ("doc_ids", index.doc_ids + index.n_docs, index.n_docs, "doc ids beyond"),
        ("indptr", index.indptr[::-1].copy(), index.n_docs, "offsets are not ascending"),
        ("values", index.values[:-1], index.n_docs, "lengths do not fit"),
    ]:
        save_arrays(tmp_path / "bad.idx", {**arrays, name: broken}, n_docs, index.dim)
        with pytest.raises(IndexFileError, match=message):
            InvertedIndex.load(tmp_path / "bad.idx")


@pytest.mark.parametrize("failing", ["write", "fsync", "rename"])
def test_a_failed_save_keeps_the_previous_index(tmp_path, monkeypatch, failing):
    path = tmp_path / "docs.idx"
    tiny_index(seed=0).save(path)
    before = path.read_bytes()
    new = tiny_index(seed=1)
    if failing == "write":  # halfway through the file
        monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: CutOffWriter(io.FileIO(fd, "wb"), 600, disk_full))
    else:
        monkeypatch.setattr(atomic.os, "fsync" if failing == "fsync" else "replace", lambda *args: disk_full())
    with pytest.raises(OSError, match="No space left"):
        new.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and same_results(InvertedIndex.load(path), tiny_index(seed=0))
    assert leftovers(tmp_path) == [], "the temporary file is removed"
    new.save(path)  # and the next save goes through
    assert same_results(InvertedIndex.load(path), new)


def test_a_save_killed_halfway_leaves_the_previous_index_and_no_loadable_half(tmp_path):
    path = tmp_path / "docs.idx"
    tiny_index(seed=0).save(path)
    before = path.read_bytes()
    # A process that dies (no exception, no cleanup) after writing 600 bytes of the new file.
    script = textwrap.dedent(f"""
        import io, os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from tests.sparse.test_index_robustness import CutOffWriter, tiny_index
        os.fdopen = lambda fd, mode: CutOffWriter(io.FileIO(fd, "wb"), 600, lambda: os._exit(9))
        tiny_index(seed=1).save({str(path)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr
    assert path.read_bytes() == before
    (half,) = [tmp_path / name for name in leftovers(tmp_path)]
    assert half.name.endswith(".partial") and half.stat().st_size == 600
    with pytest.raises(IndexFileError, match="truncated or corrupted|does not start like"):
        InvertedIndex.load(half)


@pytest.mark.parametrize("use_numba", [True, False])
def test_bad_queries_raise_instead_of_reading_out_of_bounds(use_numba):
    index = InvertedIndex(SparseRows.from_dense(np.eye(24, dtype=np.float32)), use_numba=use_numba)  # doc i: latent i
    for indices, values, k, message in [
        (np.array([10**7]), np.array([1.0]), 5, r"latent ids must lie in \[0, 24\)"),  # crashed the process (numba)
        (np.array([-5]), np.array([1.0]), 5, r"latent ids must lie in \[0, 24\)"),  # silently read list -5
        (np.array([0, 1]), np.array([1.0]), 5, "one length"),  # numba read past the values
        (np.array([[0]]), np.array([[1.0]]), 5, "1-D"),
        (np.array([0]), np.array([1.0]), 0, "k must be at least 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            index.search(indices, values, k)
    ids, scores = index.search(np.array([3]), np.array([2.0]), 5)
    assert ids.tolist() == [3] and scores.tolist() == [2.0]


# ------------------------------------------------------------------------------------------ head folders

HEAD = "3_SparseAutoEncoder"


@pytest.fixture(scope="module")
def backbone_modules():
    from seqtopk.sparse.backbone import default_backbone, load_backbone

    return list(load_backbone(default_backbone()))


def random_head(hidden_dim: int = 1536, k: int = 8, seed: int = 0):
    import torch

    from seqtopk.sparse.coding.sae import TopKSAE

    torch.manual_seed(seed)
    return TopKSAE(384, hidden_dim, k=k)


@pytest.fixture(scope="module")
def saved_head(tmp_path_factory, backbone_modules):
    """A head folder written by save_head (the one `seqtopk csr train` uses), untrained, plus a head of
    another size saved on its own, to borrow weights from."""
    from seqtopk.sparse.csr.train import save_head

    root = tmp_path_factory.mktemp("heads")
    head = random_head()
    save_head([*backbone_modules, head], head, root / "head", {"k": 8})
    (root / "other-size").mkdir()
    random_head(hidden_dim=768).to_upstream().save(str(root / "other-size"))
    return root


@pytest.fixture
def head_copy(saved_head, tmp_path):
    """A private copy of the saved head; files are hard links, so faults must go through rewrite()."""
    copy = tmp_path / "head"
    shutil.copytree(saved_head / "head", copy, copy_function=os.link)
    return copy


def set_json(path: Path, **fields) -> None:
    rewrite(path, json.dumps({**json.loads(path.read_text()), **fields}).encode())


def truncate(path: Path) -> None:
    rewrite(path, path.read_bytes()[: path.stat().st_size // 2])


FAULTS = {
    "head weights missing": (lambda d, s: (d / HEAD / "model.safetensors").unlink(),
                             FileNotFoundError, f"{HEAD}/model.safetensors is missing"),
    "head weights of another head size": (
        lambda d, s: rewrite(d / HEAD / "model.safetensors", (s / "other-size" / "model.safetensors").read_bytes()),
        ValueError, f"{HEAD}/model.safetensors holds .*768.* different heads"),
    "head weights truncated": (lambda d, s: truncate(d / HEAD / "model.safetensors"),
                               ValueError, f"{HEAD}/model.safetensors is not a readable safetensors file"),
    "head config missing": (lambda d, s: (d / HEAD / "config.json").unlink(),
                            FileNotFoundError, f"{HEAD}/config.json is missing"),
    "head config of another head size": (lambda d, s: set_json(d / HEAD / "config.json", hidden_dim=768),
                                         ValueError, f"{HEAD}/model.safetensors holds .*1536.* different heads"),
    "head config for another backbone": (lambda d, s: set_json(d / HEAD / "config.json", input_dim=512),
                                         ValueError, f"{HEAD}/config.json says the head reads 512-dim"),
    "head config with k above hidden_dim": (lambda d, s: set_json(d / HEAD / "config.json", k=5000),
                                            ValueError, "asks for k=5000"),
    "head config truncated": (lambda d, s: truncate(d / HEAD / "config.json"),
                              ValueError, f"{HEAD}/config.json is not valid JSON"),
    "head folder missing": (lambda d, s: shutil.rmtree(d / HEAD), FileNotFoundError, f"{HEAD}, the folder of module"),
    "modules.json missing": (lambda d, s: (d / "modules.json").unlink(), FileNotFoundError, "modules.json is missing"),
    "modules.json truncated": (lambda d, s: truncate(d / "modules.json"), ValueError, "modules.json is not valid JSON"),
    "backbone weights missing": (lambda d, s: (d / "model.safetensors").unlink(),
                                 FileNotFoundError, "has no backbone weights"),
    "backbone weights truncated": (lambda d, s: truncate(d / "model.safetensors"),
                                   ValueError, "head/model.safetensors is not a readable safetensors file"),
    "backbone config of another size": (lambda d, s: set_json(d / "config.json", hidden_size=512),
                                        ValueError, "reads 384-dim embeddings, but .*head/config.json gives 512"),
    "pooling config missing": (lambda d, s: (d / "1_Pooling" / "config.json").unlink(),
                               FileNotFoundError, "1_Pooling/config.json is missing"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_head_folder_with_a_missing_or_mismatched_file_is_refused_naming_it(head_copy, saved_head, fault):
    from seqtopk.sparse.csr.folder import check_head_folder
    from seqtopk.sparse.csr.serving_config import read_head_layout

    check_head_folder(head_copy)  # whole, it passes
    damage, error, message = FAULTS[fault]
    damage(head_copy, saved_head)
    with pytest.raises(error, match=message) as raised:
        check_head_folder(head_copy)
    assert "seqtopk csr train --out" in str(raised.value)
    with pytest.raises(error, match=message):  # what vLLM calls when it loads the folder
        read_head_layout(head_copy)


def test_cli_eval_of_a_damaged_head_is_one_line(head_copy, capsys):
    truncate(head_copy / HEAD / "model.safetensors")
    assert cli_main(["csr", "eval", str(head_copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("seqtopk csr: error: ") and "model.safetensors is not a readable" in err
    assert "\n" not in err and "Traceback" not in err


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("failing", ["while writing", "moving the new folder in"])
def test_a_failed_head_save_keeps_the_previous_folder(head_copy, backbone_modules, monkeypatch, failing):
    from seqtopk.sparse.csr import train
    from seqtopk.sparse.csr.folder import check_head_folder

    before = snapshot(head_copy)
    head = random_head(k=4, seed=1)
    if failing == "while writing":
        monkeypatch.setattr("seqtopk.sparse.csr.serving_config.write_serving_fields", lambda folder: disk_full())
    else:  # after the old folder was moved aside: it must come back
        real_replace = os.replace

        def replace(src, dst):
            if Path(src).name.endswith(".partial"):
                disk_full()
            real_replace(src, dst)

        monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        train.save_head([*backbone_modules, head], head, head_copy, {"k": 4}, overwrite=True)
    monkeypatch.undo()
    assert snapshot(head_copy) == before
    assert leftovers(head_copy.parent) == [], "no staging or set-aside folder remains"
    check_head_folder(head_copy)

    train.save_head([*backbone_modules, head], head, head_copy, {"k": 4}, overwrite=True)
    assert check_head_folder(head_copy).k == 4 and leftovers(head_copy.parent) == []
    assert head_copy.stat().st_mode & 0o777 == 0o777 & ~current_umask(), "the umask decides, not mkdtemp's 0o700"
