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


def test_cmake_installs_every_resource_of_the_module() -> None:
    """The terminology file, the .ui and the icons are installed (MODULE_PYTHON_RESOURCES)."""
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "DRSegUNet")
    listed = set(re.search(r"set\(MODULE_PYTHON_RESOURCES(.*?)\)", cmake, re.S).group(1).split())
    present = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    assert listed == present


def test_the_shipped_terminology_is_the_vocabulary() -> None:
    """DRSegUNet/Resources/*.term.json is made from DRSegUNetLib.vocabulary, the one source of names, codes, colours."""
    import json

    from DRSegUNetLib.vocabulary import SEGMENTS, TERMINOLOGY_FILE_NAME, slicer_terminology_context

    path = MODULE_DIR / "Resources" / TERMINOLOGY_FILE_NAME
    assert json.loads(path.read_text()) == slicer_terminology_context(), (
        f"regenerate it: python -m DRSegUNetLib.vocabulary {path.relative_to(MODULE_DIR.parent)}")
    types = {(t["CodingSchemeDesignator"], t["CodeValue"]): (c["CodeValue"], t["3dSlicerLabel"], t["recommendedDisplayRGBValue"])
             for c in json.loads(path.read_text())["SegmentationCodes"]["Category"] for t in c["Type"]}
    assert types == {s.type[:2]: (s.category[1], s.name, [round(255 * v) for v in s.color]) for s in SEGMENTS}


def test_the_pixel_size_spin_box_offers_only_valid_sizes() -> None:
    """0 (the CT's own grid) is a check box; in the .ui the spin box spans PIXEL_MM_RANGE and nothing
    else. The widget adds "model's own" (None) one singleStep below, with a translated
    specialValueText (DRSegUNetSlicer.spinBoxPixelSize reads it), so the .ui has none."""
    from DRSegUNetLib.config import PIXEL_MM_RANGE

    root = ET.parse(MODULE_DIR / "Resources" / "UI" / "DRSegUNet.ui").getroot()
    box = next(w for w in root.iter("widget") if w.get("name") == "pixelSizeSpinBox")
    props = {p.get("name"): p[0].text for p in box.findall("property")}
    assert (float(props["minimum"]), float(props["maximum"])) == PIXEL_MM_RANGE
    assert "specialValueText" not in props
    assert PIXEL_MM_RANGE[0] <= float(props["value"]) <= PIXEL_MM_RANGE[1]
    assert "ownGridCheckBox" in _ui_names()
    # the special value, one step below, is still a value the box shows with its decimals, and not 0
    step, decimals = float(props["singleStep"]), int(props["decimals"])
    assert 0 < round(PIXEL_MM_RANGE[0] - step, decimals) < PIXEL_MM_RANGE[0]


# ----------------------------------------------------------------- what runs inside Slicer's Python
# Slicer 5.6 and 5.8 run Python 3.9.10 and lack the API Slicer 5.10 added; the slicer-core of
# these tests is newer (Python 3.11), so a 3.10+ construct or a 5.10-only call would pass there.
NEWER_THAN_SLICER_5_6 = ("GetTerminology", "SetTerminology", "HasTerminology")
REPO = MODULE_DIR.parent
LIBRARY = REPO / "DRSegUNetLib"


def _library_imports(path: Path) -> set[Path]:
    """DRSegUNetLib modules ``path`` imports, anywhere in it (a function's lazy import runs too)."""
    tree = ast.parse(path.read_text(), str(path))
    inside = LIBRARY in path.parents
    # The package a relative import starts from: DRSegUNetLib, or a subpackage such as DRSegUNetLib.cli.
    package = path.parent.relative_to(REPO).parts if inside else ()
    found = set()

    def module_file(dotted: str) -> Path | None:
        parts = dotted.split(".")
        if parts[0] != "DRSegUNetLib":
            return None
        target = LIBRARY.joinpath(*parts[1:])
        if (target / "__init__.py").exists():
            return target / "__init__.py"
        return target.with_suffix(".py") if target.with_suffix(".py").exists() else None

    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if not inside:
                    continue
                base = ".".join(package[:len(package) - (node.level - 1)] + ((node.module,) if node.module else ()))
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{a.name}" for a in node.names]  # "from pkg import submodule"
        for name in names:
            while name:
                found.add(module_file(name))
                name = name.rpartition(".")[0]  # importing a.b.c runs a and a.b
    return {f for f in found if f is not None}


def _code_run_inside_slicer() -> list[Path]:
    """The module's files, and the DRSegUNetLib modules they import at run time, directly or not, with the
    library's ``__main__`` (the module runs ``PythonSlicer -m DRSegUNetLib segment-stream`` and ``finetune``)."""
    todo = sorted(MODULE_DIR.rglob("*.py")) + [LIBRARY / "__main__.py"]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += sorted(_library_imports(path) - seen)
    return sorted(seen)


def test_the_run_time_imports_are_followed() -> None:
    names = {p.relative_to(REPO).as_posix() for p in _code_run_inside_slicer()}
    assert {"DRSegUNet/DRSegUNet.py", "DRSegUNet/DRSegUNetSlicer/logic.py", "DRSegUNet/Scripts/segment.py",
            "DRSegUNetLib/__init__.py", "DRSegUNetLib/vocabulary.py", "DRSegUNetLib/orientation.py",
            "DRSegUNetLib/store.py", "DRSegUNetLib/inference.py", "DRSegUNetLib/report.py",
            "DRSegUNetLib/config.py", "DRSegUNetLib/cli/__init__.py", "DRSegUNetLib/cli/segment.py",
            "DRSegUNetLib/cli/correction_loop.py", "DRSegUNetLib/cli/common.py"} <= names


def test_code_run_inside_slicer_parses_as_python_3_9() -> None:
    bad = []
    for path in _code_run_inside_slicer():
        try:
            ast.parse(path.read_text(), str(path), feature_version=(3, 9))
        except SyntaxError as e:
            bad.append(f"{path.name}:{e.lineno}: {e.msg}")
    assert bad == []


_BUILTIN_TYPES = {"int", "float", "str", "bytes", "bool", "complex", "list", "dict", "tuple", "set", "frozenset",
                  "type", "object", "bytearray"}
_TYPING_GENERICS = {"List", "Dict", "Tuple", "Set", "FrozenSet", "Optional", "Union", "Type", "Callable", "Sequence",
                    "Iterable", "Iterator", "Mapping", "MutableMapping", "Collection", "Literal", "Any"}


def _looks_like_a_type(node: ast.AST) -> bool:
    """None, a builtin type, a subscripted generic (``list[int]``, ``Optional[X]``) or a union of those."""
    if isinstance(node, ast.Constant):
        return node.value is None
    if isinstance(node, ast.Name):
        return node.id in _BUILTIN_TYPES
    if isinstance(node, ast.Subscript):  # list[int], Optional[X], typing.Dict[...]; not array[a:b]
        value = node.value
        name = value.id if isinstance(value, ast.Name) else value.attr if isinstance(value, ast.Attribute) else ""
        return name in _BUILTIN_TYPES or name in _TYPING_GENERICS
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _looks_like_a_type(node.left) or _looks_like_a_type(node.right)
    return False


def _unions_evaluated_at_run_time(path: Path) -> list[str]:
    """``X | Y`` type unions Python 3.9 would evaluate (and fail on): in annotations unless the file has
    ``from __future__ import annotations``, in isinstance/issubclass, and unions of types anywhere else."""
    tree = ast.parse(path.read_text(), str(path))
    postponed = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                    any(a.name == "annotations" for a in n.names) for n in tree.body)
    annotations: set[int] = set()
    for node in ast.walk(tree):
        roots = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            roots = [a.annotation for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]
                     if a is not None and a.annotation is not None] + ([node.returns] if node.returns else [])
        elif isinstance(node, ast.AnnAssign):
            roots = [node.annotation]
        for root in roots:
            annotations |= {id(n) for n in ast.walk(root)}
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    found: dict[int, tuple[int, str]] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr)):
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.BinOp) and isinstance(parent.op, ast.BitOr):
            continue  # a | b | c: reported once, as the whole
        text = ast.unparse(node)
        if id(node) in annotations:
            if not postponed:
                found[id(node)] = (node.lineno, f"annotation {text} without postponed annotations")
        elif (isinstance(parent, ast.Call) and isinstance(parent.func, ast.Name)
              and parent.func.id in ("isinstance", "issubclass") and parent.args[1:2] == [node]):
            found[id(node)] = (node.lineno, f"{parent.func.id}(..., {text})")  # 3.10+ whatever the names
        elif _looks_like_a_type(node):
            found[id(node)] = (node.lineno, f"{text} is evaluated")
    return [f"{path.name}:{line}: {what}" for line, what in sorted(found.values())]


def test_code_run_inside_slicer_evaluates_no_type_unions() -> None:
    bad = [line for path in _code_run_inside_slicer() for line in _unions_evaluated_at_run_time(path)]
    assert bad == []


def test_the_union_check_finds_what_it_is_for(tmp_path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import numpy as np\n"
                      "def f(x: int | None) -> list[int] | None:\n"
                      "    mask = (x > 0) | (x < -1)\n"  # a bitwise or of arrays is fine
                      "    Alias = dict[str, int] | None\n"
                      "    return isinstance(x, int | str)\n")
    found = _unions_evaluated_at_run_time(sample)
    assert [line.split(":")[1] for line in found] == ["2", "2", "4", "5"], found
    sample.write_text("from __future__ import annotations\n" + sample.read_text())
    assert [line.split(":")[1] for line in _unions_evaluated_at_run_time(sample)] == ["5", "6"]


def _guarded_by_hasattr(node: ast.AST, parents: dict, name: str) -> bool:
    """Inside ``if hasattr(obj, "name"):`` (its body, not its else)."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.If) and child in parent.body:
            test = parent.test
            if (isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and test.func.id == "hasattr"
                    and len(test.args) == 2 and isinstance(test.args[1], ast.Constant) and test.args[1].value == name):
                return True
        child, parent = parent, parents.get(parent)
    return False


def test_the_module_calls_segment_api_newer_than_slicer_5_6_only_where_slicer_has_it() -> None:
    """vtkSegment.SetTerminology and friends came with Slicer 5.10: only behind ``if hasattr(segment, ...)``."""
    bad = []
    for path in sorted(MODULE_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in NEWER_THAN_SLICER_5_6 and not _guarded_by_hasattr(node, parents, node.func.attr)):
                bad.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert bad == []
