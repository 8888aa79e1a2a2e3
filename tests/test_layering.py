"""The package's layering, read from the source: no import cycles, the command
line a client of the library, the public names in one module.

Every import counts, including those inside functions: an import moved into a
function to dodge a cycle is still an arrow the wrong way.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import fxzip
import fxzip.api

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "passes":  # installed as fxzip.passes
        parts = ["fxzip", "passes", *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _import_graph() -> nx.DiGraph:
    files = {_module_name(p): p for folder in ("fxzip", "passes") for p in (ROOT / folder).rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] if node.level else [])
                base = ".".join(filter(None, [base, node.module])) if node.level else node.module or ""
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                while target not in files and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in files and target != name and not (name.startswith(target + ".")
                                                                and files[target].name == "__init__.py"):
                    graph.add_edge(name, target)
    return graph


def test_the_package_has_no_import_cycles():
    graph = _import_graph()
    assert {("fxzip.merge", "fxzip.stages"), ("fxzip.cli.commands", "fxzip.options"),
            ("fxzip.passes.fold", "fxzip.analysis")} <= set(graph.edges), "the import graph was not read right"
    cycles = list(nx.simple_cycles(graph))
    assert cycles == [], [" -> ".join(c + c[:1]) for c in cycles[:5]]


def test_the_library_never_imports_the_command_line():
    wrong = [(a, b) for a, b in _import_graph().edges
             if b.startswith("fxzip.cli") and not a.startswith("fxzip.cli") and a != "fxzip.__main__"]
    assert wrong == []


def test_every_public_name_is_defined_or_re_exported_in_fxzip_api():
    assert sorted(fxzip.__all__) == sorted(fxzip.api.__all__)
    for name in fxzip.api.__all__:
        assert getattr(fxzip, name) is getattr(fxzip.api, name), name
    for name in ("merge", "calibrate", "cut_points", "permute_channels", "reset_norm_stats", "save", "load",
                 "register_rule", "register_matcher"):
        assert name in fxzip.api.__all__, name


def test_transformers_is_imported_only_where_a_hugging_face_model_or_folder_is_met():
    """``transformers`` is an optional extra (``.[hf]``): no module imports it at
    load time (a module-level import would make it a dependency of the core)."""
    offenders = []
    for folder in ("fxzip", "passes"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.parse(path.read_text()).body:  # module level only
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if any(n.split(".")[0] in ("transformers", "tokenizers") for n in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
