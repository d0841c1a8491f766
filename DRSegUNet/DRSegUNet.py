"""DRSegUNet: COVID-19 lung infection segmentation on chest CT (3D Slicer scripted module).

The widget only binds the .ui to :class:`DRSegUNetLogic`; the logic runs without a GUI
(headless script, tests against slicer-core) and everything else is in ``DRSegUNetLib``.
"""
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import hashlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

try:
    from slicer.i18n import tr as _
except ImportError:  # slicer-core outside the application has no i18n
    def _(text: str) -> str:
        return text


def _ensureLibraryImportable() -> None:
    """Loaded through "Additional module paths" from a checkout, DRSegUNetLib sits in ``..``."""
    try:
        import DRSegUNetLib  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_ensureLibraryImportable()

# Only pure-Python, torch-free parts of the library are imported here; torch loads on first use.
from DRSegUNetLib.orientation import axial_view  # noqa: E402
from DRSegUNetLib.store import CorrectionsStore, ModelStore, ModelVersion  # noqa: E402
from DRSegUNetLib.vocabulary import LUNG, SEGMENTS  # noqa: E402

ATTR_SLICE_HASHES = "DRSegUNet.SliceHashes"  # per axial slice: hash of the labels last predicted or accepted
ATTR_MODEL = "DRSegUNet.Model"
ATTR_SOURCE = "DRSegUNet.Source"
ATTR_REPORT = "DRSegUNet.Report"
_BINARY_LABELMAP = "Binary labelmap"  # vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
DEVICES = ("auto", "cpu", "cuda")


#
# DRSegUNet
#


class DRSegUNet(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DRSegUNet")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["DRSegUNet maintainers"]
        self.parent.helpText = _(
            "Segments ground-glass opacity, consolidation and the lung field on chest CT with DRSegUNet, "
            "reports volumes and % of lung involved, stores your corrections and fine-tunes the model on them "
            "(level 2). See the extension's README."
        )
        self.parent.acknowledgementText = _(
            "DRSegUNet is a research tool, not a medical device. Test data: Chest Imaging Platform (COPDGene)."
        )


#
# DRSegUNetWidget
#


class DRSegUNetWidget(ScriptedLoadableModuleWidget):
    """Binds the .ui to the logic; long work is polled from a timer so the GUI never blocks."""

    FILE_MODEL = -1  # item data of the "model from a file" entry

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None
        self._job = None
        self._fineTune = None
        self._timer = None

    def setup(self):
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DRSegUNet.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DRSegUNetLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self.onTimer)

        for device in DEVICES:
            self.ui.deviceComboBox.addItem(device)
        defaults = self.logic.fineTuneDefaults()
        self.ui.epochsSpinBox.value = defaults["epochs"]
        self.ui.learningRateSpinBox.value = defaults["lr"]

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.updateButtons)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.setActiveModelButton.connect("clicked(bool)", self.onSetActiveModel)
        self.ui.acceptCorrectionsButton.connect("clicked(bool)", self.onAcceptCorrections)
        self.ui.fineTuneButton.connect("clicked(bool)", self.onFineTune)
        self.ui.cancelFineTuneButton.connect("clicked(bool)", self.onCancelFineTune)
        self.refreshModels()
        self.updateButtons()

    def cleanup(self):
        if self._timer:
            self._timer.stop()
        for job in (self._job, self._fineTune):
            if job is not None and not job.finished:
                job.cancel()

    def enter(self):
        self.refreshModels()
        self.updateButtons()

    # -- state shown in the GUI
    def refreshModels(self):
        combo = self.ui.modelComboBox
        combo.blockSignals(True)
        combo.clear()
        active = self.logic.modelStore.active().version
        for v in self.logic.modelStore.versions():
            combo.addItem(v.label + ("  [active]" if v.version == active else ""), v.version)
            if v.version == active:
                combo.setCurrentIndex(combo.count - 1)
        combo.addItem(_("From file..."), self.FILE_MODEL)
        combo.blockSignals(False)
        n = len(self.logic.correctionsStore)
        self.ui.acceptedSlicesLabel.text = _("{n} accepted slices").format(n=n)

    def updateButtons(self, *_args):
        segmenting = self._job is not None and not self._job.finished
        tuning = self._fineTune is not None and not self._fineTune.finished
        fromFile = self.ui.modelComboBox.currentData == self.FILE_MODEL
        self.ui.modelPathLineEdit.visible = fromFile
        self.ui.segmentButton.enabled = bool(self.ui.inputVolumeSelector.currentNode()) and not segmenting
        self.ui.cancelButton.enabled = segmenting
        self.ui.acceptCorrectionsButton.enabled = bool(
            self.ui.inputVolumeSelector.currentNode() and self.ui.outputSegmentationSelector.currentNode()) and not segmenting
        self.ui.fineTuneButton.enabled = not tuning and len(self.logic.correctionsStore) > 0
        self.ui.cancelFineTuneButton.enabled = tuning
        self.ui.setActiveModelButton.enabled = not fromFile and not tuning

    def selectedModelPath(self):
        if self.ui.modelComboBox.currentData == self.FILE_MODEL:
            return self.ui.modelPathLineEdit.currentPath
        return str(self.logic.modelStore.path_of(int(self.ui.modelComboBox.currentData)))

    # -- actions
    def onSegment(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            self.logic.setupPythonRequirements(askUser=self.askUser)
            if not self.ui.outputSegmentationSelector.currentNode():
                self.ui.outputSegmentationSelector.addNode()
            self._job = self.logic.startSegmentation(
                self.ui.inputVolumeSelector.currentNode(), self.ui.outputSegmentationSelector.currentNode(),
                self.selectedModelPath(), self.ui.deviceComboBox.currentText)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Loading the model...")
            self._timer.start()
        self.updateButtons()

    def onCancel(self):
        if self._job is not None:
            self._job.cancel()

    def onSetActiveModel(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to switch the model.")):
            self.logic.modelStore.set_active(int(self.ui.modelComboBox.currentData))
            self.refreshModels()

    def onAcceptCorrections(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to store the corrections."), waitCursor=True):
            sliceRange = None
            if self.ui.acceptRangeRadioButton.checked:
                sliceRange = (self.ui.rangeFirstSpinBox.value - 1, self.ui.rangeLastSpinBox.value - 1)
            ids = self.logic.acceptCorrections(
                self.ui.inputVolumeSelector.currentNode(), self.ui.outputSegmentationSelector.currentNode(), sliceRange)
            self.ui.statusLabel.text = _("Stored {n} corrected slices.").format(n=len(ids))
            self.refreshModels()
        self.updateButtons()

    def onFineTune(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to start fine-tuning."), waitCursor=True):
            self.logic.setupPythonRequirements(askUser=self.askUser)
            self.ui.fineTuneLog.plainText = ""
            self._fineTune = self.logic.startFineTune(
                epochs=self.ui.epochsSpinBox.value, lr=self.ui.learningRateSpinBox.value,
                device=self.ui.deviceComboBox.currentText)
            self._timer.start()
        self.updateButtons()

    def onCancelFineTune(self):
        if self._fineTune is not None:
            self._fineTune.cancel()

    def onTimer(self):
        if self._job is not None and not self._job.finishedAndReported:
            self._pollSegmentation()
        if self._fineTune is not None and not self._fineTune.finishedAndReported:
            self._pollFineTune()
        if all(j is None or j.finishedAndReported for j in (self._job, self._fineTune)):
            self._timer.stop()
        self.updateButtons()

    def _pollSegmentation(self):
        job = self._job
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed.")):
            job.poll()
            self.ui.progressBar.maximum = max(job.total, 1)
            self.ui.progressBar.value = job.step
            self.ui.statusLabel.text = job.message
            if job.finished:
                job.finishedAndReported = True
                if job.tableNode is not None:
                    self.ui.resultsTableView.setMRMLTableNode(job.tableNode)
                job.raiseIfFailed()

    def _pollFineTune(self):
        job = self._fineTune
        with slicer.util.tryWithErrorDisplay(_("Fine-tuning failed.")):
            for line in job.poll():
                self.ui.fineTuneLog.appendPlainText(line)
            self.ui.fineTuneProgressBar.maximum = max(job.total, 1)
            self.ui.fineTuneProgressBar.value = job.step
            if job.finished:
                job.finishedAndReported = True
                self.refreshModels()
                job.raiseIfFailed()

    @staticmethod
    def askUser(message: str) -> bool:
        return slicer.util.confirmOkCancelDisplay(message, _("DRSegUNet: install Python packages"))


#
# Volume <-> SimpleITK (numpy and the IJK-to-RAS matrix; no sitkUtils needed)
#

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ijkToRasArray(volumeNode) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def sitkImageFromVolumeNode(volumeNode):
    """A SimpleITK image (LPS geometry) with a copy of the node's voxels."""
    import SimpleITK as sitk
    from vtk.util import numpy_support

    imageData = volumeNode.GetImageData()
    if imageData is None or imageData.GetPointData().GetScalars() is None:
        raise ValueError(f"volume '{volumeNode.GetName()}' has no image data")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume '{volumeNode.GetName()}' has {imageData.GetNumberOfScalarComponents()} "
                         "components per voxel (RGB?); a CT has one")
    dims = imageData.GetDimensions()
    array = numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(dims[::-1])
    image = sitk.GetImageFromArray(array)
    ijkToLps = _RAS_TO_LPS @ ijkToRasArray(volumeNode)
    axes = ijkToLps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(d) for d in (axes / spacing).ravel()])
    image.SetOrigin([float(o) for o in ijkToLps[:3, 3]])
    return image


def volumeNodeFromSitkImage(image, name: str = "CT", scene=None, nodeClass: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node in ``scene`` with the image's voxels and geometry."""
    import SimpleITK as sitk
    from vtk.util import numpy_support

    scene = scene if scene is not None else slicer.mrmlScene
    array = np.ascontiguousarray(sitk.GetArrayFromImage(image))
    if array.ndim != 3:
        raise ValueError(f"need a 3-D scalar image, got an array of shape {array.shape}")
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    vtkArray = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    imageData.GetPointData().SetScalars(vtkArray)
    lps = np.eye(4)
    lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    ras = _RAS_TO_LPS @ lps
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, ras[r, c])
    node = scene.AddNewNodeByClass(nodeClass, name)
    node.SetIJKToRASMatrix(m)
    node.SetAndObserveImageData(imageData)
    node.CreateDefaultDisplayNodes()
    return node


def axialLayout(shapeZyx: Sequence[int], direction: Sequence[float]) -> Tuple[List[int], Callable[[int], Tuple[slice, ...]]]:
    """Which input array axis each axial-view axis comes from, and where axial slice n lies.

    Returns ``(axes, region)``: ``axes[o]`` is the (z, y, x) axis of view axis ``o``;
    ``region(n)`` is the index expression of axial slice ``n`` in the input array.
    Derived from :func:`DRSegUNetLib.orientation.axial_view`, so it matches ``SliceResult.place``.
    """
    probeShape = axial_view(np.empty((2, 3, 4)), direction)[0].shape
    axes = [{2: 0, 3: 1, 4: 2}[s] for s in probeShape]
    a0 = axes[0]
    index = np.broadcast_to(np.arange(shapeZyx[a0]).reshape([-1 if a == a0 else 1 for a in range(3)]), tuple(shapeZyx))
    indexView = axial_view(index, direction)[0]

    def region(n: int) -> Tuple[slice, ...]:
        k = int(indexView[n, 0, 0])
        return tuple(slice(k, k + 1) if a == a0 else slice(None) for a in range(3))

    return axes, region


def _sliceHash(labels: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(labels, dtype=np.uint8).tobytes(), digest_size=6).hexdigest()


#
# Long work: a segmentation in a worker thread, a fine-tuning in a subprocess
#


class _Job:
    """Common state of long work; ``poll()`` is called from the main thread."""

    def __init__(self):
        self.step = 0
        self.total = 0
        self.message = ""
        self.state = "running"  # running, completed, cancelled, failed
        self.error: Optional[BaseException] = None
        self.finishedAndReported = False  # for the widget
        self._cancel = threading.Event()

    @property
    def finished(self) -> bool:
        return self.state != "running"

    def cancel(self) -> None:
        self._cancel.set()

    def raiseIfFailed(self) -> None:
        if self.state == "failed" and self.error is not None:
            raise self.error

    def wait(self, progress: Optional[Callable[..., None]] = None, cancel: Optional[Callable[[], bool]] = None,
             interval: float = 0.02, timeout: Optional[float] = None, **pollArgs):
        """Poll until finished (headless use and tests); ``cancel()`` returning True cancels."""
        start = time.monotonic()
        while not self.finished:
            self.poll(**pollArgs)
            if progress is not None:
                progress(self.step, self.total, self.message)
            if cancel is not None and cancel():
                self.cancel()
            if timeout is not None and time.monotonic() - start > timeout:
                self.cancel()
                raise TimeoutError(f"{type(self).__name__} did not finish in {timeout} s")
            if not self.finished:
                time.sleep(interval)
        return self


class SegmentationJob(_Job):
    """Runs a Predictor in a worker thread; :meth:`poll` writes finished slices into the segmentation.

    MRML is only touched in :meth:`poll` (the main thread). Each slice is written whole
    into the three segments, so on cancel the finished slices stay and nothing is half-written.
    """

    def __init__(self, logic: "DRSegUNetLogic", volumeNode, segmentationNode, image, modelPath: str, device: str):
        super().__init__()
        self.logic = logic
        self.volumeNode = volumeNode
        self.segmentationNode = segmentationNode
        self.image = image
        self.modelPath = modelPath
        self.labels = np.zeros(image.GetSize()[::-1], dtype=np.uint8)  # (z, y, x) like the input
        self.done = np.zeros(0, dtype=bool)  # per axial slice: written
        self.report: Optional[Dict[str, Any]] = None
        self.tableNode = None
        self.message = _("Loading the model...")
        self._axes, self._region = axialLayout(self.labels.shape, image.GetDirection())
        self.total = self.labels.shape[self._axes[0]]
        self._segmentIds = logic.prepareSegments(segmentationNode, volumeNode)
        self._queue: "queue.Queue[Tuple[str, Any]]" = queue.Queue(maxsize=16)
        self._thread = threading.Thread(target=self._run, args=(device,), name="DRSegUNet segmentation", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        """Queue for the main thread; gives up on a slice once cancelled, on anything after a minute unread."""
        deadline = time.monotonic() + 60.0
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                if (self._cancel.is_set() and item[0] == "slice") or time.monotonic() > deadline:
                    return False

    def _run(self, device: str) -> None:
        from DRSegUNetLib.errors import Cancelled

        try:
            predictor = self.logic.predictorFactory(self.modelPath, device)
            for result in predictor.iter_slices(self.image, cancel=self._cancel.is_set):
                if not self._put(("slice", result)):
                    raise Cancelled("cancelled")
            self._put(("done", None))
        except Cancelled:
            self._put(("cancelled", None))
        except BaseException as e:  # reported to the main thread
            self._put(("failed", e))

    def poll(self, budget: float = 0.2, maxSlices: Optional[int] = None) -> None:
        """Write the slices finished so far (for at most ``budget`` seconds) and update the state."""
        start = time.monotonic()
        written = 0
        while not self.finished and time.monotonic() - start < budget and (maxSlices is None or written < maxSlices):
            try:
                kind, payload = self._queue.get_nowait()
            except queue.Empty:
                return
            if kind == "slice":
                self._writeSlice(payload)
                written += 1
            elif kind == "done":
                self._finish("completed")
            elif kind == "cancelled":
                self._finish("cancelled")
            else:
                self.error = payload
                self._finish("failed")

    def _writeSlice(self, result) -> None:
        if self.done.size == 0:
            self.done = np.zeros(result.total, dtype=bool)
        result.place(self.labels)
        region = self._region(result.index)
        block = self.labels[region]
        modify = self.segmentationNode.StartModify()
        try:
            for s, segmentId in zip(SEGMENTS, self._segmentIds):
                array = self.logic.segmentLabelmapArray(self.segmentationNode, self.volumeNode, segmentId, self.labels, s.labels)
                if array is not None:
                    array[region] = np.isin(block, s.labels)
                    self.segmentationNode.GetSegmentation().GetSegment(segmentId).Modified()
        finally:
            self.segmentationNode.EndModify(modify)
        self.done[result.index] = True
        self.step = int(self.done.sum())
        self.total = result.total
        self.message = _("Segmented {step}/{total} slices").format(step=self.step, total=self.total)

    def _finish(self, state: str) -> None:
        self.state = state
        if state == "failed":
            self.message = _("Failed: {error}").format(error=self.error)
            return
        self.logic.recordPrediction(self.segmentationNode, self.volumeNode, self.image, self.labels, self.modelPath)
        if state == "cancelled":
            self.message = _("Cancelled after {step} of {total} slices; finished slices kept.").format(
                step=self.step, total=self.total)
            return
        self.report = self.logic.computeReport(self.labelImage())
        self.segmentationNode.SetAttribute(ATTR_REPORT, json.dumps(self.report))
        self.tableNode = self.logic.reportTable(self.report)
        self.message = _("Done: {total} slices").format(total=self.total)

    def labelImage(self):
        """The labels so far (0 bg, 1 GGO, 2 consolidation, 3 lung) as a SimpleITK image in the input's geometry."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(self.labels)
        image.CopyInformation(self.image)
        return image


class ProcessRunner(Protocol):
    """Starts a process whose output lines are read without blocking (tests inject a fake)."""

    def start(self, args: Sequence[str], env: Dict[str, str]) -> "RunningProcess": ...


class RunningProcess(Protocol):
    def readLines(self) -> List[Tuple[str, str]]: ...  # (stream "out"/"err", line) received so far
    def returnCode(self) -> Optional[int]: ...  # None while running
    def terminate(self) -> None: ...


class SubprocessRunner:
    """Default runner: ``subprocess.Popen`` with reader threads, so polling never blocks the GUI."""

    def start(self, args: Sequence[str], env: Dict[str, str]) -> "_Subprocess":
        return _Subprocess(args, env)


class _Subprocess:
    def __init__(self, args: Sequence[str], env: Dict[str, str]):
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        self._proc = subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                      env=env, text=True, encoding="utf-8", errors="replace", bufsize=1, creationflags=flags)
        self._lines: "queue.Queue[Tuple[str, str]]" = queue.Queue()
        self._readers = [threading.Thread(target=self._read, args=(stream, name), daemon=True)
                         for stream, name in ((self._proc.stdout, "out"), (self._proc.stderr, "err"))]
        for t in self._readers:
            t.start()

    def _read(self, stream, name: str) -> None:
        for line in stream:
            self._lines.put((name, line.rstrip("\r\n")))
        stream.close()

    def readLines(self) -> List[Tuple[str, str]]:
        out = []
        while True:
            try:
                out.append(self._lines.get_nowait())
            except queue.Empty:
                return out

    def returnCode(self) -> Optional[int]:
        rc = self._proc.poll()
        if rc is None or any(t.is_alive() for t in self._readers):
            return None  # not finished until all its output is read
        return rc

    def terminate(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()


class FineTuneJob(_Job):
    """A ``python -m DRSegUNetLib finetune`` process whose JSON-lines progress drives :meth:`poll`."""

    def __init__(self, logic: "DRSegUNetLogic", process: RunningProcess, parent: ModelVersion):
        super().__init__()
        self.logic = logic
        self.process = process
        self.parent = parent
        self.version: Optional[int] = None
        self.loss: Optional[float] = None
        self.stage = ""
        self._stderr: List[str] = []
        self._cancelSent = False

    def poll(self) -> List[str]:
        """Read the lines printed so far; returns them as log text. Finishes the job when the process ends."""
        if self.finished:
            return []
        if self._cancel.is_set() and not self._cancelSent:
            self._cancelSent = True
            self.process.terminate()
        log = []
        for stream, line in self.process.readLines():
            event = None
            if stream == "out" and line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
            if isinstance(event, dict) and "stage" in event:
                self._onEvent(event)
                log.append(self.message)
            else:
                if stream == "err":
                    self._stderr = (self._stderr + [line])[-20:]
                log.append(line)
        rc = self.process.returnCode()
        if rc is not None:
            if self._cancelSent:
                self.state = "cancelled"
                self.message = _("Fine-tuning cancelled; the active model is unchanged.")
            elif rc == 0 and self.version is not None:
                self.logic.modelStore.set_active(self.version)
                self.state = "completed"
                self.message = _("New model v{version} is active (previous: v{parent}).").format(
                    version=self.version, parent=self.parent.version)
            else:
                detail = "\n".join(self._stderr[-5:]) or _("no error output")
                self.error = RuntimeError(f"fine-tuning ended with exit code {rc} without a new model:\n{detail}")
                self.state = "failed"
                self.message = str(self.error)
            log.append(self.message)
        return log

    def _onEvent(self, event: Dict[str, Any]) -> None:
        self.stage = str(event.get("stage", ""))
        if self.stage == "done":
            self.version = int(event["version"])
            self.step = self.total = max(self.total, 1)
            self.message = _("Saved model version {v}").format(v=self.version)
            return
        self.step = int(event.get("step", self.step) or 0)
        self.total = int(event.get("total", self.total) or 0)
        if event.get("loss") is not None:
            self.loss = float(event["loss"])
        loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
        self.message = f"{self.stage} {self.step}/{self.total}{loss}" + (f" {event['message']}" if event.get("message") else "")


#
# DRSegUNetLogic
#


def _defaultPredictorFactory(modelPath: str, device: str):
    from DRSegUNetLib.inference import Predictor

    return Predictor.from_checkpoint(modelPath, device=device)


class DRSegUNetLogic(ScriptedLoadableModuleLogic):
    """Segment, report, accept corrections and fine-tune, on MRML nodes, without any GUI.

    Args:
        scene: the MRML scene (default ``slicer.mrmlScene``).
        modelStore / correctionsStore: default in the data folder (see :meth:`dataFolder`).
        processRunner: starts the fine-tuning process (default :class:`SubprocessRunner`).
        predictorFactory: ``(modelPath, device) -> Predictor`` (default loads the checkpoint).
    """

    def __init__(self, scene=None, modelStore: Optional[ModelStore] = None,
                 correctionsStore: Optional[CorrectionsStore] = None, processRunner: Optional[ProcessRunner] = None,
                 predictorFactory: Optional[Callable[[str, str], Any]] = None):
        ScriptedLoadableModuleLogic.__init__(self)
        import DRSegUNetLib

        self.scene = scene if scene is not None else slicer.mrmlScene
        home = self.dataFolder()
        # `is None`, not `or`: an empty corrections store is falsy (it has a length).
        self.modelStore = modelStore if modelStore is not None else ModelStore(
            home / "models", bundled=DRSegUNetLib.default_model_path())
        self.correctionsStore = correctionsStore if correctionsStore is not None else CorrectionsStore(home / "corrections")
        self.processRunner = processRunner if processRunner is not None else SubprocessRunner()
        self.predictorFactory = predictorFactory if predictorFactory is not None else _defaultPredictorFactory
        self._segmentationsLogic = None
        modules = getattr(slicer, "modules", None)
        if getattr(modules, "segmentations", None) is None:
            # Outside the application nothing has registered the segment representations yet.
            self._segmentationsLogic = slicer.vtkSlicerSegmentationsModuleLogic()
            self._segmentationsLogic.SetMRMLScene(self.scene)

    @staticmethod
    def dataFolder() -> Path:
        """``$DRSEGUNET_HOME``, else a folder beside Slicer's settings, else the per-user default."""
        from DRSegUNetLib.store import HOME_ENV, default_home

        if os.environ.get(HOME_ENV):
            return default_home()
        app = getattr(slicer, "app", None)
        if app is not None:
            return Path(app.slicerUserSettingsFilePath).parent / "DRSegUNet"
        return default_home()

    # -- requirements
    def setupPythonRequirements(self, askUser: Callable[[str], bool]) -> None:
        """Install torch (PyTorch extension) and the other requirements, after asking. Slicer only."""
        if getattr(slicer, "app", None) is None:
            return  # plain Python: the environment is the caller's
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError(_("DRSegUNet needs the PyTorch extension: install it from the Extensions Manager."))
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                if not askUser(_("DRSegUNet needs PyTorch, which will now be downloaded and installed "
                                 "(this may take several minutes). Continue?")):
                    raise RuntimeError(_("PyTorch is required; installation was declined."))
                if torchLogic.installTorch(askConfirmation=False) is None:
                    raise RuntimeError(_("PyTorch could not be installed; use the PyTorch Utils module."))
        missing = self.missingRequirements()
        if missing:
            if not askUser(_("DRSegUNet needs these Python packages: {p}. Install them now?").format(p=", ".join(missing))):
                raise RuntimeError(_("Required Python packages were not installed: {p}").format(p=", ".join(missing)))
            slicer.util.pip_install(missing)

    @staticmethod
    def missingRequirements() -> List[str]:
        """Requirement lines of Resources/requirements.txt that are not installed (or too old)."""
        import importlib.metadata

        path = Path(__file__).parent / "Resources" / "requirements.txt"
        missing = []
        for line in path.read_text().splitlines() if path.exists() else []:
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
        """Level-2 defaults (epochs, learning rate, frozen layers) from the library's config."""
        from DRSegUNetLib.config import FineTuneConfig

        cfg = FineTuneConfig()
        return {"epochs": int(cfg.epochs), "lr": float(cfg.lr), "frozen_layers": int(cfg.frozen_layers)}

    # -- segmentation
    def prepareSegments(self, segmentationNode, volumeNode) -> List[str]:
        """(Re)create the three segments, empty, with fixed names, colours and terminology.

        Each segment gets its own full-size labelmap layer, so finished slices can be
        written in place (writing one slice through SetBinaryLabelmapToSegment either
        clears the segment or, with shared layers, spills into the other segments).
        """
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        if segmentationNode.GetDisplayNode() is None:
            segmentationNode.CreateDefaultDisplayNodes()
        segmentation = segmentationNode.GetSegmentation()
        empty = np.zeros(volumeNode.GetImageData().GetDimensions()[::-1], dtype=np.uint8)
        ids = []
        for s in SEGMENTS:
            for old in {s.segment_id, segmentation.GetSegmentIdBySegmentName(s.name)} - {""}:
                if segmentation.GetSegment(old) is not None:
                    segmentation.RemoveSegment(old)
            segment = slicer.vtkSegment()
            segment.SetName(s.name)
            segment.SetColor(*s.color)
            segment.SetNameAutoGenerated(False)
            segment.SetColorAutoGenerated(False)
            segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), s.terminology)
            segment.AddRepresentation(_BINARY_LABELMAP, self._orientedImage(volumeNode, empty))
            if not segmentation.AddSegment(segment, s.segment_id):
                raise RuntimeError(f"could not add segment '{s.name}'")
            ids.append(s.segment_id)
        return ids

    @staticmethod
    def _orientedImage(volumeNode, mask: np.ndarray):
        """A labelmap (0/1 uint8) on the volume's voxel grid from a (k, j, i) array."""
        from vtk.util import numpy_support

        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        image = slicer.vtkOrientedImageData()
        image.SetImageToWorldMatrix(ijkToRas)
        image.SetExtent(0, mask.shape[2] - 1, 0, mask.shape[1] - 1, 0, mask.shape[0] - 1)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.astype(np.uint8).ravel()
        return image

    def segmentLabelmapArray(self, segmentationNode, volumeNode, segmentId: str, labels: np.ndarray, values: Sequence[int]):
        """A writable (k, j, i) view of the segment's own full-size labelmap, or None if the user removed it.

        If the segment no longer has its own full-size layer (shared or cropped meanwhile),
        it is given one again, filled from ``labels`` (the slices finished so far).
        """
        segmentation = segmentationNode.GetSegmentation()
        segment = segmentation.GetSegment(segmentId)
        if segment is None:
            return None
        image = segment.GetRepresentation(_BINARY_LABELMAP)
        shared = len(segmentation.GetSegmentIDsForDataObject(image)) > 1 if image is not None else False
        if image is None or shared or image.GetDimensions() != labels.shape[::-1] or image.GetExtent()[::2] != (0, 0, 0):
            image = self._orientedImage(volumeNode, np.isin(labels, values))
            segment.AddRepresentation(_BINARY_LABELMAP, image)
        from vtk.util import numpy_support

        return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(labels.shape)

    def startSegmentation(self, volumeNode, segmentationNode=None, model: Any = None, device: str = "auto") -> SegmentationJob:
        """Start segmenting ``volumeNode`` into ``segmentationNode`` (new if None); poll the returned job."""
        if volumeNode is None:
            raise ValueError(_("Select an input CT volume."))
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
        modelPath = self.modelPath(model)
        if not os.path.isfile(modelPath):
            raise ValueError(_("Model file not found: {path}").format(path=modelPath))
        image = sitkImageFromVolumeNode(volumeNode)
        if segmentationNode is None:
            segmentationNode = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volumeNode.GetName()} DRSegUNet")
        return SegmentationJob(self, volumeNode, segmentationNode, image, modelPath, device)

    def segment(self, volumeNode, segmentationNode=None, model: Any = None, device: str = "auto",
                progress: Optional[Callable[..., None]] = None, cancel: Optional[Callable[[], bool]] = None,
                timeout: Optional[float] = None, **pollArgs) -> SegmentationJob:
        """Segment and wait (headless use). Raises the worker's error if it failed."""
        job = self.startSegmentation(volumeNode, segmentationNode, model, device)
        job.wait(progress=progress, cancel=cancel, timeout=timeout, **pollArgs)
        job.raiseIfFailed()
        return job

    def recordPrediction(self, segmentationNode, volumeNode, image, labels: np.ndarray, modelPath: str) -> None:
        """Remember per axial slice what the model said, so Accept can tell which slices the user changed."""
        view = axial_view(labels, image.GetDirection())[0]
        segmentationNode.SetAttribute(ATTR_SLICE_HASHES, json.dumps([_sliceHash(s) for s in view]))
        segmentationNode.SetAttribute(ATTR_MODEL, str(modelPath))
        segmentationNode.SetAttribute(ATTR_SOURCE, self.sourceIdentity(volumeNode, image))

    @staticmethod
    def sourceIdentity(volumeNode, image) -> str:
        """Volume name, file (if any) and a digest of its voxels and geometry."""
        import SimpleITK as sitk

        digest = hashlib.sha1(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).tobytes())
        digest.update(repr((image.GetSpacing(), image.GetOrigin(), image.GetDirection())).encode())
        storage = volumeNode.GetStorageNode()
        fileName = storage.GetFileName() if storage is not None and storage.GetFileName() else ""
        return f"{volumeNode.GetName()} | {fileName} | sha1:{digest.hexdigest()[:16]}"

    def computeReport(self, labelImage) -> Dict[str, Any]:
        from DRSegUNetLib.report import compute_report

        return compute_report(labelImage)

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

        "Lung" → 3, then "Ground-glass opacity" → 1, then "Consolidation" → 2 (later wins).
        """
        from vtk.util import numpy_support

        segmentation = segmentationNode.GetSegmentation()
        dims = volumeNode.GetImageData().GetDimensions()
        labels = np.zeros(dims[::-1], dtype=np.uint8)
        order = sorted(SEGMENTS, key=lambda s: -len(s.labels))  # the lung field first, lesions over it
        for s in order:
            segmentId = s.segment_id if segmentation.GetSegment(s.segment_id) else segmentation.GetSegmentIdBySegmentName(s.name)
            if not segmentId:
                continue
            labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__DRSegUNet_export__")
            try:
                ids = vtk.vtkStringArray()
                ids.InsertNextValue(segmentId)
                if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentationNode, ids, labelmap, volumeNode):
                    raise RuntimeError(f"could not export segment '{s.name}'")
                mask = numpy_support.vtk_to_numpy(labelmap.GetImageData().GetPointData().GetScalars()).reshape(dims[::-1]) > 0
            finally:
                self.scene.RemoveNode(labelmap)
            labels[mask] = s.labels[0] if len(s.labels) == 1 else LUNG
        return labels

    def acceptCorrections(self, volumeNode, segmentationNode, sliceRange: Optional[Tuple[int, int]] = None) -> List[str]:
        """Store corrected axial slices, with their CT, as training pairs; returns the new ids.

        Args:
            sliceRange: (first, last) axial slice indices, inclusive, counted from the most
                inferior slice (0); None stores the slices that differ from what was last
                predicted or accepted.
        """
        if volumeNode is None or segmentationNode is None:
            raise ValueError(_("Select the CT volume and its segmentation."))
        image = sitkImageFromVolumeNode(volumeNode)
        import SimpleITK as sitk

        ct = axial_view(sitk.GetArrayViewFromImage(image), image.GetDirection())[0]
        labels = axial_view(self.labelsFromSegmentation(segmentationNode, volumeNode), image.GetDirection())[0]
        hashes = [_sliceHash(s) for s in labels]
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
        axes, _region = axialLayout(sitk.GetArrayViewFromImage(image).shape, image.GetDirection())
        spacingZyx = image.GetSpacing()[::-1]
        spacing = (float(spacingZyx[axes[1]]), float(spacingZyx[axes[2]]))
        source = segmentationNode.GetAttribute(ATTR_SOURCE) or self.sourceIdentity(volumeNode, image)
        ids = [self.correctionsStore.add(np.asarray(ct[n]), np.asarray(labels[n]), spacing, source, n) for n in chosen]
        segmentationNode.SetAttribute(ATTR_SLICE_HASHES, json.dumps(hashes))  # accepted = the new baseline
        return ids

    # -- fine-tuning
    @staticmethod
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

    def fineTuneCommand(self, epochs: int, lr: float, device: str = "auto") -> List[str]:
        """The level-2 command: from the active model, on the corrections store, into the model store."""
        return [self.pythonExecutable(), "-m", "DRSegUNetLib", "finetune",
                "--model", str(self.modelStore.active().path),
                "--corrections", str(self.correctionsStore.root), "--store", str(self.modelStore.root),
                "--epochs", str(int(epochs)), "--lr", repr(float(lr)), "--device", device, "--json-progress"]

    def startFineTune(self, epochs: int, lr: float, device: str = "auto") -> FineTuneJob:
        """Start fine-tuning (level 2) the active model on the accepted corrections; poll the returned job."""
        import DRSegUNetLib

        if len(self.correctionsStore) == 0:
            raise ValueError(_("No accepted corrections yet: accept corrected slices first."))
        if epochs < 1 or lr <= 0:
            raise ValueError(_("Epochs must be at least 1 and the learning rate positive."))
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
        parent = self.modelStore.active()
        env = dict(os.environ)
        libParent = str(Path(DRSegUNetLib.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([libParent] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["PYTHONUNBUFFERED"] = "1"
        process = self.processRunner.start(self.fineTuneCommand(epochs, lr, device), env)
        return FineTuneJob(self, process, parent)

    # -- files
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


def reportRows(report: Dict[str, Any]) -> List[Tuple[str, float, Optional[float]]]:
    """(region, volume mL, % of lung) rows of a ``compute_report`` dict, whole lungs then each lung."""
    names = (("ggo", "GGO"), ("consolidation", "Consolidation"), ("infection", "Total infection"), ("lung", "Lung field"))

    def rows(stats: Dict[str, Any], prefix: str) -> List[Tuple[str, float, Optional[float]]]:
        out = []
        for key, name in names:
            volume = stats["volume_ml"].get(key)
            if volume is None:
                continue
            percent = 100.0 if key == "lung" else stats["percent_of_lung"].get(key)
            out.append((prefix + name, float(volume), None if percent is None else float(percent)))
        return out

    result = rows(report, "")
    for side, stats in (report.get("per_lung") or {}).items():
        result += rows(stats, f"{side.capitalize()} lung: ")
    return result


#
# DRSegUNetTest
#


class DRSegUNetTest(ScriptedLoadableModuleTest):
    """The user's flow inside Slicer: segment, check, cancel, correct, accept, fine-tune, save."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_DRSegUNet_flow()

    def _sampleVolume(self, logic):
        import DRSegUNetLib
        from DRSegUNetLib.imageio import read_ct

        candidates = [getattr(DRSegUNetLib, "sample_ct_volume_path", lambda: None)(),
                      Path(__file__).resolve().parent.parent / "Testing" / "data" / "cip_ct64" / "ct-64.nrrd",
                      DRSegUNetLib.sample_ct_path()]
        path = next(p for p in candidates if p is not None and Path(p).exists())
        return volumeNodeFromSitkImage(read_ct(path), "DRSegUNet sample CT")

    def test_DRSegUNet_flow(self):
        import tempfile

        self.delayDisplay("Starting the DRSegUNet flow test")
        with tempfile.TemporaryDirectory() as tmp:
            import DRSegUNetLib

            logic = DRSegUNetLogic(modelStore=ModelStore(Path(tmp) / "models", bundled=DRSegUNetLib.default_model_path()),
                                   correctionsStore=CorrectionsStore(Path(tmp) / "corrections"))
            volume = self._sampleVolume(logic)
            job = logic.segment(volume, device="cpu", timeout=600)
            self.assertEqual(job.state, "completed")
            segmentation = job.segmentationNode.GetSegmentation()
            self.assertEqual([segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())],
                             [s.name for s in SEGMENTS])
            for s in SEGMENTS:
                self.assertEqual(segmentation.GetSegment(s.segment_id).GetTerminology(), s.terminology)
            self.assertIn("volume_ml", job.report)
            labels = logic.labelsFromSegmentation(job.segmentationNode, volume)
            np.testing.assert_array_equal(labels, job.labels)
            self.delayDisplay("Segmented")

            # Cancel half-way: finished slices stay, nothing else is written.
            job2 = logic.startSegmentation(volume, None, None, "cpu")
            job2.wait(cancel=lambda: job2.step * 2 >= job2.total, timeout=600, maxSlices=1)
            if job2.total > 2:
                self.assertEqual(job2.state, "cancelled")
                self.assertLess(job2.step, job2.total)
                written = logic.labelsFromSegmentation(job2.segmentationNode, volume)
                np.testing.assert_array_equal(written, job2.labels)

            # Correct one slice (paint it all consolidation inside the lung field) and accept it.
            corrected = job.labels.copy()
            n = corrected.shape[0] // 2
            corrected[n][corrected[n] > 0] = 2
            segmentId = segmentation.GetSegmentIdBySegmentName("Consolidation")
            slicer.util.updateSegmentBinaryLabelmapFromArray((corrected == 2).astype(np.uint8), job.segmentationNode,
                                                             segmentId, volume)
            ids = logic.acceptCorrections(volume, job.segmentationNode)
            self.assertGreaterEqual(len(ids), 1)
            self.delayDisplay(f"Accepted {len(ids)} slices")

            # Fine-tune in a PythonSlicer process; a new version becomes active.
            before = logic.modelStore.active().version
            tune = logic.startFineTune(epochs=1, lr=logic.fineTuneDefaults()["lr"], device="cpu")
            tune.wait(timeout=600)
            tune.raiseIfFailed()
            self.assertNotEqual(logic.modelStore.active().version, before)

            # Save and read back.
            path = os.path.join(tmp, "out.seg.nrrd")
            logic.saveSegmentation(job.segmentationNode, path)
            self.assertTrue(os.path.getsize(path) > 0)
        self.delayDisplay("Test passed")
