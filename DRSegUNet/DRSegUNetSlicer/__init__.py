"""The Slicer layer of DRSegUNet: MRML nodes ⇄ SimpleITK, long work, and the logic.

May import ``slicer`` and ``vtk`` (never ``qt``: the logic runs headless and under
slicer-core in pytest); everything worth testing outside MRML is in ``DRSegUNetLib``.

- :mod:`.conversions`: volume node ⇄ SimpleITK image, masks ⇄ oriented image data.
- :mod:`.processes`: the process runner segmentation and fine-tuning start (tests inject a fake).
- :mod:`.jobs`: segmentation and fine-tuning in separate processes, polled from the main thread.
- :mod:`.logic`: :class:`DRSegUNetLogic`, segment / report / accept / fine-tune.
"""
import os
import sys

try:
    from slicer.i18n import tr as _  # noqa: F401  (used by the modules of this package)
    from slicer.i18n import translate
except ImportError:  # slicer-core outside the application has no i18n
    def _(text: str) -> str:
        return text

    def translate(context: str, text: str) -> str:
        return text


def _ensureLibraryImportable() -> None:
    """Loaded through "Additional module paths" from a checkout, DRSegUNetLib sits in ``../..``."""
    try:
        import DRSegUNetLib  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


_ensureLibraryImportable()

DEVICES = ("auto", "cpu", "cuda")
# Segmentation node attributes
ATTR_SLICE_HASHES = "DRSegUNet.SliceHashes"  # per axial slice: hash of the labels last predicted or accepted
ATTR_MODEL = "DRSegUNet.Model"
ATTR_SOURCE = "DRSegUNet.Source"
ATTR_REPORT = "DRSegUNet.Report"
ATTR_UNCERTAINTY = "DRSegUNet.SliceUncertainty"  # per axial slice: DRSegUNetLib.inference.slice_uncertainty
ATTR_ACCEPTED = "DRSegUNet.AcceptedSlices"  # axial slice indices accepted as corrections
BINARY_LABELMAP = "Binary labelmap"  # vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()

from .conversions import ijkToRasArray, sitkImageFromVolumeNode, volumeNodeFromSitkImage  # noqa: E402
from .jobs import FineTuneJob, SegmentationJob  # noqa: E402
from .logic import DRSegUNetLogic, reportRows  # noqa: E402
from .processes import ProcessRunner, RunningProcess, SubprocessRunner  # noqa: E402

__all__ = [
    "ATTR_ACCEPTED", "ATTR_MODEL", "ATTR_REPORT", "ATTR_UNCERTAINTY", "ATTR_SLICE_HASHES", "ATTR_SOURCE", "DEVICES", "DRSegUNetLogic", "FineTuneJob",
    "ProcessRunner", "RunningProcess", "SegmentationJob", "SubprocessRunner", "ijkToRasArray", "reportRows",
    "sitkImageFromVolumeNode", "volumeNodeFromSitkImage",
]
