"""DRSegUNet: COVID-19 lung infection segmentation on chest CT (3D Slicer scripted module).

The widget only binds the .ui to :class:`DRSegUNetSlicer.DRSegUNetLogic`; the logic runs
without a GUI (headless script, tests against slicer-core) and everything else is in
``DRSegUNetLib``.
"""
import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from DRSegUNetSlicer import (DEVICES, SETTING_DATA_FOLDER, SETTING_DEVICE, SETTING_PIXEL_SIZE, DRSegUNetLogic, _,
                             pixelSizeText, spinBoxPixelSize, translate, volumeNodeFromSitkImage)


class DRSegUNet(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DRSegUNet")
        # Slicer translates module categories in this context, so the module joins the translated folder.
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["DRSegUNet maintainers"]
        self.parent.helpText = _(
            "Segments ground-glass opacity, consolidation and the lung field on chest CT with DRSegUNet, "
            "reports volumes and % of lung involved, stores your corrections and fine-tunes the model on them "
            "(level 2). See docs/slicer.md in the extension's repository."
        )
        self.parent.acknowledgementText = _(
            "DRSegUNet is a research tool, not a medical device. Sample CT: COVID-19-NY-SBU (TCIA), CC BY 4.0."
        )
        app = getattr(slicer, "app", None)  # None outside the application (slicer-core, tests)
        if app is not None:
            app.connect("startupCompleted()", self.onStartupCompleted)

    @staticmethod
    def onStartupCompleted():
        """Our terminology (names, codes, colours of the three segments) and the sample CT in Sample Data."""
        from DRSegUNetSlicer import startup

        for step in (startup.loadTerminology, startup.registerSampleData):
            try:
                step()
            except Exception:  # noqa: BLE001 - never break Slicer's startup
                import logging

                logging.exception("DRSegUNet: %s failed at startup", step.__name__)


class DRSegUNetWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui to the logic; long work is polled from a timer so the GUI never blocks."""

    FILE_MODEL = -1  # item data of the "model from a file" entry

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._job = None
        self._fineTune = None
        self._timer = None
        self._polling = False
        self._parameters = None
        self._updatingGUI = False

    def setup(self):
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DRSegUNet.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DRSegUNetLogic()  # its data folder: $DRSEGUNET_HOME, the DRSegUNet/DataFolder setting, or the default
        self.logic.installingChanged = self.onInstallingChanged

        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self.onTimer)

        for device in DEVICES:
            self.ui.deviceComboBox.addItem(device)
        defaults = self.logic.fineTuneDefaults()
        self.ui.stepsSpinBox.value = defaults["steps"]
        self.ui.learningRateSpinBox.value = defaults["lr"]
        # The spin box offers only valid sizes and, one step below them, "model's own" (None: the size the
        # model's checkpoint carries; spinBoxPixelSize); 0 (the CT's own grid) is the check box.
        low, high = self.logic.pixelSizeRange()
        box = self.ui.pixelSizeSpinBox
        box.minimum, box.maximum = low - box.singleStep, high
        box.specialValueText = _("model's own")
        box.value = box.minimum
        self.ui.dataFolderPathLineEdit.currentPath = str(self.logic.dataFolder)
        if os.environ.get("DRSEGUNET_HOME"):
            self.ui.dataFolderPathLineEdit.enabled = False
            self.ui.dataFolderPathLineEdit.toolTip = _("Set by the DRSEGUNET_HOME environment variable.")

        for selector in (self.ui.inputVolumeSelector, self.ui.outputSegmentationSelector):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.updateParameterNodeFromGUI)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.pixelSizeSpinBox.connect("valueChanged(double)", self.updateParameterNodeFromGUI)
        self.ui.ownGridCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.dataFolderPathLineEdit.connect("currentPathChanged(QString)", self.onDataFolderChanged)
        self.ui.editButton.connect("clicked(bool)", self.onEdit)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.setActiveModelButton.connect("clicked(bool)", self.onSetActiveModel)
        self.ui.acceptCorrectionsButton.connect("clicked(bool)", self.onAcceptCorrections)
        self.ui.fineTuneButton.connect("clicked(bool)", self.onFineTune)
        self.ui.nextSliceButton.connect("clicked(bool)", self.onNextSlice)
        self.ui.cancelFineTuneButton.connect("clicked(bool)", self.onCancelFineTune)
        # Closing the scene removes the nodes a running segmentation writes into.
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        # A loaded scene brings its own parameter node values; a closed one leaves an empty node.
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneChanged)
        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        if self.logic is not None:
            self.logic.installingChanged = None
        if self._timer:
            self._timer.stop()
        for job in (self._job, self._fineTune):
            if job is not None and not job.finished:
                job.abort()  # the timer is stopped: nothing would poll a cancel through

    def onSceneStartClose(self, caller=None, event=None):
        if self._job is not None and not self._job.finishedAndReported:
            self._job.abort()
            self._job.finishedAndReported = True
            self.ui.statusLabel.text = _("Segmentation stopped: the scene was closed.")
        self.updateButtons()

    def onSceneChanged(self, caller=None, event=None):
        self.initializeParameterNode()

    def enter(self):
        self.refreshModels()
        self.initializeParameterNode()

    # -- the parameter node (saved with the scene) and the settings (kept across sessions)
    def initializeParameterNode(self):
        self._parameters = self.logic.parameters()
        settings = slicer.app.userSettings()
        self._parameters.setDefaults(device=settings.value(SETTING_DEVICE), pixelMM=settings.value(SETTING_PIXEL_SIZE))
        if self._parameters.inputVolume is None:
            self._parameters.inputVolume = self.ui.inputVolumeSelector.currentNode()
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self):
        p = self._parameters
        self._updatingGUI = True
        try:
            self.ui.inputVolumeSelector.setCurrentNode(p.inputVolume)
            self.ui.outputSegmentationSelector.setCurrentNode(p.outputSegmentation)
            model = p.model
            index = self.ui.modelComboBox.findData(int(model)) if model and model.isdigit() else -1
            if index < 0 and model and not model.isdigit():
                index = self.ui.modelComboBox.findData(self.FILE_MODEL)
                self.ui.modelPathLineEdit.currentPath = model
            if index >= 0:
                self.ui.modelComboBox.setCurrentIndex(index)
            self.ui.deviceComboBox.setCurrentIndex(max(0, self.ui.deviceComboBox.findText(p.device)))
            pixelMM = p.pixelMM  # None: the model's own, the spin box's minimum ("model's own")
            self.ui.ownGridCheckBox.checked = pixelMM == 0
            if pixelMM != 0:
                self.ui.pixelSizeSpinBox.value = self.ui.pixelSizeSpinBox.minimum if pixelMM is None else pixelMM
        finally:
            self._updatingGUI = False
        self.updateButtons()

    def updateParameterNodeFromGUI(self, *_args):
        if self._updatingGUI or self._parameters is None:
            return
        p = self._parameters
        wasModifying = p.node.StartModify()
        try:
            p.inputVolume = self.ui.inputVolumeSelector.currentNode()
            p.outputSegmentation = self.ui.outputSegmentationSelector.currentNode()
            data = self.ui.modelComboBox.currentData
            p.model = (self.ui.modelPathLineEdit.currentPath or None) if data == self.FILE_MODEL else data
            p.device = self.ui.deviceComboBox.currentText
            p.pixelMM = self.selectedPixelSize()
        finally:
            p.node.EndModify(wasModifying)
        settings = slicer.app.userSettings()
        settings.setValue(SETTING_DEVICE, p.device)
        settings.setValue(SETTING_PIXEL_SIZE, pixelSizeText(p.pixelMM))
        self.updateButtons()

    def selectedPixelSize(self) -> Optional[float]:
        """The working pixel size in mm; 0: the CT's own grid; None: the model's own (the logic's ``pixelMM=None``)."""
        return spinBoxPixelSize(self.ui.pixelSizeSpinBox.value, self.ui.ownGridCheckBox.checked)

    def onDataFolderChanged(self, path):
        # Emitted on every keystroke: switch only to a folder that exists (the browse dialog can make one).
        if not path or not os.path.isdir(path) or os.path.normpath(path) == os.path.normpath(str(self.logic.dataFolder)):
            return
        if self._fineTune is not None and not self._fineTune.finished:
            slicer.util.warningDisplay(_("Wait for fine-tuning to finish before moving the data folder."))
            self.ui.dataFolderPathLineEdit.currentPath = str(self.logic.dataFolder)
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot use this data folder.")):
            self.logic.setDataFolder(path)
            slicer.app.userSettings().setValue(SETTING_DATA_FOLDER, str(self.logic.dataFolder))
            self.refreshModels(selectActive=True)
        self.updateButtons()

    # -- state shown in the GUI
    def refreshModels(self, selectActive=False):
        """List the model versions; select the parameter node's model, or the active one (``selectActive``)."""
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
        if self._parameters is not None:
            if selectActive:
                self.updateParameterNodeFromGUI()
            else:
                self.updateGUIFromParameterNode()
        n = len(self.logic.correctionsStore)
        self.ui.acceptedSlicesLabel.text = _("{n} accepted slices").format(n=n)

    def onInstallingChanged(self, installing):
        """While torch or pip packages install, say so and disable what would start a second install."""
        self.ui.installStatusLabel.visible = installing
        self.updateButtons()
        slicer.app.processEvents()  # show it now: the install blocks until it is done

    def updateButtons(self, *_args):
        segmenting = self._job is not None and not self._job.finished
        tuning = self._fineTune is not None and not self._fineTune.finished
        installing = self.logic.installing  # Segment, Accept and Fine-tune install packages first
        self.ui.installStatusLabel.visible = installing
        fromFile = self.ui.modelComboBox.currentData == self.FILE_MODEL
        self.ui.modelPathLineEdit.visible = fromFile
        self.ui.pixelSizeSpinBox.enabled = not self.ui.ownGridCheckBox.checked
        self.ui.segmentButton.enabled = bool(self.ui.inputVolumeSelector.currentNode()) and not segmenting and not installing
        self.ui.editButton.enabled = bool(
            self.ui.inputVolumeSelector.currentNode() and self.ui.outputSegmentationSelector.currentNode()) and not segmenting
        self.ui.cancelButton.enabled = segmenting
        self.ui.acceptCorrectionsButton.enabled = bool(
            self.ui.inputVolumeSelector.currentNode() and self.ui.outputSegmentationSelector.currentNode()
        ) and not segmenting and not installing
        self.ui.fineTuneButton.enabled = not tuning and not installing and len(self.logic.correctionsStore) > 0
        self.ui.cancelFineTuneButton.enabled = tuning
        self.ui.setActiveModelButton.enabled = not fromFile and not tuning
        self.ui.nextSliceButton.enabled = bool(
            self.ui.inputVolumeSelector.currentNode() and self.logic.sliceUncertainty(
                self.ui.outputSegmentationSelector.currentNode())) and not segmenting

    def selectedModelPath(self):
        if self.ui.modelComboBox.currentData == self.FILE_MODEL:
            return self.ui.modelPathLineEdit.currentPath
        return str(self.logic.modelStore.path_of(int(self.ui.modelComboBox.currentData)))

    # -- actions
    def requirementsReady(self, failure, withTorch=True):
        """Set up torch and the pip packages (asking first: no busy cursor over the question); False,
        after showing why, when they are not there (declined, failed, an install already running)."""
        ready = False
        with slicer.util.tryWithErrorDisplay(failure):
            self.logic.setupPythonRequirements(askUser=self.askUser, withTorch=withTorch)
            ready = True
        self.updateButtons()
        return ready

    def onSegment(self):
        if not self.requirementsReady(_("Failed to start the segmentation.")):
            return
        output = self.ui.outputSegmentationSelector.currentNode()
        existing = self.askExistingSegments(output)
        if existing is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            # None: the logic creates "<volume> DRSegUNet", and only once the inputs passed its checks.
            self._job = self.logic.startSegmentation(
                self.ui.inputVolumeSelector.currentNode(), output, self.selectedModelPath(),
                self.ui.deviceComboBox.currentText, self.selectedPixelSize(), existing=existing)
            self.ui.outputSegmentationSelector.setCurrentNode(self._job.segmentationNode)
            if self.ui.modelComboBox.currentData == self.FILE_MODEL:
                self.ui.modelPathLineEdit.addCurrentPathToHistory()  # remembered under its settingKey
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = self._job.message
            self._timer.start()
        self.updateButtons()

    def askExistingSegments(self, segmentationNode):
        """"replace", "keep" or None (cancel) when the output already has our segments; "ask" otherwise."""
        import qt

        existing = self.logic.existingSegments(segmentationNode)
        if not existing:
            return "ask"
        names = ", ".join(segmentationNode.GetSegmentation().GetSegment(i).GetName() for i in existing)
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setWindowTitle(_("DRSegUNet: segments exist"))
        box.setIcon(qt.QMessageBox.Question)
        box.setText(_("'{node}' already has the segments {names}.").format(node=segmentationNode.GetName(), names=names))
        box.setInformativeText(_("Replace them (they are removed once the first new slice arrives), keep both "
                                 "(the new ones are named e.g. \"Lung (DRSegUNet 2)\"), or cancel?"))
        replaceButton = box.addButton(_("Replace"), qt.QMessageBox.DestructiveRole)
        keepButton = box.addButton(_("Keep both"), qt.QMessageBox.AcceptRole)
        cancelButton = box.addButton(qt.QMessageBox.Cancel)
        box.setDefaultButton(keepButton)
        box.setEscapeButton(cancelButton)
        box.exec_()
        clicked = box.clickedButton()
        if clicked == replaceButton:
            return "replace"
        if clicked == keepButton:
            return "keep"
        return None

    def onEdit(self):
        with slicer.util.tryWithErrorDisplay(_("Cannot open the Segment Editor.")):
            self.logic.setUpSegmentEditor(self.ui.outputSegmentationSelector.currentNode(),
                                          self.ui.inputVolumeSelector.currentNode())
            slicer.util.selectModule("SegmentEditor")

    def onCancel(self):
        if self._job is not None:
            self._job.cancel()

    def onSetActiveModel(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to switch the model.")):
            self.logic.modelStore.set_active(int(self.ui.modelComboBox.currentData))
            self.refreshModels(selectActive=True)

    def onAcceptCorrections(self):
        from DRSegUNetLib.vocabulary import CONSOLIDATION_NAME, GGO_NAME, INFECTION_NAME, LUNG_NAME

        if not self.requirementsReady(_("Failed to store the corrections."), withTorch=False):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to store the corrections."), waitCursor=True):
            sliceRange = None
            if self.ui.acceptRangeRadioButton.checked:
                sliceRange = (self.ui.rangeFirstSpinBox.value - 1, self.ui.rangeLastSpinBox.value - 1)
            checked = [name for name, box in ((GGO_NAME, self.ui.checkedGgoCheckBox),
                                              (CONSOLIDATION_NAME, self.ui.checkedConsolidationCheckBox),
                                              (LUNG_NAME, self.ui.checkedLungCheckBox),
                                              (INFECTION_NAME, self.ui.checkedInfectionCheckBox)) if box.checked]
            ids = self.logic.acceptCorrections(
                self.ui.inputVolumeSelector.currentNode(), self.ui.outputSegmentationSelector.currentNode(), sliceRange,
                checkedClasses=checked)
            self.ui.statusLabel.text = _("Stored {n} corrected slices.").format(n=len(ids))
            self.refreshModels()
        self.updateButtons()

    def onFineTune(self):
        if not self.requirementsReady(_("Failed to start fine-tuning.")):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start fine-tuning."), waitCursor=True):
            self.ui.fineTuneLog.plainText = ""
            self.ui.fineTuneResultLabel.text = _("Fine-tuning; the new version is then scored against the active one...")
            self._fineTune = self.logic.startFineTune(
                steps=self.ui.stepsSpinBox.value, lr=self.ui.learningRateSpinBox.value,
                device=self.ui.deviceComboBox.currentText, pixelMM=self.selectedPixelSize())
            self._timer.start()
        self.updateButtons()

    def onNextSlice(self):
        with slicer.util.tryWithErrorDisplay(_("Cannot find the next slice to check.")):
            segmentation = self.ui.outputSegmentationSelector.currentNode()
            index = self.logic.nextSliceToCheck(segmentation)
            if index is None:
                self.ui.nextSliceLabel.text = _("Every slice with lung has been accepted.")
                return
            self.logic.jumpToSlice(self.ui.inputVolumeSelector.currentNode(), index)
            uncertainty = self.logic.sliceUncertainty(segmentation)
            self.ui.nextSliceLabel.text = _("Axial slice {n} of {total} (uncertainty {u:.3f})").format(
                n=index + 1, total=len(uncertainty), u=uncertainty[index])

    def onCancelFineTune(self):
        if self._fineTune is not None:
            self._fineTune.cancel()

    def onTimer(self):
        if self._polling:  # an error dialog's event loop runs the timer again
            return
        self._polling = True
        try:
            if self._job is not None and not self._job.finishedAndReported:
                self._pollSegmentation()
            if self._fineTune is not None and not self._fineTune.finishedAndReported:
                self._pollFineTune()
            if all(j is None or j.finishedAndReported for j in (self._job, self._fineTune)):
                self._timer.stop()
            self.updateButtons()
        finally:
            self._polling = False

    def _pollSegmentation(self):
        job = self._job
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed.")):
            try:
                job.poll()
            except Exception:
                job.abort()  # one error dialog, not one per timer tick
                job.finishedAndReported = True
                raise
            self.ui.progressBar.maximum = max(job.total, 1)
            self.ui.progressBar.value = job.step
            self.ui.statusLabel.text = "\n".join([job.message] + job.notes)
            if job.finished:
                job.finishedAndReported = True
                if job.tableNode is not None:
                    self.ui.resultsTableView.setMRMLTableNode(job.tableNode)
                job.raiseIfFailed()

    def _pollFineTune(self):
        job = self._fineTune
        with slicer.util.tryWithErrorDisplay(_("Fine-tuning failed.")):
            try:
                lines = job.poll()
            except Exception:
                job.abort()
                job.finishedAndReported = True
                raise
            for line in lines:
                self.ui.fineTuneLog.appendPlainText(line)
            self.ui.fineTuneProgressBar.maximum = max(job.total, 1)
            self.ui.fineTuneProgressBar.value = job.step
            if job.finished:
                job.finishedAndReported = True
                self.ui.fineTuneResultLabel.text = job.message
                self.refreshModels(selectActive=True)
                job.raiseIfFailed()

    @staticmethod
    def askUser(message: str) -> bool:
        return slicer.util.confirmOkCancelDisplay(message, _("DRSegUNet: install Python packages"))


class DRSegUNetTest(ScriptedLoadableModuleTest):
    """The user's flow inside Slicer: segment, check, cancel, correct, accept, fine-tune, save.

    Uses only what is installed with the extension: the bundled model and the bundled CT slice.
    """

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_DRSegUNet_flow()

    @staticmethod
    def sampleVolume(copies: int = 4):
        """The bundled CT slice stacked ``copies`` times, ``copies`` axial slices at its DICOM slice spacing."""
        import SimpleITK as sitk

        import DRSegUNetLib
        from DRSegUNetLib.imageio import read_ct

        one = read_ct(DRSegUNetLib.sample_ct_path())  # (512, 512, 1), spacing z from the DICOM header
        stack = sitk.GetImageFromArray(np.repeat(sitk.GetArrayFromImage(one), copies, axis=0))
        stack.SetSpacing(one.GetSpacing())
        stack.SetOrigin(one.GetOrigin())
        stack.SetDirection(one.GetDirection())
        return volumeNodeFromSitkImage(stack, "DRSegUNet sample CT")

    def test_DRSegUNet_flow(self):
        import DRSegUNetLib
        from DRSegUNetLib.store import CorrectionsStore, ModelStore
        from DRSegUNetLib.vocabulary import CONSOLIDATION, CONSOLIDATION_NAME, SEGMENTS

        self.delayDisplay("Starting the DRSegUNet flow test")
        with tempfile.TemporaryDirectory() as tmp:
            logic = DRSegUNetLogic(modelStore=ModelStore(Path(tmp) / "models", bundled=DRSegUNetLib.default_model_path()),
                                   correctionsStore=CorrectionsStore(Path(tmp) / "corrections"))
            logic.setupPythonRequirements(askUser=lambda message: True)  # a test machine has no one to ask
            volume = self.sampleVolume()
            job = logic.segment(volume, device="cpu", timeout=600)
            self.assertEqual(job.state, "completed")
            segmentation = job.segmentationNode.GetSegmentation()
            self.assertEqual([segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())],
                             [s.name for s in SEGMENTS])
            for s in SEGMENTS:  # GetTag, not vtkSegment.GetTerminology: that one came with Slicer 5.10
                terminology = vtk.reference("")
                segmentation.GetSegment(s.segment_id).GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology)
                self.assertEqual(terminology.get(), s.terminology)
            self.assertIn("volume_ml", job.report)
            np.testing.assert_array_equal(logic.labelsFromSegmentation(job.segmentationNode, volume), job.labels)
            self.delayDisplay("Segmented")

            # Cancel after 2 of 4 slices: those stay, nothing else is written.
            job2 = logic.startSegmentation(volume, None, None, "cpu")
            job2.wait(cancel=lambda: job2.step * 2 >= job2.total, timeout=600, maxSlices=1)
            self.assertEqual(job2.state, "cancelled")
            self.assertEqual(job2.step, job2.total // 2)
            np.testing.assert_array_equal(logic.labelsFromSegmentation(job2.segmentationNode, volume), job2.labels)
            self.assertFalse(job2.labels[job2.total // 2:].any())
            self.delayDisplay("Cancelled")

            # Correct one slice (a block of consolidation in its middle) and accept it.
            corrected = job.labels.copy()
            n, rows, cols = corrected.shape[0] // 2, corrected.shape[1], corrected.shape[2]
            corrected[n, rows // 4:3 * rows // 4, cols // 4:3 * cols // 4] = CONSOLIDATION
            slicer.util.updateSegmentBinaryLabelmapFromArray((corrected == CONSOLIDATION).astype(np.uint8),
                                                             job.segmentationNode, CONSOLIDATION_NAME, volume)
            ids = logic.acceptCorrections(volume, job.segmentationNode)
            self.assertEqual(len(ids), 1)
            self.delayDisplay(f"Accepted {len(ids)} slice")

            # Fine-tune in a PythonSlicer process; a new version is saved, and becomes active only if
            # the gate passed it (this made-up correction may well not pass), which the job reports.
            before = logic.modelStore.active().version
            tune = logic.startFineTune(steps=2, lr=logic.fineTuneDefaults()["lr"], device="cpu")
            tune.wait(timeout=600)
            tune.raiseIfFailed()
            self.assertGreater(tune.version, before)
            self.assertIn(tune.version, [v.version for v in logic.modelStore.versions()])
            self.assertIn(tune.activated, (True, False))
            self.assertEqual(logic.modelStore.active().version, tune.version if tune.activated else before)
            self.assertIn(f"v{tune.version}", tune.message)

            # Save, read the file back, and check what it holds: our segments, a lung, the same labels.
            inScene = logic.labelsFromSegmentation(job.segmentationNode, volume)
            path = os.path.join(tmp, "out.seg.nrrd")
            logic.saveSegmentation(job.segmentationNode, path)
            loaded = logic.loadSegmentation(path, "DRSegUNet read back")
            segmentation = loaded.GetSegmentation()
            self.assertEqual([segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())],
                             [s.name for s in SEGMENTS])
            for s in SEGMENTS:
                segment = segmentation.GetSegment(s.segment_id)
                np.testing.assert_allclose(segment.GetColor(), s.color, atol=1e-6)
                terminology = vtk.reference("")
                segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology)
                self.assertEqual(terminology.get(), s.terminology)
            readBack = logic.labelsFromSegmentation(loaded, volume)
            np.testing.assert_array_equal(readBack, inScene)
            lungVoxels = int((readBack > 0).sum())  # the Lung segment is the whole lung field
            self.assertGreater(lungVoxels, 1000, "the bundled model found no lung in the bundled CT slice")
            self.assertTrue((readBack == CONSOLIDATION).any())  # the accepted correction is in the file
        self.delayDisplay("Test passed")
