"""The panel's choices on a plain ``vtkMRMLScriptedModuleNode``, so they are saved with the scene.

Input and output are node references (MRML remaps their IDs when a scene is imported);
model, device and working pixel size are parameters (strings). Slicer's
``parameterNodeWrapper`` would do the same, but it is not in ``slicer-core``: this keeps the
part worth testing runnable outside the application. Values read back are checked: a
device or pixel size that is not valid (an edited scene file) reads as the default.

The working pixel size is None by default: the model's own, which its checkpoint carries
(``ModelConfig.inference.pixel_mm``); it is stored as ``MODEL_PIXEL_SIZE``. A number (0: the
CT's own grid), as scenes of older versions hold, reads back as that number.
"""
import math
from typing import Optional

import slicer

from .constants import DEVICES, MODEL_PIXEL_SIZE

MODULE_NAME = "DRSegUNet"  # singleton tag and "ModuleName" attribute, as ScriptedLoadableModuleLogic.getParameterNode
ROLE_INPUT = "InputVolume"
ROLE_OUTPUT = "OutputSegmentation"
PARAM_MODEL = "Model"  # a model version number, or a checkpoint path; empty: the active version
PARAM_DEVICE = "Device"
PARAM_PIXEL_SIZE = "PixelSize"  # mm; 0: the CT's own grid; MODEL_PIXEL_SIZE: the model's own


def parameterNode(scene):
    """The module's singleton ``vtkMRMLScriptedModuleNode`` in ``scene``, made if missing."""
    node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if node is None:
        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetSingletonTag(MODULE_NAME)
        node.SetName(scene.GenerateUniqueName(MODULE_NAME))
        node.SetAttribute("ModuleName", MODULE_NAME)
        node = scene.AddNode(node)
    elif node.GetAttribute("ModuleName") != MODULE_NAME:  # a scene close clears attributes of singletons
        node.SetAttribute("ModuleName", MODULE_NAME)
    return node


def validPixelSize(value) -> Optional[float]:
    """``value`` as a working pixel size in mm if it is one (0, or within PIXEL_MM_RANGE), else None
    (which is also the model's own: ``MODEL_PIXEL_SIZE``, an empty or invalid value)."""
    from DRSegUNetLib.config import PIXEL_MM_RANGE

    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    if math.isfinite(value) and (value == 0 or PIXEL_MM_RANGE[0] <= value <= PIXEL_MM_RANGE[1]):
        return value
    return None


def pixelSizeText(value: Optional[float]) -> str:
    """How a working pixel size is stored (parameter node, application settings): ``MODEL_PIXEL_SIZE``
    for None (the model's own), else the number; :func:`validPixelSize` reads it back."""
    return MODEL_PIXEL_SIZE if value is None else repr(float(value))


def spinBoxPixelSize(value: float, ownGrid: bool = False) -> Optional[float]:
    """The working pixel size the panel's controls select: 0 with the check box *volume's own grid*;
    None (the model's own) for the spin box's special value, one step below the valid sizes
    (its minimum, shown as "model's own"), and for anything else typed below them; else the
    spin box's value."""
    from DRSegUNetLib.config import PIXEL_MM_RANGE

    if ownGrid:
        return 0.0
    value = float(value)
    return None if value < PIXEL_MM_RANGE[0] - 1e-6 else value


class DRSegUNetParameters:
    """Typed access to the parameter node; :meth:`isSet` tells a stored value from a default."""

    def __init__(self, node):
        self.node = node

    def isSet(self, name: str) -> bool:
        return bool(self.node.GetParameter(name))

    # nodes
    @property
    def inputVolume(self):
        return self.node.GetNodeReference(ROLE_INPUT)

    @inputVolume.setter
    def inputVolume(self, volumeNode) -> None:
        self.node.SetNodeReferenceID(ROLE_INPUT, volumeNode.GetID() if volumeNode is not None else None)

    @property
    def outputSegmentation(self):
        return self.node.GetNodeReference(ROLE_OUTPUT)

    @outputSegmentation.setter
    def outputSegmentation(self, segmentationNode) -> None:
        self.node.SetNodeReferenceID(ROLE_OUTPUT, segmentationNode.GetID() if segmentationNode is not None else None)

    # values
    @property
    def model(self) -> Optional[str]:
        """A version number (as text) or a checkpoint path; None: the active version."""
        return self.node.GetParameter(PARAM_MODEL) or None

    @model.setter
    def model(self, model) -> None:
        self.node.SetParameter(PARAM_MODEL, "" if model is None else str(model))

    @property
    def device(self) -> str:
        value = self.node.GetParameter(PARAM_DEVICE)
        return value if value in DEVICES else DEVICES[0]

    @device.setter
    def device(self, device: str) -> None:
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
        self.node.SetParameter(PARAM_DEVICE, device)

    @property
    def pixelMM(self) -> Optional[float]:
        """The working pixel size in mm; 0: the CT's own grid; None: the model's own (also the
        default, and what a value that is not valid reads as)."""
        return validPixelSize(self.node.GetParameter(PARAM_PIXEL_SIZE))

    @pixelMM.setter
    def pixelMM(self, value: Optional[float]) -> None:
        checked = validPixelSize(value)
        if checked is None and value is not None:
            from DRSegUNetLib.config import PIXEL_MM_RANGE

            raise ValueError(f"the working pixel size must be None (the model's own), 0 or from {PIXEL_MM_RANGE[0]} "
                             f"to {PIXEL_MM_RANGE[1]} mm, not {value!r}")
        self.node.SetParameter(PARAM_PIXEL_SIZE, pixelSizeText(checked))

    def setDefaults(self, device=None, pixelMM=None) -> None:
        """Fill what the node does not hold yet (a new scene) from the user's last choices (application
        settings: ``pixelMM`` as :func:`pixelSizeText` writes it; missing or not valid: the model's own)."""
        if not self.isSet(PARAM_DEVICE):
            self.device = device if device in DEVICES else DEVICES[0]
        if not self.isSet(PARAM_PIXEL_SIZE):
            self.pixelMM = validPixelSize(pixelMM)
