"""How the modules import each other (issue 20): no import cycles; the Slicer jobs get what they use from
the logic instead of importing it; data and training use inference only for the validation Predictor."""
import ast
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import code_metrics  # noqa: E402

SLICER_PACKAGE = REPO / "DRSegUNet" / "DRSegUNetSlicer"


def _imports(path):
    """(module imported, at module level?) for every import statement of ``path``, relative ones as ".name"."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            out += [(module, id(node) in top)] if node.module else [(f"{module}{a.name}", id(node) in top)
                                                                     for a in node.names]
    return out


def test_no_import_cycles():
    modules = code_metrics.modules(REPO)
    assert "DRSegUNetSlicer.jobs" in modules and "DRSegUNetLib.inference" in modules
    assert code_metrics.cycles(code_metrics.import_graph(modules)) == []


def test_the_cycle_finder_finds_a_cycle():
    assert code_metrics.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_of_the_slicer_package_imports_the_package_or_jobs_the_logic():
    offenders = []
    for path in sorted(SLICER_PACKAGE.glob("*.py")):
        if path.name == "__init__.py":
            continue
        for module, _top in _imports(path):
            if module in (".", "DRSegUNetSlicer") or (path.name == "jobs.py" and module.endswith("logic")):
                offenders.append(f"{path.name}: {module}")
    assert offenders == []


def test_data_and_training_import_inference_only_for_the_validation_predictor():
    library = REPO / "DRSegUNetLib"
    uses = {name: [(m, top) for m, top in _imports(library / name) if m.endswith("inference")]
            for name in ("data.py", "training.py")}
    assert uses == {"data.py": [], "training.py": [(".inference", False)]}
