"""What the module does once Slicer has started: load our terminology, register the sample CT.

Both run from the module's ``startupCompleted()`` handler and do nothing outside the
application (``slicer-core``, the headless script in plain Python).
"""
import hashlib
import logging
from pathlib import Path
from typing import Optional

import slicer

from DRSegUNetLib.vocabulary import TERMINOLOGY_FILE_NAME

RESOURCES = Path(__file__).resolve().parent.parent / "Resources"
TERMINOLOGY_FILE = RESOURCES / TERMINOLOGY_FILE_NAME  # made from DRSegUNetLib.vocabulary (a test checks it)
SAMPLE_CATEGORY = "DRSegUNet"
SAMPLE_NAME = "DRSegUNet COVID-19 chest CT slice"
SAMPLE_NODE_NAME = "DRSegUNet sample CT"


def loadTerminology(terminologiesLogic=None) -> Optional[str]:
    """Load our ``.term.json`` into Slicer's terminologies; returns its context name, None without the module.

    ``terminologiesLogic``: default ``slicer.modules.terminologies.logic()`` when that module exists.
    """
    if terminologiesLogic is None:
        module = getattr(getattr(slicer, "modules", None), "terminologies", None)
        if module is None:
            return None
        terminologiesLogic = module.logic()
    name = terminologiesLogic.LoadTerminologyFromFile(str(TERMINOLOGY_FILE))
    if not name:
        logging.warning("DRSegUNet: could not load the terminology %s", TERMINOLOGY_FILE)
        return None
    return name


def sampleDataSource() -> dict:
    """The keyword arguments of ``SampleDataLogic.registerCustomSampleDataSource`` for the bundled CT slice.

    A local file URI: Sample Data copies the file into its cache (checking its SHA-256) and
    loads it as a volume. ``loadFileType`` (not ``loadFileTypes``): the name Slicer 5.6 knows,
    which 5.8+ still accept.
    """
    import DRSegUNetLib

    path = DRSegUNetLib.sample_ct_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return dict(
        category=SAMPLE_CATEGORY,
        sampleName=SAMPLE_NAME,
        uris=[path.resolve().as_uri()],
        fileNames=[path.name],
        nodeNames=[SAMPLE_NODE_NAME],
        thumbnailFileName=str(RESOURCES / "Icons" / "DRSegUNet.png"),
        loadFileType="VolumeFile",
        loadFileProperties={"singleFile": True},  # this one DICOM file, not its folder
        checksums=[f"SHA256:{digest}"],
    )


def registerSampleData() -> bool:
    """Add the bundled CT slice to the Sample Data module; False (nothing done) outside the application."""
    if getattr(slicer, "app", None) is None:
        return False
    try:
        import SampleData
    except ImportError:
        return False
    SampleData.SampleDataLogic.registerCustomSampleDataSource(**sampleDataSource())
    return True
