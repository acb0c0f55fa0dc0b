"""An SSR encoder folder: a sentence-transformers MultiVectorEncoder built from stock modules only.

    DIR/modules.json          Transformer (the backbone, at DIR/) -> Normalize (token_embeddings, written to
                              sentence_embedding) -> SparseAutoEncoder (DIR/ssr_head/, applied per token) ->
                              Normalize (back to token_embeddings: unit-norm codes) -> MultiVectorMask (special
                              tokens, queries and documents) -> MultiVectorMask (punctuation, documents only)
    DIR/config.json           the backbone's, + architectures = [SeqtopkSSRBertModel], io_processor_plugin (vLLM)
    DIR/sentence_bert_config.json  query_length 32, document_length 180 (truncation, special tokens included)
    DIR/ssr_head/             the SparseAutoEncoder: config.json + model.safetensors (the tied weight (h, d)
                              as encoder.weight or decoder.linear.weight, pre_bias (d), latent_bias (h))
    DIR/ssr_config.json       {format, version, head, query/doc max tokens}: what seqtopk checks first
    DIR/ssr_training.json     what training did (steps, losses, dead-latent fraction on held-out text)

So `MultiVectorEncoder(DIR)` gives the same token codes as `SSREncoder(DIR)` without seqtopk installed, and
seqtopk, its index and the vLLM model read the same files. Like CSR head folders, a folder is written into a
staging folder and moved into place whole; `check_ssr_folder` reads configs and safetensors headers only and
names the bad file. `head_fingerprint` identifies the code an index was built with.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from seqtopk.sparse.coding.folder_format import (SSR_ARCHITECTURE, SSR_SPARSE_IO_PLUGIN, HeadFolderError,
                                                  read_folder_json, tied_weight_name)
from seqtopk.sparse.index.atomic import replace_folder, staging_folder
from seqtopk.sparse.ssr.tokens import DOC_MAX_TOKENS, QUERY_MAX_TOKENS

HEAD_DIR = "ssr_head"
SSR_CONFIG = "ssr_config.json"
FORMAT = "seqtopk-ssr-encoder"
VERSION = 2
_RETRAIN = "train it again with `seqtopk ssr train --k K --out {folder}`"


def check_ssr_folder(folder: Path) -> dict:
    """The head's sizes and token limits, or FileNotFoundError / HeadFolderError naming the bad file."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    retrain = _RETRAIN.format(folder=folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no SSR encoder folder at {folder}; {retrain}")
    if not (folder / SSR_CONFIG).is_file() and _is_first_layout(folder):
        raise HeadFolderError(f"{folder} is an SSR folder in seqtopk's first layout (head outside modules.json), "
                              f"which this version does not read; {retrain}")
    for name in (SSR_CONFIG, "modules.json", "config.json", "model.safetensors", f"{HEAD_DIR}/config.json",
                 f"{HEAD_DIR}/model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing, so {folder} is not a complete SSR encoder folder; {retrain}")
    ssr = read_folder_json(folder / SSR_CONFIG, retrain)
    if ssr.get("format") != FORMAT or ssr.get("version") != VERSION:
        raise HeadFolderError(f"{folder / SSR_CONFIG} is not an SSR encoder config (format {FORMAT!r} version "
                              f"{VERSION} expected); {retrain}")
    modules = read_folder_json(folder / "modules.json", retrain, list)
    if not any(isinstance(m, dict) and m.get("path") == HEAD_DIR and str(m.get("type", "")).endswith("SparseAutoEncoder")
               for m in modules):
        raise HeadFolderError(f"{folder / 'modules.json'} does not list the SparseAutoEncoder at {HEAD_DIR}/, so "
                              f"sentence-transformers would drop the head; {retrain}")
    path = folder / HEAD_DIR / "config.json"
    head = read_folder_json(path, retrain)
    try:
        d, h, k = (int(head[key]) for key in ("input_dim", "hidden_dim", "k"))
    except (KeyError, TypeError, ValueError):
        raise HeadFolderError(f"{path} lacks integer input_dim, hidden_dim and k; {retrain}") from None
    if not 1 <= k <= h or head.get("normalize"):
        raise HeadFolderError(f"{path} asks for k={k} of {h} latents (normalize={head.get('normalize')}); an SSR "
                              f"head keeps 1 <= k <= hidden_dim and no input LayerNorm; {retrain}")
    backbone_dim = read_folder_json(folder / "config.json", retrain).get("hidden_size")
    if backbone_dim != d:
        raise HeadFolderError(f"{path} says the head reads {d}-dim token vectors, but the backbone in {folder} "
                              f"gives {backbone_dim}: head and backbone come from different models; {retrain}")
    weights = folder / HEAD_DIR / "model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise HeadFolderError(f"{weights} is not a readable safetensors file, truncated or corrupted ({err}); {retrain}") from None
    expected = {"weight": [h, d], "pre_bias": [d], "latent_bias": [h]}
    found = {"weight": shapes.get(tied_weight_name(shapes)), "pre_bias": shapes.get("pre_bias"),
             "latent_bias": shapes.get("latent_bias")}
    if found != expected:
        raise HeadFolderError(f"{weights} holds {shapes}, but {path} describes {expected}; {retrain}")
    return {"input_dim": d, "hidden_dim": h, "k": k, "k_aux": int(head.get("k_aux", 256)),
            "dead_threshold": int(head.get("dead_threshold", 50)),
            "query_max_tokens": ssr.get("query_max_tokens"), "doc_max_tokens": ssr.get("doc_max_tokens")}


def _is_first_layout(folder: Path) -> bool:
    try:
        return json.loads((folder / HEAD_DIR / "config.json").read_text()).get("format") == "seqtopk-ssr-head"
    except (OSError, ValueError, AttributeError):
        return False


def stock_modules(transformer, sae, tokenizer) -> list:
    """The MultiVectorEncoder modules of an SSR encoder (`sae` a seqtopk.sparse.coding.sae.TopKSAE, saved as the plain
    upstream module), all from sentence-transformers itself."""
    from sentence_transformers.base.modules import Normalize
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask

    from seqtopk.sparse.ssr.tokens import punctuation_ids

    transformer.query_length, transformer.document_length = QUERY_MAX_TOKENS, DOC_MAX_TOKENS
    head = sae.to_upstream()
    special = list(dict.fromkeys(tokenizer.all_special_tokens))
    punctuation = tokenizer.convert_ids_to_tokens(punctuation_ids(tokenizer).tolist())
    # The SAE module reads and writes "sentence_embedding"; the two Normalize modules move token vectors in
    # (unit length, as SSR's tokens are) and the codes back out (unit length, as SSR scores them).
    return [transformer, Normalize("token_embeddings", "sentence_embedding"), head.eval(),
            Normalize("sentence_embedding", "token_embeddings"),
            MultiVectorMask(special, skiplist_tasks=["query", "document"]),
            MultiVectorMask(punctuation, skiplist_tasks=["document"])]


def save_ssr_folder(out: Path, backbone_st_model, sae, summary: dict, overwrite: bool = False) -> None:
    """Write the MultiVectorEncoder folder + SSR config + summary to a staging folder, then move it to `out`."""
    from sentence_transformers import MultiVectorEncoder

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    staging = staging_folder(out)
    try:
        model = MultiVectorEncoder(modules=stock_modules(backbone_st_model[0], sae, backbone_st_model.tokenizer),
                                   device="cpu")
        model.save(str(staging))
        modules = json.loads((staging / "modules.json").read_text())
        for m in modules:  # ST names the folder "<idx>_SparseAutoEncoder"; SSR's head keeps one name
            if m["type"].endswith("SparseAutoEncoder"):
                (staging / m["path"]).rename(staging / HEAD_DIR)
                m["path"] = HEAD_DIR
        (staging / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        config["architectures"] = [SSR_ARCHITECTURE]  # transformers goes by model_type; vLLM by this
        config["io_processor_plugin"] = SSR_SPARSE_IO_PLUGIN
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        (staging / SSR_CONFIG).write_text(json.dumps(
            {"format": FORMAT, "version": VERSION, "head": HEAD_DIR, "query_max_tokens": QUERY_MAX_TOKENS,
             "doc_max_tokens": DOC_MAX_TOKENS}, indent=2) + "\n")
        (staging / "ssr_training.json").write_text(json.dumps(summary, indent=2) + "\n")
        replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_sae(folder: Path):
    """The seqtopk.sparse.coding.sae.TopKSAE of a checked SSR folder, in eval mode (read as sentence-transformers reads
    the ssr_head/ module, so the tied weight under either name and older folders load alike)."""
    from sentence_transformers.sparse_encoder.modules import SparseAutoEncoder

    from seqtopk.sparse.coding.sae import TopKSAE

    check_ssr_folder(folder)
    return TopKSAE.from_upstream(SparseAutoEncoder.load(str(Path(folder) / HEAD_DIR), local_files_only=True)).eval()


def head_fingerprint(folder: Path) -> str:
    """Equal for two folders that give the same token codes: transformer weights + head config and weights."""
    from seqtopk.sparse.backbone import transformer_fingerprint

    folder = Path(folder)
    check_ssr_folder(folder)
    digest = hashlib.sha256(transformer_fingerprint(folder).encode())
    for name in (SSR_CONFIG, f"{HEAD_DIR}/config.json", f"{HEAD_DIR}/model.safetensors"):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:20]
