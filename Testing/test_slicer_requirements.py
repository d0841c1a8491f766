"""The Slicer logic's ``setupPythonRequirements`` with a fake PyTorch Utils and a fake installed torch:
torch older than ``DRSegUNetLib.MIN_TORCH`` gets a question and an upgrade through PyTorch Utils with
``torch>=MIN_TORCH``; while torch or pip packages install, ``installing`` is True and a second call is refused."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("slicer", reason="slicer-core is in requirements-dev.txt")

import slicer_stubs  # noqa: E402  (Testing/ is on sys.path)

slicer = slicer_stubs.install()
REPO = Path(__file__).resolve().parents[1]
if str(REPO / "DRSegUNet") not in sys.path:
    sys.path.insert(0, str(REPO / "DRSegUNet"))

import DRSegUNetSlicer as lib  # noqa: E402

import DRSegUNetLib  # noqa: E402

MIN = DRSegUNetLib.MIN_TORCH


class FakeTorchUtils:
    """PyTorchUtils' logic as SlicerPyTorch has it: ``installTorch(askConfirmation=False,
    forceComputationBackend=None, torchVersionRequirement=None, torchvisionVersionRequirement=None)``."""

    def __init__(self, env, logic_box, upgradeTo="2.13.0+cpu", fail=False):
        self.env, self.logic_box, self.upgradeTo, self.fail = env, logic_box, upgradeTo, fail
        self.calls = []

    def module(self):
        fake = self

        class PyTorchUtilsLogic:
            def torchInstalled(self):
                return fake.env["torch"] is not None

            def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                             torchvisionVersionRequirement=None):
                logic = fake.logic_box[0]
                fake.calls.append({"askConfirmation": askConfirmation, "torchVersionRequirement": torchVersionRequirement,
                                   "installing": logic.installing})
                with pytest.raises(RuntimeError, match="being installed"):  # a second click while this runs
                    logic.setupPythonRequirements(askUser=lambda message: True)
                if fake.fail:
                    raise RuntimeError("light-the-torch failed")
                if fake.upgradeTo is None:
                    return None
                fake.env["torch"] = fake.upgradeTo
                return SimpleNamespace(__version__=fake.upgradeTo)

        m = types.ModuleType("PyTorchUtils")
        m.PyTorchUtilsLogic = PyTorchUtilsLogic
        return m


@pytest.fixture()
def env(monkeypatch, tmp_path):
    """A Slicer application (``slicer.app``), an installed torch of ``env["torch"]`` (None: not installed)."""
    state = {"torch": "1.13.1", "asked": [], "answer": True, "pip": []}
    realVersion = importlib.metadata.version

    def version(name):
        if name == "torch":
            if state["torch"] is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return state["torch"]
        return realVersion(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(slicer, "app", SimpleNamespace(), raising=False)
    logic = lib.DRSegUNetLogic(scene=slicer_stubs.new_scene(), dataFolder=str(tmp_path / "data"))
    changes = []
    logic.installingChanged = changes.append
    state.update(logic=logic, changes=changes)

    def ask(message):
        state["asked"].append(message)
        return state["answer"]

    state["ask"] = ask
    return state


def _install_fake(monkeypatch, env, **kw):
    fake = FakeTorchUtils(env, [env["logic"]], **kw)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", fake.module())
    return fake


def test_an_older_torch_gets_a_question_and_an_upgrade_to_the_minimum(env, monkeypatch):
    fake = _install_fake(monkeypatch, env)
    logic = env["logic"]
    assert logic.installing is False
    logic.setupPythonRequirements(askUser=env["ask"])
    assert len(env["asked"]) == 1 and "1.13.1" in env["asked"][0] and f"{MIN} or newer" in env["asked"][0]
    assert fake.calls == [{"askConfirmation": False, "torchVersionRequirement": ">=" + MIN, "installing": True}]
    assert env["changes"] == [True, False] and logic.installing is False


def test_a_missing_torch_is_installed_with_the_minimum_as_requirement(env, monkeypatch):
    env["torch"] = None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else object())
    fake = _install_fake(monkeypatch, env)
    env["logic"].setupPythonRequirements(askUser=env["ask"])
    assert len(env["asked"]) == 1 and "downloaded and installed" in env["asked"][0]
    assert [c["torchVersionRequirement"] for c in fake.calls] == [">=" + MIN]


def test_a_declined_upgrade_says_which_versions_and_installs_nothing(env, monkeypatch):
    fake = _install_fake(monkeypatch, env)
    env["answer"] = False
    with pytest.raises(RuntimeError) as e:
        env["logic"].setupPythonRequirements(askUser=env["ask"])
    assert f"PyTorch {MIN} or newer" in str(e.value) and "1.13.1" in str(e.value) and "declined" in str(e.value)
    assert fake.calls == [] and env["changes"] == []


def test_a_new_enough_torch_asks_nothing(env, monkeypatch):
    env["torch"] = MIN + ".0"
    fake = _install_fake(monkeypatch, env)
    env["logic"].setupPythonRequirements(askUser=env["ask"])
    assert env["asked"] == [] and fake.calls == []


def test_a_failed_install_ends_the_installing_state(env, monkeypatch):
    _install_fake(monkeypatch, env, fail=True)
    logic = env["logic"]
    with pytest.raises(RuntimeError, match="light-the-torch failed"):
        logic.setupPythonRequirements(askUser=env["ask"])
    assert logic.installing is False and env["changes"] == [True, False]
    logic.setupPythonRequirements(askUser=env["ask"], withTorch=False)  # not stuck: the next call runs


def test_an_upgrade_that_leaves_the_old_torch_is_reported(env, monkeypatch):
    _install_fake(monkeypatch, env, upgradeTo="1.13.1")
    with pytest.raises(RuntimeError, match=r"PyTorch 1\.13\.1 is still installed"):
        env["logic"].setupPythonRequirements(askUser=env["ask"])


def test_an_old_torch_already_loaded_in_slicer_asks_for_a_restart(env, monkeypatch):
    _install_fake(monkeypatch, env)
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(__version__="1.13.1"))
    with pytest.raises(RuntimeError, match="restart Slicer"):
        env["logic"].setupPythonRequirements(askUser=env["ask"])


def test_an_older_torch_without_the_pytorch_extension_names_it(env, monkeypatch):
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # import fails
    with pytest.raises(RuntimeError) as e:
        env["logic"].setupPythonRequirements(askUser=env["ask"])
    assert "PyTorch extension" in str(e.value) and "1.13.1" in str(e.value)
    assert env["asked"] == []


def test_pip_installs_run_in_the_installing_state_and_refuse_a_second_call(env, monkeypatch):
    logic = env["logic"]
    monkeypatch.setattr(lib.DRSegUNetLogic, "missingRequirements", staticmethod(lambda: ["scipy"]))
    seen = []

    def pip_install(requirements):
        seen.append((requirements, logic.installing))
        with pytest.raises(RuntimeError, match="being installed"):
            logic.setupPythonRequirements(askUser=env["ask"], withTorch=False)

    monkeypatch.setattr(slicer.util, "pip_install", pip_install, raising=False)
    logic.setupPythonRequirements(askUser=env["ask"], withTorch=False)
    assert seen == [(["scipy"], True)] and logic.installing is False and env["changes"] == [True, False]


def test_outside_slicer_nothing_is_installed(env, monkeypatch):
    monkeypatch.setattr(slicer, "app", None)
    fake = _install_fake(monkeypatch, env)
    env["logic"].setupPythonRequirements(askUser=env["ask"])
    assert env["asked"] == [] and fake.calls == []
