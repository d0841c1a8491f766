"""DRSegUNetLogic: segment, report, accept corrections and fine-tune, on MRML nodes, without any GUI."""
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import slicer
import SimpleITK as sitk
import vtk

import DRSegUNetLib
from DRSegUNetLib.orientation import axial_view
from DRSegUNetLib.report import next_slice_to_check
from DRSegUNetLib.store import HOME_ENV, CorrectionsStore, ModelStore, default_home
from DRSegUNetLib.vocabulary import CONSOLIDATION_NAME, GGO_NAME, INFECTION_NAME, LUNG, LUNG_NAME, SEGMENTS

from .commands import libraryCommand, libraryEnvironment, pythonExecutable, temporaryFolder
from .constants import (ATTR_ACCEPTED, ATTR_SLICE_HASHES, ATTR_SOURCE, ATTR_UNCERTAINTY, BINARY_LABELMAP, DEVICES,
                        EXISTING_SEGMENTS, SETTING_DATA_FOLDER)
from .conversions import sitkImageFromVolumeNode
from .i18n import _
from .jobs import FineTuneJob, SegmentationJob
from .parameters import DRSegUNetParameters, parameterNode
from .processes import ProcessRunner, RunningProcess, SubprocessRunner
from .segments import SegmentWriter, segmentIdsAndNames, sliceHash, sourceIdentity, sourceRepresentationName

_REQUIREMENTS = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"


def libraryPredictor(modelPath: str, device: str):
    """A ``predictorFactory`` that runs DRSegUNetLib's Predictor inside this process (see DRSegUNetLogic)."""
    from DRSegUNetLib.inference import Predictor  # torch loads here, on first use

    return Predictor.from_checkpoint(modelPath, device=device)


class ExistingSegmentsError(ValueError):
    """The output segmentation already has segments a run would write (our names or IDs); say what to do with them."""

    def __init__(self, message: str, segmentIds: Sequence[str]):
        super().__init__(message)
        self.segmentIds = list(segmentIds)


class DRSegUNetLogic:
    """Segment, report, accept corrections and fine-tune, on MRML nodes, without any GUI.

    Args:
        scene: the MRML scene (default ``slicer.mrmlScene``).
        dataFolder: where the model versions and the corrections live (default: :meth:`defaultDataFolder`).
        modelStore / correctionsStore: default in the data folder.
        processRunner: starts the segment-stream and fine-tuning processes (default :class:`SubprocessRunner`).
        predictorFactory: ``(modelPath, device) -> Predictor`` to segment in a worker thread of
            this process (tests, scripts); None (default): a separate process runs the network
            (``python -m DRSegUNetLib segment-stream``, see :class:`SegmentationJob`).
    """

    def __init__(self, scene=None, modelStore: Optional[ModelStore] = None,
                 correctionsStore: Optional[CorrectionsStore] = None, processRunner: Optional[ProcessRunner] = None,
                 predictorFactory: Optional[Callable[[str, str], Any]] = None, dataFolder: Optional[str] = None):
        self.scene = scene if scene is not None else slicer.mrmlScene
        self.dataFolder = Path(dataFolder) if dataFolder else self.defaultDataFolder()
        # `is None`, not `or`: an empty corrections store is falsy (it has a length).
        self.modelStore = modelStore if modelStore is not None else ModelStore(
            self.dataFolder / "models", bundled=DRSegUNetLib.default_model_path())
        self.correctionsStore = correctionsStore if correctionsStore is not None else CorrectionsStore(
            self.dataFolder / "corrections")
        self.processRunner = processRunner if processRunner is not None else SubprocessRunner()
        self.predictorFactory = predictorFactory
        self.segments = SegmentWriter(self.scene)  # plans, makes and writes our segments (segments.py)
        self._installing = False
        self.installingChanged: Optional[Callable[[bool], None]] = None  # called when :attr:`installing` changes
        self._segmentationsLogic = None
        if getattr(getattr(slicer, "modules", None), "segmentations", None) is None:
            # Outside the application nothing has registered the segment representations yet.
            self._segmentationsLogic = slicer.vtkSlicerSegmentationsModuleLogic()
            self._segmentationsLogic.SetMRMLScene(self.scene)

    # -- where things are kept
    @staticmethod
    def defaultDataFolder() -> Path:
        """Where model versions and corrections live unless the caller says otherwise.

        ``$DRSEGUNET_HOME``; else, inside Slicer, the folder of the ``DRSegUNet/DataFolder``
        setting (the panel's *Data folder*), else ``DRSegUNet`` in Slicer's local per-user data
        folder (Qt's AppLocalDataLocation: ``%LOCALAPPDATA%\\slicer.org\\Slicer`` on Windows, not the
        roaming profile), unless the folder earlier versions used (beside Slicer's settings file)
        already holds a store; else (plain Python) the library's per-user default.
        """
        if os.environ.get(HOME_ENV):
            return default_home()
        app = getattr(slicer, "app", None)
        if app is None:
            return default_home()
        setting = app.userSettings().value(SETTING_DATA_FOLDER)
        if setting:
            return Path(str(setting)).expanduser()
        legacy = Path(app.slicerUserSettingsFilePath).parent / "DRSegUNet"
        local = _slicerLocalDataFolder(app) / "DRSegUNet"
        if not local.exists() and any((legacy / sub).is_dir() for sub in ("models", "corrections")):
            return legacy  # what earlier versions wrote stays where it is
        return local

    def setDataFolder(self, folder: str) -> None:
        """Keep model versions and corrections in ``folder`` from now on (new stores there; nothing is moved)."""
        folder = Path(folder).expanduser()
        if not str(folder).strip() or str(folder) == ".":
            raise ValueError(_("Choose a folder for the models and corrections."))
        self.dataFolder = folder
        self.modelStore = ModelStore(folder / "models", bundled=DRSegUNetLib.default_model_path())
        self.correctionsStore = CorrectionsStore(folder / "corrections")

    temporaryFolder = staticmethod(temporaryFolder)

    # -- requirements
    @property
    def installing(self) -> bool:
        """True while :meth:`setupPythonRequirements` installs torch or pip packages (the panel disables
        Segment, Accept and Fine-tune and says so; a second call meanwhile raises)."""
        return self._installing

    def _setInstalling(self, value: bool) -> None:
        self._installing = bool(value)
        if self.installingChanged is not None:
            self.installingChanged(self._installing)

    @staticmethod
    def installedTorchVersion() -> Optional[str]:
        """The installed torch's version from its package metadata (without importing it), or None."""
        import importlib.metadata

        try:
            return importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            return None

    def setupPythonRequirements(self, askUser: Callable[[str], bool], withTorch: bool = True) -> None:
        """Install or upgrade torch (PyTorch extension, ``torch>=DRSegUNetLib.MIN_TORCH``) and
        Resources/requirements.txt, after asking. Slicer only.

        :attr:`installing` is True while an install runs; calling again meanwhile (a second
        click while pip runs and Slicer processes events) raises a RuntimeError.
        """
        if self._installing:
            raise RuntimeError(_("Python packages are being installed: wait for the installation to finish."))
        if getattr(slicer, "app", None) is None:
            return  # plain Python: the environment is the caller's
        if withTorch:
            self._setupTorch(askUser)
        missing = self.missingRequirements()
        if missing:
            if not askUser(_("DRSegUNet needs these Python packages: {p}. Install them now?").format(p=", ".join(missing))):
                raise RuntimeError(_("Required Python packages were not installed: {p}").format(p=", ".join(missing)))
            self._setInstalling(True)
            try:
                slicer.util.pip_install(missing)
            finally:
                self._setInstalling(False)

    def _setupTorch(self, askUser: Callable[[str], bool]) -> None:
        """torch at least ``DRSegUNetLib.MIN_TORCH``: installed or upgraded with PyTorch Utils after asking."""
        import importlib.util

        minimum = DRSegUNetLib.MIN_TORCH
        version = self.installedTorchVersion()
        if version is None and importlib.util.find_spec("torch") is not None:
            return  # importable without package metadata (a source build): the library checks it when it loads
        if version is not None and DRSegUNetLib.torch_version_problem(version) is None:
            return
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            if version is None:
                raise RuntimeError(_("DRSegUNet needs the PyTorch extension: install it from the Extensions Manager."))
            raise RuntimeError(_("DRSegUNet needs PyTorch {minimum} or newer and PyTorch {version} is installed: "
                                 "install the PyTorch extension from the Extensions Manager to upgrade it.").format(
                minimum=minimum, version=version))
        if version is None:
            question = _("DRSegUNet needs PyTorch ({minimum} or newer), which will now be downloaded and installed "
                         "(this may take several minutes). Continue?").format(minimum=minimum)
            declined = _("PyTorch is required; installation was declined.")
        else:
            question = _("DRSegUNet needs PyTorch {minimum} or newer and PyTorch {version} is installed. Upgrade it "
                         "now (this may take several minutes; other modules that use PyTorch get the new version "
                         "too)?").format(minimum=minimum, version=version)
            declined = _("DRSegUNet needs PyTorch {minimum} or newer (PyTorch {version} is installed); the upgrade "
                         "was declined.").format(minimum=minimum, version=version)
        if not askUser(question):
            raise RuntimeError(declined)
        self._setInstalling(True)
        try:
            installed = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=">=" + minimum)
        finally:
            self._setInstalling(False)
        if installed is None:
            raise RuntimeError(_("PyTorch could not be installed; use the PyTorch Utils module."))
        now = self.installedTorchVersion()
        if now is not None and DRSegUNetLib.torch_version_problem(now) is not None:
            raise RuntimeError(_("PyTorch {version} is still installed and DRSegUNet needs {minimum} or newer: "
                                 "upgrade it with the PyTorch Utils module.").format(version=now, minimum=minimum))
        loaded = getattr(sys.modules.get("torch"), "__version__", None)
        if loaded is not None and DRSegUNetLib.torch_version_problem(str(loaded)) is not None:
            raise RuntimeError(_("PyTorch {version} is installed; this Slicer session still has PyTorch {old} "
                                 "loaded: restart Slicer.").format(version=now, old=loaded))

    @staticmethod
    def missingRequirements() -> List[str]:
        """Requirement lines of Resources/requirements.txt that are not installed (or too old)."""
        import importlib.metadata

        missing = []
        for line in _REQUIREMENTS.read_text().splitlines() if _REQUIREMENTS.exists() else []:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                from packaging.requirements import Requirement

                req = Requirement(line)
                name, spec = req.name, req.specifier
            except ImportError:
                name, spec = line.split(">")[0].split("=")[0].split("<")[0].strip(), None
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                missing.append(line)
                continue
            if spec is not None and version not in spec:
                missing.append(line)
        return missing

    # -- models
    def modelPath(self, model: Any = None) -> str:
        """A checkpoint path from a version number, a path, or None (the active version)."""
        if model is None:
            return str(self.modelStore.active().path)
        if isinstance(model, int) or (isinstance(model, str) and model.isdigit()):
            return str(self.modelStore.path_of(int(model)))
        return str(model)

    @staticmethod
    def fineTuneDefaults() -> Dict[str, Any]:
        """Level-2 defaults (training steps, learning rate, frozen layers, gate tolerance) from the library's config."""
        from DRSegUNetLib.config import FineTuneConfig

        cfg = FineTuneConfig()
        return {"steps": int(cfg.steps), "lr": float(cfg.lr), "frozen_layers": int(cfg.frozen_layers),
                "tolerance": float(cfg.tolerance)}

    # -- segmentation
    def existingSegments(self, segmentationNode) -> List[str]:
        """IDs of the segments of ``segmentationNode`` that have our segment IDs or names ("Lung", ...)."""
        return self.segments.existingSegments(segmentationNode)

    def plannedSegments(self, segmentationNode, existing: str = "replace") -> Dict[str, Tuple[str, str]]:
        """Our segment id → (segment ID, name) a run writes (:meth:`SegmentWriter.plannedSegments`)."""
        return self.segments.plannedSegments(segmentationNode, existing)

    def segmentIdsOf(self, segmentationNode) -> Dict[str, str]:
        """Our segment id → the segment's ID in ``segmentationNode`` (the last run's, else by our ID or name)."""
        return self.segments.segmentIdsOf(segmentationNode)

    def checkOutputSegmentation(self, segmentationNode, existing: str) -> None:
        """Refuse an output a run cannot write into without loss (see :meth:`startSegmentation`)."""
        if segmentationNode is None:
            return
        if existing not in EXISTING_SEGMENTS:
            raise ValueError(f"existing must be one of {', '.join(EXISTING_SEGMENTS)}, not {existing!r}")
        clashing = self.existingSegments(segmentationNode)
        if clashing and existing == "ask":
            names = [segmentationNode.GetSegmentation().GetSegment(i).GetName() for i in clashing]
            raise ExistingSegmentsError(_(
                "'{node}' already has the segments {names}: replace them or keep both.").format(
                node=segmentationNode.GetName(), names=", ".join(f"'{n}'" for n in names)), clashing)
        segmentation = segmentationNode.GetSegmentation()
        source = sourceRepresentationName(segmentation)
        if source != BINARY_LABELMAP:
            staying = [n for i, n in segmentIdsAndNames(segmentation) if existing != "replace" or i not in clashing]
            if staying:
                raise ValueError(_(
                    "'{node}' stores its segments as '{source}' (its source representation) and DRSegUNet writes "
                    "binary labelmaps: switching would remake {names} from labelmaps. Choose \"Create new "
                    "segmentation\", or make Binary labelmap the source representation in the Segmentations "
                    "module first.").format(node=segmentationNode.GetName(), source=source,
                                            names=", ".join(f"'{n}'" for n in staying)))

    @staticmethod
    def defaultPixelSize() -> float:
        """The working pixel size (mm) of models that do not carry their own; 0 = the CT's own grid.
        A checkpoint's own (``ModelConfig.inference``) applies where a run passes ``pixelMM=None``,
        the panel's default ("model's own")."""
        from DRSegUNetLib.config import InferenceConfig

        return float(InferenceConfig().pixel_mm or 0.0)

    @staticmethod
    def _checkPixelSize(pixelMM: Optional[float]) -> None:
        if pixelMM is not None:
            from DRSegUNetLib.config import PIXEL_MM_RANGE, check_pixel_mm

            try:
                check_pixel_mm(float(pixelMM), "pixel size")
            except ValueError:
                raise ValueError(_("The working pixel size must be 0 (the CT's own grid) or from {low} to {high} mm.").format(
                    low=PIXEL_MM_RANGE[0], high=PIXEL_MM_RANGE[1])) from None

    def startSegmentation(self, volumeNode, segmentationNode=None, model: Any = None, device: str = "auto",
                          pixelMM: Optional[float] = None, existing: str = "ask") -> SegmentationJob:
        """Start segmenting ``volumeNode`` into ``segmentationNode`` (new if None); poll the returned job.

        ``pixelMM``: the working pixel size in mm the network sees each axial slice at (0: the
        CT's own grid; None: the model's own, saved in its checkpoint; :meth:`defaultPixelSize`
        for models that do not say). Labels are always written on the volume's own grid.

        ``existing``: what to do when ``segmentationNode`` already has segments with our names
        or IDs ("Lung", "Consolidation", "Ground-glass opacity"): "ask" (default) raises
        :class:`ExistingSegmentsError` so the caller can ask the user; "keep" keeps them and
        adds ours as "Lung (DRSegUNet 2)" and so on; "replace" removes them, but only once the
        first slice has arrived, so a run that fails to start loses nothing. Nothing is
        written into the segmentation before that first slice.

        Slices of this volume accepted as corrections come back as accepted, and pull the
        slices near them toward what they say (``DRSegUNetLib.guidance``).

        A segmentation whose source representation is not a binary labelmap (closed
        surfaces) is switched to binary labelmap when that remakes none of the user's segments
        (it has none that stay), else refused with a ValueError.
        """
        if volumeNode is None:
            raise ValueError(_("Select an input CT volume."))
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
        self._checkPixelSize(pixelMM)
        self.checkOutputSegmentation(segmentationNode, existing)
        modelPath = self.modelPath(model)
        if not os.path.isfile(modelPath):
            raise ValueError(_("Model file not found: {path}").format(path=modelPath))
        image = sitkImageFromVolumeNode(volumeNode)
        if segmentationNode is None:
            segmentationNode = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volumeNode.GetName()} DRSegUNet")
        # Slices accepted from this volume guide their neighbours (DRSegUNetLib.guidance).
        corrections = str(self.correctionsStore.root) if self.correctionsStore.root.is_dir() else None
        return SegmentationJob(volumeNode, segmentationNode, image, modelPath, device, pixelMM,
                               existing="replace" if existing == "replace" else "keep", segments=self.segments,
                               reportTable=self.reportTable, predictorFactory=self.predictorFactory,
                               startLibrary=self.startLibrary, temporaryFolder=self.temporaryFolder(),
                               corrections=corrections)

    def segment(self, volumeNode, segmentationNode=None, model: Any = None, device: str = "auto",
                progress: Optional[Callable[..., None]] = None, cancel: Optional[Callable[[], bool]] = None,
                timeout: Optional[float] = None, pixelMM: Optional[float] = None, existing: str = "ask",
                **pollArgs) -> SegmentationJob:
        """Segment and wait (headless use). Raises the worker's error if it failed."""
        job = self.startSegmentation(volumeNode, segmentationNode, model, device, pixelMM, existing)
        job.wait(progress=progress, cancel=cancel, timeout=timeout, **pollArgs)
        job.raiseIfFailed()
        return job

    sourceIdentity = staticmethod(sourceIdentity)

    def reportTable(self, report: Dict[str, Any], tableNode=None):
        """Fill a table node with volume (mL) and % of lung per region, and per lung when separable."""
        if tableNode is None:
            tableNode = self.scene.AddNewNodeByClass("vtkMRMLTableNode", "DRSegUNet report")
        table = tableNode.GetTable()
        table.Initialize()
        columns = [vtk.vtkStringArray(), vtk.vtkDoubleArray(), vtk.vtkDoubleArray()]
        for column, name in zip(columns, ("Region", "Volume (mL)", "% of lung")):
            column.SetName(name)
            table.AddColumn(column)
        for region, volume, percent in reportRows(report):
            row = table.InsertNextBlankRow()
            table.SetValue(row, 0, vtk.vtkVariant(region))
            table.SetValue(row, 1, vtk.vtkVariant(volume))
            table.SetValue(row, 2, vtk.vtkVariant(float("nan") if percent is None else percent))
        tableNode.Modified()
        return tableNode

    # -- corrections
    def labelsFromSegmentation(self, segmentationNode, volumeNode) -> np.ndarray:
        """The segmentation in our label vocabulary on the volume's (z, y, x) grid.

        "Lung" → 3, then "Ground-glass opacity" → 1, then "Consolidation" → 2 (later wins);
        the segments of the last DRSegUNet run (see :meth:`segmentIdsOf`).
        """
        segmentIds = self.segmentIdsOf(segmentationNode)
        labels = np.zeros(volumeNode.GetImageData().GetDimensions()[::-1], dtype=np.uint8)
        for s in sorted(SEGMENTS, key=lambda s: -len(s.labels)):  # the lung field first, lesions over it
            segmentId = segmentIds.get(s.segment_id)
            if segmentId:
                labels[self.segments.exportSegment(segmentationNode, segmentId, volumeNode) > 0] = \
                    s.labels[0] if len(s.labels) == 1 else LUNG
        return labels

    def acceptCorrections(self, volumeNode, segmentationNode, sliceRange: Optional[Tuple[int, int]] = None,
                          checkedClasses: Optional[Sequence[str]] = None) -> List[str]:
        """Store corrected axial slices, with their CT, as training pairs; returns the new ids.

        Args:
            sliceRange: (first, last) axial slice indices, inclusive, counted from the most
                inferior slice (0); None stores the slices that differ from what was last
                predicted or accepted.
            checkedClasses: the segments the user checked on these slices, as class names
                ("ggo", "consolidation", "lung"); None or all three: every label is checked.
                Fine-tuning then trains only on what was checked (a pixel outside the
                checked segments is known only not to be one of them).
        """
        from DRSegUNetLib.orientation import axial_spacing
        from DRSegUNetLib.vocabulary import BACKGROUND_NAME, CLASS_NAMES, INFECTION_NAME

        if volumeNode is None or segmentationNode is None:
            raise ValueError(_("Select the CT volume and its segmentation."))
        known = None
        if checkedClasses is not None:
            segmentClasses = [c for c in CLASS_NAMES if c != BACKGROUND_NAME]
            unknown = sorted(set(checkedClasses) - set(segmentClasses) - {INFECTION_NAME})
            if unknown:
                raise ValueError(_("Unknown segment classes: {names}.").format(names=", ".join(unknown)))
            if not checkedClasses:
                raise ValueError(_("Check at least one segment you corrected."))
            if not set(checkedClasses) >= set(segmentClasses):
                known = tuple(c for c in segmentClasses + [INFECTION_NAME] if c in set(checkedClasses))
        image = sitkImageFromVolumeNode(volumeNode)
        ct = axial_view(sitk.GetArrayViewFromImage(image), image.GetDirection())[0]
        labels = axial_view(self.labelsFromSegmentation(segmentationNode, volumeNode), image.GetDirection())[0]
        hashes = [sliceHash(s) for s in labels]
        if sliceRange is not None:
            first, last = max(0, int(sliceRange[0])), min(len(hashes) - 1, int(sliceRange[1]))
            if first > last:
                raise ValueError(_("Empty slice range."))
            chosen = list(range(first, last + 1))
        else:
            stored = segmentationNode.GetAttribute(ATTR_SLICE_HASHES)
            if not stored:
                raise ValueError(_("This segmentation was not made by DRSegUNet in this scene: "
                                   "choose a slice range to accept."))
            before = json.loads(stored)
            if len(before) != len(hashes):
                raise ValueError(_("The segmentation does not match this volume's slices: choose a slice range."))
            chosen = [n for n, (a, b) in enumerate(zip(before, hashes)) if a != b]
        spacing = axial_spacing(image.GetSpacing(), image.GetDirection())
        source = segmentationNode.GetAttribute(ATTR_SOURCE) or self.sourceIdentity(volumeNode, image)
        ids = [self.correctionsStore.add(np.asarray(ct[n]), np.asarray(labels[n]), spacing, source, n, known=known)
               for n in chosen]
        segmentationNode.SetAttribute(ATTR_SLICE_HASHES, json.dumps(hashes))  # accepted = the new baseline
        accepted = set(json.loads(segmentationNode.GetAttribute(ATTR_ACCEPTED) or "[]")) | set(chosen)
        segmentationNode.SetAttribute(ATTR_ACCEPTED, json.dumps(sorted(accepted)))
        return ids

    # -- where to correct next
    @staticmethod
    def sliceUncertainty(segmentationNode) -> List[float]:
        """Per axial slice (0 = most inferior) the model's uncertainty when it segmented
        (``DRSegUNetLib.inference.slice_uncertainty``); empty if unknown."""
        text = segmentationNode.GetAttribute(ATTR_UNCERTAINTY) if segmentationNode is not None else None
        return [float(u) for u in json.loads(text)] if text else []

    def nextSliceToCheck(self, segmentationNode) -> Optional[int]:
        """The axial slice to correct next (``DRSegUNetLib.report.next_slice_to_check``): the most
        uncertain of the lung slices far from those already accepted; None when all are accepted."""
        uncertainty = self.sliceUncertainty(segmentationNode)
        accepted = json.loads(segmentationNode.GetAttribute(ATTR_ACCEPTED) or "[]")
        return next_slice_to_check(uncertainty, accepted)

    @staticmethod
    def axialSliceCenterRAS(volumeNode, index: int) -> Tuple[float, float, float]:
        """RAS of the centre of axial slice ``index`` (as counted by the library's axial view)."""
        dims = volumeNode.GetImageData().GetDimensions()
        ijk = _axialSliceVoxel(volumeNode, dims, int(index))
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        ras = matrix.MultiplyPoint((float(ijk[0]), float(ijk[1]), float(ijk[2]), 1.0))
        return float(ras[0]), float(ras[1]), float(ras[2])

    def jumpToSlice(self, volumeNode, index: int) -> Tuple[float, float, float]:
        """Move every slice view to axial slice ``index`` of ``volumeNode``; returns the RAS point."""
        r, a, s = self.axialSliceCenterRAS(volumeNode, index)
        slicer.vtkMRMLSliceNode.JumpAllSlices(self.scene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        return r, a, s

    # -- Segment Editor
    SEGMENT_EDITOR_SINGLETON_TAG = "SegmentEditor"  # the node the Segment Editor module uses (SegmentEditor.py)

    def setUpSegmentEditor(self, segmentationNode, volumeNode, segmentId: Optional[str] = None):
        """Point the Segment Editor module's node at this segmentation and CT, with overlap allowed.

        *Lung* overlaps the lesion segments, so the overwrite mode is "Allow overlap"
        (``OverwriteNone``): with Slicer's default, painting one segment erases the others under
        the brush. Returns the ``vtkMRMLSegmentEditorNode``; the widget then opens the module.
        """
        if segmentationNode is None or volumeNode is None:
            raise ValueError(_("Select the CT volume and its segmentation."))
        editorNode = self.scene.GetSingletonNode(self.SEGMENT_EDITOR_SINGLETON_TAG, "vtkMRMLSegmentEditorNode")
        if editorNode is None:
            editorNode = slicer.vtkMRMLSegmentEditorNode()
            editorNode.SetSingletonTag(self.SEGMENT_EDITOR_SINGLETON_TAG)
            editorNode = self.scene.AddNode(editorNode)
        editorNode.SetAndObserveSegmentationNode(segmentationNode)
        if hasattr(editorNode, "SetAndObserveSourceVolumeNode"):  # Slicer 5.4+
            editorNode.SetAndObserveSourceVolumeNode(volumeNode)
        else:
            editorNode.SetAndObserveMasterVolumeNode(volumeNode)
        editorNode.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
        if segmentId is None:
            segmentId = self.segmentIdsOf(segmentationNode).get(SEGMENTS[0].segment_id)
        if segmentId:
            editorNode.SetSelectedSegmentID(segmentId)
        return editorNode

    # -- the panel's choices, saved with the scene
    def getParameterNode(self):
        """The module's ``vtkMRMLScriptedModuleNode`` in this scene (made if missing)."""
        return parameterNode(self.scene)

    def parameters(self) -> DRSegUNetParameters:
        """Input, output, model, device and working pixel size, read from and written to :meth:`getParameterNode`."""
        return DRSegUNetParameters(self.getParameterNode())

    @staticmethod
    def pixelSizeRange() -> Tuple[float, float]:
        """The working pixel sizes (mm) accepted besides 0 (the CT's own grid) and None (the model's own)."""
        from DRSegUNetLib.config import PIXEL_MM_RANGE

        return float(PIXEL_MM_RANGE[0]), float(PIXEL_MM_RANGE[1])

    # -- fine-tuning
    pythonExecutable = staticmethod(pythonExecutable)
    libraryCommand = staticmethod(libraryCommand)
    libraryEnvironment = staticmethod(libraryEnvironment)

    def startLibrary(self, *args: str) -> RunningProcess:
        """Start ``python -m DRSegUNetLib ARGS`` with :attr:`processRunner` (see :mod:`DRSegUNetSlicer.commands`)."""
        return self.processRunner.start(self.libraryCommand(*args), self.libraryEnvironment())

    def fineTuneCommand(self, steps: int, lr: float, device: str = "auto", pixelMM: Optional[float] = None) -> List[str]:
        """The level-2 command: from the active model, on the corrections store, into the model store.
        The command makes the new version active only if it passes the gate (reference slices and
        held-out corrections no worse; DRSegUNetLib.adaptation).

        ``pixelMM``: the working pixel size to train at, which the new model carries (as
        :meth:`startSegmentation`; None: the active model's own)."""
        command = self.libraryCommand(
            "finetune", "--model", str(self.modelStore.active().path),
            "--corrections", str(self.correctionsStore.root), "--store", str(self.modelStore.root),
            "--steps", str(int(steps)), "--lr", repr(float(lr)), "--device", device, "--json-progress")
        if pixelMM is not None:
            command += ["--pixel-mm", repr(float(pixelMM))]
        return command

    def startFineTune(self, steps: int, lr: float, device: str = "auto", pixelMM: Optional[float] = None) -> FineTuneJob:
        """Start fine-tuning (level 2) the active model on the accepted corrections; poll the returned job."""
        if len(self.correctionsStore) == 0:
            raise ValueError(_("No accepted corrections yet: accept corrected slices first."))
        if steps < 1 or lr <= 0:
            raise ValueError(_("Training steps must be at least 1 and the learning rate positive."))
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
        self._checkPixelSize(pixelMM)
        parent = self.modelStore.active()
        process = self.processRunner.start(self.fineTuneCommand(steps, lr, device, pixelMM), self.libraryEnvironment())
        return FineTuneJob(process, parent, self.modelStore)

    # -- files
    def loadSegmentation(self, path: str, name: Optional[str] = None):
        """Read a .seg.nrrd into a new segmentation node with the storage node (inside and outside the application)."""
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or Path(path).name.split(".")[0])
        storage = slicer.vtkMRMLSegmentationStorageNode()
        self.scene.AddNode(storage)
        try:
            storage.SetFileName(str(path))
            if not storage.ReadData(node):
                self.scene.RemoveNode(node)
                raise RuntimeError(f"could not read {path}")
        finally:
            self.scene.RemoveNode(storage)
        return node

    def saveSegmentation(self, segmentationNode, path: str) -> None:
        """Write a .seg.nrrd with the storage node (works inside and outside the application)."""
        storage = slicer.vtkMRMLSegmentationStorageNode()
        self.scene.AddNode(storage)
        try:
            storage.SetFileName(str(path))
            if not storage.WriteData(segmentationNode):
                raise RuntimeError(f"could not write {path}")
        finally:
            self.scene.RemoveNode(storage)


def _slicerLocalDataFolder(app) -> Path:
    """Qt's AppLocalDataLocation for Slicer (``<base>/<organization>/<application>``), computed without qt."""
    from DRSegUNetLib.store import platform_data_folder

    organization = str(getattr(app, "organizationName", "") or "slicer.org")
    application = str(getattr(app, "applicationName", "") or "Slicer")
    return platform_data_folder(roaming=False) / organization / application


def _axialSliceVoxel(volumeNode, dims: Sequence[int], index: int) -> Tuple[int, int, int]:
    """(i, j, k) of the centre voxel of axial slice ``index`` of the library's axial view."""
    from DRSegUNetLib.orientation import axial_view

    from .conversions import _RAS_TO_LPS, ijkToRasArray

    axes = (_RAS_TO_LPS @ ijkToRasArray(volumeNode))[:3, :3]
    direction = [float(d) for d in (axes / np.linalg.norm(axes, axis=0)).ravel()]  # as sitkImageFromVolumeNode
    kji = np.indices(tuple(dims[::-1]), sparse=True)
    grids = [np.broadcast_to(g, tuple(dims[::-1])) for g in kji]
    views = [axial_view(g, direction)[0][index] for g in grids]  # (rows, cols) of k, j, i
    rows, cols = views[0].shape
    k, j, i = (int(v[rows // 2, cols // 2]) for v in views)
    return i, j, k


def reportRows(report: Dict[str, Any]) -> List[Tuple[str, float, Optional[float]]]:
    """(region, volume mL, % of lung) rows of a ``compute_report`` dict, whole lungs then each lung."""
    names = ((GGO_NAME, "GGO"), (CONSOLIDATION_NAME, "Consolidation"), (INFECTION_NAME, "Total infection"),
             (LUNG_NAME, "Lung field"))

    def rows(stats: Dict[str, Any], prefix: str) -> List[Tuple[str, float, Optional[float]]]:
        out = []
        for key, name in names:
            volume = stats["volume_ml"].get(key)
            if volume is None:
                continue
            percent = 100.0 if key == LUNG_NAME else stats["percent_of_lung"].get(key)
            out.append((prefix + name, float(volume), None if percent is None else float(percent)))
        return out

    result = rows(report, "")
    for side, stats in (report.get("per_lung") or {}).items():
        result += rows(stats, f"{side.capitalize()} lung: ")
    return result
