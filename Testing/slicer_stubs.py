"""Stand-ins for what slicer-core lacks, so the module's logic runs against real MRML in pytest.

slicer-core (PyPI) gives the MRML scene, nodes, the segmentations logic and most of
``slicer.util``; it has no ``qt``, ``ctk``, ``slicer.ScriptedLoadableModule`` or ``slicer.app``.
:func:`install` provides the first three (the widget is never built here) and a fresh
scene with the segmentations and volumes logics, as the application would.
"""
from __future__ import annotations

import sys
import types
import unittest
from types import SimpleNamespace


class _Anything:
    """Accepts any attribute or call; enough for module-level use of qt/ctk names."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()

    def __call__(self, *args, **kwargs):
        return _Anything()


def _module(name: str) -> types.ModuleType:
    m = types.ModuleType(name)

    def __getattr__(attr: str):
        if attr.startswith("__"):  # keep inspect, pickle and friends honest
            raise AttributeError(attr)
        return _Anything

    m.__getattr__ = __getattr__  # type: ignore[attr-defined]
    return m


def _scripted_loadable_module() -> types.ModuleType:
    m = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

        def setup(self):
            pass

        def resourcePath(self, filename):
            raise NotImplementedError("no widget outside the application")

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            print(message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        cls.__module__ = m.__name__
        setattr(m, cls.__name__, cls)
    m.__all__ = [c for c in dir(m) if c.startswith("Scripted")]
    return m


def install():
    """Insert the stand-ins and a fresh scene; returns the ``slicer`` module."""
    import slicer

    for name in ("qt", "ctk"):
        sys.modules.setdefault(name, _module(name))
    if "slicer.ScriptedLoadableModule" not in sys.modules:
        sys.modules["slicer.ScriptedLoadableModule"] = _scripted_loadable_module()
        slicer.ScriptedLoadableModule = sys.modules["slicer.ScriptedLoadableModule"]
    new_scene(slicer)
    return slicer


def new_scene(slicer=None):
    """A fresh ``slicer.mrmlScene`` with the segmentations and volumes logics attached."""
    if slicer is None:
        import slicer
    scene = slicer.vtkMRMLScene()
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(scene)
    slicer.mrmlScene = scene
    slicer.modules = SimpleNamespace(
        segmentations=SimpleNamespace(logic=lambda: segmentations),
        volumes=SimpleNamespace(logic=lambda: volumes),
    )
    slicer._stub_logics = (segmentations, volumes)  # keep them alive with the scene
    return scene
