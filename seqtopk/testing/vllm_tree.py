"""The static check of a vLLM source tree against every name the SeqTopK plugin uses: development tooling.

`check_tree(root)` finds each name of seqtopk.engines.vllm.symbols.SYMBOLS in the vLLM sources under `root`
by parsing them (`ast`, nothing imported, so a CUDA wheel can be checked on a CPU machine), with the same
comparisons as the start-up check on the installed vLLM (seqtopk.engines.vllm.compat.check_live).
`tree_version(root)` reads the version such a tree declares; `imported_names(paths)` lists the plugin's vLLM
imports, which SYMBOLS must cover. Used by evals/vllm_compat.py (each vLLM release) and tests/vllm/test_compat.py;
nothing at runtime imports this module.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from seqtopk.engines.vllm.compat import (function_problems, has_string, params_problems, self_assigned_in,
                                         source_problems)
from seqtopk.engines.vllm.symbols import SYMBOLS


def check_tree(root: str | Path) -> list[str]:
    """SYMBOLS against the vLLM sources under `root` (the folder holding the `vllm` package: an unzipped wheel,
    or site-packages), parsed with `ast`: nothing is imported, so a CUDA build can be checked anywhere."""
    tree = _Tree(Path(root))
    problems = []
    for sym in SYMBOLS:
        where = f"{sym.module}.{sym.name}"
        module = tree.module(sym.module)
        if module is None:
            problems.append(f"{sym.module}: no such module")
            continue
        node, home = tree.resolve(sym.module, sym.name)
        if node is None:
            problems.append(f"{where}: missing")
            continue
        if sym.params:
            fn = node
            if isinstance(node, ast.ClassDef):
                fn, _ = tree.member(home, node, "__init__")
            names = _def_params(fn) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
            if names is not None:
                problems += params_problems(where, names, sym)
        if sym.attrs and not isinstance(node, ast.ClassDef):
            problems.append(f"{where}: not a class (its attributes {', '.join(sym.attrs)} cannot be checked)")
        elif sym.attrs:
            for attr in sym.attrs:
                if tree.member(home, node, attr)[0] is None and attr not in tree.self_assigned(home, node):
                    problems.append(f"{where}: no attribute {attr!r}")
        if sym.bases and isinstance(node, ast.ClassDef):
            found = tree.ancestors(home, node)
            problems += [f"{where}: does not derive from {b}" for b in sym.bases if b not in found]
        if sym.abstract is not None and isinstance(node, ast.ClassDef):
            found = tree.abstract(home, node)
            if found != set(sym.abstract):
                problems.append(f"{where}: abstract methods {sorted(found)}, expected {sorted(sym.abstract)}")
        if sym.returns or sym.registers:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                problems += function_problems(where, node, sym, lambda name: isinstance(
                    tree.resolve(sym.module, name)[0], ast.FunctionDef))
            else:
                problems.append(f"{where}: not a function (what it returns cannot be checked)")
        problems += source_problems(where, sym, module)
    return problems


def tree_version(root: str | Path) -> str | None:
    """The version a vLLM source tree declares (its dist-info, else vllm/_version.py)."""
    root = Path(root)
    for info in sorted(root.glob("vllm*.dist-info")):
        meta = info / "METADATA"
        if meta.is_file():
            for line in meta.read_text().splitlines():
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
    version = root / "vllm" / "_version.py"
    if version.is_file():
        found = re.search(r"__version__\s*=\s*version\s*=\s*['\"]([^'\"]+)", version.read_text()) or \
            re.search(r"version\s*=\s*['\"]([^'\"]+)", version.read_text())
        return found.group(1) if found else None
    return None


class _Tree:
    """Modules of a source tree, parsed on demand, and name resolution through their imports."""

    def __init__(self, root: Path):
        self.root = root
        self._parsed: dict[str, ast.Module | None] = {}

    def module(self, name: str) -> ast.Module | None:
        if name not in self._parsed:
            base = self.root.joinpath(*name.split("."))
            path = next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)
            self._parsed[name] = ast.parse(path.read_text(), str(path)) if path else None
        return self._parsed[name]

    def resolve(self, module: str, dotted: str, depth: int = 0):
        """(node, module it lives in) for `dotted` in `module`, following imports; (None, None) if not found."""
        head, _, rest = dotted.partition(".")
        node, home = self._top(module, head, depth)
        if node is None or not rest:
            return node, home
        for part in rest.split("."):
            if not isinstance(node, ast.ClassDef):
                return None, None
            member, home = self.member(home, node, part)
            if member is None:
                return None, None
            node = member
        return node, home

    def _top(self, module: str, name: str, depth: int):
        tree = self.module(module)
        if tree is None or depth > 12:
            return None, None
        lazy, star = False, []
        for stmt in _toplevel(tree):
            if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == name:
                return stmt, module
            if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets):
                return stmt, module
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name:
                return stmt, module
            if isinstance(stmt, ast.ImportFrom):
                source = _absolute(module, stmt, self.module(module + ".__init__") is not None or
                                   (self.root.joinpath(*module.split(".")) / "__init__.py").is_file())
                if stmt.names[0].name == "*" and source and source.startswith("vllm"):
                    star.append(source)
                for alias in stmt.names:
                    if (alias.asname or alias.name) == name and source and source.startswith("vllm"):
                        found = self._top(source, alias.name, depth + 1)
                        if found[0] is None and self.module(f"{source}.{alias.name}") is not None:
                            return self.module(f"{source}.{alias.name}"), f"{source}.{alias.name}"
                        return found
            if isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    if alias.asname == name:
                        return self.module(alias.name), alias.name
            if isinstance(stmt, ast.FunctionDef) and stmt.name == "__getattr__":
                lazy = True
        for source in star:  # `from .common import *`: what that module defines
            found = self._top(source, name, depth + 1)
            if found[0] is not None:
                return found
        if lazy and has_string(tree, name):  # a lazily imported name (`__getattr__` with a name table)
            return ast.Constant(value=name), module
        submodule = self.module(f"{module}.{name}")
        return (submodule, f"{module}.{name}") if submodule is not None else (None, None)

    def _bases(self, home: str, cls: ast.ClassDef):
        for base in cls.bases:
            dotted = ast.unparse(base)
            if isinstance(base, ast.Subscript):
                dotted = ast.unparse(base.value)
            node, where = self.resolve(home, dotted)
            if isinstance(node, ast.ClassDef):
                yield node, where

    def member(self, home: str, cls: ast.ClassDef, name: str, depth: int = 0):
        """A name defined in a class body (method, property, field, enum member), here or in a vLLM base."""
        for stmt in cls.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and stmt.name == name:
                return stmt, home
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name:
                return stmt, home
            if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets):
                return stmt, home
        if depth < 12:
            for base, where in self._bases(home, cls):
                found = self.member(where, base, name, depth + 1)
                if found[0] is not None:
                    return found
        return None, None

    def self_assigned(self, home: str, cls: ast.ClassDef, depth: int = 0) -> set[str]:
        names = self_assigned_in(cls)
        if depth < 12:
            for base, where in self._bases(home, cls):
                names |= self.self_assigned(where, base, depth + 1)
        return names

    def ancestors(self, home: str, cls: ast.ClassDef, depth: int = 0) -> set[str]:
        names = set()
        if depth < 12:
            for base, where in self._bases(home, cls):
                names |= {base.name} | self.ancestors(where, base, depth + 1)
        return names

    def abstract(self, home: str, cls: ast.ClassDef) -> set[str]:
        """Abstract methods left to a subclass: declared abstract in the class or a vLLM base, not defined later."""
        chain = []
        stack = [(cls, home)]
        while stack:  # base classes first-found order is enough: vLLM routers use single inheritance
            node, where = stack.pop()
            chain.append(node)
            stack.extend(self._bases(where, node))
        abstract: set[str] = set()
        for node in reversed(chain):  # from the farthest base to the class itself
            for stmt in node.body:
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if any(ast.unparse(d).endswith("abstractmethod") for d in stmt.decorator_list):
                        abstract.add(stmt.name)
                    else:
                        abstract.discard(stmt.name)
        return abstract


def _toplevel(tree: ast.Module):
    """Top-level statements, including those inside if/try blocks (TYPE_CHECKING, optional imports)."""
    for stmt in tree.body:
        yield stmt
        if isinstance(stmt, (ast.If, ast.Try)):
            for block in (stmt.body, getattr(stmt, "orelse", []), getattr(stmt, "finalbody", []),
                          *[h.body for h in getattr(stmt, "handlers", [])]):
                yield from (s for s in block if not isinstance(s, (ast.If, ast.Try)))


def _absolute(module: str, stmt: ast.ImportFrom, is_package: bool) -> str | None:
    if not stmt.level:
        return stmt.module
    parts = module.split(".")
    if not is_package:
        parts = parts[:-1]
    parts = parts[: len(parts) - (stmt.level - 1)] if stmt.level > 1 else parts
    return ".".join(parts + ([stmt.module] if stmt.module else []))


def _def_params(fn) -> list[str]:
    args = fn.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    return [n for n in names if n not in ("self", "cls")]


def imported_names(paths) -> set[tuple[str, str]]:
    """(module, name) of every `from vllm... import name` in these Python files (what SYMBOLS must cover)."""
    out = set()
    for path in paths:
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm" \
                    and not node.level:
                out |= {(node.module, alias.name) for alias in node.names}
    return out
