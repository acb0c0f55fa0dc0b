"""MkDocs hooks: every recorded figure on a page is read from evals/results/*.json at build time.

On a page, `{{ result("vllm_bench_cpu.json", "ratio.decode-heavy.seqtopk-causal", "{:.2f}") }}` becomes the
value at that path of evals/results/vllm_bench_cpu.json, formatted (an optional fourth argument divides it
first, e.g. 1048576 for bytes in MiB). A path is keys joined by dots (a key that
itself holds dots is matched whole) and list indices; the format is Python's (default "{}"). A missing file
or key, or a `{{` left on a page, fails the build, so a page can never quote a figure the results do not hold.

The recorded figures (evals/results/*.png) and their JSON files are served from evals/results/ as they are,
under results/ in the site: one copy, in the repository, never in docs/.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "evals" / "results"
PLACEHOLDER = re.compile(r"\{\{\s*result\((.*?)\)\s*\}\}", re.S)
_cache: dict[str, object] = {}


def _load(name: str):
    if name not in _cache:
        path = RESULTS / name
        if not path.is_file():
            raise PluginError(f"results file {path} does not exist")
        _cache[name] = json.loads(path.read_text())
    return _cache[name]


def lookup(data, path: str, where: str = ""):
    """The value at a dotted path; keys with dots in them are matched whole (the longest key that fits)."""
    parts = path.split(".") if path else []
    node, i = data, 0
    while i < len(parts):
        if isinstance(node, list):
            try:
                node, i = node[int(parts[i])], i + 1
                continue
            except (ValueError, IndexError):
                raise PluginError(f"{where}: no list index {parts[i]!r} in path {path!r}") from None
        if not isinstance(node, dict):
            raise PluginError(f"{where}: path {path!r} goes past a value at {'.'.join(parts[:i])!r}")
        for j in range(len(parts), i, -1):
            key = ".".join(parts[i:j])
            if key in node:
                node, i = node[key], j
                break
        else:
            raise PluginError(f"{where}: no key {parts[i]!r} in path {path!r} (keys: {', '.join(map(str, node))})")
    return node


def result(name: str, path: str, fmt: str = "{}", divide_by: float = 1, where: str = "") -> str:
    value = lookup(_load(name), path, f"{where}{name}")
    if isinstance(value, (dict, list)):
        raise PluginError(f"{where}{name}: {path!r} is not a single value")
    if divide_by != 1:
        value = value / divide_by
    return fmt.format(value)


def on_page_markdown(markdown, page, config, files):
    where = f"{page.file.src_path}: "

    def replace(match):
        try:
            args = ast.literal_eval(f"({match.group(1)},)")
        except (SyntaxError, ValueError) as err:
            raise PluginError(f"{where}bad placeholder {match.group(0)!r}: {err}") from None
        return result(*args, where=where)

    out = PLACEHOLDER.sub(replace, markdown)
    if "{{" in out:
        line = next(l for l in out.splitlines() if "{{" in l)
        raise PluginError(f"{where}unreplaced placeholder: {line.strip()!r}")
    return out


def on_files(files, config):
    """Serve evals/results/*.png and *.json as results/<name> (copied from there at build time)."""
    for path in sorted(RESULTS.glob("*")):
        if path.suffix in (".png", ".json"):
            files.append(File(f"results/{path.name}", src_dir=str(RESULTS.parent), dest_dir=config["site_dir"],
                              use_directory_urls=config["use_directory_urls"]))
    return files
