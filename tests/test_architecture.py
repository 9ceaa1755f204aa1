"""The shape of the code: one import root, layers without back-edges, no import cycles, honest dependencies."""
from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The repository's top-level folders and the import names they install under (setup.py's package_dir).
ROOTS = {"pretrain": "pretrain", "kernels": "pretrain.kernels", "launch": "pretrain.launch", "tools": "pretrain.tools"}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, root in ROOTS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([root, *parts])] = path
    return found


MODULES = _modules()


_DYNAMIC = {"import_module", "_optional_import"}


def _imports(path: Path) -> set[str]:
    """Absolute names a module imports, anywhere in it (function-level imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in _DYNAMIC
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)  # importlib.import_module("x"), the kernels' optional probes
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            names.update(submodules)
            if len(submodules) < len(node.names):  # names defined in the module (package) itself
                names.add(node.module)
    return names


GRAPH = {name: {i for i in _imports(path) if i in MODULES and i != name} for name, path in MODULES.items()}


def _importers(prefix: str, of: str) -> list[str]:
    return sorted(f"{m} -> {i}" for m, deps in GRAPH.items() if m.startswith(prefix) for i in deps if i.startswith(of))


def test_models_do_not_import_the_engine():
    assert _importers("pretrain.models", "pretrain.engine") == []


def test_config_names_no_objective():
    assert _importers("pretrain.config", "pretrain.objectives") == []


def test_kernels_import_only_torch_triton_and_themselves():
    allowed = {"torch", "triton", "flash_attn", "xformers"}
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for name, path in MODULES.items():
        if name.startswith("pretrain.kernels"):
            for imp in _imports(path):
                top = imp.split(".")[0]
                if not (imp.startswith("pretrain.kernels") or imp == "pretrain" or top in allowed | stdlib):
                    bad.append(f"{name} -> {imp}")
    assert bad == []


def test_no_import_cycles():
    """Depth-first search for a back edge over every module (function-level imports included)."""
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(GRAPH[node]):
            # ``pretrain`` itself (the root __init__) is imported by every ``from pretrain import x``
            if dep == "pretrain":
                continue
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_code_never_imports_the_repository_folders_as_top_level_names():
    bad = [f"{m} -> {i}" for m, path in MODULES.items() for i in _imports(path)
           if i.split(".")[0] in ("kernels", "launch", "tools")]
    assert bad == []


# Distribution name -> import name, where they differ.
IMPORT_NAMES = {"pyyaml": "yaml", "pillow": "PIL", "pytest-timeout": None, "open_clip_torch": "open_clip",
                "scikit-learn": "sklearn"}
# Declared but imported by another dependency, never by us: each with the reason it is declared.
INDIRECT = {
    "torchvision": "timm needs it, and it must be the build that matches torch",
    "tensorboard": "torch.utils.tensorboard writes through it",
    "pylibjpeg-libjpeg": "pydicom's JPEG decoder plug-in", "pylibjpeg-openjpeg": "pydicom's JPEG 2000 plug-in",
    "pylibjpeg": "pydicom's pixel-data plug-in loader",
}


# Imported but not declared: each with the reason.
UNDECLARED = {"triton": "comes with torch's Linux build; the Triton backend registers only where it imports"}


def _declared() -> dict[str, str]:
    tree = ast.parse((REPO / "setup.py").read_text())
    specs: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg in ("install_requires", "extras_require"):
            value = ast.literal_eval(node.value)
            specs += value if isinstance(value, list) else [s for group in value.values() for s in group]
    names = {}
    for spec in specs:
        dist = spec.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower()
        names[dist] = IMPORT_NAMES.get(dist, dist.replace("-", "_"))
    return names


def test_declared_dependencies_are_the_imported_ones():
    stdlib = set(sys.stdlib_module_names) | {"pretrain"}
    imported = {i.split(".")[0] for path in MODULES.values() for i in _imports(path)} - stdlib
    declared = _declared()
    assert sorted(imported - set(declared.values()) - set(UNDECLARED)) == [], "imported but not declared in setup.py"
    tests = {i.split(".")[0] for path in (REPO / "tests").rglob("*.py") for i in _imports(path)}
    unused = sorted(d for d, mod in declared.items() if mod and mod not in imported | tests and d not in INDIRECT)
    assert unused == [], "declared in setup.py but never imported"


@pytest.mark.slow
def test_a_wheel_installs_one_import_root(tmp_path):
    """Built from the repository, installed into a fresh venv: only ``pretrain``; PyPI's names stay free."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("medpretrain-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith((".dist-info", ".data"))} == {"pretrain"}
    assert "pretrain/kernels/dispatch.py" in zipfile.ZipFile(wheel).namelist()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    probe = ("import importlib.util as u, json; print(json.dumps({n: u.find_spec(n) is not None for n in "
             "['kernels', 'tools', 'launch', 'pretrain', 'pretrain.kernels', 'pretrain.tools.cli.main']}))")
    out = subprocess.run([str(py), "-c", probe], cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    assert out.strip() == ('{"kernels": false, "tools": false, "launch": false, "pretrain": true, '
                           '"pretrain.kernels": true, "pretrain.tools.cli.main": true}')
