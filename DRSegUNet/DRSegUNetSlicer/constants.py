"""Names the Slicer layer shares: devices, segmentation node attributes, representations, settings."""

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
SETTING_PIXEL_SIZE = "DRSegUNet/PixelSize"  # as DRSegUNetSlicer.parameters.pixelSizeText writes it
# The stored working pixel size (parameter node, settings) meaning the model's own (pixelMM None).
MODEL_PIXEL_SIZE = "model"
