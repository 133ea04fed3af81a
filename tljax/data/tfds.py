"""TFDS datasets as random-access splits: `tfds:<name>:<split>` (e.g. "tfds:cifar10:train", "tfds:imdb_reviews:test").

Reading goes through `tfds.data_source`, which serves a prepared dataset (ArrayRecord files) by index without
TensorFlow, so grain can shuffle and resume by index. What needs TensorFlow is *preparing* a dataset the first time
(`tfds.data_source` downloads and prepares it when it is missing and `download=True`): on a TPU VM run
`pip install tensorflow` once, or prepare with `tfds build <name> --file_format=array_record` and point
`data_dir` (or `TFDS_DATA_DIR`) at the result. Many datasets are also on GCS (`try_gcs=True`, `gs://tfds-data`).

Records are renamed to tljax's keys: the image feature to "image", the text feature to "text", the label to "label".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from tljax.data.records import SourceUnavailable, Split

log = logging.getLogger("tljax")

IMAGE_KEYS = ("image", "img")
TEXT_KEYS = ("text", "sentence", "review", "content")


class RenamedRecords:
    """A TFDS data source whose records are renamed to tljax's keys (and scalar labels made ints)."""

    def __init__(self, source, rename: Mapping[str, str]):
        self.source, self.rename = source, dict(rename)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        record = self.source[index]
        out = {new: record[old] for old, new in self.rename.items()}
        out["label"] = int(out["label"])
        if "text" in out and isinstance(out["text"], bytes):
            out["text"] = out["text"].decode("utf-8")
        return out


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise SourceUnavailable("TFDS sources need tensorflow-datasets: pip install tensorflow-datasets") from e
    return tfds


def load(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    image_key: str | None = None,
    text_key: str | None = None,
    label_key: str = "label",
    download: bool = False,
    try_gcs: bool = False,
) -> Split:
    """One split of a TFDS dataset.

    Args:
      name: the TFDS name, with an optional config and version as TFDS spells them ("cifar10",
        "imdb_reviews/plain_text:1.0.0"; in a "tfds:<name>:<split>" string the version cannot be given).
      split: a TFDS split spec ("train", "test", "train[:10%]").
      data_dir: where prepared datasets live (default: `TFDS_DATA_DIR` or ~/tensorflow_datasets).
      image_key, text_key: the input feature (found by name when None); label_key: the class-label feature.
      download: prepare the dataset when missing (needs TensorFlow and a network; off by default so a missing
        dataset is a clear error instead of a surprise download).
    """
    tfds = _import_tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=try_gcs)
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=download, try_gcs=try_gcs)
    except Exception as e:  # DatasetNotFoundError, AssertionError for unprepared data, ...
        raise SourceUnavailable(
            f"TFDS dataset {name!r} (split {split!r}) is not available: {type(e).__name__}: {e}. Prepare it once "
            f"where a network and TensorFlow are available (`tfds build {name.split(':')[0]} "
            "--file_format=array_record`), then pass data_dir= (or set TFDS_DATA_DIR); or load with download=True."
        ) from e
    features = builder.info.features
    if label_key not in features:
        raise ValueError(f"TFDS {name!r} has no label feature {label_key!r}; its features are {sorted(features)}")
    label_names = tuple(features[label_key].names)
    kind, input_key = _input_feature(name, features, image_key, text_key)
    rename = {input_key: kind if kind == "text" else "image", label_key: "label"}
    labels = _labels(tfds, name, split, data_dir, source, label_key, input_key)
    return Split(f"tfds:{name}:{split}", RenamedRecords(source, rename), labels, label_names, kind,
                 f"TFDS {name} ({builder.info.homepage})")  # fmt: skip


def _input_feature(name, features, image_key, text_key) -> tuple[str, str]:
    if image_key or text_key:
        key = image_key or text_key
        if key not in features:
            raise ValueError(f"TFDS {name!r} has no feature {key!r}; its features are {sorted(features)}")
        return ("image" if image_key else "text"), key
    for kind, keys in (("image", IMAGE_KEYS), ("text", TEXT_KEYS)):
        found = [k for k in keys if k in features]
        if found:
            return kind, found[0]
    raise ValueError(
        f"TFDS {name!r}: no image or text feature found in {sorted(features)}; pass image_key= or text_key="
    )


def _labels(tfds, name, split, data_dir, source, label_key, input_key) -> np.ndarray:
    """All labels up front (k-shot sampling and class counts need them): read with the input feature's decoding
    skipped, which is cheap; mock sources that cannot skip decoding are read in full."""
    try:
        skip = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                decoders={input_key: tfds.decode.SkipDecoding()})  # fmt: skip
        return np.fromiter((int(r[label_key]) for r in skip), np.int64, count=len(skip))
    except Exception as e:  # noqa: BLE001 - a speed-up only; the full read below gives the same labels
        log.debug("reading %s labels with decoding (skipping it failed: %s)", name, e)
        return np.fromiter((int(source[i][label_key]) for i in range(len(source))), np.int64, count=len(source))
