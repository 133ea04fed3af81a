"""Image corruptions in the style of ImageNet-C / MNIST-C (Hendrycks & Dietterich 2019; Mu & Gilmer 2019): a shifted
copy of a clean split with the same labels, each image corrupted with a generator seeded by (seed, index).

    shifted = corrupted(load("fashion_mnist:test"), "gaussian_noise", severity=3)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from PIL import ImageDraw, ImageFilter

from tljax.data.records import Split
from tljax.data.vision import fill_color, from_pil, to_pil


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _gaussian_noise(image, severity, rng):
    """ImageNet-C: additive N(0, c) on [0, 1] pixels, c = 0.08 .. 0.38."""
    c = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    return _to_uint8(image + 255 * rng.normal(scale=c, size=image.shape))


def _impulse_noise(image, severity, rng):
    """ImageNet-C: salt and pepper on a fraction c = 0.03 .. 0.27 of the pixel values, half white, half black."""
    c = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    hit, salt = rng.random(image.shape) < c, rng.random(image.shape) < 0.5
    return np.where(hit, np.where(salt, 255, 0), image).astype(np.uint8)


def _gaussian_blur(image, severity, rng):
    """ImageNet-C (and MNIST-C): Gaussian blur of sigma 1, 2, 3, 4, 6 pixels (PIL's extended-box approximation).

    The sigmas are in pixels of the image given, as MNIST-C applied them to 28x28 digits: on such small images
    severities above 2 leave little but the silhouette.
    """
    sigma = (1, 2, 3, 4, 6)[severity - 1]
    return from_pil(to_pil(image).filter(ImageFilter.GaussianBlur(sigma)))


def _contrast(image, severity, rng):
    """ImageNet-C: pixels pulled toward their per-channel mean, keeping a fraction c = 0.4 .. 0.05 of the spread."""
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    mean = image.mean(axis=(0, 1), keepdims=True)
    return _to_uint8((image - mean) * c + mean)


def _zigzag(image, severity, rng):
    """MNIST-C's zigzag, scaled to the image: `severity` white zigzag lines across it, each at a random height and
    slope, with teeth 2/28 of the image high every 4/28 of its width (MNIST-C draws one such line on 28x28 digits).
    """
    h, w = image.shape[:2]
    im = to_pil(image)
    draw, white = ImageDraw.Draw(im), fill_color(im, 255)
    xs = np.arange(0, w + 4 * w / 28, 4 * w / 28)  # a tooth every 4/28 of the width, alternately up and down
    teeth = 2 * h / 28 * (-1.0) ** np.arange(len(xs))
    for _ in range(severity):
        y0, slope = rng.uniform(0, h), rng.uniform(-5, 5) * h / (23 * w)  # MNIST-C: rise of up to 5 over 23 px
        draw.line([(float(x), float(y)) for x, y in zip(xs, y0 + slope * xs + teeth, strict=True)], white,
                  max(1, round(h / 28)))  # fmt: skip
    return from_pil(im)


# name -> corruption(image uint8 (H, W, C), severity 1..5, rng) -> uint8 image of the same shape
CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
    "zigzag": _zigzag,
}


def corrupt(image: np.ndarray, kind: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """`image` (uint8 (H, W, C)) corrupted by `kind` (a key of `CORRUPTIONS`) at `severity` 1..5.

    Same rng state -> same output; `corrupted` seeds one rng per (seed, index) for a reproducible shifted split.
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; choose from {sorted(CORRUPTIONS)}")
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be 1..5, got {severity}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected a uint8 (H, W, C) image, got {image.dtype} {image.shape}")
    return CORRUPTIONS[kind](image, severity, rng)


class CorruptedRecords:
    """`records` with each image corrupted on access, record i with `np.random.default_rng((seed, i))`."""

    def __init__(self, records, kind: str, severity: int, seed: int):
        self.records, self.kind, self.severity, self.seed = records, kind, severity, seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        index = range(len(self))[index]  # negative indices and bounds as a list has them; seeds need index >= 0
        record = dict(self.records[index])
        rng = np.random.default_rng((self.seed, index))
        record["image"] = corrupt(record["image"], self.kind, self.severity, rng)
        return record


def corrupted(split: Split, kind: str, severity: int, seed: int = 0) -> Split:
    """A corrupted copy of an image split, computed lazily and deterministically per (seed, index).

    Named like "fashion_mnist:test[gaussian_noise-3]" (with "@seed<seed>" appended for a seed other than 0); same
    labels and label names, so a model trained on the clean split is scored on it directly.
    """
    corrupt(np.zeros((1, 1, 1), np.uint8), kind, severity, np.random.default_rng(0))  # argument errors now, not later
    if split.kind != "image":
        raise ValueError(f"{split.name} holds {split.kind}, corruptions need images")
    suffix = f"{kind}-{severity}" + (f"@seed{seed}" if seed else "")
    about = f"{split.about} Corrupted with {kind} at severity {severity} (ImageNet-C/MNIST-C style, seed {seed})."
    return replace(split, name=f"{split.name}[{suffix}]", records=CorruptedRecords(split.records, kind, severity, seed),
                   about=about.strip())  # fmt: skip
