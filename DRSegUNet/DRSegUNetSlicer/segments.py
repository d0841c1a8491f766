"""Our three segments in a segmentation node: planned, made from the vocabulary, written slice by slice.

The segments (names, colours, terminology, label values) come from
``DRSegUNetLib.vocabulary.SEGMENTS``. Each gets its own full-size binary labelmap layer, so a
finished axial slice is written in place (see :meth:`SegmentWriter.segmentLabelmapArray`). The
logic makes one :class:`SegmentWriter` for its scene and hands it to the segmentation job.
"""
import hashlib
import json
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from DRSegUNetLib.orientation import axial_view
from DRSegUNetLib.vocabulary import SEGMENTS

from .constants import ATTR_MODEL, ATTR_SEGMENT_IDS, ATTR_SLICE_HASHES, ATTR_SOURCE, BINARY_LABELMAP
from .conversions import orientedImageFromMask
from .i18n import _


def setSegmentTerminology(segment, terminologyEntry: str) -> None:
    """``vtkSegment.SetTerminology`` where Slicer has it (5.10+), else the tag it writes (5.6, 5.8)."""
    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(terminologyEntry)
    else:
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminologyEntry)


def sourceRepresentationName(segmentation) -> str:
    """``GetSourceRepresentationName`` (Slicer 5.4+; "master" before)."""
    getter = getattr(segmentation, "GetSourceRepresentationName", None) or segmentation.GetMasterRepresentationName
    return getter()


def segmentIdsAndNames(segmentation) -> List[Tuple[str, str]]:
    return [(segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i).GetName())
            for i in range(segmentation.GetNumberOfSegments())]


def sliceHash(labels: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(labels, dtype=np.uint8).tobytes(), digest_size=6).hexdigest()


def sourceIdentity(volumeNode, image: sitk.Image) -> str:
    """Volume name, file (if any) and a digest of its voxels and geometry."""
    digest = hashlib.sha1(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).tobytes())
    digest.update(repr((image.GetSpacing(), image.GetOrigin(), image.GetDirection())).encode())
    storage = volumeNode.GetStorageNode()
    fileName = storage.GetFileName() if storage is not None and storage.GetFileName() else ""
    return f"{volumeNode.GetName()} | {fileName} | sha1:{digest.hexdigest()[:16]}"


class SegmentWriter:
    """Finds, plans, makes and writes our segments in the segmentation nodes of ``scene``."""

    def __init__(self, scene):
        self.scene = scene

    @staticmethod
    def existingSegments(segmentationNode) -> List[str]:
        """IDs of the segments of ``segmentationNode`` that have our segment IDs or names ("Lung", ...)."""
        if segmentationNode is None:
            return []
        ids, names = {s.segment_id for s in SEGMENTS}, {s.name for s in SEGMENTS}
        return [i for i, name in segmentIdsAndNames(segmentationNode.GetSegmentation()) if i in ids or name in names]

    def plannedSegments(self, segmentationNode, existing: str = "replace") -> Dict[str, Tuple[str, str]]:
        """Our segment id (``vocabulary.Segment.segment_id``) → (segment ID, name) a run writes.

        Our own IDs and names, unless ``existing`` is "keep" and the segmentation already has
        one of them: then "lung_2" / "Lung (DRSegUNet 2)" and so on, the first number free for all three.
        """
        planned = {s.segment_id: (s.segment_id, s.name) for s in SEGMENTS}
        if existing != "keep" or not self.existingSegments(segmentationNode):
            return planned
        taken = segmentIdsAndNames(segmentationNode.GetSegmentation())
        usedIds, usedNames = {i for i, _n in taken}, {n for _i, n in taken}
        number = 2
        while True:
            planned = {s.segment_id: (f"{s.segment_id}_{number}", f"{s.name} (DRSegUNet {number})") for s in SEGMENTS}
            if not any(i in usedIds or n in usedNames for i, n in planned.values()):
                return planned
            number += 1

    @staticmethod
    def segmentIdsOf(segmentationNode) -> Dict[str, str]:
        """Our segment id → the segment's ID in ``segmentationNode`` (the last run's, else by our ID or name)."""
        segmentation = segmentationNode.GetSegmentation()
        recorded = json.loads(segmentationNode.GetAttribute(ATTR_SEGMENT_IDS) or "{}")
        found = {}
        for s in SEGMENTS:
            for candidate in (recorded.get(s.segment_id), s.segment_id, segmentation.GetSegmentIdBySegmentName(s.name)):
                if candidate and segmentation.GetSegment(candidate) is not None:
                    found[s.segment_id] = candidate
                    break
        return found

    @staticmethod
    def prepareSegments(segmentationNode, volumeNode, segmentIds: Optional[Dict[str, Tuple[str, str]]] = None,
                        remove: Sequence[str] = ()) -> List[str]:
        """Add the three segments, empty, with fixed names, colours and terminology; returns notes for the user.

        ``segmentIds``: our segment id → (segment ID, name) (default: our own, see
        :meth:`plannedSegments`); ``remove``: segment IDs to remove first (a "replace" run, once
        its first slice has arrived). A segmentation whose source representation is not a
        binary labelmap (e.g. closed surfaces) is switched to binary labelmap, with a note:
        otherwise what is written here would be a derived representation, remade or dropped
        by Slicer. Each segment gets its own full-size labelmap layer, so finished slices can be
        written in place (writing one slice through SetBinaryLabelmapToSegment either clears
        the segment or, with shared layers, spills into the other segments).
        """
        segmentIds = segmentIds or {s.segment_id: (s.segment_id, s.name) for s in SEGMENTS}
        notes = []
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        if segmentationNode.GetDisplayNode() is None:
            segmentationNode.CreateDefaultDisplayNodes()
        segmentation = segmentationNode.GetSegmentation()
        for old in remove:
            if segmentation.GetSegment(old) is not None:
                segmentation.RemoveSegment(old)
        source = sourceRepresentationName(segmentation)
        if source != BINARY_LABELMAP:
            # As the Segment Editor does: keep what the other segments hold, as labelmaps.
            if segmentation.GetNumberOfSegments() and not segmentation.CreateRepresentation(BINARY_LABELMAP):
                raise RuntimeError(f"could not convert '{segmentationNode.GetName()}' to binary labelmaps")
            segmentation.SetSourceRepresentationName(BINARY_LABELMAP)
            notes.append(_("'{node}' kept its segments as '{source}'; it now keeps them as binary labelmaps, "
                           "which is what DRSegUNet writes.").format(node=segmentationNode.GetName(), source=source))
        empty = np.zeros(volumeNode.GetImageData().GetDimensions()[::-1], dtype=np.uint8)
        for s in SEGMENTS:
            segmentId, name = segmentIds[s.segment_id]
            if segmentation.GetSegment(segmentId) is not None:
                segmentation.RemoveSegment(segmentId)  # only ever one of ours: plannedSegments avoids the user's
            segment = slicer.vtkSegment()
            segment.SetName(name)
            segment.SetColor(*s.color)
            segment.SetNameAutoGenerated(False)
            segment.SetColorAutoGenerated(False)
            setSegmentTerminology(segment, s.terminology)
            segment.AddRepresentation(BINARY_LABELMAP, orientedImageFromMask(volumeNode, empty))
            if not segmentation.AddSegment(segment, segmentId):
                raise RuntimeError(f"could not add segment '{name}'")
        segmentationNode.SetAttribute(ATTR_SEGMENT_IDS, json.dumps({k: v[0] for k, v in segmentIds.items()}))
        return notes

    def segmentLabelmapArray(self, segmentationNode, volumeNode, segmentId: str, labels: np.ndarray,
                             values: Sequence[int]) -> Optional[np.ndarray]:
        """A writable (k, j, i) view of the segment's own full-size labelmap, or None if the user removed it.

        If the segment no longer has its own full-size 0/1 layer (saving merges layers,
        editing crops them), it is given one again, filled with what the segment holds now
        on the volume's grid (the slices finished so far and the user's edits); only if that
        cannot be read, from ``labels``.
        """
        segmentation = segmentationNode.GetSegmentation()
        segment = segmentation.GetSegment(segmentId)
        if segment is None:
            return None
        image = segment.GetRepresentation(BINARY_LABELMAP)
        own = (image is not None and len(segmentation.GetSegmentIDsForDataObject(image)) == 1
               and segment.GetLabelValue() == 1  # a merged layer numbers its segments 1, 2, ...
               and image.GetDimensions() == labels.shape[::-1] and image.GetExtent()[::2] == (0, 0, 0))
        if not own:
            try:
                mask = self.exportSegment(segmentationNode, segmentId, volumeNode) > 0
            except RuntimeError:
                mask = None
            if mask is None or mask.shape != labels.shape:
                mask = np.isin(labels, values)
            segment.AddRepresentation(BINARY_LABELMAP, orientedImageFromMask(volumeNode, mask))
            segment.SetLabelValue(1)
        return slicer.util.arrayFromSegmentInternalBinaryLabelmap(segmentationNode, segmentId)

    def exportSegment(self, segmentationNode, segmentId: str, volumeNode) -> np.ndarray:
        """A copy of one segment on the volume's grid: ``slicer.util.arrayFromSegmentBinaryLabelmap``
        in this writer's scene (that one uses ``slicer.mrmlScene``), without leaving nodes behind."""
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__DRSegUNet_export__")
        try:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segmentId)
            export = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode
            if not export(segmentationNode, ids, labelmap, volumeNode):
                raise RuntimeError(f"could not export segment '{segmentId}'")
            return np.array(slicer.util.arrayFromVolume(labelmap))
        finally:
            # The export adds a display node and a colour table; removing the labelmap leaves them behind.
            display = labelmap.GetDisplayNode()
            if display is not None:
                if display.GetColorNode() is not None:
                    self.scene.RemoveNode(display.GetColorNode())
                self.scene.RemoveNode(display)
            self.scene.RemoveNode(labelmap)

    @staticmethod
    def recordPrediction(segmentationNode, volumeNode, image: sitk.Image, labels: np.ndarray, modelPath: str) -> None:
        """Remember per axial slice what the model said, so Accept can tell which slices the user changed."""
        view = axial_view(labels, image.GetDirection())[0]
        segmentationNode.SetAttribute(ATTR_SLICE_HASHES, json.dumps([sliceHash(s) for s in view]))
        segmentationNode.SetAttribute(ATTR_MODEL, str(modelPath))
        segmentationNode.SetAttribute(ATTR_SOURCE, sourceIdentity(volumeNode, image))
