"""The package's shape: no import cycles, an engine-free routing core and sparse index, and a wheel that
ships every subpackage and the local lm-eval tasks."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENGINES = {"vllm", "transformers", "sentence_transformers", "mteb", "lm_eval", "datasets", "triton"}


def package_modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name: each .py file under seqtopk/, by its path."""
    modules = {}
    for path in (REPO / "seqtopk").rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its file (module level and inside functions)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert len(graph) > 40, "the walk must see the whole package"
    assert find_cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def external_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add((node.module or "").split(".")[0])
    return names


@pytest.mark.parametrize("folder,allowed_internal", [
    ("routing", {"seqtopk.config", "seqtopk.budget", "seqtopk.routing", "seqtopk.paths"}),  # the torch reference
    ("sparse/index", {"seqtopk.sparse.index"}),
])
def test_core_folders_import_no_engine(folder, allowed_internal):
    graph = import_graph()
    prefix = "seqtopk." + folder.replace("/", ".")
    for name in (n for n in graph if n == prefix or n.startswith(prefix + ".")):
        path = package_modules()[name]
        assert not external_imports(path) & ENGINES, f"{name} imports an engine"
        outside = {m for m in graph[name] if not any(m == a or m.startswith(a + ".") for a in allowed_internal)}
        assert not outside, f"{name} imports {outside}"


def test_settings_and_routing_import_one_way_and_one_module_calls_the_compiled_ops():
    """config.py never imports routing/ (the budget arithmetic both need is the leaf seqtopk.budget), and
    kernels/ops.py is the only file that names torch.ops.seqtopk_cpu."""
    graph = import_graph()
    assert not {m for m in graph["seqtopk.config"] if m.startswith("seqtopk.routing")}, graph["seqtopk.config"]
    assert graph["seqtopk.budget"] == set()
    callers = {name for name, path in package_modules().items() if "torch.ops.seqtopk_cpu" in path.read_text()}
    assert callers == {"seqtopk.kernels.ops"}, callers


def test_every_vllm_hook_is_installed_from_one_module():
    """Only engines/vllm/hooks.py replaces a vLLM attribute or registers a vLLM layer; worker.py, whose import
    vLLM triggers in each worker, only calls it."""
    installers = {name for name, path in package_modules().items()
                  if any(mark in path.read_text() for mark in ("seqtopk_wrapped = True", ".register_oot(",
                                                                    "setattr(owner"))}
    assert installers == {"seqtopk.engines.vllm.hooks"}, installers
    assert "install_worker_hooks()" in package_modules()["seqtopk.engines.vllm.worker"].read_text()


def test_one_topk_mask_and_one_rule_decision():
    """Only routing/rules.py writes the plain TopK mask or reads the prefill/decode settings to pick a rule."""
    for name, path in package_modules().items():
        if name == "seqtopk.routing.rules":
            continue
        text = path.read_text()
        assert "[..., : cfg.k] = True" not in text and "[:, : cfg.k] = True" not in text, name
        assert "cfg.decode ==" not in text and "cfg.prefill ==" not in text, name


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the checkout is left untouched)."""
    source = tmp_path_factory.mktemp("source")
    for item in ("seqtopk", "pyproject.toml", "README.md"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, source / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, source / item)
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                             "-w", str(out), str(source)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # Our packaging metadata makes setuptools warn about nothing (e.g. data folders left out of `packages`).
    assert "Warning" not in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]
    (built,) = out.glob("seqtopk-*.whl")
    return built


def test_wheel_ships_every_subpackage_and_the_lm_eval_tasks(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    # one top-level package: nothing of ours lands in site-packages under a generic name such as `patches`
    assert {name.split("/")[0] for name in names} == {"seqtopk", wheel.name.split("-py3")[0] + ".dist-info"}, names
    # the top-level patches/ holds the family table as data (patches/README.md); its code is seqtopk/patches/
    assert not list((REPO / "patches").rglob("*.py")) and (REPO / "seqtopk" / "patches" / "table.py").is_file()
    for name, path in package_modules().items():
        relative = name.replace(".", "/") + ("/__init__.py" if path.name == "__init__.py" else ".py")
        assert relative in names, f"{relative} is missing from the wheel"
    tasks = sorted(p.name for p in (REPO / "seqtopk" / "lm_eval" / "tasks").glob("*.yaml"))
    assert tasks and all(f"seqtopk/lm_eval/tasks/{t}" in names for t in tasks)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "seqtopk.engines.vllm.plugin:register" in entry_points and "seqtopk.cli:main" in entry_points


def test_installed_wheel_runs_lm_eval_on_a_local_task(wheel, tiny_checkpoint, shared_data, tmp_path):
    """`seqtopk lm-eval --tasks arc_easy_local` from the wheel alone, away from the checkout."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site), "SEQTOPK_SHARED": str(shared_data.parent)}
    where = subprocess.run([sys.executable, "-c", "import seqtopk.lm_eval as m; print(m.TASKS_DIR)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(site / "seqtopk" / "lm_eval" / "tasks"), where.stderr
    result = subprocess.run([sys.executable, "-m", "seqtopk.cli", "lm-eval", "--model",
                             str(tiny_checkpoint("qwen3_moe")), "--tasks", "arc_easy_local", "--limit", "2",
                             "--batch-size", "2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("arc_easy_local {") and '"acc,none"' in result.stdout


def test_wheel_installs_in_a_fresh_venv_and_runs_the_demo(wheel, shared_data, tmp_path):
    """pip install of the wheel into a new venv (dependencies borrowed from this one through a .pth file):
    no warnings, the `seqtopk` command runs the demo on the shipped model, and the lm-eval tasks are found."""
    import site
    import venv

    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    env_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    Path(env_site, "borrowed_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {**os.environ, "PIP_ROOT_USER_ACTION": "ignore", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "SEQTOPK_SHARED": str(shared_data.parent)}
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], env=env,
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    assert "warning" not in (install.stdout + install.stderr).lower(), install.stdout + install.stderr
    where = subprocess.run([str(python), "-c", "import seqtopk.lm_eval as m, seqtopk.demo as d; "
                            "print(m.TASKS_DIR); print(d.MODEL_DIR)"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
    tasks, model = where.stdout.split()
    assert tasks.startswith(env_site) and sorted(os.listdir(tasks)) == sorted(
        p.name for p in (REPO / "seqtopk" / "lm_eval" / "tasks").glob("*.yaml"))
    assert model.startswith(env_site) and (Path(model) / "model.safetensors").is_file()
    demo = subprocess.run([str(env_dir / "bin" / "seqtopk"), "demo", "--max-new-tokens", "16", "--png",
                           str(tmp_path / "demo.png")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "--- SeqTopK" in demo.stdout and (tmp_path / "demo.png").is_file()


def _calls(path: Path) -> set[str]:
    """Names this module calls (f(...) and obj.f(...))."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            names.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return names


def _defines(path: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def test_each_decision_has_one_place():
    """One builder of scoring objects (both engines translate into it), one fused-path dispatch, one BEIR corpus
    reader, one top-k sparse autoencoder (CSR and SSR) and one vLLM head layer for it."""
    modules = package_modules()
    owners = {
        # what is called or defined -> the only module allowed to
        "scoring objects built": ({"SoftmaxScoring", "BiasedScoring", "ChosenSoftmaxScoring"}, _calls,
                                  {"seqtopk.routing.scoring"}),
        "Triton routing kernels called": ({"paged_decode", "select_sequence_dense", "TritonSteps"}, _calls,
                                          {"seqtopk.kernels.backend", "seqtopk.kernels.paths"}),
        "BEIR corpus read": ({"read_beir_jsonl", "read_corpus", "read_jsonl_texts"}, _defines,
                             {"seqtopk.sparse.data.readers"}),
        "sparse autoencoder (dead latents, AuxK)": ({"TopKSAE", "aux_codes", "dead_mask", "record_firing"}, _defines,
                                                    {"seqtopk.sparse.coding.sae"}),
        "defaults of the settings": ({"SeqTopKConfig"}, _defines, {"seqtopk.config"}),
        "experts-per-token statistics schema": ({"RoutingStatsSnapshot"}, _defines, {"seqtopk.routing.stats"}),
    }
    for what, (names, find, allowed) in owners.items():
        found = {name for name, path in modules.items() if find(path) & names}
        assert found <= allowed, f"{what} outside {sorted(allowed)}: {sorted(found - allowed)}"
        assert found, f"{what}: the walk found no owner at all"
    # both engines report that schema
    assert "RoutingStatsSnapshot(" in modules["seqtopk.engines.vllm.stats"].read_text()
    # the paths hand the Triton steps to the torch rules: the rules themselves call no kernel
    assert "TRITON_STEPS" in modules["seqtopk.kernels.paths"].read_text()
    assert "from seqtopk.kernels" not in modules["seqtopk.routing.rules"].read_text()
    # one vLLM head layer serves CSR and SSR
    heads = {name for name, path in modules.items() if name.startswith("seqtopk.sparse.vllm")
             and "pre_bias" in path.read_text() and "nn.Module" in path.read_text()}
    assert heads == {"seqtopk.sparse.vllm.sae_layer"}, heads
    for gone in ("seqtopk/sparse/csr/head.py", "seqtopk/sparse/ssr/sae.py", "seqtopk/sparse/ssr/corpus.py",
                 "seqtopk/patches/support.py", "seqtopk/engines/vllm/cpu_alias.py", "seqtopk/sparse/sae.py"):
        assert not (REPO / gone).exists(), f"{gone} should be gone (its job lives in one other place)"
    # the runtime family table carries no verification status (tests/vllm/family_status.py does)
    import dataclasses

    from seqtopk.patches._base import Family

    assert "vllm" not in {f.name for f in dataclasses.fields(Family)}
    neg_inf = [name for name, path in modules.items() if 'NEG_INF = float("-inf")' in path.read_text()]
    assert neg_inf == ["seqtopk.routing.paged"], neg_inf


# The rooms of seqtopk/sparse, lowest first. A module may import its own room and rooms of a lower rank only:
# never a room of its own rank (siblings stay apart) nor a higher one (a shared piece never imports a room that
# uses it). A room is a subpackage of seqtopk.sparse, or a module directly in it (by its name).
SPARSE_ROOMS = [
    {"index", "data"},  # sparse rows and the exact inverted / multi-vector index; readers of the shared data
    {"backbone", "coding"},  # the dense backbone and its cache; the top-k SAE, its code, losses, folder format
    {"mteb", "synthetic"},  # MTEB tasks and model wrappers; synthetic corpora for benchmarks
    {"csr", "ssr"},  # the two kinds of head: training, evaluation, saved folders
    {"export", "vllm"},  # codes in vector engines; the heads served by vLLM
]


def upward_imports(graph: dict[str, set[str]], package: str, ranks: list[set[str]]) -> list[str]:
    """Imports inside `package` that go sideways or up the ranked rooms, and rooms the ranking leaves out."""
    rank = {room: i for i, rooms in enumerate(ranks) for room in rooms}

    def room(module: str) -> str | None:
        rest = module[len(package) + 1:] if module.startswith(package + ".") else ""
        return rest.split(".")[0] or None

    wrong = []
    for name in sorted(graph):
        here = room(name)
        if here is None:
            continue
        if here not in rank:
            wrong.append(f"{name}: room {here!r} has no rank in the list")
            continue
        for target in sorted(graph[name]):
            there = room(target)
            if there is None or there == here:
                continue
            if there not in rank or rank[there] >= rank[here]:
                wrong.append(f"{name} (rank {rank[here]}) imports {target} (rank {rank.get(there)})")
    return wrong


def test_sparse_rooms_import_only_rooms_below_them():
    toy = {"p.low.a": {"p.high.b"}, "p.high.b": {"p.low.a"}, "p.mid": {"p.low.a"}, "p.odd": set()}
    assert upward_imports(toy, "p", [{"low"}, {"mid", "high"}]) == [
        "p.low.a (rank 0) imports p.high.b (rank 1)", "p.odd: room 'odd' has no rank in the list"]
    graph = import_graph()
    sparse = {name for name in graph if name.startswith("seqtopk.sparse.")}
    assert len(sparse) > 40, "the walk must see the whole of seqtopk/sparse"
    found = {name.split(".")[2] for name in sparse}
    assert found == set().union(*SPARSE_ROOMS), f"rooms on disk {sorted(found)} differ from the ranked list"
    assert upward_imports(graph, "seqtopk.sparse", SPARSE_ROOMS) == []
