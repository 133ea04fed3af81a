"""Transferability scores: which checkpoint, layer or pooling to transfer, judged from frozen features before any
fine-tuning is paid for.

    feats = features.extract(loaded, batches, layer=3, pooling="mean")      # target train split, frozen
    transferability.logme(feats.x, feats.labels)          # LogME, average log evidence per example (higher: better)
    transferability.h_score(feats.x, feats.labels)        # H-score (shrinkage=True: the Ledoit-Wolf variant)
    transferability.leep(source_probs, feats.labels)      # LEEP, from a source classifier's probabilities

Each score reads one set of features once, so all are NumPy in float64 (the numbers are sums over thousands of
rows and a few hundred dimensions; float32 loses digits that rankings of close candidates need). Labels are class
indices (any non-negative ints); every score needs at least two classes. How well a score ranks candidates against
the accuracy real transfer reaches is `experiments.transferability.rank_agreement` (scipy.stats, which tljax itself
does not depend on).

- LogME (You et al., ICML 2021): for each class, the one-vs-rest target y = [label == c] is modelled as Bayesian
  linear regression y = F w + noise, w ~ N(0, 1/alpha), noise ~ N(0, 1/beta); alpha and beta maximise the
  evidence p(y | F, alpha, beta) by the fixed-point iteration of MacKay, made cheap by one SVD of F. The score is
  the evidence per example, averaged over classes. Defaults follow the authors' code (start alpha = beta = 1, stop
  when alpha/beta moves by <= 0.1% or after 11 steps, 1e-5 added to the denominators), so numbers compare with
  published ones; `tol`/`max_iter` iterate to the exact maximum instead.
- H-score (Bao et al., ICIP 2019): tr(cov(f)^+ cov(E[f | y])), how much of the feature variance lies between the
  class means. cov(f) is often singular for wide features (the pseudo-inverse then amplifies noise directions);
  `shrinkage=True` is the regularised H-score of Ibrahim et al. (2022): cov(f) shrunk toward a scaled identity by
  Ledoit-Wolf's coefficient a, and the between-class covariance scaled by (1 - a).
- LEEP (Nguyen et al., ICML 2020): with a source classifier's probabilities theta(x) over its classes z, the
  empirical joint P(y, z) = mean_i theta(x_i)_z [y_i = y] and P(y | z) = P(y, z) / P(z) make a "expected empirical
  predictor"; LEEP is its mean log likelihood of the true target labels, mean_i log sum_z P(y_i | z) theta(x_i)_z.
- NCE (Tran et al., ICCV 2019): the negative conditional entropy -H(Y | Z) of the target labels given the source
  classifier's hard predictions z.
"""

from __future__ import annotations

import numpy as np
from sklearn.covariance import LedoitWolf

EPS = 1e-5  # added to the fixed-point denominators, as in the LogME authors' code
SCORES = ("logme", "h_score", "h_score_shrunk", "leep", "nce")  # all higher-is-better


# --- input checks ---


def check_features(x) -> np.ndarray:
    """(N, D) finite numbers as float64; anything else is an error that says what was passed."""
    x = np.asarray(x)
    if x.ndim != 2 or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"features must be a 2-D numeric array (examples, dims), got {x.dtype} of shape {x.shape}")
    if len(x) < 2 or not np.isfinite(x).all():
        raise ValueError(f"features need at least 2 rows, all finite; got {len(x)} rows, finite={np.isfinite(x).all()}")
    return x.astype(np.float64)


def check_labels(labels, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(classes present, each row's index into them) of `labels`: 1-D non-negative ints, one per row, >= 2 classes."""
    y = np.asarray(labels)
    if y.ndim != 1 or y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D array of integer class indices, got {y.dtype} of shape {y.shape}; "
            "convert class names or one-hot rows to indices first (np.unique(..., return_inverse=True) / argmax)"
        )
    if len(y) != n:
        raise ValueError(f"got {n} feature rows but {len(y)} labels: pass one label per row")
    if (y < 0).any():
        raise ValueError("labels hold negative values (-1 marks unlabelled rows in tljax.features): drop those rows")
    classes, index = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"labels hold a single class {classes.tolist()}: transferability needs at least 2 classes")
    return classes, index


# --- LogME ---


def logme(x, labels, *, tol: float = 1e-3, max_iter: int = 11) -> float:
    """LogME: the maximum log evidence per example of a Bayesian linear model from features to one-vs-rest
    targets, averaged over classes (higher means the features fit the labels with a simpler linear model).

    Args:
      x: (N, D) features. labels: (N,) class indices.
      tol, max_iter: the fixed-point iteration stops when alpha/beta changes by at most `tol` (relative) or after
        `max_iter` updates; the defaults are the authors' (published numbers), tighter values reach the maximum.
    Returns:
      The mean over classes of each class's log evidence divided by N.
    """
    return float(np.mean([e for e, _, _ in logme_fits(x, labels, tol=tol, max_iter=max_iter)]))


def logme_fits(x, labels, *, tol: float = 1e-3, max_iter: int = 11) -> list[tuple[float, float, float]]:
    """(log evidence / N, alpha, beta) per class present in `labels`, in class order."""
    x = check_features(x)
    classes, index = check_labels(labels, len(x))
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    rank = int(np.sum(s > s.max() * max(x.shape) * np.finfo(np.float64).eps))
    u, sigma = u[:, :rank], s[:rank] ** 2  # sigma: eigenvalues of F^T F
    targets = [(index == c).astype(np.float64) for c in range(len(classes))]
    return [class_evidence(u, sigma, y, x.shape[1], tol=tol, max_iter=max_iter) for y in targets]


def class_evidence(
    u: np.ndarray, sigma: np.ndarray, y: np.ndarray, dims: int, *, tol: float, max_iter: int
) -> tuple[float, float, float]:
    """One target's evidence maximisation in the SVD basis F = U S V^T (U: (N, k), sigma = S^2).

    With z = U^T y and t = alpha / beta, the posterior mean m = (t + F^T F)^-1 F^T y has ||m||^2 = sum sigma z^2 /
    (t + sigma)^2 and the residual ||y - F m||^2 = sum (t z / (t + sigma))^2 + (||y||^2 - ||z||^2); gamma = sum
    sigma / (t + sigma) counts the well-determined directions, and MacKay's updates are alpha = gamma / ||m||^2,
    beta = (N - gamma) / ||y - F m||^2. The evidence uses log|A| for A = alpha I_D + beta F^T F: the D - k
    directions outside the span of F contribute log(alpha) each. Features of rank 0 (k = 0) explain nothing: their
    evidence is the limit alpha -> inf (w = 0), the noise model's, which no features' maximum falls below.
    """
    n = len(y)
    if not len(sigma):  # features of rank 0 (all zero: a dead layer): y is noise alone, the limit alpha -> inf
        beta = n / (y @ y + EPS)
        return float((n * np.log(beta) - beta * (y @ y) - n * np.log(2 * np.pi)) / 2 / n), np.inf, float(beta)
    z2 = (u.T @ y) ** 2
    outside = y @ y - z2.sum()  # the part of y no linear map of F reaches
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        t = alpha / beta
        gamma = np.sum(sigma / (sigma + t))
        m2 = np.sum(sigma * z2 / (sigma + t) ** 2)
        res2 = np.sum(z2 * (t / (sigma + t)) ** 2) + outside
        alpha, beta = gamma / (m2 + EPS), (n - gamma) / (res2 + EPS)
        if abs(alpha / beta - t) / t <= tol:
            break
    logdet = np.sum(np.log(alpha + beta * sigma)) + (dims - len(sigma)) * np.log(alpha)
    evidence = (dims * np.log(alpha) + n * np.log(beta) - logdet - beta * res2 - alpha * m2 - n * np.log(2 * np.pi)) / 2
    return float(evidence / n), float(alpha), float(beta)


# --- H-score ---


def h_score(x, labels, *, shrinkage: bool = False) -> float:
    """H-score tr(cov(f)^+ cov(E[f | y])) with 1/N covariances (higher: classes separate along high-variance
    directions of f relative to the spread within them).

    Args:
      shrinkage: False for Bao et al.'s score with the pseudo-inverse; True for the regularised H-score (Ibrahim
        et al. 2022): cov(f) replaced by Ledoit-Wolf's (1 - a) cov(f) + a mu I and the between-class covariance by
        (1 - a) cov(E[f | y]), which keeps near-singular directions of wide features from dominating.
    """
    x = check_features(x)
    classes, index = check_labels(labels, len(x))
    x = x - x.mean(axis=0)
    means = np.zeros((len(classes), x.shape[1]))
    np.add.at(means, index, x)
    means /= np.bincount(index)[:, None]
    g = means[index]  # each row's class mean: E[f | y] as a random vector, centred because x is
    between = g.T @ g / len(x)
    if not shrinkage:
        return float(np.trace(np.linalg.pinv(x.T @ x / len(x), hermitian=True) @ between))
    lw = LedoitWolf(assume_centered=True).fit(x)
    return float(np.trace(np.linalg.solve(lw.covariance_, (1 - lw.shrinkage_) * between)))


# --- LEEP and NCE (need a source classifier) ---


def check_probs(probs, n: int) -> np.ndarray:
    """(N, Z) rows of a source classifier's probabilities: non-negative, each summing to 1."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or len(p) != n:
        raise ValueError(f"source probabilities must be (N={n}, source classes), got shape {p.shape}")
    if (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise ValueError("source probabilities must be non-negative rows summing to 1: apply softmax to logits first")
    return p / p.sum(1, keepdims=True)  # float32 softmax rows sum to 1 only to ~1e-7


def leep(source_probs, labels) -> float:
    """LEEP: mean_i log sum_z P(y_i | z) theta(x_i)_z, with P(y | z) from the empirical joint of the target labels
    and the source classifier's probabilities (higher, toward 0: the source's classes predict the target's)."""
    y = np.asarray(labels)
    theta = check_probs(source_probs, len(y))
    classes, index = check_labels(y, len(theta))
    joint = np.zeros((len(classes), theta.shape[1]))
    np.add.at(joint, index, theta)
    joint /= len(theta)
    marginal = joint.sum(axis=0)  # P(z); a source class no row puts mass on contributes nothing
    conditional = np.divide(joint, marginal, out=np.zeros_like(joint), where=marginal > 0)
    return float(np.mean(np.log(np.sum(theta * conditional[index], axis=1))))


def nce(source_labels, labels) -> float:
    """NCE = -H(Y | Z) = sum_{y, z} P(y, z) log P(y | z) over the target labels y and the source classifier's hard
    predictions z (class indices; from probabilities take their argmax)."""
    y = np.asarray(labels)
    classes, index = check_labels(y, len(y))
    z = np.asarray(source_labels)
    if z.shape != y.shape or not np.issubdtype(z.dtype, np.integer) or (z < 0).any():
        raise ValueError(f"source labels must be non-negative ints, one per label ({y.shape}), got {z.dtype} {z.shape}")
    joint = np.zeros((len(classes), z.max() + 1))
    np.add.at(joint, (index, z), 1.0 / len(y))
    conditional = np.divide(joint, joint.sum(axis=0), out=np.zeros_like(joint), where=joint > 0)
    return float(np.sum(joint[joint > 0] * np.log(conditional[joint > 0])))


# --- every score of one candidate ---


def scores(x, labels, source_probs=None) -> dict[str, float]:
    """Every score of one candidate's features: LogME, H-score (plain and shrunk), and LEEP / NCE when a source
    classifier's probabilities on the same rows are given."""
    out = {"logme": logme(x, labels), "h_score": h_score(x, labels),
           "h_score_shrunk": h_score(x, labels, shrinkage=True)}  # fmt: skip
    if source_probs is not None:
        out["leep"] = leep(source_probs, labels)
        out["nce"] = nce(np.asarray(source_probs).argmax(1), labels)
    return out
