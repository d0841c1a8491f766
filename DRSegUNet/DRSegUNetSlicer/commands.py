"""How the module runs the library in a separate process: which Python, which command line, which
environment, and where its temporary files go (``segment-stream`` and ``finetune``).

The process itself is started by a :class:`~.processes.ProcessRunner` the logic holds.
"""
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

import slicer

import DRSegUNetLib


def pythonExecutable() -> str:
    """PythonSlicer inside Slicer (torch lives in its site-packages), else this interpreter."""
    if getattr(slicer, "app", None) is not None:
        found = shutil.which("PythonSlicer")
        if found:
            return found
        candidate = os.path.join(os.path.dirname(sys.executable), "PythonSlicer" + (".exe" if os.name == "nt" else ""))
        if os.path.exists(candidate):
            return candidate
    return sys.executable


def libraryCommand(*args: str) -> List[str]:
    """``python -m DRSegUNetLib ARGS`` with the Python that has torch (see :func:`pythonExecutable`)."""
    return [pythonExecutable(), "-m", "DRSegUNetLib", *args]


def libraryEnvironment() -> Dict[str, str]:
    """The environment for :func:`libraryCommand`: this DRSegUNetLib first on the path, unbuffered output."""
    env = dict(os.environ)
    libParent = str(Path(DRSegUNetLib.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([libParent] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def temporaryFolder() -> Optional[str]:
    """Slicer's temporary folder (*Application Settings → General → Temporary directory*); None: the system's."""
    app = getattr(slicer, "app", None)
    path = getattr(app, "temporaryPath", None) if app is not None else None
    if path and os.path.isdir(str(path)):
        return str(path)
    return None
