"""Image data sources: Fashion-MNIST, scikit-learn's digits, and your own folder of images.

Every source returns `Split`s of records `{"image": np.uint8 (H, W, C), "label": int}` (see `records.py`); turning
them into model inputs is `vision.ImagePreprocess`'s job, augmenting them is `augment.py`'s.

    from tljax.data.images import FASHION_MNIST, DIGITS, image_folder
    train = FASHION_MNIST.load("train")        # 60000 records, 6000 per class
    splits = image_folder("~/data/flowers")    # {"train": Split, "test": Split} or {"all": Split}

Environment:
  TLJAX_FASHION_MNIST_DIR: folder holding the four Fashion-MNIST IDX files (`train-images-idx3-ubyte.gz`, ...);
    defaults to /usr/share/datasets/fashion-mnist, where the Debian package dataset-fashion-mnist puts them.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np

from tljax.data.records import ArrayRecords, SourceInfo, SourceUnavailable, Split

# --------------------------------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_ENV = "TLJAX_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PROVIDER = "install the Debian package dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist)"
FASHION_MNIST_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_ABOUT = (
    "Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, Zalando Research; MIT licence): 28x28 grayscale photos of Zalando "
    "articles in 10 classes, read from the IDX files of the Debian package dataset-fashion-mnist."
)
_FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}  # split -> IDX file prefix
_FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}
_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}  # ndim -> magic number of an unsigned-byte IDX file


def fashion_mnist_dir() -> Path:
    """The folder looked in for the IDX files: `$TLJAX_FASHION_MNIST_DIR`, else the Debian package's folder.

    Read at call time (not import time) so a test or a notebook can point it elsewhere.
    """
    return Path(os.path.expanduser(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT_DIR))


def _fashion_mnist_paths(split: str, folder: Path) -> tuple[Path, Path]:
    prefix = _FASHION_MNIST_FILES[split]
    return folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"


def _fashion_mnist_available() -> bool:
    folder = fashion_mnist_dir()
    return all(p.is_file() for split in _FASHION_MNIST_FILES for p in _fashion_mnist_paths(split, folder))


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Reads a gzipped unsigned-byte IDX file (the MNIST format) with `ndim` dimensions.

    The header is 2 zero bytes, the type code 0x08 (unsigned byte), the number of dimensions, then one big-endian
    uint32 per dimension; the data follow. A wrong magic number or a truncated body is an error naming the file,
    so a corrupt download never turns into silently shifted labels.
    """
    path = Path(path)
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for an IDX header with {ndim} dimensions")
    magic = int.from_bytes(raw[:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise ValueError(f"{path}: IDX magic number {magic:#010x}, expected {_IDX_MAGIC[ndim]:#010x} "
                         f"(unsigned bytes, {ndim} dimensions)")  # fmt: skip
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes) but the file holds "
                         f"{len(raw) - header} bytes of data")  # fmt: skip
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


@functools.lru_cache(maxsize=4)
def _fashion_mnist_arrays(split: str, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28, 1) uint8, labels (N,) int64), parsed once per process and folder."""
    images_path, labels_path = _fashion_mnist_paths(split, folder)
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    want = (_FASHION_MNIST_SIZES[split], 28, 28)
    if images.shape != want:
        raise ValueError(f"{images_path}: images of shape {images.shape}, expected {want}")
    if labels.shape != want[:1]:
        raise ValueError(f"{labels_path}: {labels.shape[0]} labels, expected {want[0]}")
    if labels.max() >= len(FASHION_MNIST_LABELS):
        raise ValueError(f"{labels_path}: label {labels.max()} outside 0..{len(FASHION_MNIST_LABELS) - 1}")
    return images[..., None], labels.astype(np.int64)


def _check_split(source: str, split: str, splits) -> None:
    if split not in splits:
        raise ValueError(f"{source} has splits {sorted(splits)}, not {split!r}")


def load_fashion_mnist(split: str) -> Split:
    """Fashion-MNIST `split` ("train": 60000, "test": 10000; 10 balanced classes) as a `Split`.

    Raises:
      SourceUnavailable: the IDX files are not in `fashion_mnist_dir()`.
    """
    _check_split("fashion_mnist", split, _FASHION_MNIST_FILES)
    folder = fashion_mnist_dir()
    missing = [p.name for p in _fashion_mnist_paths(split, folder) if not p.is_file()]
    if missing:
        raise SourceUnavailable(f"Fashion-MNIST files {missing} not found in {folder}: {FASHION_MNIST_PROVIDER}, "
                                f"or set {FASHION_MNIST_ENV} to a folder holding them")  # fmt: skip
    images, labels = _fashion_mnist_arrays(split, folder)
    # Labels as Python ints so records carry `int` as the contract says; the images stay one shared array.
    records = ArrayRecords({"image": images, "label": labels.tolist()})
    return Split(f"fashion_mnist:{split}", records, labels, FASHION_MNIST_LABELS, "image", FASHION_MNIST_ABOUT)


FASHION_MNIST = SourceInfo(
    name="fashion_mnist",
    kind="image",
    splits=dict(_FASHION_MNIST_SIZES),
    num_classes=len(FASHION_MNIST_LABELS),
    provider=FASHION_MNIST_PROVIDER,
    about=FASHION_MNIST_ABOUT,
    load=load_fashion_mnist,
    available=_fashion_mnist_available,
)

# ------------------------------------------------------------------------------------------------------------ digits

DIGITS_PROVIDER = "pip install scikit-learn"
DIGITS_ABOUT = (
    "Digits: the 1797 8x8 handwritten digits bundled with scikit-learn (`load_digits`), the test set of UCI optdigits "
    "(Alpaydin & Kaynak 1998, CC BY 4.0); counts 0..16 scaled to uint8 as round(x * 255 / 16)."
)
DIGITS_LABELS = tuple(str(d) for d in range(10))
DIGITS_TEST_EVERY = 5  # within each class, every 5th example (in the bundled order) is a test example
_DIGITS_SIZES = {"train": 1442, "test": 355}


def _digits_available() -> bool:
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8, 1) uint8, labels (1797,) int64) from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SourceUnavailable(f"the digits data set comes with scikit-learn: {DIGITS_PROVIDER}") from e
    bunch = load_digits()
    # Counts of on-pixels in 4x4 blocks (0..16); x * 255 / 16 rounded maps 0 -> 0 and 16 -> 255 exactly.
    images = np.round(bunch.images * 255 / 16).astype(np.uint8)[..., None]
    return images, bunch.target.astype(np.int64)


def digits_split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The fixed stratified train/test split of digits: the r-th example of a class (in scikit-learn's order) is a
    test example when r % 5 == 4, giving 1442 train / 355 test (20% of every class, rounded down).

    A rule rather than a seeded shuffle, so the split cannot change with a numpy or scikit-learn release.
    """
    rank = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(len(members))
    is_test = rank % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1
    return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


def load_digits_split(split: str) -> Split:
    """Digits `split` ("train": 1442, "test": 355; see `digits_split_indices`) as a `Split` of 8x8x1 uint8 images.

    Raises:
      SourceUnavailable: scikit-learn is not installed.
    """
    _check_split("digits", split, _DIGITS_SIZES)
    images, labels = _digits_arrays()
    idx = digits_split_indices(labels)[split]
    images, labels = images[idx], labels[idx]
    records = ArrayRecords({"image": images, "label": labels.tolist()})
    return Split(f"digits:{split}", records, labels, DIGITS_LABELS, "image", DIGITS_ABOUT)


DIGITS = SourceInfo(
    name="digits",
    kind="image",
    splits=dict(_DIGITS_SIZES),
    num_classes=len(DIGITS_LABELS),
    provider=DIGITS_PROVIDER,
    about=DIGITS_ABOUT,
    load=load_digits_split,
    available=_digits_available,
)

# ------------------------------------------------------------------------------------------------------ image folder

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


class ImageFiles:
    """Records decoded from image files on access (`records[i]` opens `paths[i]`), so a folder of any size costs
    only its file list until it is read.

    Images come back as uint8 RGB (H, W, 3): palettes, grayscale and CMYK are converted and an alpha channel is
    dropped; EXIF orientation is applied so phone photos stand upright. A first GIF frame is used. 16-bit images
    keep their full range (see `decode_image`).
    """

    def __init__(self, paths: list[Path], labels: list[int]):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return {"image": decode_image(self.paths[index]), "label": self.labels[index]}


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """The image at `path` as uint8 RGB (H, W, 3); an unreadable file is a ValueError naming it.

    16-bit images (PNG, PGM: microscopy, medical, depth) keep each value's high byte, as Pillow reduces 16-bit colour
    PNGs, so 0..65535 maps onto 0..255 (12-bit data stored in 16 bits stays dark: rescale it first). 32-bit integer
    and float images (TIFF) have no fixed range to map to 8 bits, so they are refused rather than clipped.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            fmt, im = im.format, ImageOps.exif_transpose(im)  # a decoded copy, upright
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:  # PIL raises all of these on bad data
        raise ValueError(f"could not decode image {path}: {e}") from e
    return _as_rgb(im, fmt, path)


_SIXTEEN_BIT_I = ("PNG", "PPM")  # formats whose 32-bit "I" mode holds 16-bit values (older Pillow's PNG, PGM)


def _as_rgb(im, fmt: str | None, path) -> np.ndarray:
    if im.mode.startswith("I;16") or (im.mode == "I" and fmt in _SIXTEEN_BIT_I):
        return _sixteen_bit_rgb(np.asarray(im), path)
    if im.mode in ("I", "F") or im.mode.startswith("I;"):  # .convert("RGB") would clip them to 0..255
        raise ValueError(
            f"{path}: a 32-bit {'float' if im.mode == 'F' else 'integer'} image (mode {im.mode}) has no fixed range "
            "to map to 8 bits; convert it to 8- or 16-bit PNG first, scaled to your data's range"
        )
    try:
        return np.asarray(im.convert("RGB"))
    except ValueError as e:  # modes without a conversion to RGB (LAB, ...)
        raise ValueError(f"could not convert image {path} (mode {im.mode}) to RGB: {e}") from e


def _sixteen_bit_rgb(values: np.ndarray, path) -> np.ndarray:
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"{path}: values {values.min()}..{values.max()} outside the 16-bit range 0..65535")
    gray = (values.astype(np.uint16) >> 8).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def _visible_children(folder: Path) -> list[Path]:
    """Children of `folder` in sorted order, without hidden entries (.DS_Store, .ipynb_checkpoints)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return [p for p in _visible_children(folder) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]


def _subfolders(folder: Path) -> list[Path]:
    return [p for p in _visible_children(folder) if p.is_dir()]


def _is_split_layout(root: Path, top: list[Path]) -> bool:
    """path/<split>/<class>/<image> when the top folders hold folders, path/<class>/<image> when they hold images.

    An image outside a class folder has no label, so top folders that mix the two, and images directly in `root`,
    are errors naming them rather than a guess that would drop them or read the split folders as classes.
    """
    nested = [d for d in top if _subfolders(d)]
    with_images = [d for d in top if _image_files(d)]
    if nested and with_images:
        raise ValueError(
            f"image folder {root} mixes the two layouts: {_listed(nested, root)} hold subfolders, as split folders "
            f"do (path/<split>/<class>/<image>), and {_listed(with_images, root)} hold images, as class folders do "
            f"(path/<class>/<image>). For the split layout, move or delete the images "
            f"{_listed([f for d in nested for f in _image_files(d)], root)}; for the class layout, the subfolders "
            f"{_listed([s for d in with_images for s in _subfolders(d)], root)}"
        )
    stray = _image_files(root)
    if stray:
        raise ValueError(
            f"images directly in {root} belong to no class: {_listed(stray, root)}; move them into a class folder "
            "or out of the image folder"
        )
    return bool(nested)


def _listed(paths: list[Path], root: Path, most: int = 6) -> str:
    names = sorted(str(p.relative_to(root)) for p in paths)
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def _class_files(class_dir: Path) -> list[Path]:
    files = _image_files(class_dir)
    if not files:
        raise ValueError(f"class folder {class_dir} holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return files


def _folder_split(name: str, split_dir: Path, label_names: tuple[str, ...], root: Path) -> Split:
    paths, labels = [], []
    for class_dir in _subfolders(split_dir):
        files = _class_files(class_dir)
        paths += files
        labels += [label_names.index(class_dir.name)] * len(files)
    if not paths:
        raise ValueError(f"split folder {split_dir} holds no class folders")
    about = f"image folder {root} ({len(label_names)} classes = its sorted subfolder names)"
    records = ImageFiles(paths, labels)
    return Split(f"image_folder:{root}:{name}", records, np.asarray(labels, np.int64), label_names, "image", about)


def image_folder(path: str | os.PathLike) -> dict[str, Split]:
    """Your own images, one subfolder per class, decoded lazily with PIL (see `ImageFiles`).

    Two layouts are recognised:
      path/<class>/<image>          -> {"all": Split}
      path/<split>/<class>/<image>  -> {<split>: Split, ...}, e.g. "train", "val", "test"

    The layout is the split layout when the top folders hold folders. Class names are the sorted class-folder
    names (in the split layout, the union over splits, so every split has the same label space even when one lacks a
    class). Images must sit directly in their class folder; an image anywhere above it (in `path` or beside the
    class folders of a split) is an error naming it, while files with other extensions than jpg, jpeg, png, bmp,
    gif, webp and hidden entries are ignored. Splits are named "image_folder:<path>:<split>".

    Raises:
      ValueError: `path` is missing or holds no class folders, a class folder holds no images, or an image sits
        outside a class folder.
    """
    root = Path(os.path.expanduser(str(path)))
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a folder")
    top = _subfolders(root)
    if not top:
        raise ValueError(f"image folder {root} holds no class folders: put each class's images in path/<class>/")
    if _is_split_layout(root, top):
        label_names = tuple(sorted({c.name for d in top for c in _subfolders(d)}))
        return {d.name: _folder_split(d.name, d, label_names, root) for d in top}
    return {"all": _folder_split("all", root, tuple(d.name for d in top), root)}
