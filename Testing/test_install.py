"""The library as an installed package (pyproject.toml): the README's two set-up commands install it,
CI runs the README's test command, a wheel carries the bundled model, CT sample and split files, and
the command line runs from any folder, not only from the repository's root."""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

from conftest import REPO

from DRSegUNetLib import __version__

PACKAGE_DATA_DIRS = ("models", "data", "splits")


def _env_without_repo() -> dict[str, str]:
    """The environment minus PYTHONPATH: only what is installed in this interpreter is importable."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _setup_commands() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```\n(.*?)\n```", section, re.S)


def test_readme_set_up_commands_install_the_package_and_ci_runs_the_test_command():
    commands = _setup_commands()
    assert len(commands) == 2, commands
    for command in commands:
        assert "\n" not in command
        install = re.search(r"\.venv/bin/pip install ([^&]*)", command)
        assert install and re.search(r"(^|\s)-e \.(\s|$)", install.group(1)), f"does not install the package: {command}"
    assert "python -m DRSegUNetLib segment" in commands[0]
    ci = [line for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == [commands[1]]


def test_pyproject_lists_the_package_data_that_exists_and_the_requirements():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    tool = project["tool"]["setuptools"]
    # every package of the library, its subpackages (DRSegUNetLib.cli) too: setuptools lists no subpackage itself
    packages = sorted(".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "DRSegUNetLib").rglob("__init__.py"))
    assert sorted(tool["packages"]) == packages == ["DRSegUNetLib", "DRSegUNetLib.cli"]
    globs = tool["package-data"]["DRSegUNetLib"]
    package = REPO / "DRSegUNetLib"
    for folder in PACKAGE_DATA_DIRS:
        files = sorted(p.relative_to(package).as_posix() for p in (package / folder).iterdir() if p.is_file())
        assert files, f"DRSegUNetLib/{folder} is empty"
        missing = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)]
        assert not missing, f"not in the package data: {missing}"
    assert tool["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    assert tool["dynamic"]["version"] == {"attr": "DRSegUNetLib.__version__"}
    assert project["project"]["scripts"]["drsegunet"] == "DRSegUNetLib.cli:main"


def test_the_command_line_runs_from_any_folder(tmp_path):
    """What `pip install -e .` of the set-up commands gives (before it, `python -m DRSegUNetLib` outside
    the repository said "No module named DRSegUNetLib")."""
    env = _env_without_repo()
    r = subprocess.run([sys.executable, "-m", "DRSegUNetLib", "--version"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"not installed in {sys.prefix} (README: pip install ... -e .): {r.stderr}"
    assert r.stdout.strip() == f"DRSegUNetLib {__version__}"
    script = Path(sysconfig.get_path("scripts")) / ("drsegunet.exe" if os.name == "nt" else "drsegunet")
    r = subprocess.run([str(script), "segment", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr


def test_a_wheel_carries_the_model_the_sample_and_the_splits(tmp_path):
    """Build the wheel as pip would (from a copy, so nothing lands in the checkout), then run the
    command line from the unpacked wheel alone."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "DRSegUNetLib", src / "DRSegUNetLib", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = sorted(line.split(":", 1)[1].strip() for line in z.read(meta).decode().splitlines()
                          if line.startswith("Requires-Dist:"))
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
        z.extractall(tmp_path / "site")
    package = REPO / "DRSegUNetLib"
    for folder in PACKAGE_DATA_DIRS:
        for f in (package / folder).iterdir():
            if f.is_file():
                assert f"DRSegUNetLib/{folder}/{f.name}" in names
    pinned = sorted(line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()
                    if line.split("#")[0].strip())
    assert requires == pinned
    assert "drsegunet = DRSegUNetLib.cli:main" in entry_points
    check = ("import DRSegUNetLib as d, sys; from pathlib import Path; "
             "assert Path(d.__file__).is_relative_to(Path(sys.argv[1])), d.__file__; "
             "assert d.default_model_path().is_file() and d.sample_ct_path().is_file(); "
             "assert (d.PACKAGE_DIR / 'splits' / 'default.json').is_file(); "
             "import DRSegUNetLib.cli as c; "  # the subpackage (and every command family it imports) too
             "assert Path(c.__file__).is_relative_to(Path(sys.argv[1])), c.__file__")
    env = dict(_env_without_repo(), PYTHONPATH=str(tmp_path / "site"))
    r = subprocess.run([sys.executable, "-c", check, str(tmp_path / "site")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
