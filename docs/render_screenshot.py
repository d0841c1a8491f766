"""Render docs/screenshot.png: the extension's screenshot for the Extensions Manager.

This is an off-screen VTK rendering of what the library (the same code the Slicer module runs)
writes for two real CTs that ship with this repository; it is NOT a screenshot of the Slicer GUI.

- Left: the bundled COVID-19 CT slice (DRSegUNetLib/data/ny_sbu_A002304_135.dcm, TCIA
  COVID-19-NY-SBU, CC BY 4.0) with the bundled model's labels: ground-glass opacity yellow,
  consolidation red, outline of the lung field blue.
- Right: 3D surfaces of the same model's labels on a real multi-slice chest CT
  (Testing/data/cip_ct64/ct-64.nrrd, Chest Imaging Platform COPDGene test data, 64x64x79 voxels of
  4.2x4.2x4.0 mm). That patient has COPD, not COVID-19: the lung field (translucent blue) is the
  point of this panel, and whatever the model labels GGO or consolidation there is not a COVID-19
  lesion. The caption prints those volumes.

Labels come from ``python -m DRSegUNetLib segment ... --device cpu --threads 1`` (the command line,
in a subprocess), so the picture is the program's output, not a re-implementation of it.

Run from anywhere: ``.venv/bin/python docs/render_screenshot.py [--out docs/screenshot.png]``.
Needs the library's requirements and the ``vtk`` package (``slicer-core`` brings it); no display:
VTK picks an off-screen OpenGL context (EGL or OSMesa) when there is no X server (a one-line
"bad X server connection" warning is then expected). Single-threaded on purpose; about 10 s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# one thread for torch, BLAS and Mesa's llvmpipe rasteriser (set before they are imported)
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "LP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SLICE_CT = REPO / "DRSegUNetLib" / "data" / "ny_sbu_A002304_135.dcm"
VOLUME_CT = REPO / "Testing" / "data" / "cip_ct64" / "ct-64.nrrd"
MAX_BYTES = 400_000

GGO, CONSOLIDATION, LUNG = 1, 2, 3  # label values of `segment` (README: 1 GGO, 2 consolidation, 3 lung)
YELLOW, RED, BLUE = (1.0, 0.86, 0.1), (0.92, 0.16, 0.12), (0.25, 0.55, 1.0)
WINDOW, LEVEL = 1500.0, -600.0  # lung window


def segment(ct: Path, workdir: Path, name: str) -> tuple[np.ndarray, sitk.Image, dict]:
    """Labels (z, y, x), the CT and the JSON report, from the library's command line."""
    labels_path, report_path = workdir / f"{name}_labels.nii.gz", workdir / f"{name}_report.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-m", "DRSegUNetLib", "segment", str(ct), str(labels_path),
                    "--device", "cpu", "--threads", "1", "--report", str(report_path)],
                   check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path)))
    image = sitk.ReadImage(str(ct))
    return labels, image, json.loads(report_path.read_text())


def to_vtk_image(array: np.ndarray, spacing) -> vtk.vtkImageData:
    """A (z, y, x) or (y, x) numpy array as vtkImageData with x fastest."""
    array = np.ascontiguousarray(array if array.ndim == 3 else array[None])
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.SetSpacing(*spacing)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True))
    return image


def text(message: str, x: float, y: float, size: int, bold: bool = False, color=(1, 1, 1), centred: bool = False):
    actor = vtk.vtkTextActor()
    actor.SetInput(message)
    actor.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
    actor.SetPosition(x, y)
    prop = actor.GetTextProperty()
    prop.SetFontSize(size)
    prop.SetBold(bold)
    prop.SetColor(*color)
    prop.SetFontFamilyToArial()
    if centred:
        prop.SetJustificationToCentered()
    prop.SetVerticalJustificationToBottom()
    return actor


def slice_renderer(labels: np.ndarray, image: sitk.Image) -> vtk.vtkRenderer:
    """The CT slice in a lung window, GGO and consolidation filled, the lung field outlined."""
    hu = sitk.GetArrayFromImage(image)[0].astype(np.float32)
    lab = labels[0]
    # rows of a DICOM axial slice run anterior -> posterior; VTK's y runs up: flip so anterior is on top
    # (columns run patient right -> left, so the patient's right is on the left: radiological convention)
    hu, lab = hu[::-1], lab[::-1]
    sx, sy = image.GetSpacing()[:2]

    ren = vtk.vtkRenderer()
    grey = vtk.vtkImageMapToWindowLevelColors()
    grey.SetInputData(to_vtk_image(hu, (sx, sy, 1.0)))
    grey.SetWindow(WINDOW)
    grey.SetLevel(LEVEL)
    grey.SetOutputFormatToRGB()
    ct_actor = vtk.vtkImageActor()
    ct_actor.GetMapper().SetInputConnection(grey.GetOutputPort())
    ren.AddActor(ct_actor)

    table = vtk.vtkLookupTable()
    table.SetNumberOfTableValues(4)
    table.SetRange(0, 3)
    table.SetTableValue(0, 0, 0, 0, 0)
    table.SetTableValue(GGO, *YELLOW, 0.5)
    table.SetTableValue(CONSOLIDATION, *RED, 0.55)
    table.SetTableValue(LUNG, 0, 0, 0, 0)
    table.Build()
    colours = vtk.vtkImageMapToColors()
    colours.SetInputData(to_vtk_image(lab.astype(np.uint8), (sx, sy, 1.0)))
    colours.SetLookupTable(table)
    colours.SetOutputFormatToRGBA()
    lesion_actor = vtk.vtkImageActor()
    lesion_actor.GetMapper().SetInputConnection(colours.GetOutputPort())
    lesion_actor.SetPosition(0, 0, 0.5)  # in front of the CT (the camera looks down -z)
    ren.AddActor(lesion_actor)

    contour = vtk.vtkFlyingEdges2D()
    contour.SetInputData(to_vtk_image((lab > 0).astype(np.float32), (sx, sy, 1.0)))
    contour.SetValue(0, 0.5)
    outline = vtk.vtkPolyDataMapper()
    outline.SetInputConnection(contour.GetOutputPort())
    outline.ScalarVisibilityOff()
    outline_actor = vtk.vtkActor()
    outline_actor.SetMapper(outline)
    outline_actor.GetProperty().SetColor(*BLUE)
    outline_actor.GetProperty().SetLineWidth(2.0)
    outline_actor.SetPosition(0, 0, 1.0)
    ren.AddActor(outline_actor)

    ren.SetBackground(0, 0, 0)
    camera = ren.GetActiveCamera()
    camera.ParallelProjectionOn()
    centre = (hu.shape[1] * sx / 2, hu.shape[0] * sy / 2, 0)
    camera.SetFocalPoint(*centre)
    camera.SetPosition(centre[0], centre[1], 1000)
    camera.SetViewUp(0, 1, 0)
    camera.SetParallelScale(hu.shape[0] * sy / 2 * 1.02)
    ren.ResetCameraClippingRange()
    return ren


def surface(mask: np.ndarray, spacing, colour, opacity: float) -> vtk.vtkActor:
    padded = np.pad(mask.astype(np.float32), 1)  # closed surfaces at the volume's border
    edges = vtk.vtkFlyingEdges3D()
    edges.SetInputData(to_vtk_image(padded, spacing))
    edges.SetValue(0, 0.5)
    smooth = vtk.vtkWindowedSincPolyDataFilter()
    smooth.SetInputConnection(edges.GetOutputPort())
    smooth.SetNumberOfIterations(20)
    smooth.SetPassBand(0.05)
    smooth.NonManifoldSmoothingOn()
    smooth.NormalizeCoordinatesOn()
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputConnection(smooth.GetOutputPort())
    normals.SetFeatureAngle(60)
    mapper = vtk.vtkPolyDataMapper()
    mapper.SetInputConnection(normals.GetOutputPort())
    mapper.ScalarVisibilityOff()
    actor = vtk.vtkActor()
    actor.SetMapper(mapper)
    actor.GetProperty().SetColor(*colour)
    actor.GetProperty().SetOpacity(opacity)
    actor.GetProperty().SetSpecular(0.2)
    return actor


def volume_renderer(labels: np.ndarray, image: sitk.Image) -> vtk.vtkRenderer:
    """Surfaces of the three segments: lung field translucent blue, GGO yellow, consolidation red."""
    spacing = image.GetSpacing()
    ren = vtk.vtkRenderer()
    ren.AddActor(surface(labels > 0, spacing, BLUE, 0.2))  # the whole lung field, lesions included
    for value, colour in ((GGO, YELLOW), (CONSOLIDATION, RED)):
        if (labels == value).any():
            ren.AddActor(surface(labels == value, spacing, colour, 1.0))
    ren.SetBackground(0.08, 0.09, 0.12)
    ren.SetUseDepthPeeling(1)
    ren.SetMaximumNumberOfPeels(8)
    # identity direction, LPS: +x patient left, +y posterior, +z superior. Look from the front
    # (camera anterior, -y), head up, turned a little to the patient's left.
    ren.ResetCamera()
    camera = ren.GetActiveCamera()
    focal = np.array(camera.GetFocalPoint())
    camera.SetPosition(*(focal + np.array([0.0, -1.0, 0.0])))
    camera.SetViewUp(0, 0, 1)
    ren.ResetCamera()
    camera.Azimuth(-25)
    camera.Elevation(12)
    camera.OrthogonalizeViewUp()
    ren.ResetCamera()
    camera.Zoom(1.25)
    ren.ResetCameraClippingRange()
    return ren


def render(out: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="drsegunet_screenshot_") as tmp:
        slice_labels, slice_image, slice_report = segment(SLICE_CT, Path(tmp), "slice")
        vol_labels, vol_image, vol_report = segment(VOLUME_CT, Path(tmp), "volume")

    width, height = 1280, 720
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(width, height)
    window.SetAlphaBitPlanes(1)
    window.SetMultiSamples(0)

    left, right = slice_renderer(slice_labels, slice_image), volume_renderer(vol_labels, vol_image)
    left.SetViewport(0.0, 0.14, 0.5, 0.92)
    right.SetViewport(0.5, 0.14, 1.0, 0.92)
    title, caption = vtk.vtkRenderer(), vtk.vtkRenderer()
    title.SetViewport(0.0, 0.92, 1.0, 1.0)
    caption.SetViewport(0.0, 0.0, 1.0, 0.14)
    for ren in (title, caption):
        ren.SetBackground(0.12, 0.13, 0.16)
    title.AddViewProp(text("DRSegUNet: the bundled model's output on real CT   "
                          "(off-screen VTK rendering, not a screenshot of the Slicer GUI)", 0.5, 0.25, 20,
                          bold=True, centred=True))
    pct, vs = slice_report["percent_of_lung"], slice_report["volume_ml"]
    caption.AddViewProp(text(
        "Real COVID-19 CT slice (TCIA COVID-19-NY-SBU, patient A002304; CC BY 4.0)\n"
        f"GGO (yellow) {pct['ggo']:.0f} %, consolidation (red) {pct['consolidation']:.0f} % "
        "of this slice's lung field (blue outline)", 0.01, 0.3, 16))
    vv = vol_report["volume_ml"]
    caption.AddViewProp(text(
        "3D: real chest CT, 79 slices of 4 mm (CIP COPDGene test data).\n"
        f"COPD, no COVID-19: lung field (translucent blue) {vv['lung'] / 1000:.2f} L. The {vv['ggo']:.0f} mL\n"
        f"labelled GGO (yellow) and {vv['consolidation']:.0f} mL consolidation (red) on this scan\n"
        "are not COVID-19 lesions.", 0.51, 0.06, 16))
    for ren in (title, caption, left, right):
        window.AddRenderer(ren)
    window.Render()

    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    pixels = grab.GetOutput()
    w, h, _ = pixels.GetDimensions()
    rgb = numpy_support.vtk_to_numpy(pixels.GetPointData().GetScalars()).reshape(h, w, 3)[::-1]

    from PIL import Image  # Pillow is one of the library's requirements

    out.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(np.ascontiguousarray(rgb))
    picture.save(out, optimize=True)
    if out.stat().st_size > MAX_BYTES:  # the catalog shows it small; 256 colours keep it light
        picture.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "screenshot.png")
    args = p.parse_args(argv)
    out = render(args.out)
    print(f"wrote {out} ({out.stat().st_size // 1000} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
