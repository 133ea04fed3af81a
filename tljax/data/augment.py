"""Training augmentation seeded per example, and batch-level mixup/cutmix.

Every random op takes `(image uint8 (H, W, C), rng: np.random.Generator)`. Pipelines hand it grain's per-element
generator, which grain 0.2 seeds from (pipeline seed, element index) alone, so example i of a run gets the same
augmentation whatever was read before it: a resumed run, or a second worker, reproduces it exactly.

    pre = ImagePreprocess.from_pretrained(folder)
    aug = Augment(randaugment_n=2, randaugment_m=9, mixup_alpha=0.8, cutmix_alpha=1.0)
    ds = grain.MapDataset.source(train).shuffle(seed=0).random_map(train_transform(pre, aug), seed=1).batch(64)
    ds = ds.random_map(aug.batch_transform(train.num_classes), seed=2)   # soft labels (64, C)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from tljax.data.vision import ImagePreprocess, fill_color, from_pil, to_pil

# ------------------------------------------------------------------------------------------- random resized crop


def random_resized_crop_box(
    height: int, width: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) as torchvision's `RandomResizedCrop.get_params` draws it.

    Area fraction uniform in `scale`, aspect ratio log-uniform in `ratio`; 10 tries to fit the image, then the
    central crop with the ratio clamped into `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    resample: int = Image.Resampling.BILINEAR,
) -> np.ndarray:
    """A random crop (see `random_resized_crop_box`) resized to (size, size): uint8 (H, W, C) -> (size, size, C).

    Cropping and resizing are one PIL call (`resize(box=...)`), so no intermediate image is made.
    """
    top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
    return from_pil(to_pil(image).resize((size, size), resample, box=(left, top, left + w, top + h)))


def horizontal_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """The image mirrored left-right with probability `p` (a view, no copy)."""
    return image[:, ::-1] if rng.random() < p else image


# ----------------------------------------------------------------------------------------------------- RandAugment

RANDAUGMENT_MAX_M = 10  # magnitudes on timm's scale: "rand-m9-n2" is randaugment_m=9, randaugment_n=2


def _signed(value: float, rng: np.random.Generator) -> float:
    """`value` with a random sign: geometric and enhance ops go either way."""
    return value if rng.random() < 0.5 else -value


def _affine(im: Image.Image, coeffs: tuple, fill: int) -> Image.Image:
    """PIL affine: output pixel (x, y) samples input (a x + b y + c, d x + e y + f)."""
    return im.transform(
        im.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=fill_color(im, fill)
    )


def _shear_x(im, level, rng, fill):
    s = _signed(0.3 * level, rng)
    return _affine(im, (1, s, -s * im.height / 2, 0, 1, 0), fill)  # about the centre, as torchvision does


def _shear_y(im, level, rng, fill):
    s = _signed(0.3 * level, rng)
    return _affine(im, (1, 0, 0, s, 1, -s * im.width / 2), fill)


def _translate_x(im, level, rng, fill):
    return _affine(im, (1, 0, _signed(0.45 * level, rng) * im.width, 0, 1, 0), fill)


def _translate_y(im, level, rng, fill):
    return _affine(im, (1, 0, 0, 0, 1, _signed(0.45 * level, rng) * im.height), fill)


def _rotate(im, level, rng, fill):
    return im.rotate(_signed(30 * level, rng), Image.Resampling.BILINEAR, fillcolor=fill_color(im, fill))


def _enhance(enhancer) -> Callable:
    """An op scaling an ImageEnhance factor by 1 +/- 0.9 * level (torchvision's and timm's range)."""
    return lambda im, level, rng, fill: enhancer(im).enhance(1 + _signed(0.9 * level, rng))


# name -> op(image, level in [0, 1], rng, fill) -> image; ranges at level 1 as torchvision's RandAugment at full
# magnitude (translate as a fraction of the image, 0.45 like timm, so the op means the same at any resolution).
RANDAUGMENT_OPS: dict[str, Callable[[Image.Image, float, np.random.Generator, int], Image.Image]] = {
    "identity": lambda im, level, rng, fill: im,
    "autocontrast": lambda im, level, rng, fill: ImageOps.autocontrast(im),
    "equalize": lambda im, level, rng, fill: ImageOps.equalize(im),
    "rotate": _rotate,  # up to +/-30 degrees
    "shear_x": _shear_x,  # up to +/-0.3
    "shear_y": _shear_y,
    "translate_x": _translate_x,  # up to +/-45% of the width
    "translate_y": _translate_y,
    "brightness": _enhance(ImageEnhance.Brightness),  # factor 0.1 .. 1.9
    "contrast": _enhance(ImageEnhance.Contrast),
    "color": _enhance(ImageEnhance.Color),
    "sharpness": _enhance(ImageEnhance.Sharpness),
    "posterize": lambda im, level, rng, fill: ImageOps.posterize(im, 8 - round(4 * level)),  # 8 .. 4 bits
    "solarize": lambda im, level, rng, fill: ImageOps.solarize(im, 256 - round(256 * level)),  # invert above
}


def rand_augment_pil(im: Image.Image, rng: np.random.Generator, n: int, m: float, fill: int = 0) -> Image.Image:
    """RandAugment on a PIL image: `n` ops drawn uniformly with replacement, each at magnitude `m` of 10."""
    names = list(RANDAUGMENT_OPS)
    level = m / RANDAUGMENT_MAX_M
    for _ in range(n):
        im = RANDAUGMENT_OPS[names[rng.integers(len(names))]](im, level, rng, fill)
    return im


def rand_augment(image: np.ndarray, rng: np.random.Generator, n: int = 2, m: float = 9, fill: int = 0) -> np.ndarray:
    """RandAugment (Cubuk et al. 2020) on uint8 (H, W, C) with C 1 or 3; ops and ranges in `RANDAUGMENT_OPS`.

    As torchvision's: every drawn op is applied (no per-op probability) at the fixed magnitude (no magnitude noise);
    areas uncovered by geometric ops get `fill` (0, black, torchvision's default).
    """
    return from_pil(rand_augment_pil(to_pil(image), rng, n, m, fill))


# ------------------------------------------------------------------------------------------------- mixup / cutmix


def soft_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(B,) class indices -> float32 one-hot (B, C); (B, C) probabilities pass through (so mixes compose)."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return labels.astype(np.float32)
    return np.eye(num_classes, dtype=np.float32)[labels]


def mixup(batch: Mapping[str, Any], rng: np.random.Generator, alpha: float, num_classes: int) -> dict:
    """Mixup (Zhang et al. 2018): each example blended with its neighbour in the batch (`np.roll` by 1, as
    torchvision's v2 MixUp pairs them), weight lam ~ Beta(alpha, alpha) shared by the batch.

    Returns the batch with pixel_values lam * x + (1 - lam) * x_rolled and float32 labels (B, num_classes) mixed
    the same way (rows sum to 1).
    """
    lam = np.float32(rng.beta(alpha, alpha))
    x, y = np.asarray(batch["pixel_values"], np.float32), soft_labels(batch["labels"], num_classes)
    mixed = lam * x + (1 - lam) * np.roll(x, 1, axis=0)
    return {**batch, "pixel_values": mixed, "labels": lam * y + (1 - lam) * np.roll(y, 1, axis=0)}


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box covering about 1 - lam of the image, centred uniformly, clipped."""
    half_h, half_w = int(height * math.sqrt(1 - lam) / 2), int(width * math.sqrt(1 - lam) / 2)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    return max(cy - half_h, 0), min(cy + half_h, height), max(cx - half_w, 0), min(cx + half_w, width)


def cutmix(batch: Mapping[str, Any], rng: np.random.Generator, alpha: float, num_classes: int) -> dict:
    """CutMix (Yun et al. 2019): a box of each (B, C, H, W) image replaced by the same box of its neighbour
    (`np.roll` by 1), box area about 1 - lam with lam ~ Beta(alpha, alpha).

    The labels mix by the box's actual area after clipping to the image (timm's `correct_lam`), so they say how much
    of each image is really there; float32 (B, num_classes), rows sum to 1.
    """
    x, y = np.asarray(batch["pixel_values"], np.float32), soft_labels(batch["labels"], num_classes)
    height, width = x.shape[-2:]
    top, bottom, left, right = cutmix_box(height, width, rng.beta(alpha, alpha), rng)
    mixed = x.copy()
    mixed[..., top:bottom, left:right] = np.roll(x, 1, axis=0)[..., top:bottom, left:right]
    lam = np.float32(1 - (bottom - top) * (right - left) / (height * width))
    return {**batch, "pixel_values": mixed, "labels": lam * y + (1 - lam) * np.roll(y, 1, axis=0)}


@dataclass(frozen=True)
class MixBatch:
    """Batch transform for grain's `random_map` after `.batch()`: mixup or cutmix, soft labels always.

    With both alphas set, each batch gets cutmix with probability `switch_prob`, else mixup (timm's default).
    Labels come back as (B, C) even when an alpha is 0, so the jitted step sees one label shape.
    """

    num_classes: int
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    switch_prob: float = 0.5

    def __call__(self, batch: Mapping[str, Any], rng: np.random.Generator) -> dict:
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < self.switch_prob)
        if use_cutmix:
            return cutmix(batch, rng, self.cutmix_alpha, self.num_classes)
        if self.mixup_alpha > 0:
            return mixup(batch, rng, self.mixup_alpha, self.num_classes)
        return {**batch, "labels": soft_labels(batch["labels"], self.num_classes)}


# ----------------------------------------------------------------------------------------------- the train recipe


@dataclass(frozen=True)
class Augment:
    """A training augmentation recipe; the defaults are the usual fine-tuning ones (crop + flip, nothing else).

    Attributes:
      random_resized_crop: crop a random area in `scale` with aspect in `ratio` (torchvision/timm defaults) and
        resize it to the model's size; False resizes the whole image as the eval preprocessing does.
      scale, ratio: see `random_resized_crop_box`.
      flip: mirror left-right with probability 1/2 (turn off for digits, text, anything chiral).
      randaugment_n, randaugment_m: RandAugment ops per image (0 = off) and their magnitude on timm's 0..10 scale.
      fill: the value geometric RandAugment ops fill uncovered pixels with.
      mixup_alpha, cutmix_alpha: Beta parameters of the batch-level mixes (0 = off); see `batch_transform`.
      switch_prob: with both mixes on, the probability a batch gets cutmix.
    """

    random_resized_crop: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    randaugment_n: int = 0
    randaugment_m: float = 9
    fill: int = 0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    switch_prob: float = 0.5

    def __post_init__(self):
        if not 0 <= self.randaugment_m <= RANDAUGMENT_MAX_M:
            raise ValueError(f"randaugment_m is on timm's 0..10 scale (torchvision's 0..30 divided by 3), "
                             f"got {self.randaugment_m}")  # fmt: skip
        if not 0 < self.scale[0] <= self.scale[1] <= 1 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], got {self}")

    @property
    def random(self) -> bool:
        """Whether any augmentation is on (else training reads the deterministic preprocessing, which caches)."""
        mix = self.mixup_alpha > 0 or self.cutmix_alpha > 0
        return bool(self.random_resized_crop or self.flip or self.randaugment_n or mix)

    def batch_transform(self, num_classes: int) -> MixBatch | None:
        """The mixup/cutmix batch transform for `random_map` after `.batch()`; None when both alphas are 0."""
        if self.mixup_alpha <= 0 and self.cutmix_alpha <= 0:
            return None
        return MixBatch(num_classes, self.mixup_alpha, self.cutmix_alpha, self.switch_prob)


@dataclass(frozen=True)
class TrainTransform:
    """`(record, rng) -> {"pixel_values", "labels"}`: `augment` on the uint8 image, then `preprocess`'s rescaling
    and normalisation. A picklable dataclass (not a closure) so grain worker processes can take it.

    RandAugment runs at the smaller of the source and the output resolution: before the crop for small sources
    (Fashion-MNIST at 28x28 costs 64x fewer pixels than at 224x224), after it for large photos. Its ops are defined
    relative to the image size, so they mean the same either way.
    """

    preprocess: ImagePreprocess
    augment: Augment = field(default_factory=Augment)

    def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict:
        aug, pre = self.augment, self.preprocess
        image = np.asarray(record["image"])
        early = image.shape[0] * image.shape[1] <= pre.size * pre.size
        if aug.randaugment_n and early:
            image = rand_augment(image, rng, aug.randaugment_n, aug.randaugment_m, aug.fill)
        if aug.random_resized_crop:
            image = random_resized_crop(image, rng, pre.size, aug.scale, aug.ratio, pre.resample)
        else:
            image = pre.resize(image)
        if aug.randaugment_n and not early:
            image = rand_augment(image, rng, aug.randaugment_n, aug.randaugment_m, aug.fill)
        if aug.flip:
            image = horizontal_flip(image, rng)
        return {"pixel_values": pre.pixel_values(image), "labels": record["label"]}


def train_transform(preprocess: ImagePreprocess, augment: Augment | None = None) -> TrainTransform:
    """The per-record train transform for `grain.MapDataset.random_map` (see the module docstring)."""
    return TrainTransform(preprocess, augment or Augment())
