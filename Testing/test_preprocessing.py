import numpy as np
import pytest

from DRSegUNetLib.config import EightBitConfig, PreprocessConfig
from DRSegUNetLib.errors import InputError
from DRSegUNetLib.preprocessing import check_ct_hu, eight_bit_to_hu, normalize


def test_normalize_clips_to_thesis_window_then_z_scores():
    cfg = PreprocessConfig(hu_min=-1000, hu_max=100, mean=-500, std=250)
    x = normalize(np.array([-3024, -1000, -500, 0, 100, 3071]), cfg)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [-2.0, -2.0, 0.0, 2.0, 2.4, 2.4])


def test_eight_bit_rule_maps_black_to_air_and_white_to_window_top():
    cfg = EightBitConfig()
    np.testing.assert_allclose(eight_bit_to_hu(np.array([0, 255], np.uint8), cfg), [cfg.low, cfg.high])
    assert cfg.low == -1000.0


@pytest.mark.parametrize("array,message", [
    (np.zeros((0, 4, 4)), "empty"),
    (np.array([[-1000.0, np.nan]]), "NaN"),
    (np.random.default_rng(0).integers(0, 256, (8, 8)), "8-bit"),
    (np.random.default_rng(0).integers(0, 4000, (8, 8)), "MR"),
    (np.full((8, 8), -1000.0), "air"),
])
def test_not_ct_is_refused_with_a_reason(array, message):
    with pytest.raises(InputError, match=message):
        check_ct_hu(array)


def test_real_ct_range_is_accepted():
    a = np.full((10, 10), 40.0)
    a[:3] = -1000
    a[0, 0] = -3024
    check_ct_hu(a)
