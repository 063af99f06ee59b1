"""The house rules of the package layout, read from the source with `ast` (no imports run):

- no import circles among the modules of engine, weights, kernels (imported as tinyllama_kernels) and bench (an import
  inside a function counts);
- arrows point down: engine.runtime and engine.text import nothing above them, engine.generation never imports the
  model, the CLI or the server, engine.model never imports engine.inspect (which sits on top of it), and nothing but
  the CLI imports engine.cli;
- HTTP (FastAPI, starlette, uvicorn, prometheus_client, ...) is imported only by the server (engine.serve) and its
  command (engine.cli.serve): the engine below stays free of it;
- every sub-package of engine says in its docstring what lives there.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("engine", "weights", "kernels", "bench")  # the folders
IMPORT_NAMES = {"kernels": "tinyllama_kernels"}  # folder -> import name where they differ (see kernels/README.md)
# What each room may import from this project (prefixes); anything else of the project is an upward arrow.
ALLOWED = {
    "engine.runtime": ("engine.runtime", "engine.config", "engine.errors", "weights"),
    "engine.text": ("engine.text", "engine.errors"),
    "engine.generation": ("engine.generation", "engine.runtime", "engine.text", "engine.config", "engine.errors",
                          "weights"),
    "engine.model": ("engine.model", "engine.generation", "engine.runtime", "engine.text", "engine.config",
                     "engine.errors", "weights", "tinyllama_kernels"),
    "engine.inspect": ("engine.inspect", "engine.model", "engine.generation", "engine.runtime", "engine.text",
                       "engine.config", "engine.errors", "weights"),
    "weights": ("weights",),
    "tinyllama_kernels": ("tinyllama_kernels", "engine.runtime", "engine.config", "engine.errors", "weights"),
    "engine.serve": ("engine.serve", "engine.inspect", "engine.generation", "engine.runtime", "engine.text",
                     "engine.config", "engine.errors", "engine.model", "weights"),
    "engine.config": ("engine.config", "weights"),
    "engine.errors": ("engine.errors",),
}
NOT_FOR_ANYONE_BUT_CLI = "engine.cli"
HTTP_PACKAGES = ("fastapi", "starlette", "uvicorn", "prometheus_client", "httpx", "h11", "anyio", "openai")
HTTP_ROOMS = ("engine.serve", "engine.cli.serve", "bench.serve", "bench.serve_conversations", "bench.soak")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    parts[0] = IMPORT_NAMES.get(parts[0], parts[0])
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every module of the project packages: dotted name -> file."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file (top level or inside functions)."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()

    def add(dotted: str) -> None:
        while dotted and dotted not in modules:  # `import a.b.c` of a non-module attribute: its module
            dotted = dotted.rpartition(".")[0]
        if dotted and dotted != name:
            targets.add(dotted)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                add(sub if sub in modules else source)
    return targets


def third_party_imports(path: Path) -> set[str]:
    """The top-level names of every module a file imports (anywhere in it), project or not."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted: the import circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def room_of(module: str) -> str | None:
    return next((room for room in sorted(ALLOWED, key=len, reverse=True)
                 if module == room or module.startswith(room + ".")), None)


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        room = room_of(module)
        for t in sorted(targets):
            if room is not None and not any(t == a or t.startswith(a + ".") for a in ALLOWED[room]):
                bad.append(f"{module} -> {t} (room {room} may import only {', '.join(ALLOWED[room])})")
            if (t == NOT_FOR_ANYONE_BUT_CLI or t.startswith(NOT_FOR_ANYONE_BUT_CLI + ".")) and not (
                    module == NOT_FOR_ANYONE_BUT_CLI or module.startswith(NOT_FOR_ANYONE_BUT_CLI + ".")
                    or module == "engine.__main__"):
                bad.append(f"{module} -> {t} (only the command line imports engine.cli)")
    return bad


def test_the_graph_sees_imports_inside_functions_and_relative_ones():
    graph = import_graph()
    assert "engine.runtime.native" in graph["engine.runtime.layers"]
    assert "tinyllama_kernels._common" in graph["tinyllama_kernels.matmul"]  # `from ._common import ...`
    assert "engine.cli.check" in graph["engine.cli.main"]  # a lazy import inside main()


def test_the_cycle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_arrows_point_down():
    bad = upward_arrows(import_graph())
    assert not bad, "\n".join(bad)


def test_the_rule_checker_flags_an_upward_arrow():
    graph = {"engine.runtime.layers": {"engine.generation.sampling"}, "tinyllama_kernels.matmul": {"engine.cli.common"},
             "engine.text.tokenizer": {"engine.runtime.layers"}, "engine.model": {"engine.inspect.lens"},
             "engine.inspect.plots": {"engine.cli.inspect"}}
    flagged = {line.split(" -> ")[0] for line in upward_arrows(graph)}
    assert flagged == set(graph)


def http_imports_outside_the_server(modules: dict[str, Path]) -> list[str]:
    bad = []
    for name, path in sorted(modules.items()):
        if any(name == room or name.startswith(room + ".") for room in HTTP_ROOMS):
            continue
        used = third_party_imports(path) & set(HTTP_PACKAGES)
        bad += [f"{name} imports {pkg} (HTTP belongs to {', '.join(HTTP_ROOMS)})" for pkg in sorted(used)]
    return bad


def test_only_the_server_imports_http():
    bad = http_imports_outside_the_server(project_modules())
    assert not bad, "\n".join(bad)


def test_the_http_checker_flags_a_planted_import(tmp_path):
    planted = tmp_path / "scheduler.py"
    planted.write_text("def f():\n    from fastapi import FastAPI\n")
    assert http_imports_outside_the_server({"engine.generation.scheduler": planted}) == [
        "engine.generation.scheduler imports fastapi (HTTP belongs to engine.serve, engine.cli.serve, bench.serve, "
        "bench.serve_conversations, bench.soak)"]
    assert http_imports_outside_the_server({"engine.serve.app": planted}) == []


@pytest.mark.parametrize("package", ["engine", "engine.runtime", "engine.text", "engine.generation", "engine.cli",
                                     "engine.inspect", "engine.serve", "weights", "bench"])
def test_every_package_says_what_lives_there(package):
    path = REPO / package.replace(".", "/") / "__init__.py"
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert doc and len(doc) > 40, f"{path} needs a docstring saying what lives there and what it must not import"


def test_the_kernels_folder_says_what_lives_there_and_its_import_name():
    """kernels/ has no __init__.py (see below); its README is the package's docstring."""
    text = (REPO / "kernels" / "README.md").read_text(encoding="utf-8")
    assert "import name is `tinyllama_kernels`" in text and "Must not import" in text


def test_the_kernels_folder_does_not_shadow_hugging_faces_kernels():
    """transformers 5 imports Hugging Face's `kernels` library; a regular package named `kernels` in the repository
    root (on sys.path first under `python -m`) would shadow it and break `import transformers` (it did)."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    code = ("import sys, importlib.util; spec = importlib.util.find_spec('kernels'); "
            "print(spec is None or not spec.origin or not spec.origin.startswith(sys.argv[1]))")
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", code, str(REPO)], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True", "`import kernels` from the repository root finds our folder"


def test_tinyllama_kernels_is_this_checkout():
    """The tests import the Triton kernels under test, not a stale install elsewhere."""
    spec = __import__("importlib.util").util.find_spec("tinyllama_kernels")
    assert spec is not None, "tinyllama_kernels is not importable: run `pip install -e .`"
    assert str(REPO / "kernels") in list(spec.submodule_search_locations)


def test_every_package_is_installed_by_pyproject():
    """`pip install .` ships every package: pyproject's package list holds every folder with an __init__.py (under its
    import name) and the kernels folder as tinyllama_kernels; the kernels' C sources go with them."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = set(config["packages"])
    found = {module_name(init) for package in PACKAGES for init in (REPO / package).rglob("__init__.py")}
    found.add("tinyllama_kernels")
    assert found == shipped, f"pyproject's packages differ from the folders: {sorted(found ^ shipped)}"
    assert config["package-dir"] == {"tinyllama_kernels": "kernels"}
    data = config["package-data"]["engine.runtime.native"]
    assert "*.c" in data and "*.h" in data  # the kernels are compiled from these on the user's machine
