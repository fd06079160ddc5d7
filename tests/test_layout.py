"""The import rules of ARCHITECTURE.md, checked on the source (ast; lazy imports included).

* Layers: ``cli`` → ``families`` / ``deploy`` → the method folders (``uninformed_students``,
  ``stfpm``) → the shared ground floor (every other module). Imports only go down or sideways
  within a layer; ``ustad/__init__.py`` (the lazy public API) may name anything.
* The two method families never import each other.
* ``from ustad import __version__`` is allowed anywhere.
* No circle among modules (a module importing a package counts as importing its ``__init__``).
* No private name (``_x``) imported from another module.
* No module directly in ``ustad/`` beyond the shared ground floor; both families have the same
  inner file names for the parts they share.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "ustad"
METHODS = ("uninformed_students", "stfpm")
TOP = {"cli": 3, "__main__": 3, "families": 2, "deploy": 2, **{m: 1 for m in METHODS}}
GROUND_FLOOR = {
    "calibration",
    "calibration_files",
    "checkpointing",
    "decisions",
    "detector",
    "ensemble",
    "host_images",
    "image_batches",
    "io",
    "knn",
    "metric_writer",
    "overlays",
    "program_cache",
    "score_files",
    "selection",
    "workdir_lock",
    "sharding",
    "stats",
    "tiling",
    "training",
    "training_budget",
    "training_checks",
    "xla_flags",
}
FOLDERS = {"cli", "data", "deploy", "evaluation", "models", "teachers", *METHODS}
SAME_FILES = {"nets", "maps", "steps", "train", "checkpoints", "score"}


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = ["ustad", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    return TOP.get(parts[1], 0) if len(parts) > 1 else 4


def family(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in METHODS else None


def imports_of(path: pathlib.Path, modules: set[str]):
    """``(imported module, imported name or None, line)`` for every ustad import in the file."""
    name = module_name(path, path_root(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ustad":
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            if base.split(".")[0] != "ustad":
                continue
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:  # a submodule
                    yield f"{base}.{alias.name}", None, node.lineno
                else:
                    yield base, alias.name, node.lineno


def path_root(path: pathlib.Path) -> pathlib.Path:
    while path.name != "ustad":
        path = path.parent
    return path


def import_graph(root: pathlib.Path = ROOT):
    files = sorted(root.rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    edges: dict[str, dict[str, list]] = {m: {} for m in modules}
    for f in files:
        for target, name, line in imports_of(f, modules):
            edges[module_name(f, root)].setdefault(target, []).append((name, line))
    return modules, edges


def find_cycle(edges: dict[str, dict]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in edges.get(m, {}):
            if t == m or t not in edges:
                continue
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if state.get(t) is None and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if state.get(m) is None and (cycle := visit(m)):
            return cycle
    return None


def violations(root: pathlib.Path = ROOT) -> list[str]:
    modules, edges = import_graph(root)
    found = []
    for source, targets in edges.items():
        for target, name, line in ((t, n, li) for t, found in targets.items() for n, li in found):
            where = f"{source}:{line} imports {target}" + (f".{name}" if name else "")
            if source == "ustad" or (target == "ustad" and name == "__version__"):
                continue  # the lazy façade, and the version every module may state
            if layer(target) > layer(source):
                found.append(f"upward import: {where}")
            fs, ft = family(source), family(target)
            if fs and ft and fs != ft:
                found.append(f"one family imports the other: {where}")
            if name and name.startswith("_") and target != source:
                found.append(f"private name imported across modules: {where}")
    # Circles among modules, the package façade aside (it imports lazily, on attribute access).
    cycle = find_cycle({m: t for m, t in edges.items() if m != "ustad"})
    if cycle:
        found.append("import circle: " + " -> ".join(cycle))
    return found


def test_import_rules():
    assert violations() == []


def test_layout_test_catches_a_planted_circle_upward_import_and_cross_family_import(tmp_path):
    root = tmp_path / "ustad"
    for rel, text in {
        "__init__.py": "",
        "detector.py": "from ustad.training import run\n",
        "training.py": "def run():\n    from ustad.detector import x\n",  # a lazy circle
        "stfpm/__init__.py": "",
        "stfpm/maps.py": "from ustad.uninformed_students.maps import _private\n",
        "uninformed_students/__init__.py": "",
        "uninformed_students/maps.py": "from ustad.cli import main\n_private = 1\n",
        "cli/__init__.py": "",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    found = "\n".join(violations(root))
    assert "import circle: ustad.detector -> ustad.training -> ustad.detector" in found
    assert "upward import: ustad.uninformed_students.maps:1 imports ustad.cli.main" in found
    assert "one family imports the other: ustad.stfpm.maps:1" in found
    assert "private name imported across modules: ustad.stfpm.maps:1" in found


def test_ground_floor_and_folders():
    loose = {p.stem for p in ROOT.glob("*.py")} - {"__init__", "__main__", "families"}
    assert loose <= GROUND_FLOOR, f"modules outside the folders: {sorted(loose - GROUND_FLOOR)}"
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders <= FOLDERS, sorted(folders - FOLDERS)


@pytest.mark.parametrize("family_name", METHODS)
def test_both_families_have_the_same_inner_files(family_name):
    files = {p.stem for p in (ROOT / family_name).glob("*.py")}
    assert SAME_FILES <= files, sorted(SAME_FILES - files)
