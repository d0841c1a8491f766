"""Pseudo labels (thesis §4.4.1 steps 5-6): MATLAB structuring elements, k-means mapping."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
import sklearn.cluster

from DRSegUNetLib import sample_ct_path
from DRSegUNetLib.config import PseudoLabelConfig
from DRSegUNetLib.errors import InputError
from DRSegUNetLib.lungs import extract_lungs_slice
from DRSegUNetLib.pseudolabels import (clean_ggo, disk_strel, kmeans_ranks, line_strel, pseudolabel_slice, pseudolabel_volume,
                                       rank_clusters)
from DRSegUNetLib.vocabulary import BACKGROUND, CONSOLIDATION, GGO, LUNG


# --- structuring elements: MATLAB strel ------------------------------------------------------

def test_line_strel_8_at_50_degrees_matches_matlab():
    # strel('line', 8, 50): half-length 3.5 → x = round(2.25) = 2, y = round(2.68) = 3,
    # drawn with intline from (-2, 3) to (2, -3): 7 pixels, not 8.
    expected = np.array([
        [0, 0, 0, 0, 1],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 1, 0, 0],
        [0, 1, 0, 0, 0],
        [0, 1, 0, 0, 0],
        [1, 0, 0, 0, 0],
    ], dtype=bool)
    np.testing.assert_array_equal(line_strel(8, 50), expected)


def test_line_strel_horizontal_and_vertical():
    # MATLAB rounds the half-length 3.5 away from zero: 9 pixels for length 8.
    np.testing.assert_array_equal(line_strel(8, 0), np.ones((1, 9), dtype=bool))
    np.testing.assert_array_equal(line_strel(8, 90), np.ones((9, 1), dtype=bool))
    np.testing.assert_array_equal(line_strel(3, 45), np.fliplr(np.eye(3, dtype=bool)))


def test_line_strel_is_symmetric_about_its_centre():
    for angle in (0, 17, 50, 90, 135, 200):
        se = line_strel(8, angle)
        np.testing.assert_array_equal(se, se[::-1, ::-1])


def test_disk_strel_matlab_default_is_an_octagon_of_109_pixels():
    disk = disk_strel(6)
    assert disk.shape == (11, 11)  # half-width 5, not 6: the periodic-line approximation
    assert disk.sum() == 109
    assert disk[0].sum() == 7 and disk[0, :2].sum() == 0
    np.testing.assert_array_equal(disk, disk.T)


def test_disk_strel_exact_euclidean_and_small_radius():
    exact = disk_strel(6, approximation=0)
    assert exact.shape == (13, 13) and exact.sum() == 113
    assert disk_strel(2).sum() == 13  # MATLAB uses the exact disk below radius 3
    assert disk_strel(5).shape == (9, 9) and disk_strel(5).sum() == 69
    with pytest.raises(ValueError):
        disk_strel(6, approximation=5)


# --- k-means mapping -------------------------------------------------------------------------

def test_rank_clusters_is_invariant_to_relabelling():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 3, 500)
    centres = np.array([-400.0, -900.0, -750.0])
    expected = rank_clusters(ids, centres)
    np.testing.assert_array_equal(np.unique(expected[ids == 1]), [0])  # darkest centre → rank 0
    for perm in itertools.permutations(range(3)):
        p = np.array(perm)
        permuted_centres = np.empty_like(centres)
        permuted_centres[p] = centres
        np.testing.assert_array_equal(rank_clusters(p[ids], permuted_centres), expected)


@pytest.fixture(scope="module")
def real_slice() -> tuple[np.ndarray, np.ndarray]:
    """A 160x160 crop of the right lung of the bundled COVID CT slice (HU) and its lung mask."""
    image = sitk.ReadImage(str(sample_ct_path()))
    hu = sitk.GetArrayFromImage(image)[0].astype(np.float32)
    lung = extract_lungs_slice(hu, spacing=image.GetSpacing()[1::-1])
    return hu[180:340, 60:220], lung[180:340, 60:220]


def test_pseudo_labels_do_not_depend_on_kmeans_cluster_numbering(real_slice, monkeypatch):
    hu, lung = real_slice
    expected = pseudolabel_slice(hu, lung)
    assert (expected == GGO).any() and (expected == LUNG).any()

    class PermutedKMeans(sklearn.cluster.KMeans):
        perm = np.arange(3)
        fits = 0

        def fit(self, X, y=None, sample_weight=None):
            super().fit(X, y, sample_weight)
            PermutedKMeans.fits += 1
            centres = np.empty_like(self.cluster_centers_)
            centres[self.perm] = self.cluster_centers_
            self.labels_, self.cluster_centers_ = self.perm[self.labels_], centres
            return self

    monkeypatch.setattr(sklearn.cluster, "KMeans", PermutedKMeans)
    for perm in list(itertools.permutations(range(3)))[1:]:
        PermutedKMeans.perm = np.array(perm)
        np.testing.assert_array_equal(pseudolabel_slice(hu, lung), expected)
    assert PermutedKMeans.fits == 5


def test_mapping_darkest_clusters_are_lung_brightest_is_ggo():
    rng = np.random.default_rng(0)
    hu = np.full((120, 120), -1000.0, dtype=np.float32)
    lung = np.zeros(hu.shape, dtype=bool)
    lung[10:110, 10:110] = True
    hu[lung] = rng.choice([-950.0, -850.0], size=int(lung.sum())) + rng.normal(0, 10, int(lung.sum()))
    hu[40:70, 40:70] = -450.0 + rng.normal(0, 10, (30, 30))  # a ground-glass patch
    labels = pseudolabel_slice(hu, lung)
    assert labels.dtype == np.uint8
    assert set(np.unique(labels)) == {BACKGROUND, GGO, LUNG}
    assert (labels[~lung] == BACKGROUND).all()
    assert (labels[40:70, 40:70] == GGO).mean() > 0.95
    assert (labels[lung] == GGO).sum() < 1.1 * 900
    assert not (labels == CONSOLIDATION).any()


def test_clean_up_removes_thin_structures_and_keeps_patches():
    ggo = np.zeros((80, 80), dtype=bool)
    ggo[np.arange(5, 75), np.arange(5, 75)] = True  # a one-pixel vessel at 45°
    ggo[30:60, 10:40] = True  # a 30x30 patch
    out = clean_ggo(ggo, PseudoLabelConfig())
    assert not out[5:25, 45:75].any() and not out[60:75, 60:75].any()
    assert out[30:60, 10:40].mean() > 0.95


def test_lung_with_uniform_values_is_all_lung():
    hu = np.full((40, 40), -1000.0, dtype=np.float32)
    lung = np.zeros(hu.shape, dtype=bool)
    lung[5:35, 5:35] = True
    hu[lung] = -850.0
    labels = pseudolabel_slice(hu, lung)
    assert (labels[lung] == LUNG).all() and (labels[~lung] == BACKGROUND).all()


@pytest.mark.parametrize("hu,mask,message", [
    (np.full((8, 8), np.nan), np.ones((8, 8), bool), "NaN"),
    (np.zeros((8, 8)), np.ones((8, 9), bool), "shape"),
    (np.zeros((2, 8, 8)), np.ones((2, 8, 8), bool), "2D"),
])
def test_bad_input_is_refused(hu, mask, message):
    with pytest.raises(InputError, match=message):
        pseudolabel_slice(hu, mask)


def test_pseudolabel_volume_on_real_covid_ct_keeps_geometry():
    image = sitk.ReadImage(str(sample_ct_path()))  # bilateral GGO and consolidation
    seen = []
    labels = pseudolabel_volume(image, progress=lambda stage, step, total, message="", **kw: seen.append(step))
    assert (labels.GetSize(), labels.GetSpacing(), labels.GetOrigin(), labels.GetDirection()) == \
        (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    a = sitk.GetArrayFromImage(labels)
    assert set(np.unique(a)) <= {BACKGROUND, GGO, LUNG}
    ggo_fraction = (a == GGO).sum() / (a > 0).sum()
    assert 0.1 < ggo_fraction < 0.35  # measured 0.20 on this slice
    assert seen == [1]


def test_default_clusters_the_lung_extracted_image_as_the_thesis_does(real_slice):
    """Thesis step 4-5: the lung mask is applied to the image (outside = air) and k-means
    (K=3) runs on that image. Reference: sklearn on every pixel of the masked image. The
    library clusters distinct values weighted by their counts: the same objective, but
    Lloyd's iterations start elsewhere and may stop in another local optimum. On this
    slice: inertia 3.5291e8 vs 3.5284e8, 154 of about 8,300 top-cluster pixels differ."""
    hu, lung = real_slice
    cfg = PseudoLabelConfig()
    assert cfg.cluster_domain == "image"
    masked = np.where(lung, np.clip(hu, cfg.hu_min, cfg.hu_max), cfg.hu_min).astype(np.float64)
    km = sklearn.cluster.KMeans(n_clusters=3, n_init=cfg.n_init, random_state=cfg.seed).fit(masked.reshape(-1, 1))
    top = (np.argsort(np.argsort(km.cluster_centers_.ravel()))[km.labels_] == 2).reshape(hu.shape)
    ours = kmeans_ranks(masked, cfg).reshape(hu.shape) == 2
    assert (top ^ ours).sum() <= 0.03 * (top | ours).sum()
    expected = np.where(lung, LUNG, BACKGROUND).astype(np.uint8)
    expected[clean_ggo(ours & lung, cfg) & lung] = GGO
    np.testing.assert_array_equal(pseudolabel_slice(hu, lung), expected)
    # Clustering the lung pixels alone puts the cut higher: less GGO.
    only_lung = pseudolabel_slice(hu, lung, PseudoLabelConfig(cluster_domain="lung"))
    assert 0 < (only_lung == GGO).sum() < (expected == GGO).sum()
    with pytest.raises(ValueError, match="cluster_domain"):
        pseudolabel_slice(hu, lung, PseudoLabelConfig(cluster_domain="body"))
