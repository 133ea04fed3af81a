"""Transfer splits: k-shot samples, label subsets (Yosinski et al.'s A/B halves), validation carve-outs, subsets,
and domain-shift pairs with a shared label space. Every sample is a pure function of (split, arguments, seed).

    train, val = carve_validation(load("fashion_mnist:train"), 0.1, seed=0)
    few = k_shot(train, k=5, seed=3)                        # 5 examples of every class
    a, b = label_halves(train.num_classes, seed=0)          # two disjoint halves of the label space
    train_a = label_subset(train, a)                        # classes of A, relabelled 0..len(a)-1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tljax.data.records import Split


class EmptySplitError(ValueError):
    """A split (or what a transfer split leaves of it) has no examples."""


def check_nonempty(split: Split) -> Split:
    if len(split) == 0:
        raise EmptySplitError(f"split {split.name!r} has no examples")
    return split


def _rng(seed: int, *salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *salt])


def k_shot(split: Split, k: int, seed: int = 0) -> Split:
    """k examples of every class, drawn without replacement (the order: classes interleaved, then by draw).

    Raises a ValueError naming the class when one has fewer than k examples."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    counts = split.class_counts()
    short = [(i, int(c)) for i, c in enumerate(counts) if c < k]
    if short:
        i, c = short[0]
        raise ValueError(
            f"k={k} is larger than class {i} ({split.label_names[i]!r}) of {split.name!r}, which has {c} example(s)"
            f"{f'; {len(short)} classes are short' if len(short) > 1 else ''}: lower k or use label_subset first"
        )
    rng = _rng(seed, k)
    picks = [rng.choice(np.flatnonzero(split.labels == c), size=k, replace=False) for c in range(split.num_classes)]
    order = np.stack(picks, axis=1).reshape(-1)  # shot 0 of every class, then shot 1, ...
    return split.take(order, f"{k}shot@{seed}")


def subsample(split: Split, n: int, seed: int = 0, *, stratified: bool = True) -> Split:
    """n examples; stratified keeps the class proportions (largest remainders), else a uniform draw."""
    if not isinstance(n, int) or not 0 < n <= len(split):
        raise ValueError(f"subsample size must be an int in [1, {len(split)}] for {split.name!r}, got {n!r}")
    rng = _rng(seed, n)
    if not stratified:
        return split.take(np.sort(rng.choice(len(split), n, replace=False)), f"n{n}@{seed}")
    quota = _quota(split.class_counts(), n)
    chosen = [rng.choice(np.flatnonzero(split.labels == c), q, replace=False) for c, q in enumerate(quota) if q]
    return split.take(np.sort(np.concatenate(chosen)), f"n{n}@{seed}")


def _quota(counts: np.ndarray, n: int) -> np.ndarray:
    """Per-class sample sizes summing to n, proportional to counts (largest remainder method)."""
    exact = counts * n / counts.sum()
    quota = np.floor(exact).astype(np.int64)
    for c in np.argsort(-(exact - quota), kind="stable")[: n - quota.sum()]:
        quota[c] += 1
    return np.minimum(quota, counts)


def carve_validation(split: Split, size: float | int, seed: int = 0) -> tuple[Split, Split]:
    """(train, validation) from one split, stratified by class: `size` is a fraction (0 < size < 1) or a count.

    For sources without a validation split: early stopping and hyper-parameter choice must never see the test set.
    """
    n = round(size * len(split)) if isinstance(size, float) else size
    if not isinstance(n, int) or not 0 < n < len(split):
        raise ValueError(f"validation size {size!r} leaves no train or no validation examples of {split.name!r}")
    val = subsample(split, n, seed)
    val_idx = val.records.indices
    keep = np.ones(len(split), bool)
    keep[val_idx] = False
    return split.take(np.flatnonzero(keep), f"carve{n}:train@{seed}"), split.take(val_idx, f"carve{n}:val@{seed}")


def label_halves(num_classes: int, seed: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Two disjoint random halves of the classes (Yosinski et al. 2014's A/B split of ImageNet)."""
    perm = _rng(seed, num_classes).permutation(num_classes)
    half = num_classes // 2
    return tuple(sorted(int(c) for c in perm[:half])), tuple(sorted(int(c) for c in perm[half:]))


def label_subset(split: Split, classes: Sequence[int | str], *, relabel: bool = True) -> Split:
    """The examples of `classes` (indices or names); relabelled 0..len-1 in the given order unless relabel=False."""
    index = {n: i for i, n in enumerate(split.label_names)}
    ids = []
    for c in classes:
        if isinstance(c, str) and c not in index:
            raise ValueError(f"unknown class {c!r} of {split.name!r}; classes: {list(split.label_names)}")
        i = index[c] if isinstance(c, str) else int(c)
        if not 0 <= i < split.num_classes:
            raise ValueError(f"class index {i} is outside [0, {split.num_classes}) of {split.name!r}")
        ids.append(i)
    if len(set(ids)) != len(ids) or not ids:
        raise ValueError(f"classes must be distinct and non-empty, got {list(classes)}")
    rows = np.flatnonzero(np.isin(split.labels, ids))
    sub = check_nonempty(split.take(rows, "classes=" + ",".join(map(str, ids))))
    if not relabel:
        return sub
    remap = np.full(split.num_classes, -1, np.int64)
    remap[ids] = np.arange(len(ids))
    return Relabelled.of(sub, remap, tuple(split.label_names[i] for i in ids))


@dataclass(frozen=True)
class Relabelled:
    """Records whose "label" goes through a class-index map (label subsets keep a dense label space)."""

    records: object
    remap: np.ndarray

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = dict(self.records[index])
        record["label"] = int(self.remap[record["label"]])
        return record

    @staticmethod
    def of(split: Split, remap: np.ndarray, names: tuple[str, ...]) -> Split:
        from dataclasses import replace

        return replace(split, records=Relabelled(split.records, remap), labels=remap[split.labels], label_names=names)
