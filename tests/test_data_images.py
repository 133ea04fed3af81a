"""Image sources (Fashion-MNIST, digits, image folders), preprocessing parity with HF processors, seeded
augmentation under grain, mixup/cutmix."""

import gzip
import json
from types import SimpleNamespace

import grain
import numpy as np
import pytest
from PIL import Image

from tljax.data import augment as A
from tljax.data.images import DIGITS, FASHION_MNIST, FASHION_MNIST_ENV, decode_image, image_folder, read_idx
from tljax.data.records import SourceUnavailable
from tljax.data.vision import ImagePreprocess, from_pil, to_pil

needs_fashion_mnist = pytest.mark.skipif(not FASHION_MNIST.available(), reason="dataset-fashion-mnist not installed")


def _texture(shape, seed=0) -> np.ndarray:
    """A smooth gradient plus noise: every augmentation op visibly changes it."""
    h, w = shape[:2]
    grad = np.add.outer(np.arange(h) * 200 / h, np.arange(w) * 50 / w)
    noise = np.random.default_rng(seed).integers(0, 6, shape)
    return (grad.reshape(h, w, *([1] * (len(shape) - 2))) + noise).astype(np.uint8)


# --------------------------------------------------------------------------------------------------- Fashion-MNIST


@needs_fashion_mnist
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_split(split, n):
    data = FASHION_MNIST.load(split)
    assert data.name == f"fashion_mnist:{split}" and len(data) == n == FASHION_MNIST.splits[split]
    assert data.num_classes == 10 and data.label_names[0] == "T-shirt/top" and data.label_names[9] == "Ankle boot"
    np.testing.assert_array_equal(data.class_counts(), np.full(10, n // 10))
    record = data[n - 1]
    assert record["image"].shape == (28, 28, 1) and record["image"].dtype == np.uint8
    assert type(record["label"]) is int and record["label"] == data.labels[n - 1]
    assert data.labels.dtype == np.int64 and 0 <= data.labels.min() and data.labels.max() <= 9
    assert "Zalando" in data.about and "MIT" in data.about


def test_fashion_mnist_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    assert not FASHION_MNIST.available()
    with pytest.raises(SourceUnavailable, match="dataset-fashion-mnist") as e:
        FASHION_MNIST.load("test")
    assert str(tmp_path) in str(e.value) and FASHION_MNIST_ENV in str(e.value)
    with pytest.raises(ValueError, match="splits"):
        FASHION_MNIST.load("validation")


def _write_idx(path, magic: int, dims, data: bytes):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + data)


def test_read_idx_validates(tmp_path):
    good = tmp_path / "good.gz"
    _write_idx(good, 0x803, (2, 2, 3), bytes(range(12)))
    np.testing.assert_array_equal(read_idx(good, 3), np.arange(12, dtype=np.uint8).reshape(2, 2, 3))
    bad_magic, short = tmp_path / "labels-bad.gz", tmp_path / "short.gz"
    _write_idx(bad_magic, 0x803, (4,), bytes(4))
    _write_idx(short, 0x803, (2, 2, 3), bytes(11))
    with pytest.raises(ValueError, match="labels-bad.gz.*magic"):
        read_idx(bad_magic, 1)
    with pytest.raises(ValueError, match="short.gz.*11 bytes"):
        read_idx(short, 3)


# ----------------------------------------------------------------------------------------------------------- digits


def test_digits_split():
    train, test = DIGITS.load("train"), DIGITS.load("test")
    assert (len(train), len(test)) == (1442, 355) == (DIGITS.splits["train"], DIGITS.splits["test"])
    total = train.class_counts() + test.class_counts()
    np.testing.assert_array_equal(total, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    np.testing.assert_array_equal(test.class_counts(), total // 5)  # stratified: 20% of each class, rounded down
    assert train.label_names == tuple("0123456789")
    images = np.stack([train[i]["image"] for i in range(len(train))] + [test[i]["image"] for i in range(len(test))])
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8 and images.max() == 255
    assert len({im.tobytes() for im in images}) > 1700  # the two splits are (nearly all) different images
    assert DIGITS.load("test").labels.tolist() == test.labels.tolist()  # fixed, not reshuffled


# ----------------------------------------------------------------------------------------------------- image folder


def _png(path, value, size=(5, 4), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_image_folder_flat(tmp_path):
    _png(tmp_path / "dog" / "a.png", (10, 20, 30))
    _png(tmp_path / "cat" / "b.PNG", 7, mode="L")
    _png(tmp_path / "cat" / "c.png", (1, 2, 3))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    splits = image_folder(tmp_path)
    assert list(splits) == ["all"]
    data = splits["all"]
    assert data.label_names == ("cat", "dog") and data.labels.tolist() == [0, 0, 1]
    assert data.name == f"image_folder:{tmp_path}:all"
    gray, dog = data[0], data[2]
    assert gray["image"].shape == (4, 5, 3) and gray["image"].dtype == np.uint8 and (gray["image"] == 7).all()
    assert dog["label"] == 1 and dog["image"][0, 0].tolist() == [10, 20, 30]


def test_image_folder_splits(tmp_path):
    _png(tmp_path / "train" / "a" / "1.png", (0, 0, 0))
    _png(tmp_path / "train" / "b" / "1.jpg", (255, 255, 255))
    _png(tmp_path / "test" / "b" / "2.bmp", (9, 9, 9))
    splits = image_folder(tmp_path)
    assert sorted(splits) == ["test", "train"]
    assert splits["train"].label_names == splits["test"].label_names == ("a", "b")
    assert splits["train"].labels.tolist() == [0, 1] and splits["test"].labels.tolist() == [1]
    assert splits["test"][0]["image"].shape == (4, 5, 3)


def test_image_folder_errors(tmp_path):
    _png(tmp_path / "ok" / "a.png", (0, 0, 0))
    (tmp_path / "ok" / "broken.jpg").write_bytes(b"not a jpeg")
    data = image_folder(tmp_path)["all"]
    with pytest.raises(ValueError, match="broken.jpg"):
        data[1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*no images"):
        image_folder(tmp_path)
    with pytest.raises(ValueError, match="no class folders"):
        image_folder(tmp_path / "ok")
    with pytest.raises(ValueError, match="does not exist"):
        image_folder(tmp_path / "missing")


def test_image_folder_stray_images_are_errors(tmp_path):
    """An image outside a class folder has no label: naming it beats reading train/ and test/ as two classes."""
    for split in ("train", "test"):
        for c in ("blue", "red"):
            _png(tmp_path / split / c / "0.png", (0, 0, 200))
    _png(tmp_path / "train" / "preview.png", (1, 1, 1))
    with pytest.raises(ValueError, match=r"mixes the two layouts.*train/preview.png") as e:
        image_folder(tmp_path)
    assert "no images" not in str(e.value) and "train/blue" in str(e.value)  # both ways out are named
    _png(tmp_path / "test" / "preview.png", (1, 1, 1))
    with pytest.raises(ValueError, match=r"mixes the two layouts.*test/preview.png, train/preview.png"):
        image_folder(tmp_path)
    (tmp_path / "test" / "preview.png").unlink()
    (tmp_path / "train" / "preview.png").unlink()
    assert sorted(image_folder(tmp_path)) == ["test", "train"]
    _png(tmp_path / "cover.png", (1, 1, 1))
    with pytest.raises(ValueError, match=r"images directly in .* belong to no class: cover.png"):
        image_folder(tmp_path)


def _gray16(path, values):
    Image.fromarray(np.asarray(values, np.uint16)).save(path)


def test_16bit_images_keep_their_range(tmp_path):
    """16-bit PNG and PGM (microscopy, medical, depth) keep their high byte, as Pillow reduces 16-bit colour PNGs."""
    values = np.linspace(0, 65535, 20 * 24).astype(np.uint16).reshape(20, 24)
    _gray16(tmp_path / "gray16.png", values)
    image = decode_image(tmp_path / "gray16.png")
    assert image.shape == (20, 24, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, np.repeat((values >> 8).astype(np.uint8)[..., None], 3, -1))
    assert (image.min(), image.max(), round(float(image.mean()), 1)) == (0, 255, 127.5)
    (tmp_path / "gray16.pgm").write_bytes(b"P5\n24 20\n65535\n" + values.astype(">u2").tobytes())  # Pillow: mode I
    np.testing.assert_array_equal(decode_image(tmp_path / "gray16.pgm"), image)
    (tmp_path / "folder" / "a").mkdir(parents=True)
    _gray16(tmp_path / "folder" / "a" / "1.png", values)
    np.testing.assert_array_equal(image_folder(tmp_path / "folder")["all"][0]["image"], image)


@pytest.mark.parametrize("dtype,mode", [(np.float32, "F"), (np.int32, "I")])
def test_images_without_a_fixed_range_are_refused(tmp_path, dtype, mode):
    Image.fromarray(np.arange(12, dtype=dtype).reshape(3, 4) * 1000).save(tmp_path / "depth.tif")
    with pytest.raises(ValueError, match=rf"depth.tif: .*mode {mode}.* no fixed range"):
        decode_image(tmp_path / "depth.tif")


# ---------------------------------------------------------------------------------------------------- preprocessing


def _hf(name: str, **kwargs):
    """The PIL-backed HF processor, whatever transformers picks by default (torchvision's differs in resizing)."""
    import transformers

    return (getattr(transformers, f"{name}Pil", None) or getattr(transformers, name))(**kwargs)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        (
            "ViTImageProcessor",
            dict(size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3], image_std=[0.3, 0.2, 0.1]),
        ),
        ("CLIPImageProcessor", dict(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})),
        ("ConvNextImageProcessor", dict(size={"shortest_edge": 24}, crop_pct=0.875)),  # HF ResNet's processor
    ],
)
def test_preprocess_matches_hf(name, kwargs, tmp_path):
    hf = _hf(name, **kwargs)
    hf.save_pretrained(tmp_path)
    pre = ImagePreprocess.from_pretrained(tmp_path)
    for image in (_texture((37, 53, 3)), _texture((61, 40, 1), seed=1)):
        want = hf(Image.fromarray(image.squeeze()).convert("RGB"), return_tensors="np")["pixel_values"][0]
        got = pre({"image": image, "label": 3})
        assert got["labels"] == 3 and got["pixel_values"].dtype == np.float32
        assert got["pixel_values"].shape == want.shape == (3, pre.size, pre.size)
        np.testing.assert_allclose(got["pixel_values"], want, atol=1e-5, rtol=0)


def test_preprocess_from_loaded_and_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"image_size": 48}))
    with pytest.warns(UserWarning, match="no preprocessor_config.json"):
        pre = ImagePreprocess.from_pretrained(SimpleNamespace(hf_config=SimpleNamespace(name_or_path=str(tmp_path))))
    assert pre == ImagePreprocess(size=48)  # ImageNet mean/std, bilinear square resize
    with pytest.warns(UserWarning):
        assert ImagePreprocess.from_pretrained(tmp_path, size=64, mean=(0.5,) * 3).size == 64
    records = [{"image": _texture((9, 7, 1), seed=i), "label": i} for i in range(4)]
    batch = grain.MapDataset.source(records).map(pre).batch(4)[0]  # usable as a grain map transform
    assert batch["pixel_values"].shape == (4, 3, 48, 48) and batch["labels"].tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(batch["pixel_values"][2], pre(records[2])["pixel_values"])


def test_grayscale_is_rgb_with_equal_channels():
    pre = ImagePreprocess(size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    gray = _texture((20, 30, 1))
    from_gray, from_rgb = (pre({"image": im, "label": 0})["pixel_values"] for im in (gray, np.repeat(gray, 3, -1)))
    np.testing.assert_array_equal(from_gray, from_rgb)


# ----------------------------------------------------------------------------------------------------- augmentation


def test_grain_random_map_is_seeded_per_index():
    """grain 0.2.18 seeds the generator it passes from (seed, index) only: the property resumable training needs."""
    records = [{"image": _texture((28, 28, 1)), "label": 1}] * 6  # one image six times: differences come from rng
    transform = A.train_transform(ImagePreprocess(size=32), A.Augment(randaugment_n=2, randaugment_m=9))
    ds = grain.MapDataset.source(records).random_map(transform, seed=7)
    first = [ds[i]["pixel_values"] for i in (3, 0, 5)]
    again = grain.MapDataset.source(records).random_map(transform, seed=7)
    np.testing.assert_array_equal(again[5]["pixel_values"], first[2])  # other access order, fresh pipeline
    np.testing.assert_array_equal(again[3]["pixel_values"], first[0])
    assert not np.array_equal(first[0], first[1])  # different index -> different augmentation
    other_seed = grain.MapDataset.source(records).random_map(transform, seed=8)
    assert not np.array_equal(other_seed[3]["pixel_values"], first[0])
    assert first[0].shape == (3, 32, 32) and first[0].dtype == np.float32


@pytest.mark.parametrize("shape", [(28, 28, 1), (20, 24, 3)])
def test_randaugment_ops_change_and_keep_shape(shape):
    image = _texture(shape)
    pil = to_pil(image)
    for name, op in A.RANDAUGMENT_OPS.items():
        out = from_pil(op(pil, 1.0, np.random.default_rng(0), 0))
        assert out.shape == shape and out.dtype == np.uint8, name
        unchanged = name == "identity" or (name == "color" and shape[-1] == 1)  # grayscale has no saturation
        assert unchanged == np.array_equal(out, image), name
    a, b = (A.rand_augment(image, np.random.default_rng(3), n=3, m=9) for _ in range(2))
    np.testing.assert_array_equal(a, b)


def test_random_resized_crop_and_flip():
    image = _texture((30, 40, 3))
    rng = np.random.default_rng(0)
    for _ in range(50):
        top, left, h, w = A.random_resized_crop_box(30, 40, rng)
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 40 and h > 0 and w > 0
    assert A.random_resized_crop(image, rng, 16).shape == (16, 16, 3)
    full = A.random_resized_crop(image, rng, 40, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3))  # whole image, resized
    assert full.shape == (40, 40, 3)
    np.testing.assert_array_equal(A.horizontal_flip(image, rng, p=1.0), image[:, ::-1])
    np.testing.assert_array_equal(A.horizontal_flip(image, rng, p=0.0), image)


def _batch(b=4, c=5):
    x = np.random.default_rng(0).normal(size=(b, 3, 8, 8)).astype(np.float32)
    return {"pixel_values": x, "labels": np.arange(b) % c}


def test_mixup_mixes_images_and_labels():
    batch = _batch()
    out = A.mixup(batch, np.random.default_rng(0), alpha=0.4, num_classes=5)
    y = out["labels"]
    assert y.shape == (4, 5) and y.dtype == np.float32 and out["pixel_values"].dtype == np.float32
    np.testing.assert_allclose(y.sum(1), 1, atol=1e-6)
    lam = y[0, 0]  # example 0 (class 0) is mixed with example 3 (class 3)
    assert 0 < lam < 1 and np.isclose(y[0, 3], 1 - lam)
    x = batch["pixel_values"]
    np.testing.assert_allclose(out["pixel_values"], lam * x + (1 - lam) * np.roll(x, 1, 0), atol=1e-6)


def test_cutmix_pastes_a_box_and_weights_labels_by_area():
    batch = _batch()
    out = A.cutmix(batch, np.random.default_rng(1), alpha=1.0, num_classes=5)
    y, x, mixed = out["labels"], batch["pixel_values"], out["pixel_values"]
    np.testing.assert_allclose(y.sum(1), 1, atol=1e-6)
    from_self = (mixed == x).all(axis=1)  # (B, H, W): pixel kept from the example itself
    from_other = (mixed == np.roll(x, 1, 0)).all(axis=1)
    assert (from_self | from_other).all() and from_other.any()
    np.testing.assert_allclose(y[np.arange(4), np.arange(4)], from_self.mean(axis=(1, 2)), atol=1e-6)


def test_mix_batch_always_soft_and_works_after_grain_batch():
    records = [{"image": _texture((12, 12, 1), seed=i), "label": i % 3} for i in range(8)]
    aug = A.Augment(mixup_alpha=0.8, cutmix_alpha=1.0)
    ds = grain.MapDataset.source(records).random_map(A.train_transform(ImagePreprocess(size=8), aug), seed=0)
    ds = ds.batch(4).random_map(aug.batch_transform(3), seed=1)
    batch = ds[1]
    assert batch["pixel_values"].shape == (4, 3, 8, 8) and batch["labels"].shape == (4, 3)
    np.testing.assert_allclose(batch["labels"].sum(1), 1, atol=1e-6)
    np.testing.assert_array_equal(ds[1]["labels"], batch["labels"])
    assert A.Augment().batch_transform(3) is None
    plain = A.MixBatch(3)(_batch(c=3), np.random.default_rng(0))
    np.testing.assert_array_equal(plain["labels"], np.eye(3, dtype=np.float32)[np.arange(4) % 3])


@pytest.mark.parametrize(
    "pre",
    [
        A.ImagePreprocess(),
        A.ImagePreprocess(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), rescale_factor=1.0),
        A.ImagePreprocess(size=224, crop_pct=0.875, resample=3),
    ],
    ids=["vit", "scratch", "convnext-crop"],
)
def test_preprocessing_round_trips_through_an_hf_processor_dict(pre):
    """Exports of image jobs write `to_hf_config()` as preprocessor_config.json; reading it back is the same."""
    assert A.ImagePreprocess.from_hf_config(json.loads(json.dumps(pre.to_hf_config()))) == pre
