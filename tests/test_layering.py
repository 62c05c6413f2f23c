"""The house rules of the layout: the library never imports the studies, and the repository's top level is
the user's (CMakeLists.txt, pyproject.toml, engine/, kernels/, export/, benchmarks/, tests/, README.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDIES = "indis.engine.studies"
#: source folder -> the package it installs as (pyproject.toml's package-dir)
PACKAGES = {ROOT / "engine" / "api": "indis", ROOT / "engine": "indis.engine",
            ROOT / "kernels": "indis.kernels", ROOT / "export": "indis.export"}


def _module_name(path: Path) -> str:
    for folder, package in sorted(PACKAGES.items(), key=lambda kv: -len(kv[0].parts)):
        if folder in path.parents:
            parts = path.relative_to(folder).with_suffix("").parts
            return ".".join((package, *parts)).removesuffix(".__init__")
    raise AssertionError(path)


def library_modules() -> dict[str, Path]:
    files = [p for folder in PACKAGES for p in folder.rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    return {name: p for name, p in modules.items() if not (name + ".").startswith(STUDIES + ".")}


def imported_names(path: Path, module: str) -> set[str]:
    """Every module an ``import`` anywhere in the file names (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def test_the_library_imports_no_study() -> None:
    modules = library_modules()
    assert {"indis", "indis.engine.core.sampling", "indis.engine.serving.batcher", "indis.engine.cli",
            "indis.kernels.ragged_step", "indis.export.backends"} <= set(modules)
    offenders = {name: sorted(n for n in imported_names(path, name) if (n + ".").startswith(STUDIES + "."))
                 for name, path in modules.items()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_import_check_sees_relative_and_local_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from ..studies import quality\n"
                 "    from indis.engine.studies.demo import main\n")
    names = imported_names(f, "indis.engine.serving.m")
    assert {"indis.engine.studies.quality", "indis.engine.studies.demo"} <= names


def test_importing_every_library_module_loads_no_study() -> None:
    mods = sorted(m for m in library_modules() if not m.startswith("indis.export.tensorrt"))
    code = ("import importlib, sys\n"
            f"for m in {mods!r}:\n    importlib.import_module(m)\n"
            f"print(sorted(m for m in sys.modules if m.startswith({STUDIES!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_the_top_level_is_the_users_layout() -> None:
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    top = {line.split("/")[0] for line in tracked.splitlines() if "/" in line}
    assert top <= {".ci", "benchmarks", "engine", "export", "kernels", "tests"}, top
