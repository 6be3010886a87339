"""The shape of src/ (issue 17), read from the source with ``ast``; nothing is imported.

- Imports: the graph of every import statement (module level and inside functions, absolute and
  relative, ``importlib.import_module("...")`` with a constant name) between the modules of
  src/. No cycle between files, no cycle between packages, and no import from a lower layer into
  a higher one (the layer table below). A module must have a place in the table.
- Sizes: no module over MAX_MODULE_LINES lines, no function over MAX_FUNCTION_LINES lines.
- Private names of other libraries (``JobReturn._return_value``, ``hydra._internal``) only in
  nondet_hpc/compose.py, the one module written to fall back when a release renames them. The
  guard reads attribute uses, keyword arguments and ``getattr(x, "_name")`` as well as imports:
  a ``._name`` whose name is defined nowhere in src/ belongs to another library.

The checks run on a folder given as an argument, so the tests at the end run them on small
trees written here, where the answer is known.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
OURS = ("nondet_hpc", "hydra_plugins")  # our top-level packages: any other import is another library

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60  # from the ``def`` line to the last line of the body, docstring included

# ----------------------------------------------------------------------------------- the layers
# Lower never imports higher, not even inside a function; the same layer may import itself.
SHARED, RUN, ANALYSIS, CLUSTER, ENTRY = 1, 2, 3, 4, 5
LAYER_NAMES = {SHARED: "shared", RUN: "run", ANALYSIS: "analysis", CLUSTER: "cluster", ENTRY: "entry point"}

# A module's layer: its own entry, else the entry of the nearest package below the top level that
# holds it ("nondet_hpc" is the package's __init__ only, not everything in it).
LAYERS = {
    # 1. shared, torch-free: what a run folder and a sweep folder are, the config, the formulas and
    #    the declarations every layer reads (keep these acyclic among themselves)
    "nondet_hpc": SHARED,  # the package's __init__: the version, the cuBLAS setting on import
    "nondet_hpc.config": SHARED,  # the structured config, the thread rule, where conf/ is
    "nondet_hpc.rundir": SHARED,  # the run-folder contract: names, ids, atomic writes
    "nondet_hpc.viewspec": SHARED,  # the evaluation views and their order
    "nondet_hpc.presets": SHARED,  # the ready studies and their cost model
    "nondet_hpc.metrics": SHARED,  # the metric formulas, arrays only (a module or a package)
    "nondet_hpc.registry": SHARED,  # declarations: sources, models, metrics
    "nondet_hpc.sweep": SHARED,  # the sweep folder's contract: sweep.json, its lock, the wave stop rule
    "nondet_hpc.safeio": SHARED,  # reading and writing shared folders: regular files only, no links
    "nondet_hpc.records": SHARED,  # the formats of a run's weights and trajectory files (numpy, safetensors)
    "nondet_hpc.readers": SHARED,  # dataset files (IDX, npz, image folders) as uint8 arrays, no torch
    "nondet_hpc.model_factory": SHARED,  # a researcher's model factory: its name, arguments and source hash
    # 2. one trained model (torch)
    "nondet_hpc.run": RUN,
    # 3. the report of a sweep (pandas, matplotlib)
    "nondet_hpc.analysis": ANALYSIS,
    # 4. SLURM: submission, the jobs on the nodes, status, cancel
    "nondet_hpc.cluster": CLUSTER,
    # 5. entry points (python -m ...), Hydra glue, and the Hydra plugins
    "nondet_hpc.__main__": ENTRY,
    "nondet_hpc.reduce": ENTRY,
    "nondet_hpc.status": ENTRY,
    "nondet_hpc.cancel": ENTRY,
    "nondet_hpc.evaluate": ENTRY,
    "nondet_hpc.barriers": ENTRY,
    "nondet_hpc.compare": ENTRY,  # where two runs parted (analysis/compare_runs.py)
    "nondet_hpc.plan": ENTRY,
    "nondet_hpc.experiments": ENTRY,
    "nondet_hpc.callbacks": ENTRY,
    "nondet_hpc.guards": ENTRY,
    "nondet_hpc.compose": ENTRY,
    "nondet_hpc.slurm": ENTRY,  # the import path of job pickles written by version 0.1.0
    "hydra_plugins.nondet_hpc_launcher": ENTRY,
}

# Imports the layers allow but the design does not (issue 17): (importer, imported, why). A name
# stands for a module and everything below it; "*" for any module of ours.
FORBIDDEN = [
    ("hydra_plugins.nondet_hpc_launcher.local", "nondet_hpc.cluster",
     "the local launcher uses the sweep layer (nondet_hpc.sweep), never the SLURM package"),
    ("nondet_hpc.callbacks", "hydra_plugins",
     "a callback needs the SLURM launcher's _target_ string, declared below the plugin, not its config"),
    ("*", "nondet_hpc.__main__", "the command line is run, not imported: conf_dir lives in nondet_hpc.config"),
]

# --------------------------------------------------------------------- private names: exceptions
PRIVATE_NAMES_HOME = "nondet_hpc/compose.py"  # the one module allowed to use them (with a fallback)
ALLOWED_PRIVATE = {
    # os._exit: the documented way to end a process without running cleanup; a requeued SLURM
    # job must exit without submitit writing a result file (cluster/jobs.py, cluster/pack.py)
    "os._exit",
}
# Hydra's instantiate keys (_target_, _recursive_, _convert_, _partial_, _args_) are its public,
# documented API, written with an underscore on each side.
PUBLIC_SUNDER = re.compile(r"^_[A-Za-z]+_$")


# ====================================================================================== reading src/
@dataclass
class Module:
    name: str  # dotted import name
    path: Path
    is_package: bool  # an __init__.py
    tree: ast.Module
    lines: int


@dataclass
class Edge:
    src: str
    dst: str
    where: str  # path:line of the import statement

    def __str__(self) -> str:
        return f"{self.src} -> {self.dst} ({self.where})"


@dataclass
class Source:
    root: Path
    modules: dict[str, Module] = field(default_factory=dict)

    def rel(self, module: Module, node: ast.AST | None = None) -> str:
        where = module.path.relative_to(self.root).as_posix()
        return f"{where}:{node.lineno}" if node is not None else where


def read_source(root: Path) -> Source:
    src = Source(root)
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[0] not in OURS:
            continue
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        text = path.read_text()
        src.modules[".".join(parts)] = Module(".".join(parts), path, is_package,
                                              ast.parse(text, str(path)), len(text.splitlines()))
    return src


def _ours(name: str) -> bool:
    return name.split(".")[0] in OURS


def _known(src: Source, name: str) -> str | None:
    """The module ``name`` refers to: itself, else the nearest package of ours that holds it."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in src.modules:
            return ".".join(parts)
        parts.pop()
    return None


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    """The module an ImportFrom names, relative imports resolved against the importing module."""
    if not node.level:
        return node.module or ""
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_names(module: Module) -> list[tuple[str, ast.AST]]:
    """Every name an import statement anywhere in ``module`` asks for: ``import a.b`` gives a.b,
    ``from a import b`` gives a.b (a submodule, or a name inside a), ``importlib.import_module("a")``
    gives a."""
    out: list[tuple[str, ast.AST]] = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            out += [(f"{base}.{a.name}" if a.name != "*" else base, node) for a in node.names]
        elif (isinstance(node, ast.Call) and _call_name(node.func) in ("importlib.import_module", "import_module")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.args[0].value, node))
    return out


def _call_name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{func.value.id}.{func.attr}"
    return ""


def import_edges(src: Source) -> list[Edge]:
    """module -> the module of ours it imports: ``from a import b`` is an edge to the submodule
    a.b when there is one, else to a. Importing a.b.c also runs the __init__ of a and a.b; those
    implicit edges are left out (an __init__ counts where a module imports a name from it)."""
    edges: dict[tuple[str, str], Edge] = {}
    for module in src.modules.values():
        for name, node in imported_names(module):
            target = _known(src, name) if _ours(name) else None
            if target is None or target == module.name:
                continue
            edges.setdefault((module.name, target), Edge(module.name, target, src.rel(module, node)))
    return list(edges.values())


def cycles(nodes: set[str], edges: list[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    graph: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        graph[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def package_of(name: str) -> str:
    """The node of the package graph: the package right under a top-level package of ours
    (nondet_hpc.run, hydra_plugins.nondet_hpc_launcher), or a top-level module itself."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else name


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    if name in LAYERS:
        return LAYERS[name]
    while len(parts) > 2:
        parts.pop()
        if ".".join(parts) in LAYERS:
            return LAYERS[".".join(parts)]
    return None


# ========================================================================================= the checks
def file_cycles(src: Source) -> list[str]:
    edges = import_edges(src)
    out = []
    for comp in cycles(set(src.modules), [(e.src, e.dst) for e in edges]):
        inside = [str(e) for e in edges if e.src in comp and e.dst in comp]
        out.append(f"{' <-> '.join(comp)}:\n      " + "\n      ".join(sorted(inside)))
    return out


def package_cycles(src: Source) -> list[str]:
    edges = [e for e in import_edges(src) if package_of(e.src) != package_of(e.dst)]
    nodes = {package_of(m) for m in src.modules}
    out = []
    for comp in cycles(nodes, [(package_of(e.src), package_of(e.dst)) for e in edges]):
        inside = [str(e) for e in edges if package_of(e.src) in comp and package_of(e.dst) in comp]
        out.append(f"{' <-> '.join(comp)}:\n      " + "\n      ".join(sorted(inside)))
    return out


def upward_imports(src: Source) -> list[str]:
    out = []
    for e in import_edges(src):
        low, high = layer_of(e.src), layer_of(e.dst)
        if low is not None and high is not None and low < high:
            out.append(f"{e}: {LAYER_NAMES[low]} imports {LAYER_NAMES[high]}")
    return sorted(out)


def _under(name: str, prefix: str) -> bool:
    return prefix == "*" or name == prefix or name.startswith(prefix + ".")


def forbidden_imports(src: Source) -> list[str]:
    return sorted(f"{e}: {why}" for e in import_edges(src) for importer, imported, why in FORBIDDEN
                  if _under(e.src, importer) and _under(e.dst, imported))


def modules_without_layer(src: Source) -> list[str]:
    return sorted(f"{src.rel(m)} ({m.name})" for m in src.modules.values() if layer_of(m.name) is None)


def long_modules(src: Source) -> list[str]:
    return sorted(f"{src.rel(m)}: {m.lines} lines" for m in src.modules.values() if m.lines > MAX_MODULE_LINES)


def long_functions(src: Source) -> list[str]:
    out = []
    for m in src.modules.values():
        for node in ast.walk(m.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{src.rel(m, node)} {node.name}: {n} lines")
    return sorted(out)


def own_names(src: Source) -> set[str]:
    """Every name src/ defines: functions, classes, parameters, assignment targets (``x = ``,
    ``self.x = ``, class fields), import aliases. A ``._name`` among these is ours."""
    names: set[str] = set()
    for m in src.modules.values():
        for node in ast.walk(m.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.alias):
                names.add(node.asname or node.name.split(".")[0])
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__")) \
        and not PUBLIC_SUNDER.match(name)


def _imports_of(module: Module) -> dict[str, str]:
    """Local name -> the module it was imported from (``import os`` : os -> os)."""
    out = {}
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                out[a.asname or a.name] = f"{_absolute(module, node)}.{a.name}"
    return out


def private_uses(src: Source) -> list[str]:
    """Uses of another library's private names outside PRIVATE_NAMES_HOME."""
    ours = {n for n in own_names(src) if n.startswith("_")}
    out = []
    for m in src.modules.values():
        if src.rel(m) == PRIVATE_NAMES_HOME:
            continue
        imports = _imports_of(m)

        def hit(node: ast.AST, what: str) -> None:
            if what not in ALLOWED_PRIVATE:
                out.append(f"{src.rel(m, node)}: {what}")

        for node in ast.walk(m.tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                base = _absolute(m, node) if isinstance(node, ast.ImportFrom) else ""
                for a in node.names:
                    full = f"{base}.{a.name}" if base else a.name
                    if not _ours(full) and any(_private(p) for p in full.split(".")):
                        hit(node, f"import {full}")
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                owner = node.value.id if isinstance(node.value, ast.Name) else None
                if owner in ("self", "cls"):
                    continue
                library = imports.get(owner or "")
                if library is not None and not _ours(library):
                    hit(node, f"{library}.{node.attr}")  # a module or class of another library
                elif library is None and node.attr not in ours:
                    hit(node, f"{ast.unparse(node.value)}.{node.attr} ({node.attr} is defined nowhere in src/)")
            elif isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg and _private(kw.arg) and kw.arg not in ours:
                        hit(node, f"{ast.unparse(node.func)}({kw.arg}=...)")
                if (_call_name(node.func) in ("getattr", "setattr", "hasattr") and len(node.args) > 1
                        and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
                        and _private(node.args[1].value) and node.args[1].value not in ours):
                    hit(node, f"{_call_name(node.func)}(..., {node.args[1].value!r})")
    return sorted(out)


# ======================================================================================= on src/
@pytest.fixture(scope="module")
def src() -> Source:
    return read_source(SRC)


def _report(what: str, found: list[str]) -> str:
    return f"{len(found)} {what}:\n  " + "\n  ".join(found)


def test_every_module_has_a_layer(src):
    assert modules_without_layer(src) == [], "add these to LAYERS in tests/test_structure.py"


def test_no_import_cycle_between_files(src):
    found = file_cycles(src)
    assert not found, _report("import cycles between files", found)


def test_no_import_cycle_between_packages(src):
    found = package_cycles(src)
    assert not found, _report("import cycles between packages", found)


def test_no_upward_import(src):
    found = upward_imports(src)
    assert not found, _report("imports from a lower layer into a higher one", found)


def test_no_import_the_design_forbids(src):
    found = forbidden_imports(src)
    assert not found, _report("imports the design forbids", found)


def test_no_module_over_the_line_limit(src):
    found = long_modules(src)
    assert not found, _report(f"modules over {MAX_MODULE_LINES} lines", found)


def test_no_function_over_the_line_limit(src):
    found = long_functions(src)
    assert not found, _report(f"functions over {MAX_FUNCTION_LINES} lines", found)


def test_no_private_name_of_another_library_outside_compose(src):
    found = private_uses(src)
    assert not found, _report(f"private names of other libraries outside {PRIVATE_NAMES_HOME}", found)


def test_the_checks_read_the_real_tree(src):
    """Guards against a check that passes because it reads nothing: the tree and its imports are
    there, and compose.py's private Hydra import is seen where it is allowed."""
    assert {"nondet_hpc", "nondet_hpc.config", "nondet_hpc.compose", "hydra_plugins.nondet_hpc_launcher"} \
        <= set(src.modules)
    edges = {(e.src, e.dst) for e in import_edges(src)}
    assert ("nondet_hpc.__main__", "nondet_hpc.config") in edges
    compose = src.modules["nondet_hpc.compose"]
    assert any(name.startswith("hydra._internal") for name, _ in imported_names(compose))


# ====================================================================== the checks on known trees
def _tree(root: Path, files: dict[str, str]) -> Source:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return read_source(root)


def test_cycles_are_found_through_relative_and_function_level_imports(tmp_path):
    src = _tree(tmp_path, {
        "nondet_hpc/__init__.py": "",
        "nondet_hpc/cluster/__init__.py": "",
        "nondet_hpc/cluster/jobs.py": "from .waves import decide\n",
        "nondet_hpc/cluster/waves.py": "def f():\n    from . import submit\n",
        "nondet_hpc/cluster/submit.py": "import nondet_hpc.cluster.jobs\n",
        "nondet_hpc/cluster/pack.py": "from .jobs import RunJob\n",  # into the cycle, not part of it
    })
    found = file_cycles(src)
    assert len(found) == 1
    assert found[0].startswith("nondet_hpc.cluster.jobs <-> nondet_hpc.cluster.submit <-> nondet_hpc.cluster.waves")
    assert "nondet_hpc.cluster.waves -> nondet_hpc.cluster.submit (nondet_hpc/cluster/waves.py:2)" in found[0]
    assert package_cycles(src) == []  # one package


def test_package_cycles_and_upward_imports_are_found(tmp_path):
    src = _tree(tmp_path, {
        "nondet_hpc/__init__.py": "",
        "nondet_hpc/config.py": "",
        "nondet_hpc/analysis/__init__.py": "",
        "nondet_hpc/analysis/reduce.py": "from ..cluster import waves\nfrom nondet_hpc import config\n",
        "nondet_hpc/cluster/__init__.py": "",
        "nondet_hpc/cluster/waves.py": "def measure():\n    from nondet_hpc.analysis.planning import groups\n",
        "nondet_hpc/analysis/planning.py": "import numpy\n",
        "nondet_hpc/run/__init__.py": "",
        "nondet_hpc/run/task.py": "import importlib\nimportlib.import_module('nondet_hpc.cluster.waves')\n",
        "nondet_hpc/experiments.py": "def plan():\n    from .__main__ import conf_dir\n",
        "nondet_hpc/__main__.py": "",
        "hydra_plugins/nondet_hpc_launcher/__init__.py": "",
        "hydra_plugins/nondet_hpc_launcher/local.py": "from nondet_hpc.cluster.waves import rule\n",
    })
    assert file_cycles(src) == []  # reduce -> waves -> planning: no cycle of files
    (found,) = package_cycles(src)
    assert found.startswith("nondet_hpc.analysis <-> nondet_hpc.cluster")
    assert upward_imports(src) == [
        "nondet_hpc.analysis.reduce -> nondet_hpc.cluster.waves (nondet_hpc/analysis/reduce.py:1): "
        "analysis imports cluster",
        "nondet_hpc.run.task -> nondet_hpc.cluster.waves (nondet_hpc/run/task.py:2): run imports cluster"]
    assert [f.split(":")[0] for f in forbidden_imports(src)] == [
        "hydra_plugins.nondet_hpc_launcher.local -> nondet_hpc.cluster.waves (hydra_plugins/nondet_hpc_launcher/local.py",
        "nondet_hpc.experiments -> nondet_hpc.__main__ (nondet_hpc/experiments.py"]
    # a module outside the table is named, not silently given a layer
    _tree(tmp_path, {"nondet_hpc/newthing.py": ""})
    assert modules_without_layer(read_source(tmp_path)) == ["nondet_hpc/newthing.py (nondet_hpc.newthing)"]


def test_sizes_are_measured(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1))
    fits = f"def fits():\n{body}\n"  # exactly MAX_FUNCTION_LINES lines
    over = f"{fits}\n\ndef over():\n{body}\n    return 1\n"
    src = _tree(tmp_path, {
        "nondet_hpc/__init__.py": "",
        "nondet_hpc/ok.py": fits + "\n" * (MAX_MODULE_LINES - MAX_FUNCTION_LINES),  # exactly at both limits
        "nondet_hpc/long.py": over + "\n" * (MAX_MODULE_LINES + 1 - len(over.splitlines())),
    })
    assert len((tmp_path / "nondet_hpc/ok.py").read_text().splitlines()) == MAX_MODULE_LINES
    assert long_functions(src) == [f"nondet_hpc/long.py:{MAX_FUNCTION_LINES + 3} over: {MAX_FUNCTION_LINES + 1} lines"]
    assert long_modules(src) == [f"nondet_hpc/long.py: {MAX_MODULE_LINES + 1} lines"]


def test_private_names_of_other_libraries_are_found_beyond_import_lines(tmp_path):
    src = _tree(tmp_path, {
        "nondet_hpc/__init__.py": "import os as _os\n_os.environ.setdefault('A', 'b')\n",
        "nondet_hpc/compose.py": "from hydra._internal.config_loader_impl import ConfigLoaderImpl\n"
                                 "f = ConfigLoaderImpl._apply_overrides_to_config\n",
        "nondet_hpc/ours.py": (
            "import os, sys\n"
            "from hydra.core.utils import JobReturn\n"
            "from ._helpers import _log\n"
            "class Job:\n"
            "    _target_: str = 'x'\n"
            "    def __init__(self):\n"
            "        self._seen = []\n"
            "    def run(self, other, ret):\n"
            "        other._seen.append(self._seen)\n"  # our own attribute on another object: fine
            "        _log(ret.__class__.__name__, Job._target_)\n"  # dunder, public Hydra key: fine
            "        os._exit(0)\n"  # allowed, with its reason
            "        return ret._return_value\n"  # line 12: Hydra's private field
            "def make():\n"
            "    r = JobReturn(_return_value=1)\n"  # line 14: as a keyword
            "    sys._getframe(0)\n"  # line 15: a stdlib private name, not allowed
            "    return getattr(r, '_return_value')\n"  # line 16
        ),
        "nondet_hpc/_helpers.py": "def _log(*a):\n    pass\n",
        "nondet_hpc/plugin.py": "from hydra._internal.utils import run_and_report\nimport submitit.core._submit\n",
    })
    assert private_uses(src) == [
        "nondet_hpc/ours.py:12: ret._return_value (_return_value is defined nowhere in src/)",
        "nondet_hpc/ours.py:14: JobReturn(_return_value=...)",
        "nondet_hpc/ours.py:15: sys._getframe",
        "nondet_hpc/ours.py:16: getattr(..., '_return_value')",
        "nondet_hpc/plugin.py:1: import hydra._internal.utils.run_and_report",
        "nondet_hpc/plugin.py:2: import submitit.core._submit",
    ]
