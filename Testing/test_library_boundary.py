"""DRSegUNetLib never imports slicer, vtk or qt (it must run outside Slicer)."""
import ast
import subprocess
import sys

from conftest import REPO

FORBIDDEN = {"slicer", "vtk", "qt", "ctk", "PythonQt"}


def test_no_forbidden_import_statements():
    offenders = []
    for path in (REPO / "DRSegUNetLib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_importing_every_module_loads_none_of_them():
    code = (
        "import importlib, pkgutil, sys, DRSegUNetLib\n"
        "for m in pkgutil.walk_packages(DRSegUNetLib.__path__, 'DRSegUNetLib.'):\n"
        "    if m.name != 'DRSegUNetLib.__main__': importlib.import_module(m.name)\n"
        f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
