"""The package's import graph, read from the sources with `ast` (imports inside functions too):
no circle between oes_fast modules, and the kernels (kernels/, shipped as oes_fast.kernels)
never reach into the op layer (oes_fast.ops)."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"oes_fast": ROOT / "oes_fast", "oes_fast.kernels": ROOT / "kernels"}
EXTENSIONS = {"oes_fast._C"}  # compiled by setup.py: a module without Python source, importing nothing


def module_files() -> dict[str, pathlib.Path]:
    """Dotted module name -> source file, for every module of oes_fast and oes_fast.kernels."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def imports(name: str, path: pathlib.Path, modules) -> set[str]:
    """The oes_fast modules that the module `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub; `from mod import f` imports mod
            submodules = set(modules) | EXTENSIONS
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in submodules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others (the strongly
    connected components with more than one module), each sorted."""
    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reach = {name: reachable(name) for name in graph}
    groups = {tuple(sorted(n for n in reach[name] if name in reach[n])) for name in graph if name in reach[name]}
    return sorted(list(g) for g in groups)


def test_circles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": set()}
    assert circles(graph) == [["a", "b", "c"]]


def test_relative_imports_resolve():
    graph = import_graph()
    assert "oes_fast.ops" in graph["oes_fast"]  # `from . import ops`
    assert "oes_fast.rng" in graph["oes_fast.models"]  # `from .. import rng`
    assert "oes_fast.kernels.gumbel_mask" in graph["oes_fast.kernels.logit_adam_step"]  # `from .gumbel_mask import`


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "modules that import each other: " + "; ".join(" <-> ".join(group) for group in found)


def test_kernels_do_not_import_the_op_layer():
    graph = import_graph()
    offenders = sorted(name for name, targets in graph.items()
                       if name.startswith("oes_fast.kernels") and "oes_fast.ops" in targets)
    assert not offenders, f"kernels import oes_fast.ops: {offenders}"
