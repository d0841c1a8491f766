"""Volume nodes ⇄ SimpleITK images, and masks ⇄ segment labelmaps (no sitkUtils needed).

MRML arrays are (k, j, i) with an IJK→RAS matrix on the node; SimpleITK arrays are
(z, y, x) = (k, j, i) with LPS geometry. Only the matrix needs converting.
"""
import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from DRSegUNetLib.segio import ijk_to_lps

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse


def ijkToRasArray(volumeNode) -> np.ndarray:
    """The node's 4x4 IJK→RAS matrix as a numpy array."""
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def sitkImageFromVolumeNode(volumeNode) -> sitk.Image:
    """A SimpleITK image (LPS geometry) with a copy of the node's voxels."""
    imageData = volumeNode.GetImageData()
    if imageData is None or imageData.GetPointData().GetScalars() is None:
        raise ValueError(f"volume '{volumeNode.GetName()}' has no image data")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume '{volumeNode.GetName()}' has {imageData.GetNumberOfScalarComponents()} "
                         "components per voxel (RGB?); a CT has one")
    image = sitk.GetImageFromArray(slicer.util.arrayFromVolume(volumeNode))  # copies
    ijkToLps = _RAS_TO_LPS @ ijkToRasArray(volumeNode)
    axes = ijkToLps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(d) for d in (axes / spacing).ravel()])
    image.SetOrigin([float(o) for o in ijkToLps[:3, 3]])
    return image


def volumeNodeFromSitkImage(image: sitk.Image, name: str = "CT", scene=None,
                            nodeClass: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node in ``scene`` (default ``slicer.mrmlScene``) with the image's voxels and geometry."""
    scene = scene if scene is not None else slicer.mrmlScene
    array = sitk.GetArrayViewFromImage(image)
    if array.ndim != 3:
        raise ValueError(f"need a 3-D scalar image, got an array of shape {array.shape}")
    node = scene.AddNewNodeByClass(nodeClass, name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(_RAS_TO_LPS @ ijk_to_lps(image)))
    slicer.util.updateVolumeFromArray(node, array)  # copies
    node.CreateDefaultDisplayNodes()
    return node


def orientedImageFromMask(volumeNode, mask: np.ndarray):
    """A binary labelmap (0/1 uint8) on the volume's voxel grid from a (k, j, i) mask."""
    from vtk.util import numpy_support

    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    image = slicer.vtkOrientedImageData()
    image.SetImageToWorldMatrix(ijkToRas)
    image.SetExtent(0, mask.shape[2] - 1, 0, mask.shape[1] - 1, 0, mask.shape[0] - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.asarray(mask, np.uint8).ravel()
    return image
