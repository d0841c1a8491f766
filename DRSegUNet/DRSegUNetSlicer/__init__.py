"""The Slicer layer of DRSegUNet: MRML nodes ⇄ SimpleITK, long work, and the logic.

May import ``slicer`` and ``vtk`` (never ``qt``: the logic runs headless and under
slicer-core in pytest); everything worth testing outside MRML is in ``DRSegUNetLib``.

- :mod:`.conversions`: volume node ⇄ SimpleITK image, masks ⇄ oriented image data.
- :mod:`.processes`: the process runner segmentation and fine-tuning start (tests inject a fake).
- :mod:`.jobs`: segmentation and fine-tuning in separate processes, polled from the main thread.
- :mod:`.logic`: :class:`DRSegUNetLogic`, segment / report / accept / fine-tune.
- :mod:`.parameters`: the panel's choices on a parameter node saved with the scene.
- :mod:`.startup`: what the module does once Slicer has started (terminology, Sample Data).
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
ATTR_SEGMENT_IDS = "DRSegUNet.SegmentIds"  # {"ggo": id, "consolidation": id, "lung": id} of the last run's segments
BINARY_LABELMAP = "Binary labelmap"  # vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
CLOSED_SURFACE = "Closed surface"  # vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
# What to do with segments a segmentation already has under our names or IDs (see DRSegUNetLogic.startSegmentation).
EXISTING_SEGMENTS = ("ask", "replace", "keep")
# Application settings (written by the widget; the data folder is also read by the logic, for the headless script).
SETTING_DATA_FOLDER = "DRSegUNet/DataFolder"
SETTING_DEVICE = "DRSegUNet/Device"
SETTING_PIXEL_SIZE = "DRSegUNet/PixelSize"

from .conversions import ijkToRasArray, sitkImageFromVolumeNode, volumeNodeFromSitkImage  # noqa: E402
from .jobs import FineTuneJob, SegmentationJob  # noqa: E402
from .logic import DRSegUNetLogic, ExistingSegmentsError, reportRows, setSegmentTerminology  # noqa: E402
from .parameters import DRSegUNetParameters  # noqa: E402
from .processes import ProcessRunner, RunningProcess, SubprocessRunner  # noqa: E402

__all__ = [
    "ATTR_ACCEPTED", "ATTR_MODEL", "ATTR_REPORT", "ATTR_SEGMENT_IDS", "ATTR_UNCERTAINTY", "ATTR_SLICE_HASHES",
    "ATTR_SOURCE", "CLOSED_SURFACE", "DEVICES", "DRSegUNetLogic", "DRSegUNetParameters", "EXISTING_SEGMENTS",
    "ExistingSegmentsError", "FineTuneJob", "ProcessRunner", "RunningProcess", "SETTING_DATA_FOLDER", "SETTING_DEVICE",
    "SETTING_PIXEL_SIZE", "SegmentationJob", "SubprocessRunner", "ijkToRasArray", "reportRows",
    "setSegmentTerminology", "sitkImageFromVolumeNode", "volumeNodeFromSitkImage",
]
