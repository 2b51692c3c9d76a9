"""The layer rule of docs/architecture.md, checked on the source with `ast`.

Every module of src/tunelab has a layer (LAYERS below, by module-name prefix, so a new module gets the layer of
its folder). A module imports only from its own layer or lower ones. The check fails on:

- an upward import (counting imports inside functions);
- an import cycle. A cycle that crosses layers must contain an upward edge (going round it the layer comes
  back to where it started), so it is reported as that edge; a cycle inside one layer is reported as a cycle;
- an import of another module's `_private` name (`from .x import _y`, or `x._y` on an imported tunelab module);
- a tunelab import inside a function, except in cli.py (it imports the library lazily so `tunelab --help`
  starts without torch) and the package's __init__.py (its `train`/`resume` import config and pipeline lazily
  for the same reason: `import tunelab` must not import torch, and `tunelab.cli` imports the package first).

KNOWN holds the violations that other parts of the refactor remove; the test fails on a violation not in KNOWN
and on a KNOWN entry that no longer occurs, so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "tunelab"

# Module-name prefix -> layer. The longest matching prefix wins; "tunelab" alone is the package's __init__.py
# (the public API: it re-exports from everything, so it sits on top with the CLI).
LAYERS = {
    # L0: no tunelab imports
    "tunelab.errors": 0,
    "tunelab.versions": 0,
    "tunelab.atomic": 0,
    # L1: schema, YAML load, overrides, explain
    "tunelab.config": 1,
    # L2: read, clean, split, stream, templates, batching helpers
    "tunelab.data": 2,
    # L3: pure tensor functions; load an HF model dir and name its parts
    "tunelab.ops": 3,
    "tunelab.models": 3,
    "tunelab.hub": 3,
    "tunelab.gguf_export": 3,  # a merged model + tokenizer -> one GGUF file (with gguf_pretokenizers, its table)
    "tunelab.gguf_pretokenizers": 3,
    "tunelab.ollama": 3,  # a Modelfile from a chat template
    # L4: one file per fine-tuning method plus shared targets / layout
    "tunelab.methods": 4,
    # L5: one file per task
    "tunelab.tasks": 5,
    # L6: task-agnostic inference over a split; baselines; forgetting
    "tunelab.evaluate": 6,
    # L7: the loop and its parts
    "tunelab.training": 7,
    # L8: run directories (make, finish, load a run), export, reports
    "tunelab.runs": 8,
    "tunelab.predict": 8,
    "tunelab.export": 8,
    "tunelab.report": 8,
    # L9: the spines and the applications built on them
    "tunelab.pipeline": 9,
    "tunelab.multitask": 9,
    "tunelab.rl": 9,
    "tunelab.compare": 9,
    "tunelab.cv": 9,
    "tunelab.sweep": 9,
    "tunelab.advise": 9,
    "tunelab.importer": 9,
    "tunelab.inspect": 9,
    "tunelab.serve": 9,  # tunelab serve: runs behind an OpenAI-compatible HTTP API (FastAPI only in here)
    "tunelab.ui": 9,  # tunelab ui: the local web app over a workspace of run folders (FastAPI, its own page)
    # L10: argument parsing and printing; the public API
    "tunelab.cli": 10,
    "tunelab.__main__": 10,
    "tunelab": 10,
}

# Where a tunelab import inside a function is allowed (see the module docstring for why).
LAZY_OK = {"tunelab.cli", "tunelab"}

# Violations other parts of the refactor (issue 24) remove, each with who/what removes it.
KNOWN = {
}


def layer_of(module: str) -> int:
    matches = [p for p in LAYERS if module == p or (p != "tunelab" and module.startswith(p + "."))]
    if not matches:
        raise AssertionError(f"{module} has no layer: add its prefix to LAYERS in tests/test_layers.py")
    return LAYERS[max(matches, key=len)]


def read_package(root: Path = SRC) -> dict[str, tuple[str, bool]]:
    """Module name -> (source, is_package) for every .py file under root."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = ("tunelab",) + path.relative_to(root).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_pkg else parts)
        modules[name] = (path.read_text(encoding="utf-8"), is_pkg)
    return modules


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _imports(module: str, is_pkg: bool, tree: ast.Module, names: set[str]):
    """Yield (target_module, imported_name_or_None, node, inside_function) for every tunelab import."""
    package = module if is_pkg else module.rpartition(".")[0]

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == "tunelab" or alias.name.startswith("tunelab."):
                        yield alias.name, None, child, in_function
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    base = ".".join(base + ([child.module] if child.module else []))
                else:
                    base = child.module or ""
                if not (base == "tunelab" or base.startswith("tunelab.")):
                    continue
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    if sub in names:
                        yield sub, None, child, in_function
                    else:
                        yield base, alias.name, child, in_function
            yield from visit(child, inner)

    yield from visit(tree, False)


def scan(modules: dict[str, tuple[str, bool]]) -> dict[str, object]:
    """The import graph of `modules` and the rule's violations, each as one readable line."""
    names = set(modules)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    upward, local, private = set(), set(), set()
    for module, (source, is_pkg) in modules.items():
        tree = ast.parse(source, filename=module)
        bound = {}  # local name -> tunelab module it is bound to
        for target, name, node, in_function in _imports(module, is_pkg, tree, names):
            if target not in names:
                continue  # a name of tunelab's that is not a module we know (e.g. a typo): Python reports it
            if target != module:
                edges[module].add(target)
            if layer_of(target) > layer_of(module):
                upward.add(f"upward: {module} -> {target} (L{layer_of(module)} -> L{layer_of(target)})")
            if in_function and module not in LAZY_OK:
                local.add(f"function-local: {module} imports {target} inside a function (line {node.lineno})")
            if name is not None and _private(name) and target != module:
                private.add(f"private: {module} imports {target}.{name}")
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
            else:
                for alias in node.names:
                    if name is None and target.endswith("." + alias.name):
                        bound[alias.asname or alias.name] = target
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)):
                continue
            chain, base = [], node
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if not isinstance(base, ast.Name) or base.id not in bound:
                continue
            target = bound[base.id]
            for attr in reversed(chain):
                if f"{target}.{attr}" in names:
                    target = f"{target}.{attr}"
                    continue
                if _private(attr) and target != module:
                    private.add(f"private: {module} uses {target}.{attr}")
                break
    # function-local lines carry line numbers only for the reader: the key is the import itself
    local = {line.rpartition(" (line ")[0] for line in local}
    # the same-layer cycles, found on the edges that do not run upward (see the module docstring)
    flat = {m: {t for t in ts if layer_of(t) <= layer_of(m)} for m, ts in edges.items()}
    cycles = {"cycle: " + " <-> ".join(sorted(c)) for c in _components(flat) if len(c) > 1}
    return {"edges": edges, "upward": upward, "function-local": local, "private": private, "cycles": cycles,
            "all_cycles": [c for c in _components(edges) if len(c) > 1]}


def _components(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components (Tarjan), iteratively."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    out.append(component)
    return out


def violations(result) -> set[str]:
    return result["upward"] | result["cycles"] | result["function-local"] | result["private"]


def summary(result) -> str:
    big = sorted((len(c) for c in result["all_cycles"]), reverse=True)
    return (f"cycles (any, incl. function-local imports): {len(big)} of sizes {big}; same-layer cycles: "
            f"{len(result['cycles'])}; upward edges: {len(result['upward'])}; function-local imports: "
            f"{len(result['function-local'])}; private imports: {len(result['private'])}")


def test_layers():
    result = scan(read_package())
    print(summary(result))
    found = violations(result)
    new = sorted(found - set(KNOWN))
    gone = sorted(set(KNOWN) - found)
    message = []
    if new:
        message.append("Imports that break the layer rule (docs/architecture.md):\n  " + "\n  ".join(new))
    if gone:
        message.append("KNOWN entries that no longer occur: delete them from tests/test_layers.py:\n  "
                       + "\n  ".join(gone))
    assert not message, "\n".join(message)


def test_every_module_has_a_layer():
    for module in read_package():
        layer_of(module)


def _planted(path: str, line: str) -> dict[str, tuple[str, bool]]:
    modules = read_package()
    source, is_pkg = modules[path]
    modules[path] = (line + "\n" + source, is_pkg)
    return modules


def test_fails_on_a_planted_upward_import():
    modules = _planted("tunelab.methods.full", "from ..training import loop")
    found = violations(scan(modules)) - set(KNOWN)
    assert "upward: tunelab.methods.full -> tunelab.training.loop (L4 -> L7)" in found


def test_fails_on_planted_cycle_private_and_function_local_imports():
    modules = {
        "tunelab": ("", True),
        "tunelab.errors": ("", False),
        "tunelab.data": ("from . import sources\n", True),
        "tunelab.data.sources": ("from . import read\n", False),
        "tunelab.data.clean": ("from .sources import _helper\nfrom . import sources\nx = sources._other\n", False),
        "tunelab.models": ("def f():\n    from .errors import E\n", False),
        "tunelab.cli": ("def main():\n    from . import models\n", False),
    }
    found = violations(scan(modules))
    assert found == {
        "cycle: tunelab.data <-> tunelab.data.sources",
        "private: tunelab.data.clean imports tunelab.data.sources._helper",
        "private: tunelab.data.clean uses tunelab.data.sources._other",
        "function-local: tunelab.models imports tunelab.errors inside a function",
    }


def test_the_cli_starts_without_torch():
    """`tunelab --help` prints without importing torch (seconds): tunelab/__init__ and cli.py import lazily."""
    import subprocess
    import sys

    code = "import sys, tunelab.cli; assert 'torch' not in sys.modules, 'import tunelab.cli imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
