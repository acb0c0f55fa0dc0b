"""A saved head folder, checked before anything loads it.

sentence-transformers and vLLM read a head folder file by file and fail on a bad one with whatever their
parser says (a JSON position, a safetensors header error, a state_dict size mismatch, a missing positional
argument). `check_head_folder` reads only configs and safetensors headers (no weights, no model) and says
which file is wrong and what to do instead: a missing file is a FileNotFoundError, a bad or mismatched one a
HeadFolderError (a ValueError), so `seqtopk` prints either as one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from seqtopk.sparse.coding.folder_format import HeadFolderError, read_folder_json, tied_weight_name

_RETRAIN = "train it again with `seqtopk csr train --out {folder}`, or restore the folder from a complete copy"


@dataclass
class HeadFolder:
    """What the check read: the module list, the head's subfolder and its sizes."""

    folder: Path
    modules: list[dict]
    head_dir: Path
    input_dim: int
    hidden_dim: int
    k: int
    head_config: dict


def check_head_folder(folder: Path) -> HeadFolder:
    """Check a CSR head folder's files against each other; raise naming the first bad file and the fix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no head folder at {folder}; train one with `seqtopk csr train --out {folder}`")
    modules = _read_json(folder, folder / "modules.json", list)
    if not (modules and all(isinstance(m, dict) and "type" in m for m in modules)):
        raise _bad(folder, folder / "modules.json", "is not a list of modules")
    if not str(modules[-1]["type"]).endswith("SparseAutoEncoder"):
        raise HeadFolderError(f"{folder} is not a CSR head folder: the last module in modules.json is "
                              f"{modules[-1]['type']}, not a SparseAutoEncoder")
    for module in modules:
        if not (folder / module.get("path", "")).is_dir():
            raise FileNotFoundError(f"{folder / module.get('path', '')}, the folder of module {module['type']} in "
                                    f"modules.json, is missing; " + _RETRAIN.format(folder=folder))
    dims = {}
    for module in modules[:-1]:
        kind, where = str(module["type"]).rsplit(".", 1)[-1], folder / module.get("path", "")
        if kind == "Transformer":
            dims[where / "config.json"] = _backbone_dim(folder, where)
        elif kind == "Pooling":
            config = _read_json(folder, where / "config.json")
            dims[where / "config.json"] = config.get("embedding_dimension", config.get("word_embedding_dimension"))
    head_dir = folder / modules[-1].get("path", "")
    config_path = head_dir / "config.json"
    config = _read_json(folder, config_path)
    try:
        input_dim, hidden_dim, k = (int(config[key]) for key in ("input_dim", "hidden_dim", "k"))
    except (KeyError, TypeError, ValueError):
        raise _bad(folder, config_path, "lacks integer input_dim, hidden_dim and k") from None
    if not 1 <= k <= hidden_dim:
        raise _bad(folder, config_path, f"asks for k={k} active latents out of hidden_dim={hidden_dim}")
    for source, dim in dims.items():
        if dim is not None and dim != input_dim:
            raise _bad(folder, config_path, f"says the head reads {input_dim}-dim embeddings, but {source} gives "
                                            f"{dim}: the head and the backbone come from different models")
    _check_head_weights(folder, head_dir / "model.safetensors", input_dim, hidden_dim)
    return HeadFolder(folder, modules, head_dir, input_dim, hidden_dim, k, config)


def _backbone_dim(folder: Path, where: Path) -> int | None:
    config = _read_json(folder, where / "config.json")
    weights = where / "model.safetensors"
    if weights.is_file():
        _tensor_shapes(folder, weights)
    elif not (where / "pytorch_model.bin").is_file():
        raise FileNotFoundError(f"{weights} is missing: the head folder {folder} has no backbone weights; "
                                + _RETRAIN.format(folder=folder))
    return config.get("hidden_size")


def _check_head_weights(folder: Path, path: Path, input_dim: int, hidden_dim: int) -> None:
    shapes = _tensor_shapes(folder, path)
    expected = {"weight": [hidden_dim, input_dim], "pre_bias": [input_dim], "latent_bias": [hidden_dim]}
    found = {"weight": shapes.get(tied_weight_name(shapes)), "pre_bias": shapes.get("pre_bias"), "latent_bias": shapes.get("latent_bias")}
    wrong = {name: found[name] for name in expected if found[name] != expected[name]}
    if wrong:
        raise _bad(folder, path, f"holds {wrong}, but config.json describes a head with {expected}: the weights "
                                 "and the config come from different heads")


def _tensor_shapes(folder: Path, path: Path) -> dict[str, list[int]]:
    """Names and shapes from a safetensors header (the header also fixes the file size, so truncation shows)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; " + _RETRAIN.format(folder=folder))
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise _bad(folder, path, f"is not a readable safetensors file, truncated or corrupted ({err})") from None


def _read_json(folder: Path, path: Path, kind: type = dict):
    return read_folder_json(path, _RETRAIN.format(folder=folder), kind)


def _bad(folder: Path, path: Path, why: str) -> HeadFolderError:
    return HeadFolderError(f"{path} {why}; {_RETRAIN.format(folder=folder)}")
