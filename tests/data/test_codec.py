"""Sample encoding: label maps travel beside the image, and a wrong one is refused by name."""
from __future__ import annotations

import numpy as np
import pytest

from pretrain.data.codec import decode_sample, encode_sample


def test_label_map_round_trips_and_is_absent_when_not_given():
    image = np.arange(2 * 8 * 8, dtype=np.uint16).reshape(2, 8, 8)
    mask = (np.arange(64, dtype=np.uint8) % 5).reshape(1, 8, 8)
    members = encode_sample("k1", image, {"label": 3}, mask=mask)
    back = decode_sample({**members, "__url__": "s.tar"})
    assert np.array_equal(back["mask"], mask) and back["mask"].dtype == np.uint8
    assert np.array_equal(back["image"], image) and back["label"] == 3
    assert decode_sample({**encode_sample("k2", image, {}), "__url__": "s.tar"})["mask"] is None


@pytest.mark.parametrize("mask", [np.zeros((1, 8, 7), np.uint8), np.zeros((2, 8, 8), np.uint8), np.zeros((1, 8, 8), np.float32)])
def test_a_label_map_off_the_image_grid_or_not_integer_is_refused(mask):
    with pytest.raises(ValueError, match="sample 'k'.*mask must be an integer array of shape \\(1, 8, 8\\)"):
        encode_sample("k", np.zeros((1, 8, 8), np.uint16), {}, mask=mask)
