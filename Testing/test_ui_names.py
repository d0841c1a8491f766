"""Every ``self.ui.<name>`` the widget uses is a widget in the .ui file (a typo fails here, not in Slicer),
and every Python file of the module is installed by its CMakeLists.txt."""
from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1] / "DRSegUNet"


def _ui_names() -> set[str]:
    root = ET.parse(MODULE_DIR / "Resources" / "UI" / "DRSegUNet.ui").getroot()
    return {w.get("name") for w in root.iter("widget")} | {a.get("name") for a in root.iter("action")}


def _used_names() -> set[str]:
    tree = ast.parse((MODULE_DIR / "DRSegUNet.py").read_text())
    used = set()
    for node in ast.walk(tree):
        # self.ui.<name>
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            used.add(node.attr)
    return used


def test_widget_uses_only_names_from_the_ui_file() -> None:
    used = _used_names()
    assert len(used) > 15, "the widget should bind its controls through self.ui"
    missing = used - _ui_names()
    assert not missing, f"self.ui names missing from DRSegUNet.ui: {sorted(missing)}"


def test_ui_names_are_unique_and_the_top_widget_is_the_module() -> None:
    root = ET.parse(MODULE_DIR / "Resources" / "UI" / "DRSegUNet.ui").getroot()
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names))
    assert root.find("class").text == "DRSegUNet"
    assert root.find("widget").get("class") == "qMRMLWidget"


def test_mrml_widgets_get_the_scene() -> None:
    root = ET.parse(MODULE_DIR / "Resources" / "UI" / "DRSegUNet.ui").getroot()
    mrml = {w.get("name") for w in root.iter("widget") if w.get("class") in ("qMRMLNodeComboBox", "qMRMLTableView")}
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert mrml and mrml <= connected


def test_cmake_installs_every_python_file_of_the_module() -> None:
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "DRSegUNet")
    listed = set(re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", cmake, re.S).group(1).split())
    present = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    assert listed == present


# Slicer 5.6 and 5.8 run Python 3.9.10 and lack the API Slicer 5.10 added; the slicer-core of
# these tests is newer (Python 3.11), so a 3.10+ construct or a 5.10-only call would pass here.
NEWER_THAN_SLICER_5_6 = ("GetTerminology(", "SetTerminology(")


def _code_run_inside_slicer() -> list[Path]:
    repo = MODULE_DIR.parent
    return sorted(MODULE_DIR.rglob("*.py")) + sorted((repo / "DRSegUNetLib").rglob("*.py"))


def test_code_run_inside_slicer_parses_as_python_3_9() -> None:
    bad = []
    for path in _code_run_inside_slicer():
        try:
            ast.parse(path.read_text(), str(path), feature_version=(3, 9))
        except SyntaxError as e:
            bad.append(f"{path.name}:{e.lineno}: {e.msg}")
    assert bad == []


def test_the_module_calls_no_segment_api_newer_than_slicer_5_6() -> None:
    bad = [f"{path.name}:{n}: {line.strip()}" for path in sorted(MODULE_DIR.rglob("*.py"))
           for n, line in enumerate(path.read_text().splitlines(), 1)
           if any(call in line for call in NEWER_THAN_SLICER_5_6)]
    assert bad == []
