"""Probes on synthetic features: logistic regression against scikit-learn (same objective via C = 1/(lambda N)),
MLP probe with early stopping, kNN and nearest-class-mean against scikit-learn's classifiers."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid

from tljax import probes
from tljax.features import Features

# Every logistic test fits 160 x 8 features of 4 classes (refits: 240 rows; both pad to 256): L-BFGS compiles once.
N_TRAIN, N_VAL, DIM, CLASSES = 160, 80, 8, 4


def _linear_data(noise: float = 2.0, seed: int = 0) -> tuple:
    """Overlapping classes of a random linear rule, features on unequal scales and offsets (train, val)."""
    rng = np.random.RandomState(seed)
    scale, offset = rng.uniform(0.5, 3.0, DIM), 3 * rng.randn(DIM)
    u = rng.randn(N_TRAIN + N_VAL, DIM)
    y = (u @ rng.randn(DIM, CLASSES) + noise * rng.randn(len(u), CLASSES)).argmax(1)
    x = (u * scale + offset).astype(np.float32)
    return Features(x[:N_TRAIN], y[:N_TRAIN]), Features(x[N_TRAIN:], y[N_TRAIN:])


def _blobs(n: int, seed: int, labels, spread: float = 0.3) -> Features:
    rng = np.random.RandomState(seed)
    centers = np.random.RandomState(123).randn(CLASSES, DIM) * 3
    y = rng.randint(0, CLASSES, n)
    return Features((centers[y] + spread * rng.randn(n, DIM)).astype(np.float32), np.asarray(labels)[y])


@pytest.mark.parametrize("l2", [1e-1, 1e-2])
def test_logistic_matches_sklearn(l2):
    train, val = _linear_data()
    probe = probes.logistic_regression(train, val, l2_grid=(l2,), tol=1e-7)
    mean, std = probes.standardizer(train.x)
    ref = LogisticRegression(C=1 / (l2 * len(train)), tol=1e-10, max_iter=10_000)
    ref.fit((train.x - mean) / std, train.labels)
    np.testing.assert_allclose(probe.predict_proba(val), ref.predict_proba((val.x - mean) / std), atol=1e-3)
    np.testing.assert_allclose(np.asarray(probe.params["w"]), ref.coef_.T, atol=2e-3)
    np.testing.assert_array_equal(probe.classes, ref.classes_)
    assert probe.hparams["iterations"] < 1000  # converged (gradient norm under tol), not stopped by max_iter


def test_logistic_refit_on_train_and_val_matches_sklearn():
    train, val = _linear_data(seed=2)
    probe = probes.logistic_regression(train, val, l2_grid=(1e-2,), tol=1e-7, refit=True)
    x, y = np.concatenate([train.x, val.x]), np.concatenate([train.labels, val.labels])
    mean, std = probes.standardizer(x)
    ref = LogisticRegression(C=1 / (1e-2 * len(x)), tol=1e-10, max_iter=10_000).fit((x - mean) / std, y)
    np.testing.assert_allclose(probe.predict_proba(val), ref.predict_proba((val.x - mean) / std), atol=1e-3)


def test_logistic_separable_and_ties_go_to_the_strongest():
    labels = [3, 7, 9, 11]  # not 0..C-1: predictions are the training classes themselves
    train, val = _blobs(N_TRAIN, seed=0, labels=labels), _blobs(N_VAL, seed=1, labels=labels)
    grid = (1e-4, 1e-2, 1.0)
    probe = probes.logistic_regression(train, val, l2_grid=grid)
    assert set(probe.val_accuracy) == set(grid)
    assert probe.accuracy(val) == 1.0 and set(probe.predict(val)) <= set(labels)
    assert probe.hparams["l2"] == 1.0  # every strength is perfect on val: ties go to the strongest


def test_logistic_picks_best_val_strength():
    train, val = _linear_data(seed=1)
    probe = probes.logistic_regression(train, val, l2_grid=(1e-3, 1e-1, 10.0, 1e3))
    best = max(probe.val_accuracy.values())
    assert probe.val_accuracy[probe.hparams["l2"]] == best
    assert probe.accuracy(val) == pytest.approx(best)
    assert probe.val_accuracy[1e3] < best  # that strong a penalty underfits


def _xor(n: int, seed: int) -> Features:
    rng = np.random.RandomState(seed)
    x = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    return Features(x, (x[:, 0] * x[:, 1] > 0).astype(np.int64))


def test_mlp_probe_learns_nonlinear_rule_and_is_seeded():
    train, val = _xor(400, 0), _xor(200, 1)
    kw = dict(hidden=32, epochs=40, lr=1e-2, batch_size=64, patience=5, seed=3)
    probe = probes.mlp_probe(train, val, **kw)
    assert probe.accuracy(val) >= 0.9  # no linear probe gets far above 0.5 on XOR
    best = probe.hparams["epoch"]
    assert probe.val_accuracy[best] == max(probe.val_accuracy.values()) == probe.accuracy(val)
    assert max(probe.val_accuracy) <= min(kw["epochs"], best + kw["patience"])  # stopped early or ran out
    again = probes.mlp_probe(train, val, **kw)
    np.testing.assert_array_equal(again.scores(val), probe.scores(val))


def _random(n: int, d: int = 6, c: int = 4, seed: int = 0) -> Features:
    rng = np.random.RandomState(seed)
    return Features(rng.randn(n, d).astype(np.float32), rng.randint(0, c, n))


@pytest.mark.parametrize("k,metric", [(1, "euclidean"), (5, "cosine")])
def test_knn_matches_sklearn(metric, k):
    train, query = _random(150), _random(80, seed=1)
    got = probes.knn(train, query, k=k, metric=metric, batch_size=32)  # 80 queries: the last chunk is padded
    ref = KNeighborsClassifier(k, metric=metric, algorithm="brute").fit(train.x, train.labels)
    # sklearn breaks vote ties by the smallest label, tljax by the nearest neighbour: compare untied rows.
    neighbours = train.labels[ref.kneighbors(query.x, return_distance=False)]
    counts = np.stack([np.bincount(row, minlength=4) for row in neighbours])
    untied = (counts == counts.max(1, keepdims=True)).sum(1) == 1
    assert untied.sum() >= 40
    np.testing.assert_array_equal(got[untied], ref.predict(query.x)[untied])


def test_knn_tie_goes_to_the_nearest():
    train = Features(np.array([[1.0, 0], [2.0, 0], [4.0, 0]], np.float32), np.array([5, 2, 2]))
    query = np.array([[0.0, 0]], np.float32)
    assert probes.knn(train, query, k=2, metric="euclidean")[0] == 5  # one vote each: label 5 is nearer
    assert probes.knn(train, query, k=3, metric="euclidean")[0] == 2  # more votes beat nearness


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_nearest_class_mean_matches_sklearn(metric):
    train, query = _random(150, seed=2), _random(80, seed=3)
    got = probes.nearest_class_mean(train, query, metric=metric)
    if metric == "euclidean":
        want = NearestCentroid().fit(train.x, train.labels).predict(query.x)
    else:  # means of unit vectors, then the centroid with the highest cosine similarity
        unit = train.x / np.linalg.norm(train.x, axis=1, keepdims=True)
        ncm = NearestCentroid().fit(unit, train.labels)
        nn = KNeighborsClassifier(1, metric="cosine", algorithm="brute").fit(ncm.centroids_, ncm.classes_)
        want = nn.predict(query.x)
    np.testing.assert_array_equal(got, want)
    assert probes.accuracy(got, query) == pytest.approx(np.mean(want == query.labels))


def test_errors():
    train = _random(10)
    with pytest.raises(ValueError, match="unknown metric"):
        probes.knn(train, train, k=3, metric="manhattan")
    with pytest.raises(ValueError, match="unknown metric"):
        probes.nearest_class_mean(train, train, metric="dot")
    with pytest.raises(ValueError, match="k=11"):
        probes.knn(train, train, k=11)
    with pytest.raises(ValueError, match="unlabelled"):
        probes.knn(Features(train.x, np.full(10, -1)), train, k=1)
    with pytest.raises(ValueError, match="equal non-empty"):
        probes.accuracy(np.zeros(3), np.zeros(4))
    # Regressions: mismatched lengths made kNN clamp its neighbour lookup (predictions, no error), and other widths
    # failed inside a matrix product
    with pytest.raises(ValueError, match=r"x \(10, 6\) and labels \(9,\)"):
        Features(train.x, train.labels[:9])
    narrow = train.x[:, :5]
    for call in (
        lambda: probes.knn(train, narrow, k=3),
        lambda: probes.nearest_class_mean(train, narrow),
        lambda: probes.logistic_regression(train, Features(narrow, train.labels)),
        lambda: probes.logistic_regression(train, train, l2_grid=[1.0]).predict(narrow),
    ):
        with pytest.raises(ValueError, match=r"shape \(10, 5\), but the classifier was fitted on \(N, 6\)"):
            call()
