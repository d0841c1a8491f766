"""The Slicer layer of DRSegUNet: MRML nodes ⇄ SimpleITK, long work, and the logic.

May import ``slicer`` and ``vtk`` (never ``qt``: the logic runs headless and under
slicer-core in pytest); everything worth testing outside MRML is in ``DRSegUNetLib``.

- :mod:`.constants`: devices, segmentation node attributes, representation and setting names.
- :mod:`.i18n`: Slicer's translation functions (stand-ins under slicer-core).
- :mod:`.conversions`: volume node ⇄ SimpleITK image, masks ⇄ oriented image data.
- :mod:`.segments`: our three segments in a segmentation node, made from the vocabulary and written slice by slice.
- :mod:`.processes`: the process runner segmentation and fine-tuning start (tests inject a fake).
- :mod:`.commands`: the ``python -m DRSegUNetLib`` command line, its environment, the temporary folder.
- :mod:`.jobs`: segmentation and fine-tuning in separate processes, polled from the main thread; what
  they write with and start processes with is passed in by the logic.
- :mod:`.logic`: :class:`DRSegUNetLogic`, segment / report / accept / fine-tune.
- :mod:`.parameters`: the panel's choices on a parameter node saved with the scene.
- :mod:`.startup`: what the module does once Slicer has started (terminology, Sample Data).

This file only makes the library importable and re-exports; no module of the package imports it.
"""
import os
import sys


def _ensureLibraryImportable() -> None:
    """Loaded through "Additional module paths" from a checkout, DRSegUNetLib sits in ``../..``."""
    try:
        import DRSegUNetLib  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


_ensureLibraryImportable()  # before the modules below import DRSegUNetLib

from .constants import (ATTR_ACCEPTED, ATTR_MODEL, ATTR_REPORT, ATTR_SEGMENT_IDS, ATTR_SLICE_HASHES,  # noqa: E402
                        ATTR_SOURCE, ATTR_UNCERTAINTY, BINARY_LABELMAP, CLOSED_SURFACE, DEVICES, EXISTING_SEGMENTS,
                        MODEL_PIXEL_SIZE, SETTING_DATA_FOLDER, SETTING_DEVICE, SETTING_PIXEL_SIZE)
from .conversions import ijkToRasArray, sitkImageFromVolumeNode, volumeNodeFromSitkImage  # noqa: E402
from .i18n import _, translate  # noqa: E402
from .jobs import FineTuneJob, SegmentationJob  # noqa: E402
from .logic import DRSegUNetLogic, ExistingSegmentsError, reportRows  # noqa: E402
from .parameters import DRSegUNetParameters, pixelSizeText, spinBoxPixelSize  # noqa: E402
from .processes import ProcessRunner, RunningProcess, SubprocessRunner  # noqa: E402
from .segments import SegmentWriter, setSegmentTerminology  # noqa: E402

__all__ = [
    "ATTR_ACCEPTED", "ATTR_MODEL", "ATTR_REPORT", "ATTR_SEGMENT_IDS", "ATTR_UNCERTAINTY", "ATTR_SLICE_HASHES",
    "ATTR_SOURCE", "BINARY_LABELMAP", "CLOSED_SURFACE", "DEVICES", "DRSegUNetLogic", "DRSegUNetParameters",
    "EXISTING_SEGMENTS", "ExistingSegmentsError", "FineTuneJob", "MODEL_PIXEL_SIZE", "ProcessRunner", "RunningProcess",
    "SETTING_DATA_FOLDER", "SETTING_DEVICE", "SETTING_PIXEL_SIZE", "SegmentWriter", "SegmentationJob",
    "SubprocessRunner", "_", "ijkToRasArray", "pixelSizeText", "reportRows", "setSegmentTerminology",
    "sitkImageFromVolumeNode", "spinBoxPixelSize", "translate", "volumeNodeFromSitkImage",
]
