"""Geometry helpers shared by tests and by `old_numpy_check.py` (which runs under another Python)."""
import SimpleITK as sitk


def oblique_image(image: sitk.Image) -> sitk.Image:
    """The same content with the axes permuted and flipped and a non-identity direction:
    index i → -x (L→R), j → -z (head→feet), k → +y (anterior→posterior)."""
    arr = sitk.GetArrayFromImage(image)[::-1, :, ::-1].transpose(1, 0, 2).copy()  # (y, z, x)
    out = sitk.GetImageFromArray(arr)
    sp = image.GetSpacing()
    out.SetSpacing((sp[0], sp[2], sp[1]))
    out.SetDirection((-1, 0, 0, 0, 0, 1, 0, -1, 0))
    out.SetOrigin((12.5, -40.0, 7.0))
    return out
