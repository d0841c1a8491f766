"""HU slice → the 8-bit styles of the training data → approx. HU (EightBitConfig), for issue 21.

* ``medseg_style``: a lung-window JPEG like MedSeg's: HU window [lo, hi] → grey 0..255
  (rounded, clipped), JPEG-compressed (quality 75, PIL), read back, then EightBitConfig.
* ``zenodo_style``: COVID-19-CT-Seg's recipe (github dstaroff/COVID19-CT-Segmentation,
  src/segmentation/image/preprocessing.py: ``cv.resize(..., INTER_CUBIC)`` to 256,
  min-max per slice, ``uint8(x * 255)``, ``cv.createCLAHE(clipLimit=7.0)`` with OpenCV's
  default 8x8 tiles), then EightBitConfig. The resize is a cubic zoom (scipy) and CLAHE
  is ``clahe_u8`` below, a numpy re-implementation of OpenCV's algorithm (checked against
  cv2 4.x/5.x when it can be imported: ``python experiments/issue21/styles.py``).
"""
from __future__ import annotations

import io

import numpy as np
from scipy import ndimage

import common  # noqa: F401  (sets sys.path and torch threads)
from DRSegUNetLib.config import EightBitConfig
from DRSegUNetLib.preprocessing import eight_bit_to_hu


def to_u8(x01: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(x01, np.float64) * 255.0), 0, 255).astype(np.uint8)


def jpeg(u8: np.ndarray, quality: int = 75) -> np.ndarray:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("L"))


def clahe_u8(img: np.ndarray, clip_limit: float = 7.0, tiles: tuple[int, int] = (8, 8)) -> np.ndarray:
    """OpenCV's CLAHE (imgproc/src/clahe.cpp) for uint8 images: per-tile histograms clipped
    at max(int(clip_limit * tile_area / 256), 1), the excess spread evenly (the residual one
    count per step bins), LUT = round(cdf * 255 / tile_area), bilinear blending of the four
    nearest tiles' LUTs. Images not divisible by the tile grid are padded (reflect 101)."""
    h, w = img.shape
    ty, tx = tiles
    ph, pw = (-h) % ty, (-w) % tx
    src = np.pad(img, ((0, ph), (0, pw)), mode="reflect") if (ph or pw) else img
    th, tw = src.shape[0] // ty, src.shape[1] // tx
    area = th * tw
    clip = max(int(clip_limit * area / 256), 1)
    luts = np.zeros((ty, tx, 256), np.float64)
    for i in range(ty):
        for j in range(tx):
            hist = np.bincount(src[i * th:(i + 1) * th, j * tw:(j + 1) * tw].ravel(), minlength=256).astype(np.int64)
            excess = int(np.maximum(hist - clip, 0).sum())
            hist = np.minimum(hist, clip)
            batch = excess // 256
            residual = excess - batch * 256
            hist += batch
            if residual:
                step = max(256 // residual, 1)
                idx = np.arange(0, 256, step)[:residual]
                hist[idx] += 1
            luts[i, j] = np.clip(np.round(np.cumsum(hist) * (255.0 / area)), 0, 255)
    # bilinear interpolation between tile centres (on the unpadded image)
    yf = np.arange(h) / th - 0.5
    xf = np.arange(w) / tw - 0.5
    y1 = np.floor(yf).astype(int)
    x1 = np.floor(xf).astype(int)
    ya, xa = yf - y1, xf - x1
    y2, x2 = np.minimum(y1 + 1, ty - 1), np.minimum(x1 + 1, tx - 1)
    y1, x1 = np.maximum(y1, 0), np.maximum(x1, 0)
    v = img.astype(np.intp)
    Y1, X1, Y2, X2 = y1[:, None], x1[None, :], y2[:, None], x2[None, :]
    YA, XA = ya[:, None], xa[None, :]
    out = ((luts[Y1, X1, v] * (1 - XA) + luts[Y1, X2, v] * XA) * (1 - YA)
           + (luts[Y2, X1, v] * (1 - XA) + luts[Y2, X2, v] * XA) * YA)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def medseg_style(hu: np.ndarray, window: tuple[float, float], eb: EightBitConfig = EightBitConfig(),
                 quality: int = 75) -> np.ndarray:
    lo, hi = window
    u8 = to_u8((hu - lo) / (hi - lo))
    if quality:
        u8 = jpeg(u8, quality)
    return eight_bit_to_hu(u8, eb)


def zenodo_u8(hu: np.ndarray, size: int = 256, clip_floor: float = -1024.0) -> np.ndarray:
    x = np.maximum(hu.astype(np.float64), clip_floor)
    if size and size != x.shape[0]:
        x = ndimage.zoom(x, size / x.shape[0], order=3, grid_mode=True, mode="nearest")
    x = (x - x.min()) / (x.max() - x.min())
    return clahe_u8(to_u8(np.clip(x, 0, 1)), 7.0)


def zenodo_style(hu: np.ndarray, size: int = 256, eb: EightBitConfig = EightBitConfig()) -> np.ndarray:
    return eight_bit_to_hu(zenodo_u8(hu, size), eb)


if __name__ == "__main__":  # check clahe_u8 against OpenCV where cv2 imports
    import sys
    sys.path.append("/tmp/cvdep")
    try:
        import cv2
    except ImportError:
        print("cv2 not importable; nothing to check")
        raise SystemExit(0)
    rng = np.random.default_rng(0)
    for name, hu, _ in common.ny_slices()[:4]:
        x = np.maximum(hu.astype(np.float64), -1024)
        x = ndimage.zoom(x, 0.5, order=3, grid_mode=True, mode="nearest")
        u8 = to_u8((x - x.min()) / (x.max() - x.min()))
        ours, ref = clahe_u8(u8), cv2.createCLAHE(clipLimit=7.0).apply(u8)
        d = np.abs(ours.astype(int) - ref.astype(int))
        print(f"{name}: cv2 {cv2.__version__} vs numpy CLAHE: max |diff| {d.max()}, mean {d.mean():.4f}, "
              f"equal {np.mean(d == 0):.4f}")
