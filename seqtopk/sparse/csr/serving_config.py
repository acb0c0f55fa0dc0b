"""The fields that make a saved CSR head folder servable by vLLM as well as loadable by sentence-transformers."""

from __future__ import annotations

import json
from pathlib import Path

from seqtopk.sparse.backbone import is_csr_head_dir, max_seq_length
from seqtopk.sparse.coding.folder_format import ARCHITECTURE, SPARSE_IO_PLUGIN
from seqtopk.sparse.csr.folder import check_head_folder


def write_serving_fields(folder: Path) -> None:
    """Name our vLLM architecture and sparse-output plugin in config.json; state the length limit.

    transformers ignores `architectures` when sentence-transformers loads the backbone (it goes by
    model_type), so the folder still loads with `SparseEncoder(path)`.
    """
    folder = Path(folder)
    if not is_csr_head_dir(folder):
        raise ValueError(f"{folder} is not a CSR head folder (its last module must be a SparseAutoEncoder)")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "bert":
        raise ValueError(f"vLLM serving supports BERT-family backbones only; {folder} has model_type {config.get('model_type')!r}")
    config["architectures"] = [ARCHITECTURE]
    config["io_processor_plugin"] = SPARSE_IO_PLUGIN
    config_path.write_text(json.dumps(config, indent=2) + "\n")

    # vLLM takes max_model_len and lower-casing from sentence_bert_config.json; sentence-transformers 6
    # keeps the limit in tokenizer_config.json only, so copy it across.
    st_config_path = folder / "sentence_bert_config.json"
    st_config = json.loads(st_config_path.read_text()) if st_config_path.is_file() else {}
    st_config.setdefault("max_seq_length", max_seq_length(folder))
    st_config.setdefault("do_lower_case", False)
    st_config_path.write_text(json.dumps(st_config, indent=4) + "\n")


def read_head_layout(folder: Path) -> dict:
    """What vLLM needs beyond the BERT weights: the head's folder and config, and whether the pooled
    embedding is L2-normalised before the head (a Normalize module between Pooling and the head)."""
    head = check_head_folder(Path(folder))  # a missing or mismatched file fails here, named, not inside vLLM
    if head.head_config.get("normalize"):
        raise ValueError(f"{folder}: heads with normalize=true (LayerNorm inside the head) cannot be served")
    kinds = [m["type"].rsplit(".", 1)[-1] for m in head.modules[:-1]]
    if kinds[:2] != ["Transformer", "Pooling"] or set(kinds[2:]) - {"Normalize"}:
        raise ValueError(f"{folder}: expected Transformer, Pooling, [Normalize], SparseAutoEncoder; got {kinds}")
    return {
        "head_dir": head.head_dir,
        "normalize_input": "Normalize" in kinds,
        "input_dim": head.input_dim,
        "hidden_dim": head.hidden_dim,
        "k": head.k,
    }
