"""A PNG overlay of one axial slice: CT in a lung window with the segments coloured."""
from __future__ import annotations

import io
import os

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_write_bytes
from .orientation import axial_view
from .vocabulary import CONSOLIDATION, GGO, INFECTION_NAME, LUNG, LUNG_NAME, REGIONS, SEGMENTS

WINDOW = (-1350.0, 150.0)  # lung window W1500/L-600 for display only
ALPHA = 0.45


def overlay_slice(hu: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3): grey CT with GGO, consolidation and lung outline coloured."""
    grey = np.clip((hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    colours = {s.labels[0]: np.array(s.color) for s in SEGMENTS if len(s.labels) == 1}
    for value in (GGO, CONSOLIDATION):
        m = labels == value
        rgb[m] = (1 - ALPHA) * rgb[m] + ALPHA * colours[value]
    field = np.isin(labels, REGIONS[LUNG_NAME])
    from scipy import ndimage

    edge = field & ~ndimage.binary_erosion(field)
    lung_colour = next(np.array(s.color) for s in SEGMENTS if LUNG in s.labels and len(s.labels) > 1)
    rgb[edge] = lung_colour
    return (rgb * 255).round().astype(np.uint8)


def write_overlay(image: sitk.Image, labels: sitk.Image, path: str | os.PathLike, index: int | None = None) -> int:
    """Write the overlay of axial slice ``index`` (default: most infection) and return the index.

    The PNG says which slice it shows in its text chunks: ``slice_index`` (0 = most inferior, as
    segment's report and the corrections store count), ``slices`` (how many) and a ``Description``.
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    hu, _ = axial_view(sitk.GetArrayViewFromImage(image), image.GetDirection())
    lab, _ = axial_view(sitk.GetArrayViewFromImage(labels), labels.GetDirection())
    if index is None:
        infection = np.isin(lab, REGIONS[INFECTION_NAME]).sum(axis=(1, 2))
        index = int(np.argmax(infection)) if infection.any() else lab.shape[0] // 2
    rgb = overlay_slice(np.asarray(hu[index], dtype=np.float32), np.asarray(lab[index]))
    info = PngInfo()
    info.add_text("slice_index", str(index))
    info.add_text("slices", str(lab.shape[0]))
    info.add_text("Description", f"DRSegUNet overlay of axial slice {index} of {lab.shape[0]} (0 = most inferior): "
                                 "GGO yellow, consolidation red, lung outline blue")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())
    return index
