"""Long work, polled from the main thread: a segmentation in a worker thread, a fine-tuning in a process.

The widget polls a job from a ``QTimer``; headless callers use :meth:`Job.wait`. MRML is
only touched in ``poll()``, so no Slicer call ever runs outside the main thread.

The logic starts the jobs and passes in what they use: the segment writer, the report table
maker, the predictor factory or the library process starter, the model store. Nothing here
imports the logic.
"""
import collections
import dataclasses
import json
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from DRSegUNetLib.errors import Cancelled
from DRSegUNetLib.orientation import SliceResult, axial_view
from DRSegUNetLib.store import ModelStore, ModelVersion
from DRSegUNetLib.vocabulary import SEGMENTS

from .constants import ATTR_REPORT, ATTR_UNCERTAINTY, BINARY_LABELMAP, CLOSED_SURFACE
from .i18n import _
from .processes import RunningProcess
from .segments import SegmentWriter

PredictorFactory = Callable[[str, str], Any]  # (model path, device) -> a Predictor (DRSegUNetLib.inference)
LibraryStarter = Callable[..., RunningProcess]  # ("segment-stream", ARGS...) -> python -m DRSegUNetLib ARGS, started


class Job:
    """State shared by long work: progress, a cancel flag, and how it ended."""

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
        """Ask the work to stop; :meth:`poll` finishes the job."""
        self._cancel.set()

    def abort(self) -> None:
        """Cancel and stop now, without waiting for another :meth:`poll` (module cleanup, scene close)."""
        self.cancel()

    def poll(self, **kwargs) -> Any:
        raise NotImplementedError

    def raiseIfFailed(self) -> None:
        if self.state == "failed" and self.error is not None:
            raise self.error

    def wait(self, progress: Optional[Callable[..., None]] = None, cancel: Optional[Callable[[], bool]] = None,
             interval: float = 0.02, timeout: Optional[float] = None, **pollArgs) -> "Job":
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


class SegmentationJob(Job):
    """Segments a volume; :meth:`poll` writes finished slices into the segmentation.

    The network runs in a separate process (``python -m DRSegUNetLib segment-stream``, with
    PythonSlicer inside Slicer), which writes each axial slice into a shared ``.npy`` array
    and then prints a line naming it; a Python thread inside Slicer would only run while
    the main thread runs Python, because Slicer's main thread keeps the GIL in its event
    loop. With a ``predictorFactory`` (tests, scripts that bring their own predictor) the
    predictor runs in a worker thread of this process instead.

    Each axial slice is written whole into the three segments' own full-size labelmaps
    (with ``SliceResult.place``), so on Cancel the slices written so far stay, no slice is
    half-written, and nothing more is written after Cancel.

    The segmentation is not touched before the first slice arrives: only then are the
    segments made (and, with ``existing="replace"``, the old ones removed), so a run that
    fails to start leaves the segmentation as it was. ``existing="keep"`` writes next to
    segments with our names under new names (``SegmentWriter.plannedSegments``).

    While slices stream in, derived representations are not rebuilt per slice: a closed
    surface (Show 3D) is taken away at the first slice and made once at the end, and the
    labelmaps' ``Modified()`` (which makes the segmentation drop every derived
    representation, of all segments) runs at most once per :attr:`derivedInterval` seconds
    and once at the end. Between those the slice views still see each slice: the
    segment's ``Modified()`` and the labelmap's voxel array ``Modified()``, which reaches the
    display pipelines but not the segmentation's invalidation.
    """

    derivedInterval = 10.0  # seconds between labelmap Modified() events while streaming

    def __init__(self, volumeNode, segmentationNode, image: sitk.Image, modelPath: str, device: str,
                 pixelMM: Optional[float] = None, existing: str = "keep", *, segments: SegmentWriter,
                 reportTable: Callable[[Dict[str, Any]], Any], predictorFactory: Optional[PredictorFactory] = None,
                 startLibrary: Optional[LibraryStarter] = None, temporaryFolder: Optional[str] = None,
                 corrections: Optional[str] = None):
        """
        Args:
            segments: plans, makes and writes the segments (the logic's :class:`SegmentWriter`).
            reportTable: ``report -> table node`` for the finished report.
            predictorFactory: ``(modelPath, device) -> Predictor``, run in a worker thread; None:
                ``startLibrary("segment-stream", ...)`` runs the network in a separate process,
                with its files in ``temporaryFolder`` (None: the system's).
            corrections: corrections store folder whose accepted slices of this volume guide
                their neighbours (``DRSegUNetLib.guidance``); None: no guidance.
        """
        super().__init__()
        self.segments = segments
        self.reportTable = reportTable
        self.volumeNode = volumeNode
        self.segmentationNode = segmentationNode
        self.image: Optional[sitk.Image] = image  # the CT; released when the job finishes
        self.geometry = (image.GetSpacing(), image.GetOrigin(), image.GetDirection())
        self.modelPath = modelPath
        self.pixelMM = pixelMM  # working pixel size (mm); 0: the CT's grid; None: the model's own
        self.labels = np.zeros(image.GetSize()[::-1], dtype=np.uint8)  # (z, y, x) like the input
        self.total = axial_view(self.labels, image.GetDirection())[0].shape[0]
        self.done = np.zeros(self.total, dtype=bool)  # per axial slice: written
        self.uncertainty = np.zeros(self.total, dtype=np.float64)  # per axial slice (0 until written)
        self.report: Optional[Dict[str, Any]] = None
        self.tableNode = None
        self.message = _("Loading the model...")
        self.notes: List[str] = []  # what the run changed besides the segments (the source representation)
        self.existing = existing  # "replace" or "keep" (see DRSegUNetLogic.startSegmentation)
        self.segmentIds = segments.plannedSegments(segmentationNode, existing)  # ours -> (ID, name) in the node
        self.prepared = False  # the segments exist (the first slice has arrived)
        self.derivedUpdates = 0  # labelmap Modified() rounds sent (each drops and may rebuild derived representations)
        self._hadSurface = False
        self._lastDerived = 0.0
        self._aborted = False
        if predictorFactory is None:
            if startLibrary is None:
                raise ValueError("a segmentation needs a predictorFactory or a startLibrary")
            self._source: Any = _SliceProcess(startLibrary, temporaryFolder, image, modelPath, device, pixelMM,
                                              self.total, corrections)
        else:
            self._source = _SliceThread(predictorFactory, image, modelPath, device, pixelMM, self._cancel, corrections)

    @property
    def settings(self) -> Optional[Dict[str, Any]]:
        """The predictor's decision rule and numerics (for the report), once it is loaded."""
        return self._source.settings

    def abort(self) -> None:
        """Cancel and stop the computation now (module cleanup, scene close)."""
        self._aborted = True  # the scene is going: no 3D surface to rebuild
        self.cancel()
        self._source.stop()
        if not self.finished:
            self._finish("cancelled")

    def poll(self, budget: float = 0.2, maxSlices: Optional[int] = None) -> None:
        """Write the slices finished so far (for at most ``budget`` seconds) and update the state."""
        start = time.monotonic()
        written: List[str] = []
        try:
            while not self.finished and time.monotonic() - start < budget and (maxSlices is None or len(written) < maxSlices):
                event = self._source.next(self._cancel.is_set())
                if event is None:
                    break
                kind, payload = event
                if kind == "slice":
                    if not self._cancel.is_set():  # after Cancel, slices still queued are dropped
                        self._writeSlice(payload)
                        written.append(payload)
                elif kind == "done":
                    self._finish("cancelled" if self._cancel.is_set() and self.step < self.total else "completed")
                elif kind == "cancelled":
                    self._finish("cancelled")
                else:
                    self.error = payload
                    self._finish("failed")
        finally:
            if written and not self.finished:
                if time.monotonic() - self._lastDerived >= self.derivedInterval:
                    self._labelmapsModified()
                else:
                    self._labelmapsModified(quiet=True)

    def _prepare(self) -> None:
        """At the first slice: take the 3D surface away, remove what "replace" replaces, add our segments."""
        node = self.segmentationNode
        segmentation = node.GetSegmentation()
        self._hadSurface = segmentation.GetNumberOfSegments() > 0 and bool(segmentation.ContainsRepresentation(CLOSED_SURFACE))
        if self._hadSurface:
            node.RemoveClosedSurfaceRepresentation()
        remove = self.segments.existingSegments(node) if self.existing == "replace" else []
        self.segmentIds = self.segments.plannedSegments(node, self.existing)  # the user may have added segments meanwhile
        self.notes += self.segments.prepareSegments(node, self.volumeNode, self.segmentIds, remove=remove)
        self.prepared = True
        self._lastDerived = time.monotonic()

    def _labelmapsModified(self, quiet: bool = False) -> None:
        """Tell the displays that our labelmaps changed.

        ``quiet``: only the voxel arrays are marked modified; the slice views' pipelines
        re-read them, but the segmentation (which observes the labelmap itself) keeps its
        derived representations. Otherwise the labelmaps are marked modified: the
        segmentation drops every derived representation, which Slicer rebuilds where shown.
        """
        segmentation = self.segmentationNode.GetSegmentation()
        done: List[Any] = []  # kept alive, so a labelmap shared by two segments is the same wrapper
        modify = self.segmentationNode.StartModify()  # the node's content-modified events: one, at EndModify
        try:
            self._markLabelmaps(segmentation, quiet, done)
        finally:
            self.segmentationNode.EndModify(modify)
        if not quiet:
            self.derivedUpdates += 1
            self._lastDerived = time.monotonic()

    def _markLabelmaps(self, segmentation, quiet: bool, done: List[Any]) -> None:
        for segmentId, _name in self.segmentIds.values():
            segment = segmentation.GetSegment(segmentId)
            labelmap = segment.GetRepresentation(BINARY_LABELMAP) if segment is not None else None
            if labelmap is None or any(labelmap is d for d in done):  # saving merges layers: one labelmap, two segments
                continue
            done.append(labelmap)
            if quiet:
                scalars = labelmap.GetPointData().GetScalars()
                if scalars is not None:
                    scalars.Modified()
            else:
                labelmap.Modified()

    def _finishDisplay(self) -> None:
        """Once at the end: one labelmap Modified(), and the 3D surface again if it was shown."""
        if not self.prepared or self._aborted or self.segmentationNode.GetScene() is None:
            return
        segmentation = self.segmentationNode.GetSegmentation()
        showSurface = self._hadSurface or bool(segmentation.ContainsRepresentation(CLOSED_SURFACE))
        self._labelmapsModified()
        if showSurface:
            self.segmentationNode.CreateClosedSurfaceRepresentation()

    def _writeSlice(self, result) -> None:
        if not self.prepared:
            self._prepare()
        result.place(self.labels)
        segmentation = self.segmentationNode.GetSegmentation()
        modify = self.segmentationNode.StartModify()
        try:
            for s in SEGMENTS:
                segmentId = self.segmentIds[s.segment_id][0]
                array = self.segments.segmentLabelmapArray(self.segmentationNode, self.volumeNode, segmentId,
                                                           self.labels, s.labels)
                if array is not None:
                    result.place(array, s.labels)
                    # What slicer.util.arrayFromSegmentInternalBinaryLabelmap asks for after writing.
                    segmentation.GetSegment(segmentId).Modified()
        finally:
            self.segmentationNode.EndModify(modify)
        self.done[result.index] = True
        if getattr(result, "uncertainty", None) is not None:
            self.uncertainty[result.index] = float(result.uncertainty)
        self.step = int(self.done.sum())
        self.message = _("Segmented {step}/{total} slices").format(step=self.step, total=self.total)

    def _finish(self, state: str) -> None:
        try:
            self._conclude(state)
        finally:
            self.image = None  # a copy of the whole CT: the panel keeps the last job until the next one

    def _conclude(self, state: str) -> None:
        self.state = state
        self._source.close()
        if state == "completed" and not self.prepared:
            self._prepare()  # no slice at all (an empty volume): the segments still exist, empty
        self._finishDisplay()
        if state == "failed":
            self.message = _("Failed: {error}").format(error=self.error)
            return
        if not self.prepared:  # cancelled before the first slice: the segmentation is as it was
            self.message = _("Cancelled before the first slice; the segmentation is unchanged.")
            return
        self.segments.recordPrediction(self.segmentationNode, self.volumeNode, self.image, self.labels, self.modelPath)
        self.segmentationNode.SetAttribute(ATTR_UNCERTAINTY, json.dumps([round(float(u), 5) for u in self.uncertainty]))
        if state == "cancelled":
            self.message = _("Cancelled after {step} of {total} slices; finished slices kept.").format(
                step=self.step, total=self.total)
            return
        from DRSegUNetLib.report import add_uncertainty, compute_report  # scipy: ships with Slicer (Resources/requirements.txt)

        self.report = compute_report(self.labelImage())
        self.report.update(model=self.modelPath, inference=self.settings)
        add_uncertainty(self.report, list(self.uncertainty))
        self.segmentationNode.SetAttribute(ATTR_REPORT, json.dumps(self.report))
        self.tableNode = self.reportTable(self.report)
        self.message = _("Done: {total} slices").format(total=self.total)

    def labelImage(self) -> sitk.Image:
        """The labels so far (0 bg, 1 GGO, 2 consolidation, 3 lung) as a SimpleITK image in the input's geometry."""
        image = sitk.GetImageFromArray(self.labels)
        spacing, origin, direction = self.geometry
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(direction)
        return image


def _jsonEvent(stream: str, line: str) -> Optional[Dict[str, Any]]:
    """A progress event (``--json-progress`` / segment-stream line with a "stage") or None for other output."""
    if stream != "out" or not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "stage" in event else None


class _SliceThread:
    """The predictor of a ``predictorFactory`` in a worker thread; events through a queue."""

    def __init__(self, predictorFactory: PredictorFactory, image: sitk.Image, modelPath: str, device: str,
                 pixelMM: Optional[float], cancelled: threading.Event, corrections: Optional[str] = None):
        self.predictorFactory, self.image, self.modelPath, self.pixelMM = predictorFactory, image, modelPath, pixelMM
        self.corrections = corrections  # corrections store folder that guides (None: no guidance)
        self.settings: Optional[Dict[str, Any]] = None
        self._cancel = cancelled
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
        try:
            predictor = self.predictorFactory(self.modelPath, device)
            if self.pixelMM is not None:
                predictor.inference = dataclasses.replace(predictor.inference, pixel_mm=float(self.pixelMM) or None)
            settings = getattr(predictor, "settings", None)
            self.settings = settings() if callable(settings) else None
            guide = None
            if self.corrections:
                from DRSegUNetLib.guidance import guide_for_image
                from DRSegUNetLib.store import CorrectionsStore

                guide = guide_for_image(CorrectionsStore(self.corrections), self.image)
            extra = {"guide": guide} if guide is not None and len(guide) else {}
            for result in predictor.iter_slices(self.image, cancel=self._cancel.is_set, **extra):
                if not self._put(("slice", result)):
                    raise Cancelled("cancelled")
            self._put(("done", None))
        except Cancelled:
            self._put(("cancelled", None))
        except BaseException as e:  # reported to the main thread
            self._put(("failed", e))

    def next(self, cancelled: bool) -> Optional[Tuple[str, Any]]:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def stop(self) -> None:
        self._cancel.set()  # the thread stops at its next slice

    def close(self) -> None:
        pass


class _SliceProcess:
    """``python -m DRSegUNetLib segment-stream`` in a separate process; its JSON lines become events.

    The CT goes to the process as an ``.mha`` file, the labels come back in a shared
    ``.npy`` array (memory-mapped on both sides) that the process fills slice by slice; a
    slice is read only after the process has printed that it is written. Cancel ends the
    process (and its children: PythonSlicer is a launcher).
    """

    def __init__(self, startLibrary: LibraryStarter, temporaryFolder: Optional[str], image: sitk.Image,
                 modelPath: str, device: str, pixelMM: Optional[float], total: int, corrections: Optional[str] = None):
        self.settings: Optional[Dict[str, Any]] = None
        self.direction = image.GetDirection()
        self.total = total  # axial slices (the job's count)
        # The CT copy goes to Slicer's temporary folder (its settings), else the system's.
        self.folder = Path(tempfile.mkdtemp(prefix="drsegunet-segment-", dir=temporaryFolder))
        self.process: Optional[RunningProcess] = None
        self._labels: Optional[np.ndarray] = None
        self._events: "collections.deque[Tuple[str, Any]]" = collections.deque()
        self._stderr: List[str] = []
        self._ended = self._stopped = False
        try:
            ct, labels = self.folder / "ct.mha", self.folder / "labels.npy"
            sitk.WriteImage(image, str(ct))
            np.lib.format.open_memmap(labels, mode="w+", dtype=np.uint8, shape=tuple(image.GetSize()[::-1])).flush()
            self._labels = np.load(labels, mmap_mode="r")
            args = ["segment-stream", str(ct), str(labels), "--model", str(modelPath), "--device", device]
            if pixelMM is not None:
                args += ["--pixel-mm", repr(float(pixelMM))]
            args += ["--corrections", str(corrections) if corrections else "none"]
            self.process = startLibrary(*args)
        except BaseException:
            self.close()
            raise

    def next(self, cancelled: bool) -> Optional[Tuple[str, Any]]:
        if cancelled and not self._stopped:
            self.stop()
        if not self._events and not self._ended:
            self._read()
        return self._events.popleft() if self._events else None

    def _read(self) -> None:
        rc = self.process.returnCode()  # before reading: once it is known, every line is queued
        for stream, line in self.process.readLines():
            event = _jsonEvent(stream, line)
            if event is None:
                if stream == "err" and line.strip():
                    self._stderr = (self._stderr + [line])[-20:]
                continue
            if event.get("stage") == "loaded":
                self.settings = event.get("settings")
            elif event.get("stage") == "slice" and not self._stopped:
                index = int(event["index"])
                labels = np.array(axial_view(self._labels, self.direction)[0][index])
                uncertainty = event.get("uncertainty")
                self._events.append(("slice", SliceResult(index, self.total, labels, self.direction, None,
                                                          None if uncertainty is None else float(uncertainty))))
        if rc is None:
            return
        self._ended = True
        if self._stopped:
            self._events.append(("cancelled", None))
        elif rc == 0:
            self._events.append(("done", None))
        else:
            errors = [line[len("error: "):] for line in self._stderr if line.startswith("error: ")]
            detail = errors[-1] if errors else "\n".join(self._stderr[-5:]) or _("no error output")
            # Exit code 2: the input or the checkpoint cannot be used (the CLI's one-line message).
            kind = ValueError if rc == 2 else RuntimeError
            self._events.append(("failed", kind(detail if rc == 2 else
                                                f"segmentation process ended with exit code {rc}: {detail}")))

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            if self.process is not None:
                self.process.terminate()

    def close(self) -> None:
        if self.process is not None and not self._ended and not self._stopped:
            self.stop()
        self._labels = None  # the memory map is closed when its last reference goes
        shutil.rmtree(self.folder, ignore_errors=True)


class FineTuneJob(Job):
    """A ``python -m DRSegUNetLib finetune --json-progress`` process whose JSON lines drive :meth:`poll`."""

    def __init__(self, process: RunningProcess, parent: ModelVersion, modelStore: ModelStore):
        """``parent``: the active version when the process started; ``modelStore``: where it saves the new one."""
        super().__init__()
        self.modelStore = modelStore
        self.process = process
        self.parent = parent
        self.version: Optional[int] = None
        self.activated: Optional[bool] = None  # the gate's verdict (the command's "done" line)
        self.gate: Optional[Dict[str, Any]] = None  # reference and held-out Dice, before and after
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
        rc = self.process.returnCode()  # before reading: once it is known, every line is queued
        for stream, line in self.process.readLines():
            event = _jsonEvent(stream, line)
            if event is not None:
                self._onEvent(event)
                log.append(self.message)
            else:
                if stream == "err":
                    self._stderr = (self._stderr + [line])[-20:]
                log.append(line)
        if rc is not None:
            if rc == 0 and self.version is not None:  # saved, even if a Cancel came after it had finished
                self.state = "completed"
                if self.activated is False:  # the gate refused it: the command left the active model alone
                    self.message = _("New model v{version} saved but NOT made active: it scored worse than v{parent} "
                                     "({why}). Use Make active to use it anyway.").format(
                        version=self.version, parent=self.parent.version,
                        why="; ".join((self.gate or {}).get("reasons", [])) or _("see the log"))
                else:
                    self.modelStore.set_active(self.version)  # what the command did (older commands: always)
                    self.message = _("New model v{version} is active (previous: v{parent}). {gate} Segment again to "
                                     "use it; the slices you accepted guide their neighbours.").format(
                        version=self.version, parent=self.parent.version, gate=self.gateSummary())
            elif self._cancelSent:
                self.state = "cancelled"
                self.message = self._cancelledMessage()
            else:
                detail = "\n".join(self._stderr[-5:]) or _("no error output")
                self.error = RuntimeError(f"fine-tuning ended with exit code {rc} without a new model:\n{detail}")
                self.state = "failed"
                self.message = str(self.error)
            log.append(self.message)
        return log

    def gateSummary(self) -> str:
        """Before -> after on the reference slices and the held-out corrections, one line."""
        gate = self.gate or {}
        ref = gate.get("reference") or {}
        before, after = ref.get("before") or {}, ref.get("after") or {}
        parts = [f"{r} {before[r]:.3f}->{after[r]:.3f}" for r in before if r in after]
        held = gate.get("holdout") or {}
        hb, ha = held.get("before") or {}, held.get("after") or {}
        text = (_("Reference Dice: ") + ", ".join(parts)) if parts else ""
        if hb and ha:
            text += _("; held-out corrected slices: {b:.3f}->{a:.3f}").format(
                b=sum(hb.values()) / len(hb), a=sum(ha.values()) / len(ha))
        return text

    def abort(self) -> None:
        self.cancel()
        if not self.finished:
            self._cancelSent = True
            self.process.terminate()
            self.state = "cancelled"
            self.message = self._cancelledMessage()

    def _cancelledMessage(self) -> str:
        """What a cancel left: the command may have saved and activated its model just before it ended."""
        active = self.modelStore.active().version
        if active == self.parent.version:
            return _("Fine-tuning cancelled; the active model is unchanged.")
        # Most likely the command's own new model, saved just before the cancel; say only what is known.
        return _("Fine-tuning cancelled. The active model is now v{version}; it was v{parent} when fine-tuning "
                 "started.").format(version=active, parent=self.parent.version)

    def _onEvent(self, event: Dict[str, Any]) -> None:
        self.stage = str(event.get("stage", ""))
        if self.stage == "done":
            self.version = int(event["version"])
            self.activated = event.get("activated")
            self.gate = event.get("gate")
            self.step = self.total = max(self.total, 1)
            self.message = _("Saved model version {v}").format(v=self.version)
            return
        self.step = int(event.get("step", self.step) or 0)
        self.total = int(event.get("total", self.total) or 0)
        if event.get("loss") is not None:
            self.loss = float(event["loss"])
        loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
        self.message = f"{self.stage} {self.step}/{self.total}{loss}" + (f" {event['message']}" if event.get("message") else "")
