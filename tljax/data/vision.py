"""Image records -> model inputs: resize, crop, rescale and normalise as the backbone's own HF processor does.

    pre = ImagePreprocess.from_pretrained("path/to/vit")          # reads preprocessor_config.json
    eval_ds = grain.MapDataset.source(split).map(pre).batch(64)   # {"pixel_values": (64, 3, 224, 224), "labels"}

`ImagePreprocess` maps `{"image": uint8 (H, W, C), "label": int}` to `{"pixel_values": float32 (3, S, S) CHW,
"labels": int}`, the layout ViT, ResNet and CLIP take. It is deterministic, so it is the eval transform; the train
transform in `augment.py` reuses its `resize` and `pixel_values` steps around the random ones.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm / torchvision / HF "IMAGENET_DEFAULT"; ResNet and ConvNeXt use these
IMAGENET_STD = (0.229, 0.224, 0.225)
BILINEAR, BICUBIC = int(Image.Resampling.BILINEAR), int(Image.Resampling.BICUBIC)
_CROPPING_PROCESSORS = ("CLIP", "ConvNext")  # processor types whose default resample is bicubic


@dataclass(frozen=True)
class ImagePreprocess:
    """How one backbone wants its images; call it on a record (a grain `map` transform).

    Geometry, in the HF processors' conventions:
      crop_pct None: resize to (size, size), ignoring the aspect ratio (HF ViT).
      crop_pct p: resize the shorter edge to int(size / p) keeping the aspect ratio, then take the central
        (size, size) crop (p = 1.0: HF CLIP; p = 0.875: HF ResNet/ConvNeXt at 224, i.e. 256 then crop 224).

    Attributes:
      size: output height and width.
      mean, std: per-channel statistics of the pretraining data, applied after rescaling.
      resample: PIL filter for resizing (2 bilinear, 3 bicubic).
      crop_pct: see above.
      rescale_factor: multiplies the uint8 values (1/255 -> [0, 1]; 1.0 when the processor does not rescale).
    """

    size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resample: int = BILINEAR
    crop_pct: float | None = None
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 channels, got {self.mean} and {self.std}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    @classmethod
    def from_pretrained(cls, folder_or_loaded: Any, **overrides) -> ImagePreprocess:
        """The preprocessing a checkpoint was trained with, from its `preprocessor_config.json`.

        Args:
          folder_or_loaded: an HF checkpoint folder, or a loaded model whose `hf_config.name_or_path` is one
            (what `tljax.models.load_pretrained` returns).
          overrides: fields to replace (e.g. `size=384` to fine-tune at a higher resolution; a crop keeps its
            crop_pct). Without a preprocessor_config.json, these plus the defaults (ImageNet mean/std, bilinear,
            square resize) are used, with `size` from config.json's `image_size` when it has one, and a warning.
        """
        folder = _checkpoint_folder(folder_or_loaded)
        config_path = folder / "preprocessor_config.json"
        if config_path.is_file():
            return replace(cls.from_hf_config(json.loads(config_path.read_text())), **overrides)
        fields = {"size": _config_image_size(folder) or cls.size, **overrides}
        warnings.warn(f"{folder} has no preprocessor_config.json: preprocessing with {cls(**fields)}; pass mean/std/"
                      "size if the checkpoint was trained with other statistics", stacklevel=2)  # fmt: skip
        return cls(**fields)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ImagePreprocess:
        """Reads an HF image processor dict (ViT, CLIP, ConvNext/ResNet, and the old feature-extractor form)."""
        kind = config.get("image_processor_type") or config.get("feature_extractor_type") or ""
        size, crop_pct = _hf_geometry(config, kind)
        default_resample = BICUBIC if kind.startswith(_CROPPING_PROCESSORS) else BILINEAR
        rescale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
        normalize = config.get("do_normalize", True)
        return cls(
            size=size,
            mean=tuple(config.get("image_mean", IMAGENET_MEAN)) if normalize else (0.0, 0.0, 0.0),
            std=tuple(config.get("image_std", IMAGENET_STD)) if normalize else (1.0, 1.0, 1.0),
            resample=int(config.get("resample", default_resample)),
            crop_pct=crop_pct,
            rescale_factor=rescale,
        )

    def to_hf_config(self) -> dict:
        """An HF image-processor dict that `from_hf_config` reads back as this preprocessing (exports write it as
        `preprocessor_config.json`, so a model trained from scratch reloads with its own statistics)."""
        common = {"do_resize": True, "resample": int(self.resample), "do_rescale": True,
                  "rescale_factor": self.rescale_factor, "do_normalize": True, "image_mean": list(self.mean),
                  "image_std": list(self.std)}  # fmt: skip
        if self.crop_pct is None:
            return {"image_processor_type": "ViTImageProcessor", "size": {"height": self.size, "width": self.size},
                    **common}  # fmt: skip
        if self.size >= 384:
            raise ValueError(f"a center crop (crop_pct {self.crop_pct}) at size {self.size} >= 384 has no HF form")
        return {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": self.size},
                "crop_pct": self.crop_pct, **common}  # fmt: skip

    def resize(self, image: np.ndarray) -> np.ndarray:
        """The deterministic geometry: uint8 (H, W, C) -> uint8 (size, size, C), C unchanged (1 or 3)."""
        pil = to_pil(image)
        if self.crop_pct is None:
            return from_pil(pil.resize((self.size, self.size), self.resample))
        pil = pil.resize(shorter_edge_size(pil.size, int(self.size / self.crop_pct + 1e-6)), self.resample)
        return center_crop(from_pil(pil), self.size)

    def pixel_values(self, image: np.ndarray) -> np.ndarray:
        """uint8 (size, size, C) with C in {1, 3} -> float32 (3, size, size), rescaled and normalised.

        Grayscale is broadcast to 3 channels here, after resizing, so it is resized once rather than three times.
        """
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[-1] == 4:
            image = image[..., :3]
        if image.shape[-1] not in (1, 3):
            raise ValueError(f"expected an image with 1, 3 or 4 channels, got shape {image.shape}")
        # One multiply-add per pixel, equal to HF's (x * rescale - mean) / std up to float32 rounding, written into
        # one fresh array: numpy temporaries of this size cost more in page faults than the arithmetic.
        std = np.asarray(self.std, np.float64)
        scale = (self.rescale_factor / std).astype(np.float32)[:, None, None]
        shift = (-np.asarray(self.mean, np.float64) / std).astype(np.float32)[:, None, None]
        chw = np.moveaxis(image, -1, 0)  # (1 or 3, H, W); one channel broadcasts to three
        out = np.empty((3, *chw.shape[1:]), np.float32)
        np.multiply(chw, scale, out=out, dtype=np.float32)
        return np.add(out, shift, out=out)

    def __call__(self, record: Mapping[str, Any]) -> dict:
        """`{"image", "label"}` -> `{"pixel_values": float32 (3, size, size), "labels": int}`."""
        return {"pixel_values": self.pixel_values(self.resize(np.asarray(record["image"]))), "labels": record["label"]}


def to_pil(image: np.ndarray) -> Image.Image:
    """uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> a PIL image in mode L, RGB or RGBA."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return Image.fromarray(image)


def fill_color(im: Image.Image, value: int):
    """`value` as a fill colour in the image's mode (PIL wants an int for L, a tuple for RGB)."""
    return value if len(im.getbands()) == 1 else (value,) * len(im.getbands())


def from_pil(pil: Image.Image) -> np.ndarray:
    """A PIL image -> uint8 (H, W, C); mode L gets its channel axis back so records keep HWC."""
    array = np.asarray(pil)
    return array[..., None] if array.ndim == 2 else array


def shorter_edge_size(wh: tuple[int, int], edge: int) -> tuple[int, int]:
    """(width, height) with the shorter side `edge` and the longer scaled (truncated, like HF and torchvision)."""
    w, h = wh
    if w <= h:
        return edge, int(edge * h / w)
    return int(edge * w / h), edge


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central (size, size) window of an HWC image, offsets rounded down as HF's `center_crop` does."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"cannot center-crop {size}x{size} from an image of {h}x{w}")
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size]


def _checkpoint_folder(folder_or_loaded: Any) -> Path:
    """A checkpoint folder from a path or from a loaded model (duck-typed: tljax.data imports nothing from models)."""
    hf_config = getattr(folder_or_loaded, "hf_config", None)
    if hf_config is not None:
        folder_or_loaded = getattr(hf_config, "name_or_path", None) or getattr(hf_config, "_name_or_path", "")
    folder = Path(os.path.expanduser(str(folder_or_loaded)))
    if not folder.is_dir():
        raise ValueError(f"{folder_or_loaded!r} is not a checkpoint folder (nor a loaded model that names one)")
    return folder


def _config_image_size(folder: Path) -> int | None:
    """config.json's `image_size` (ViT) or `vision_config.image_size` (CLIP); None when it has none (ResNet)."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    size = config.get("image_size") or config.get("vision_config", {}).get("image_size")
    return int(size) if size else None


def _hf_geometry(config: Mapping[str, Any], kind: str) -> tuple[int, float | None]:
    """(size, crop_pct) of an HF processor dict; see `ImagePreprocess` for what they mean."""
    size, crop = config.get("size", 224), config.get("crop_size")
    do_crop = config.get("do_center_crop", False) and crop is not None
    if isinstance(size, int):  # old feature-extractor configs: an int is the shorter edge when a crop follows
        size = {"shortest_edge": size} if do_crop else {"height": size, "width": size}
    if "height" in size:
        if size["height"] != size["width"]:
            raise ValueError(f"only square inputs are supported, the processor resizes to {size}")
        if do_crop:
            raise ValueError(f"a square resize followed by a center crop {crop} is not supported")
        return int(size["height"]), None
    edge = int(size["shortest_edge"])
    if "crop_pct" in config or kind.startswith("ConvNext"):  # HF ResNet uses the ConvNext processor
        crop_pct = float(config.get("crop_pct") or 224 / 256)
        return (edge, crop_pct) if edge < 384 else (edge, None)  # ConvNext warps without cropping from 384 on
    if not do_crop:
        raise ValueError(f"resizing the shorter edge to {edge} without a center crop gives non-square inputs")
    crop_size = int(crop if isinstance(crop, int) else crop["height"])
    return crop_size, crop_size / edge
