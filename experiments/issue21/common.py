"""Shared helpers for the issue 21 (point 3) hilar false-positive study.

Loads the 12 COVID-19-NY-SBU DICOM slices in HU, runs the bundled model on them and
measures "hilar false positives" by one fixed rule (``hilar_metrics``). Inference only,
one torch thread. Nothing in DRSegUNetLib imports this.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

from DRSegUNetLib import default_model_path  # noqa: E402
from DRSegUNetLib.imageio import read_ct  # noqa: E402
from DRSegUNetLib.inference import Predictor  # noqa: E402
from DRSegUNetLib.lungs import extract_lungs_slice  # noqa: E402
from DRSegUNetLib.orientation import axial_spacing, axial_view  # noqa: E402

NY = ROOT.parent / "shared" / "data" / "hu" / "covid19_ny_sbu"
OUT = Path(__file__).resolve().parent
GGO, CONS, LUNG = 1, 2, 3
# Slices where the data README sees bilateral GGO/consolidation; on the others a lesion
# next to the mediastinum is not expected (checked by eye on the lung-window overlays).
DISEASED = {"A002304_19010112-135", "A046441_19001111-045", "A046441_19010101-23", "A056642_19001229-053"}
BAND_MM = 15.0  # "near the hilum": lung-field pixels within this distance of the mediastinum
DENSE_HU = -400.0  # "vessel / bronchial wall / other soft tissue" inside the lung field


def ny_slices():
    """[(name, HU (H, W) float32 in radiological display orientation, (row, col) mm)]."""
    out = []
    for p in sorted(NY.glob("*.dcm")):
        image = sitk.Cast(read_ct(p), sitk.sitkFloat32)
        hu, _ = axial_view(sitk.GetArrayFromImage(image), image.GetDirection())
        sp = axial_spacing(image.GetSpacing(), image.GetDirection())
        out.append((p.stem, np.maximum(np.ascontiguousarray(hu[0]), -1024.0), sp))
    return out


def predictor(pixel_mm=1.2, model=None, **kw):
    return Predictor.from_checkpoint(model or default_model_path(), device="cpu", pixel_mm=pixel_mm, cpu_bf16="off",
                                     **kw)


def segment(pred, hu, spacing, eight_bit=False, pixel_size=True):
    """Labels (H, W) and probabilities (C, H, W) numpy for one slice."""
    lab, prob = pred.labels(hu[None].astype(np.float32), spacing if pixel_size else None, eight_bit)
    return lab[0], prob[0].float().numpy()


def mediastinum(field: np.ndarray) -> np.ndarray:
    """The non-lung region between the lungs: the largest component of (convex hull of the
    lung field, built row by row between the outermost lung pixels) minus the field,
    opened with a 3-px disk. Includes heart, great vessels, hila, spine front."""
    m = np.zeros_like(field)
    rows = np.flatnonzero(field.any(1))
    for r in rows:
        cols = np.flatnonzero(field[r])
        m[r, cols[0]:cols[-1] + 1] = True
    m &= ~field
    m = ndimage.binary_opening(m, iterations=3)
    lab, n = ndimage.label(m)
    if n == 0:
        return m
    sizes = ndimage.sum(m, lab, range(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def hilar_band(field: np.ndarray, spacing, band_mm: float = BAND_MM) -> np.ndarray:
    """Lung-field pixels within ``band_mm`` of the mediastinum (Euclidean, in mm)."""
    med = mediastinum(field)
    if not med.any():
        return np.zeros_like(field)
    d = ndimage.distance_transform_edt(~med, sampling=spacing)
    return field & (d <= band_mm)


def hilar_metrics(lab, hu, spacing, field=None, band_mm: float = BAND_MM) -> dict:
    """Lesion (GGO + consolidation) area in the hilar band, in mm², and related counts.

    ``field``: the lung field that defines the band (default: the labels' own field,
    GGO ∪ consolidation ∪ lung). Using one reference field for several runs keeps the
    band fixed so that runs compare on the same pixels."""
    px = spacing[0] * spacing[1]
    lesion = (lab == GGO) | (lab == CONS)
    if field is None:
        field = lab > 0
    band = hilar_band(field, spacing, band_mm)
    dense = hu > DENSE_HU
    return {
        "band_mm2": float(band.sum() * px),
        "hilar_lesion_mm2": float((lesion & band).sum() * px),
        "hilar_ggo_mm2": float(((lab == GGO) & band).sum() * px),
        "hilar_cons_mm2": float(((lab == CONS) & band).sum() * px),
        "hilar_lesion_frac": float((lesion & band).sum() / max(1, band.sum())),
        # dense (> -400 HU) pixels of the band that are called lesion: vessels / walls as lesion
        "hilar_dense_as_lesion_frac": float((lesion & band & dense).sum() / max(1, (band & dense).sum())),
        "lesion_mm2": float(lesion.sum() * px),
        "field_mm2": float(field.sum() * px),
    }


def reference_field(hu, spacing):
    """Thesis lung extraction (-170 HU) as a model-independent lung field."""
    return extract_lungs_slice(hu, spacing=spacing)


def overlay_png(path: Path, hu: np.ndarray, panels, titles, band=None, suptitle: str = "",
                panel_px: int = 260) -> None:
    """Side-by-side panels cropped to the lung field (``band``'s field, 10 mm margin): CT in
    lung window (W1500/L-600), GGO yellow, consolidation red, the hilar band outlined in cyan.
    Saved as a 96-colour palette PNG to stay small."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    field = panels[0] > 0
    rows, cols = np.flatnonzero(field.any(1)), np.flatnonzero(field.any(0))
    m = 15
    r0, r1 = max(rows[0] - m, 0), min(rows[-1] + m, hu.shape[0])
    c0, c1 = max(cols[0] - m, 0), min(cols[-1] + m, hu.shape[1])
    grey = np.clip((hu + 1350.0) / 1500.0, 0, 1)
    n = len(panels)
    aspect = (r1 - r0) / (c1 - c0)
    fig, axes = plt.subplots(1, n, figsize=(panel_px / 100 * n, panel_px / 100 * aspect + 0.5), dpi=100)
    axes = np.atleast_1d(axes)
    for ax, lab, t in zip(axes, panels, titles):
        rgb = np.repeat(grey[..., None], 3, axis=2)
        for cls, col in ((GGO, (1.0, 0.9, 0.0)), (CONS, (1.0, 0.1, 0.1))):
            mm = lab == cls
            rgb[mm] = 0.45 * rgb[mm] + 0.55 * np.array(col)
        if band is not None:
            edge = band & ~ndimage.binary_erosion(band)
            rgb[edge] = (0.0, 0.9, 0.9)
        ax.imshow(rgb[r0:r1, c0:c1], interpolation="antialiased")
        ax.set_title(t, fontsize=7)
        ax.axis("off")
    if suptitle:
        axes[0].set_title(f"{suptitle}\n{titles[0]}", fontsize=7)
    fig.tight_layout(pad=0.15)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", pad_inches=0.03)
    plt.close(fig)
    with Image.open(path) as im:
        im.convert("RGB").quantize(96, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
