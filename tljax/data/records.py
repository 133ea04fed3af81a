"""What every data source returns: a `Split`, random-access records with their labels and label names.

A split reads like grain's `RandomAccessDataSource` (`len(split)`, `split[i]` -> a record dict), so pipelines index
it directly and a resumed run can start at any example without replaying an iterator. Records use plain keys:

    text:   {"text": str, "label": int}
    image:  {"image": np.uint8 array (H, W, C), "label": int}

`labels` holds every label up front (cheap), so k-shot sampling, label subsets and class counts never decode an
image or read a file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

KINDS = ("text", "image")


class RandomAccess(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> dict: ...


class ArrayRecords:
    """Records backed by aligned columns (numpy arrays or lists): `records[i] == {col: values[i], ...}`."""

    def __init__(self, columns: Mapping[str, Sequence[Any]]):
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"columns must have one length, got {lengths}")
        self.columns = dict(columns)
        self._n = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> dict:
        return {k: v[index] for k, v in self.columns.items()}


class Subset:
    """`records` seen through `indices` (k-shot samples, label subsets, validation carve-outs) without copying."""

    def __init__(self, records: RandomAccess, indices: np.ndarray):
        self.records, self.indices = records, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.records[int(self.indices[index])]


@dataclass(frozen=True)
class Split:
    """One split of a dataset.

    Attributes:
      name: how to ask for it again, e.g. "fashion_mnist:train" (derived splits append what was done to them).
      records: random access to record dicts (see the module docstring).
      labels: (N,) int64 class indices aligned with `records`.
      label_names: the names of classes 0..C-1.
      kind: "text" or "image".
      about: provenance (where the data comes from, its licence) for reports.
    """

    name: str
    records: RandomAccess
    labels: np.ndarray
    label_names: tuple[str, ...]
    kind: str
    about: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Split kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.records) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.records)} records but {len(self.labels)} labels")

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def take(self, indices, suffix: str) -> Split:
        """The examples at `indices` (same label space), named `f"{name}[{suffix}]"`."""
        indices = np.asarray(indices, np.int64)
        return replace(self, name=f"{self.name}[{suffix}]", records=Subset(self.records, indices),
                       labels=self.labels[indices])  # fmt: skip


@dataclass(frozen=True)
class SourceInfo:
    """A registered dataset: how to load each split and what a user needs to know before asking for it.

    Attributes:
      name: the registry name ("fashion_mnist").
      kind: "text" or "image".
      splits: split name -> documented number of examples.
      num_classes: size of the label space.
      provider: what makes it available, said in the error when it is missing ("apt install dataset-fashion-mnist").
      about: one line of provenance.
      load: `load(split) -> Split`; raises `SourceUnavailable` when the provider is not installed.
      available: `available() -> bool`, cheap (no loading).
    """

    name: str
    kind: str
    splits: Mapping[str, int]
    num_classes: int
    provider: str
    about: str
    load: Any
    available: Any


class SourceUnavailable(RuntimeError):
    """A data source whose files or package are not installed; the message names what provides it."""
