"""An SSR encoder folder: the backbone's sentence-transformers folder plus ssr_head/ (config + safetensors).

    DIR/                     the backbone as saved by sentence-transformers (loads with SentenceTransformer)
    DIR/config.json          + architectures = [SeqtopkSSRBertModel], io_processor_plugin (vLLM serving)
    DIR/ssr_head/config.json {format, input_dim, hidden_dim, k, k_aux, dead_threshold, query/doc max tokens}
    DIR/ssr_head/model.safetensors  weight (h, d), pre_bias (d), latent_bias (h)
    DIR/ssr_training.json    what training did (steps, losses, dead-latent fraction on held-out text)

Like CSR head folders (seqtopk.sparse.csr.folder), a folder is written into a staging folder and moved into
place whole, and `check_ssr_folder` reads configs and safetensors headers only and names the bad file.
`head_fingerprint` identifies the code an index was built with, so an index refuses another head.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from seqtopk.sparse.csr.folder import HeadFolderError
from seqtopk.sparse.index.atomic import replace_folder, staging_folder
from seqtopk.sparse.ssr.tokens import DOC_MAX_TOKENS, QUERY_MAX_TOKENS

HEAD_DIR = "ssr_head"
FORMAT = "seqtopk-ssr-head"
_RETRAIN = "train it again with `seqtopk ssr train --k K --out {folder}`"


def check_ssr_folder(folder: Path) -> dict:
    """The head config of a complete SSR folder, or FileNotFoundError / HeadFolderError naming the bad file."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    retrain = _RETRAIN.format(folder=folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no SSR encoder folder at {folder}; {retrain}")
    for name in ("modules.json", "config.json", "model.safetensors", f"{HEAD_DIR}/config.json", f"{HEAD_DIR}/model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing, so {folder} is not a complete SSR encoder folder; {retrain}")
    path = folder / HEAD_DIR / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise HeadFolderError(f"{path} is not valid JSON ({err}); {retrain}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise HeadFolderError(f"{path} is not an SSR head config (format {FORMAT!r} expected); {retrain}")
    try:
        d, h, k = (int(config[key]) for key in ("input_dim", "hidden_dim", "k"))
    except (KeyError, TypeError, ValueError):
        raise HeadFolderError(f"{path} lacks integer input_dim, hidden_dim and k; {retrain}") from None
    backbone_dim = json.loads((folder / "config.json").read_text()).get("hidden_size")
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
    if {name: shapes.get(name) for name in expected} != expected:
        raise HeadFolderError(f"{weights} holds {shapes}, but {path} describes {expected}; {retrain}")
    return config


def save_ssr_folder(out: Path, backbone_st_model, sae, summary: dict, overwrite: bool = False) -> None:
    """Write backbone + head + summary to a staging folder, then move it to `out` whole."""
    import torch
    from safetensors.torch import save_file

    from seqtopk.sparse.vllm.registry import SSR_ARCHITECTURE, SSR_SPARSE_IO_PLUGIN

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    staging = staging_folder(out)
    try:
        backbone_st_model.save(str(staging))
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        config["architectures"] = [SSR_ARCHITECTURE]  # transformers goes by model_type; vLLM by this
        config["io_processor_plugin"] = SSR_SPARSE_IO_PLUGIN
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        (staging / HEAD_DIR).mkdir()
        head_config = {"format": FORMAT, **sae.config(), "query_max_tokens": QUERY_MAX_TOKENS,
                       "doc_max_tokens": DOC_MAX_TOKENS}
        (staging / HEAD_DIR / "config.json").write_text(json.dumps(head_config, indent=2) + "\n")
        state = {name: t.detach().to("cpu", torch.float32).contiguous()
                 for name, t in sae.state_dict().items() if name in ("weight", "pre_bias", "latent_bias")}
        save_file(state, str(staging / HEAD_DIR / "model.safetensors"))
        (staging / "ssr_training.json").write_text(json.dumps(summary, indent=2) + "\n")
        replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_sae(folder: Path):
    """The TokenSAE of a checked SSR folder, in eval mode."""
    from safetensors.torch import load_file

    from seqtopk.sparse.ssr.sae import TokenSAE

    config = check_ssr_folder(folder)
    sae = TokenSAE(config["input_dim"], config["hidden_dim"], config["k"], config.get("k_aux", 256),
                   config.get("dead_threshold", 50))
    sae.load_state_dict(load_file(str(Path(folder) / HEAD_DIR / "model.safetensors")), strict=False)
    return sae.eval()


def head_fingerprint(folder: Path) -> str:
    """Equal for two folders that give the same token codes: backbone weights + head config and weights."""
    from seqtopk.sparse.backbone import backbone_fingerprint

    folder = Path(folder)
    check_ssr_folder(folder)
    digest = hashlib.sha256(backbone_fingerprint(folder).encode())
    digest.update((folder / HEAD_DIR / "config.json").read_bytes())
    digest.update((folder / HEAD_DIR / "model.safetensors").read_bytes())
    return digest.hexdigest()[:20]
