import numpy as np
import pytest

from DRSegUNetLib.metrics import MetricAccumulator, counts


def test_scores_on_hand_computed_case():
    pred = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
    truth = np.array([1, 1, 0, 1, 1, 0, 0, 0], bool)
    s = counts(pred, truth).scores()  # tp 2, fp 1, fn 2
    assert s["dice"] == pytest.approx(4 / 7)
    assert s["iou"] == pytest.approx(2 / 5)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 4)
    assert s["f1"] == pytest.approx(s["dice"])


def test_absent_from_both_is_left_out_of_the_mean_but_counted():
    acc = MetricAccumulator(["ggo", "infection", "lung"])
    # slice a: labels 1 GGO, 2 consolidation, 3 lung
    pred_a = np.array([[1, 1, 3, 0]])
    acc.add("a", pred_a, {"ggo": np.array([[1, 0, 0, 0]], bool), "infection": np.array([[1, 1, 0, 0]], bool)})
    pred_b = np.array([[3, 3, 0, 0]])
    acc.add("b", pred_b, {"ggo": np.zeros((1, 4), bool), "infection": np.zeros((1, 4), bool),
                         "lung": np.array([[1, 1, 1, 0]], bool)})
    s = acc.summary()
    assert s["ggo"]["n_slices"] == 2 and s["ggo"]["n_empty_both"] == 1
    assert s["ggo"]["mean"]["dice"] == pytest.approx(2 / 3)  # slice a only: tp1 fp1 fn0
    # infection = GGO ∪ consolidation: predicted pixels 0-1 are exactly the true ones
    assert s["infection"]["mean"]["dice"] == pytest.approx(1.0)
    assert s["infection"]["n_empty_both"] == 1
    assert s["lung"]["n_slices"] == 1  # slice a did not decide the lung
    assert s["lung"]["pooled"]["dice"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))


def test_prediction_without_truth_scores_zero_not_nan():
    acc = MetricAccumulator(["ggo"])
    acc.add("a", np.array([[1, 0]]), {"ggo": np.zeros((1, 2), bool)})
    s = acc.summary()["ggo"]
    assert s["mean"]["dice"] == 0.0 and s["pooled"]["precision"] == 0.0


def test_region_areas_count_label_values_of_each_region_at_the_pixel_size():
    from DRSegUNetLib.metrics import region_areas_cm2
    from DRSegUNetLib.vocabulary import CONSOLIDATION, GGO, LUNG

    labels = np.zeros((2, 10, 10), np.uint8)
    labels[0, :2] = GGO            # 20 px
    labels[0, 2:5] = CONSOLIDATION  # 30 px
    labels[1, :4] = LUNG           # 40 px
    areas = region_areas_cm2(labels, 2.0)  # 4 mm² a pixel = 0.04 cm²
    assert areas == pytest.approx({"ggo": 0.8, "consolidation": 1.2, "infection": 2.0, "lung": 3.6})
    assert region_areas_cm2(labels[1], 1.0, ("lung",)) == pytest.approx({"lung": 0.4})
