"""Structure checks: the library never imports the CLI, and no module uses another module's ``_private`` names."""
import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("depgraph", "recover", "viz")


def _modules():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield path


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_private_attrs(tree) -> set:
    """Private attribute names a module defines: ``self._x = ...`` and private methods/attributes of its classes."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _private(node.attr) \
                and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            out.add(node.attr)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(item.name):
                    out.add(item.name)
                elif isinstance(item, ast.Assign):
                    out.update(t.id for t in item.targets if isinstance(t, ast.Name) and _private(t.id))
    return out


def private_uses(path: Path, foreign_attrs=frozenset()) -> list:
    """Uses of another module's private names in one file: [(line, text)].

    ``from m import _x``, ``import m._x``, ``mod._x`` (``mod`` bound by an import), and ``obj._x`` or
    ``getattr(obj, "_x")`` on anything but ``self``/``cls`` when ``_x`` is in ``foreign_attrs`` (private
    attributes that another module of ours defines and this one does not).
    """
    tree = ast.parse(path.read_text(), str(path))
    foreign = set(foreign_attrs) - _defined_private_attrs(tree)
    imported, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                imported.add((a.asname or a.name).split(".")[0])
                if any(_private(part) for part in a.name.split(".")):
                    found.append((node.lineno, f"import {a.name}"))
        elif isinstance(node, ast.ImportFrom):
            mod = "." * node.level + (node.module or "")
            if any(_private(part) for part in (node.module or "").split(".")):
                found.append((node.lineno, f"from {mod} import ..."))
            for a in node.names:
                imported.add(a.asname or a.name)
                if _private(a.name):
                    found.append((node.lineno, f"from {mod} import {a.name}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if owner in imported or (owner not in ("self", "cls") and node.attr in foreign):
                found.append((node.lineno, f"{ast.unparse(node)}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in foreign:
            found.append((node.lineno, ast.unparse(node)))
    return found


def _foreign_attrs() -> set:
    out = set()
    for p in _modules():
        out |= _defined_private_attrs(ast.parse(p.read_text()))
    return out


def test_no_private_names_across_modules():
    foreign = _foreign_attrs()
    bad = [f"{p.relative_to(ROOT)}:{line}: {text}" for p in _modules() for line, text in private_uses(p, foreign)]
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_the_checker_finds_private_uses(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from .calibration import _x, ok\nimport depgraph.plan as plan\nplan._y\nself._z\n"
                 "graph._flow.store\ngetattr(graph, '_flow', None)\nmod._parameters\n")
    assert sorted(t for _, t in private_uses(f, {"_flow", "_z"})) == sorted([
        "from .calibration import _x", "plan._y", "graph._flow", "getattr(graph, '_flow', None)"])


def test_library_imports_without_the_cli():
    """Every library module imports with ``depgraph.cli`` blocked; ``import depgraph`` loads no CLI module."""
    names = [m.name for pkg in PACKAGES for m in pkgutil.walk_packages([str(ROOT / pkg)], prefix=f"{pkg}.")
             if not (m.name == "depgraph.cli" or m.name.startswith("depgraph.cli."))] + list(PACKAGES)
    code = ("import importlib, sys\n"
            "sys.modules['depgraph.cli'] = None\n"
            f"for n in {names!r}:\n"
            "    importlib.import_module(n)\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", "import sys, depgraph; print(sorted(m for m in sys.modules "
                        "if m.startswith('depgraph.cli')))"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]
