"""The package's shape: every module imports in a fresh interpreter, no import cycles (counting the imports inside
functions too), and no top-level `kernels` module is installed, imported or shadowed."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"llmdrop_rt": ROOT / "llmdrop_rt", "llmdrop_rt.kernels": ROOT / "kernels"}


def package_modules() -> dict[str, Path]:
    """Module name -> source file, for every module of the package (kernels/ installs as llmdrop_rt.kernels).
    A .py file outside a package folder (no __init__.py: io/decilm_files/, the code a decilm export carries for
    transformers) is data, never imported by the package."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            if not (path.parent / "__init__.py").is_file():
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that `name`'s source imports anywhere (module level or inside functions)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one, else a name from pkg.
            candidates = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module
                          for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c in known and c != name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


def test_the_package_has_no_import_cycle():
    modules = package_modules()
    known = set(modules)
    graph = {name: imported_modules(name, path, known) for name, path in modules.items()}
    assert graph["llmdrop_rt.cli"] >= {"llmdrop_rt.cli.drop", "llmdrop_rt.cli.generate"}  # the parser sees imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(n for n in package_modules() if not n.endswith("__main__"))
    script = """
import importlib, sys
for name in sys.argv[2:]:
    importlib.import_module(name)
def from_our_folder(module):
    places = [getattr(module, "__file__", None) or "", *getattr(module, "__path__", [])]
    return any(place.startswith(sys.argv[1]) for place in places)
stray = [name for name, module in list(sys.modules.items())
         if name.split(".")[0] == "kernels" and from_our_folder(module)]
assert not stray, f"kernels/ was imported as a top-level package: {stray}"
"""
    proc = subprocess.run([sys.executable, "-c", script, str(ROOT / "kernels"), *names], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_from_the_checkout_an_installed_kernels_package_is_still_found(tmp_path):
    """With the checkout's root first on sys.path (as `python -m` run there puts it), `import kernels` gives an
    installed package of that name (PyPI's, which transformers imports), not our kernels/ folder."""
    installed = tmp_path / "kernels"
    installed.mkdir()
    (installed / "__init__.py").write_text("WHO = 'installed'\n")
    script = "import sys; sys.path.insert(1, sys.argv[1]); import kernels; print(kernels.WHO, kernels.__file__)"
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["installed", str(installed / "__init__.py")]


def test_from_the_checkout_with_no_kernels_package_installed_the_name_stays_empty():
    """No installed `kernels` anywhere: the name gives an empty package (transformers reads "not available"),
    never our kernels under the wrong name."""
    script = ("import sys; sys.path[:] = [''] + [p for p in sys.path[1:] if 'packages' not in p]; import kernels; "
              "print(sorted(n for n in vars(kernels) if not n.startswith('_') and n != 'sys'))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def test_no_source_imports_a_top_level_kernels_module():
    offenders = []
    for path in [*ROOT.joinpath("llmdrop_rt").rglob("*.py"), *ROOT.joinpath("tests").rglob("*.py"),
                 *ROOT.joinpath("bench").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "kernels" or
                          (n or "").startswith("kernels.")]
    assert not offenders, offenders
