"""The layout's rules (docs/ARCHITECTURE.md): a light public API, no import circle, no private name
imported across modules. Read from the source (AST), so a function-local import counts too."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("diffusers", "transformers", "open_clip", "timm", "accelerate", "huggingface_hub")


def _modules():
    """{dotted name: path} of every module of g4seg_core and nodes."""
    out = {}
    for base in ("g4seg_core", "nodes"):
        for folder, _, files in os.walk(os.path.join(ROOT, base)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _imports(name, path, modules):
    """[(imported module, imported names)] of one module, relative imports resolved."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, []) if sub in modules else (target, [alias.name]))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
    return [(target, names) for target, names in found if target in modules and target != name]


def test_no_import_circle():
    modules = _modules()
    graph = {name: {t for t, _ in _imports(name, path, modules)} for name, path in modules.items()}

    def reaches(start, goal):
        seen, todo = {start}, [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    # a package's __init__ importing its own submodules (and they it) is how packages work, not a circle
    def own(a, b):
        return a.startswith(b + ".") or b.startswith(a + ".")

    circles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a]
                     if a < b and not own(a, b) and reaches(b, a))
    assert not circles, f"import circles: {circles}"


def test_no_private_name_imported_across_modules():
    modules = _modules()
    private = sorted(f"{name} imports {target}.{n}" for name, path in modules.items()
                     for target, names in _imports(name, path, modules)
                     for n in names if n.startswith("_") and not n.startswith("__"))
    assert not private, f"private names used outside their module (make them public or move them): {private}"


def test_public_api():
    import g4seg_core

    for name in g4seg_core.__all__:
        value = getattr(g4seg_core, name)
        assert getattr(value, "__name__", name) == name, name
    assert "G4SegPipeline" in dir(g4seg_core)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        g4seg_core.nothing


def test_public_api_import_is_light():
    """ComfyUI's pack imports g4seg_core: the package and its config, error and multi-class names load no
    diffusers, transformers or open_clip."""
    code = ("import sys, g4seg_core; from g4seg_core import G4SegConfig, G4SegError, refine_classes, RefineResult; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
