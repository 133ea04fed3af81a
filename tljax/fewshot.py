"""Few-shot evaluation on frozen features: N-way K-shot episodes, per-episode classifiers, mean accuracy +- 95% CI.

    feats = features.cached_extract(loaded, ..., data_key="wordnet_lexnames:test|...", pooling="mean")
    eps = fewshot.episodes(feats.labels, n_way=5, k_shot=1, n_query=15, count=600, seed=0)
    x = fewshot.simpleshot(feats.x, center=base.x.mean(0))          # CL2N (SimpleShot); or feats.x as it is
    accs = fewshot.evaluate(x, eps, "prototype")                     # (600,) accuracy per episode
    fewshot.summary(accs)                                            # {"mean", "ci95", "std", "episodes"}

The protocol is that of the few-shot literature (Vinyals et al. 2016; Chen et al. 2019, "A Closer Look at Few-shot
Classification"; Wang et al. 2019, SimpleShot): each episode draws N classes, then K support and Q query examples
per class without overlap; a classifier sees only the support set and is scored on the queries; the reported number
is the mean query accuracy over many episodes (600 is usual) with the 95% confidence interval 1.96 * std / sqrt(E).

Classifiers reuse `tljax.probes`: the prototype classifier is `nearest_class_mean`, kNN is `knn`, the logistic
one is `fit_logistic` (L-BFGS) at a fixed strength, since an episode has no validation set to choose one.
Features are computed once (`features.cached_extract`), so 600 episodes cost seconds. Fine-tuning the backbone on
each support set is `experiments/fewshot.py` (it composes `engine.fit`, which sits above this module).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tljax import probes
from tljax.features import Features

Z_95 = 1.96  # two-sided 95% quantile of the normal distribution


@dataclass(frozen=True)
class Episodes:
    """`count` episodes as row indices into the labelled source, class-major within each episode.

    Attributes:
      classes: (E, N) the source's class of each episode label: episode label i is class `classes[e, i]`.
      support: (E, N * K) rows; rows i*K .. (i+1)*K - 1 are episode label i.
      query: (E, N * Q) rows, laid out the same way with Q per class; disjoint from the support.
    """

    classes: np.ndarray
    support: np.ndarray
    query: np.ndarray
    k_shot: int
    n_query: int

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def n_way(self) -> int:
        return self.classes.shape[1]

    @property
    def support_labels(self) -> np.ndarray:
        """(N * K,) episode labels 0..N-1 of the support rows (the same in every episode)."""
        return np.repeat(np.arange(self.n_way), self.k_shot)

    @property
    def query_labels(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_way), self.n_query)


# --- sampling ---


def classes_with(labels: np.ndarray, min_count: int) -> np.ndarray:
    """The classes (sorted) with at least `min_count` rows: a pool that `episodes(..., classes=)` can draw from."""
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    return values[(counts >= min_count) & (values >= 0)]


def _check_sizes(n_way, k_shot, n_query, count) -> None:
    for name, v, low in (("n_way", n_way, 2), ("k_shot", k_shot, 1), ("n_query", n_query, 1), ("count", count, 1)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")


def _pool(labels: np.ndarray, classes: Sequence[int] | None, n_way: int, need: int) -> np.ndarray:
    """The classes episodes draw from, each with at least `need` rows, and at least `n_way` of them."""
    present, counts = np.unique(labels[labels >= 0], return_counts=True)
    pool = present if classes is None else np.unique(np.asarray(classes, np.int64))
    have = dict(zip(present.tolist(), counts.tolist(), strict=True))
    short = {int(c): have.get(int(c), 0) for c in pool if have.get(int(c), 0) < need}
    if short:
        raise ValueError(
            f"classes {short} (class: rows) have fewer than k_shot + n_query = {need} examples; lower k_shot or "
            f"n_query, or leave those classes out with classes=fewshot.classes_with(labels, {need})"
        )
    if len(pool) < n_way:
        raise ValueError(f"n_way={n_way} needs at least {n_way} classes to draw from, but there are {len(pool)}")
    return pool


def episodes(
    labels: np.ndarray,
    n_way: int,
    k_shot: int,
    n_query: int,
    count: int,
    seed: int = 0,
    *,
    classes: Sequence[int] | None = None,
) -> Episodes:
    """Samples `count` N-way K-shot episodes with Q queries per class.

    Per episode: N distinct classes uniformly from the pool, then K + Q distinct rows of each class uniformly, the
    first K the support and the rest the queries (so support and query never share a row).

    Args:
      labels: (rows,) class of each row of the source (`Features.labels`, `Split.labels`); -1 rows are never drawn.
      classes: the classes to draw from (default: every labelled class); each needs K + Q rows.
      seed: the same seed gives the same episodes (numpy's PCG64 via `default_rng`).
    Returns:
      `Episodes` of index arrays into `labels`.
    Raises:
      ValueError: sizes below 1 (n_way below 2), fewer than N classes, or a class with fewer than K + Q rows
        (the message names them and how to leave them out).
    """
    _check_sizes(n_way, k_shot, n_query, count)
    labels = np.asarray(labels)
    pool = _pool(labels, classes, n_way, k_shot + n_query)
    rows_of = {int(c): np.flatnonzero(labels == c) for c in pool}
    rng = np.random.default_rng(seed)
    drawn = np.empty((count, n_way), np.int64)
    picked = np.empty((count, n_way, k_shot + n_query), np.int64)
    for e in range(count):
        drawn[e] = rng.choice(pool, n_way, replace=False)
        for i, c in enumerate(drawn[e]):
            picked[e, i] = rng.choice(rows_of[int(c)], k_shot + n_query, replace=False)
    support = picked[:, :, :k_shot].reshape(count, -1)
    query = picked[:, :, k_shot:].reshape(count, -1)
    return Episodes(drawn, support, query, int(k_shot), int(n_query))


# --- feature transforms ---


def simpleshot(x: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """SimpleShot's feature transform: subtract `center` (the mean feature of base-class data, "CL2N"), then
    L2-normalise each row ("L2N" when `center` is None). Rows are transformed independently, so it is applied to
    all rows once, before the episodes."""
    x = np.asarray(x, np.float32)
    if center is not None:
        x = x - np.asarray(center, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# --- classifiers: support (x, episode labels) -> query predictions ---


def prototype(support_x, support_y, query_x, *, metric: str = "euclidean") -> np.ndarray:
    """Nearest class mean (prototypical networks' rule; SimpleShot uses euclidean distance on CL2N features)."""
    return probes.nearest_class_mean(Features(support_x, support_y), query_x, metric=metric)


def knn(support_x, support_y, query_x, *, k: int = 1, metric: str = "cosine") -> np.ndarray:
    """k nearest support rows vote (k=1: the nearest neighbour; k is capped at the support size)."""
    return probes.knn(Features(support_x, support_y), query_x, k=min(k, len(support_x)), metric=metric)


def logistic(support_x, support_y, query_x, *, l2: float | None = None) -> np.ndarray:
    """Multinomial logistic regression on the support rows as given (no standardisation: K=1 gives no spread to
    estimate), fitted by `probes.fit_logistic`. `l2` None is 1 / (N*K), scikit-learn's default C=1 (the few-shot
    baseline of Tian et al. 2020); see `probes.logistic_regression` for the correspondence C = 1 / (l2 * rows)."""
    classes, y = np.unique(np.asarray(support_y), return_inverse=True)
    l2 = 1.0 / len(y) if l2 is None else float(l2)
    params, _ = probes.fit_logistic(np.asarray(support_x, np.float32), y, len(classes), l2)
    logits = np.asarray(query_x, np.float32) @ np.asarray(params["w"]) + np.asarray(params["b"])
    return classes[logits.argmax(-1)]


CLASSIFIERS: dict[str, Callable[..., np.ndarray]] = {"prototype": prototype, "knn": knn, "logistic": logistic}


def evaluate(x: np.ndarray, eps: Episodes, classifier: str | Callable = "prototype", **options) -> np.ndarray:
    """(E,) query accuracy of `classifier` trained on each episode's support rows of `x` (features, rows as in the
    labels the episodes were drawn from).

    Args:
      classifier: a name in `CLASSIFIERS` or `fn(support_x, support_y, query_x, **options) -> predictions`.
      options: keyword arguments of the classifier (metric, k, l2).
    """
    if isinstance(classifier, str):
        if classifier not in CLASSIFIERS:
            raise ValueError(f"unknown few-shot classifier {classifier!r}; choose one of {sorted(CLASSIFIERS)}")
        classifier = CLASSIFIERS[classifier]
    x = np.asarray(x, np.float32)
    if x.ndim != 2:
        raise ValueError(f"few-shot features must be (rows, dim), got shape {x.shape}")
    if eps.support.max() >= len(x) or eps.query.max() >= len(x):
        raise ValueError(f"episodes index rows up to {max(eps.support.max(), eps.query.max())} but x has {len(x)}")
    ys, yq = eps.support_labels, eps.query_labels
    return np.asarray(
        [np.mean(classifier(x[s], ys, x[q], **options) == yq) for s, q in zip(eps.support, eps.query, strict=True)]
    )


def evaluate_scores(scores: np.ndarray, eps: Episodes) -> np.ndarray:
    """(E,) query accuracy of a fixed scorer (zero-shot: (rows, classes) similarities to every class of the
    source) restricted to each episode's N classes: the 0-shot column beside the K-shot ones."""
    scores = np.asarray(scores)
    per_episode = [
        np.mean(scores[q][:, c].argmax(-1) == eps.query_labels) for c, q in zip(eps.classes, eps.query, strict=True)
    ]
    return np.asarray(per_episode)


# --- reporting ---


def confidence_interval(accuracies: np.ndarray, z: float = Z_95) -> tuple[float, float]:
    """(mean, half-width) of the normal-approximation interval z * std / sqrt(E) over episodes (population std, as
    in the reference implementations of Chen et al. 2019 and SimpleShot)."""
    a = np.asarray(accuracies, np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"need a non-empty 1-D array of per-episode accuracies, got shape {a.shape}")
    return float(a.mean()), float(z * a.std() / np.sqrt(a.size))


def summary(accuracies: np.ndarray) -> dict:
    """{"mean", "ci95", "std", "episodes"}: what a few-shot table reports (mean +- ci95)."""
    mean, ci = confidence_interval(accuracies)
    return {"mean": mean, "ci95": ci, "std": float(np.std(accuracies)), "episodes": int(np.size(accuracies))}
