"""Corruptions for shifted splits: deterministic per (seed, index), same labels, never writing the source."""

import numpy as np
import pytest

from tljax.data import corruptions as C
from tljax.data.records import Split


def _texture(shape, seed=0) -> np.ndarray:
    """A smooth gradient plus noise: every corruption visibly changes it."""
    h, w = shape[:2]
    grad = np.add.outer(np.arange(h) * 200 / h, np.arange(w) * 50 / w)
    noise = np.random.default_rng(seed).integers(0, 6, shape)
    return (grad.reshape(h, w, *([1] * (len(shape) - 2))) + noise).astype(np.uint8)


@pytest.mark.parametrize("kind", sorted(C.CORRUPTIONS))
def test_corruptions_deterministic_and_change_the_image(kind):
    for image in (_texture((28, 28, 1)), _texture((32, 24, 3))):
        before = image.copy()
        a = C.corrupt(image, kind, 3, np.random.default_rng(5))
        assert a.shape == image.shape and a.dtype == np.uint8
        np.testing.assert_array_equal(a, C.corrupt(image, kind, 3, np.random.default_rng(5)))
        assert not np.array_equal(a, image)
        np.testing.assert_array_equal(image, before)  # the source record is never written


def test_corrupted_split():
    records = [{"image": _texture((10, 10, 1)), "label": i % 2} for i in range(5)]
    clean = Split("toy:test", records, np.arange(5) % 2, ("a", "b"), "image")
    shifted = C.corrupted(clean, "gaussian_noise", 3)
    assert shifted.name == "toy:test[gaussian_noise-3]" and shifted.labels.tolist() == clean.labels.tolist()
    assert C.corrupted(clean, "contrast", 2, seed=4).name == "toy:test[contrast-2@seed4]"
    np.testing.assert_array_equal(shifted[2]["image"], C.corrupted(clean, "gaussian_noise", 3)[2]["image"])
    np.testing.assert_array_equal(shifted[-1]["image"], shifted[4]["image"])
    assert not np.array_equal(shifted[1]["image"], shifted[2]["image"])  # same clean image, other index
    assert not np.array_equal(shifted[1]["image"], C.corrupted(clean, "gaussian_noise", 3, seed=1)[1]["image"])
    assert shifted[3]["label"] == 1
    with pytest.raises(ValueError, match="unknown corruption"):
        C.corrupted(clean, "snow", 3)
    with pytest.raises(ValueError, match="severity"):
        C.corrupted(clean, "zigzag", 6)
