"""Transferability scores against references: LogME against the authors' published code (numbers pinned below) and
a direct evaluation of the evidence; H-score against a loop over classes; LEEP and NCE against hand computations."""

import numpy as np
import pytest
import scipy.stats
from sklearn.covariance import ledoit_wolf_shrinkage

from experiments import transferability as cmd
from tljax import transferability as tr


def planted(seed: int, n: int, d: int, classes: int, signal: float):
    """Gaussian features with `signal` added along the first `classes` axes for each row's class."""
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, d)), rng.integers(0, classes, n)
    x[:, :classes] += signal * np.eye(classes)[y]
    return x, y


# LogME of `planted(*args)` by the fixed-point path of thuml/LogME's LogME.py (commit 3a08950, the authors' code,
# run as published with numba's njit removed): LogME().fit(x, y). The code is not vendored here; these are its
# outputs. N > D in all three: for N < D the published path misses (D - k) log(alpha) in log|A| (thuml/LogME issue
# #23, fix in PR #24), which `tr.logme` includes; that case is checked against the direct formula below instead.
PUBLISHED = {
    (0, 300, 24, 5, 1.0): -0.5718953783815088,
    (1, 500, 8, 3, 0.0): -0.8676663665363051,
    (2, 120, 40, 2, 3.0): -0.4213697315881967,
}


@pytest.mark.parametrize("args", sorted(PUBLISHED))
def test_logme_matches_the_published_code(args):
    x, y = planted(*args)
    assert tr.logme(x, y) == pytest.approx(PUBLISHED[args], rel=1e-6)
    assert tr.logme(x.astype(np.float32), y.astype(np.int32)) == pytest.approx(PUBLISHED[args], rel=1e-5)


def direct_evidence(x, y, alpha, beta):
    """log p(y | F, alpha, beta) / N for y = F w + e, w ~ N(0, I/alpha), e ~ N(0, I/beta), with explicit inverse and
    determinant of A = alpha I + beta F^T F (no SVD, no fixed point)."""
    n, d = x.shape
    a = alpha * np.eye(d) + beta * x.T @ x
    m = beta * np.linalg.inv(a) @ x.T @ y
    _, logdet = np.linalg.slogdet(a)
    e = (d * np.log(alpha) + n * np.log(beta) - beta * np.sum((y - x @ m) ** 2) - alpha * m @ m - logdet
         - n * np.log(2 * np.pi)) / 2  # fmt: skip
    return e / n


@pytest.mark.parametrize("shape", [(200, 12), (40, 90)])  # N > D and N < D (rank-deficient F^T F)
def test_logme_fixed_point_is_the_evidence_maximum(shape):
    x, y = planted(3, *shape, 3, 1.5)
    fits = tr.logme_fits(x, y, tol=1e-12, max_iter=500)
    for c, (evidence, alpha, beta) in enumerate(fits):
        target = (y == c).astype(float)
        assert evidence == pytest.approx(direct_evidence(x, target, alpha, beta), rel=1e-9)
        grid = np.exp(np.linspace(-3, 3, 25))  # 2.6 decades either side, the fixed point at the centre
        best = max(direct_evidence(x, target, alpha * ga, beta * gb) for ga in grid for gb in grid)
        assert best <= evidence + 1e-9 * abs(evidence)  # 1e-5 in the update's denominators moves it by ~1e-10
    assert tr.logme(x, y, tol=1e-12, max_iter=500) == pytest.approx(np.mean([f[0] for f in fits]), rel=1e-12)
    assert tr.logme(x, y) == pytest.approx(np.mean([f[0] for f in fits]), rel=1e-2)  # 11 steps: within 1%


def test_logme_prefers_features_that_carry_the_label():
    x, y = planted(4, 400, 16, 4, 3.0)
    noise = np.random.default_rng(5).normal(size=x.shape)
    assert tr.logme(x, y) > tr.logme(noise, y) + 0.05
    assert tr.h_score(x, y) > 10 * tr.h_score(noise, y)


def test_logme_of_all_zero_features_is_the_noise_models_evidence():
    """Regression: features of rank 0 (a dead layer) gave NaN, which breaks a ranking; their evidence is the noise
    model's (weights pinned to 0, alpha -> inf), below that of features that carry the label."""
    x, y = planted(4, 200, 8, 2, 1.0)
    t = (y == 0).astype(np.float64)
    noise_only = np.mean([(len(t) * np.log(b) - b * (v @ v) - len(t) * np.log(2 * np.pi)) / 2 / len(t)
                          for v in (t, 1 - t) for b in [len(t) / (v @ v)]])  # fmt: skip
    zero = tr.logme(np.zeros_like(x), y)
    assert np.isfinite(zero) and zero == pytest.approx(noise_only, rel=1e-6)
    assert tr.logme(x, y) > zero


def direct_h_score(x, y):
    cov = np.cov(x, rowvar=False, bias=True)
    mu = x.mean(0)
    between = sum(np.mean(y == c) * np.outer(x[y == c].mean(0) - mu, x[y == c].mean(0) - mu) for c in np.unique(y))
    return cov, between, np.trace(np.linalg.pinv(cov) @ between)


def test_h_score_against_the_formula():
    x, y = planted(6, 300, 10, 4, 1.0)
    cov, between, expected = direct_h_score(x, y)
    assert tr.h_score(x, y) == pytest.approx(expected, rel=1e-9)
    a = ledoit_wolf_shrinkage(x - x.mean(0), assume_centered=True)
    shrunk = (1 - a) * cov + a * np.trace(cov) / len(cov) * np.eye(len(cov))
    assert tr.h_score(x, y, shrinkage=True) == pytest.approx(np.trace(np.linalg.inv(shrunk) @ ((1 - a) * between)))
    assert tr.h_score(x, y, shrinkage=True) < tr.h_score(x, y)
    wide = planted(7, 30, 60, 3, 1.0)  # singular covariance: the pseudo-inverse keeps it finite
    assert np.isfinite(tr.h_score(*wide)) and tr.h_score(*wide) == pytest.approx(direct_h_score(*wide)[2], rel=1e-6)


# 3 examples, 2 source classes (columns), 2 target classes. P(y, z) = [[.8, .2], [.8, 1.2]] / 3, P(z) = [1.6, 1.4] / 3,
# P(y | z) = [[1/2, 1/7], [1/2, 6/7]]; per row sum_z P(y_i | z) theta_iz = 3/7, 3/4, 19/28.
THETA = np.array([[0.8, 0.2], [0.3, 0.7], [0.5, 0.5]])
Y3 = np.array([0, 1, 1])


def test_leep_by_hand():
    assert tr.leep(THETA, Y3) == pytest.approx(np.mean(np.log([3 / 7, 3 / 4, 19 / 28])), rel=1e-12)
    assert tr.leep(THETA.astype(np.float32), Y3 + 5) == pytest.approx(tr.leep(THETA, Y3), rel=1e-6)  # label values
    perfect = np.eye(2)[[0, 1, 1]]  # the source classes are the target classes
    assert tr.leep(perfect, Y3) == pytest.approx(0.0, abs=1e-12)


def test_nce_by_hand():
    # hard predictions [0, 1, 0]: P(y | z=0) = (1/2, 1/2), P(y=1 | z=1) = 1 -> NCE = -(2/3) log 2
    assert tr.nce(THETA.argmax(1), Y3) == pytest.approx(-2 / 3 * np.log(2), rel=1e-12)
    assert tr.scores(np.eye(3)[:, :2] + 1.0, Y3, THETA)["nce"] == pytest.approx(-2 / 3 * np.log(2))


def test_rank_agreement_matches_scipy():
    acc = {"a": 0.5, "b": 0.7, "c": 0.6, "d": 0.9}
    assert cmd.rank_agreement({"a": 1, "b": 3, "c": 2, "d": 4}, acc)["kendall_tau"] == pytest.approx(1.0)
    flipped = cmd.rank_agreement({"a": 4, "b": 2, "c": 3, "d": 1}, acc)
    assert flipped["kendall_tau"] == pytest.approx(-1.0) and flipped["spearman_rho"] == pytest.approx(-1.0)
    score = {"a": 0.1, "b": 0.4, "c": 0.5, "d": 0.3}
    got = cmd.rank_agreement(score, acc)
    names = sorted(acc)
    s, a = [score[k] for k in names], [acc[k] for k in names]
    assert got["kendall_tau"] == pytest.approx(scipy.stats.kendalltau(s, a).statistic)
    assert got["spearman_rho"] == pytest.approx(scipy.stats.spearmanr(s, a).statistic)
    assert got["spearman_p"] == pytest.approx(scipy.stats.spearmanr(s, a).pvalue)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, y: tr.logme(x, y.astype(float)), "integer class indices"),
        (lambda x, y: tr.h_score(x, y.astype(str)), "integer class indices"),
        (lambda x, y: tr.logme(x, y == 1), "integer class indices"),
        (lambda x, y: tr.logme(x, y[:-1]), "10 feature rows but 9 labels"),
        (lambda x, y: tr.h_score(x[:, 0], y), "2-D numeric array"),
        (lambda x, y: tr.logme(x, np.zeros_like(y)), "single class"),
        (lambda x, y: tr.logme(x, y - 1), "negative"),
        (lambda x, y: tr.logme(np.where(x > 0, np.nan, x), y), "finite"),
        (lambda x, y: tr.leep(np.ones((10, 3)), y), "summing to 1"),
        (lambda x, y: tr.leep(np.full((9, 2), 0.5), y), "shape"),
        (lambda x, y: tr.nce(np.zeros(10), y), "non-negative ints"),
        (lambda x, y: cmd.rank_agreement({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 2, "d": 3}), "same candidates"),
        (lambda x, y: cmd.rank_agreement({"a": 1, "b": 2}, {"a": 1, "b": 2}), ">= 3 candidates"),
        (lambda x, y: cmd.rank_agreement({"a": 1, "b": 1, "c": 1}, {"a": 1, "b": 2, "c": 3}), "constant"),
    ],
)
def test_bad_input_errors(call, message):
    x, y = planted(8, 10, 3, 2, 1.0)
    y[:2] = [0, 1]
    with pytest.raises(ValueError, match=message):
        call(x, y)


# --- the command's plumbing (experiments/transferability.py) on a tiny random BERT ---


def _token_batches() -> list[dict]:
    from conftest import token_batch

    out = []
    for b in range(2):
        ids, mask = token_batch(4, 9, seed=b)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": np.arange(4) % 2})
    return out


def test_cached_layers_is_one_pass_then_the_cache(tiny_bert_dir, tmp_path):
    import tljax.models as tm
    from tljax import features

    loaded = tm.load_pretrained(tiny_bert_dir)
    specs, passes = [(0, "mean"), (-1, "cls")], []
    ckpt = features.checkpoint_id(*features.backbone_of(loaded))

    def batches():
        passes.append(1)
        return iter(_token_batches())

    kw = dict(cache_dir=tmp_path, data_key="toy", checkpoint=ckpt)
    first = cmd.cached_layers(loaded, batches, specs, **kw)
    again = cmd.cached_layers(loaded, lambda: pytest.fail("a cache hit must not read data"), specs, **kw)
    assert passes == [1] and [(f.layer, f.pooling) for f in again] == [(0, "mean"), (1, "cls")]
    for (layer, pooling), f, g in zip(specs, first, again, strict=True):
        direct = features.extract(loaded, _token_batches(), layer=layer, pooling=pooling)
        np.testing.assert_allclose(f.x, direct.x, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(f.x, g.x)
    more = cmd.cached_layers(loaded, batches, specs + [(1, "mean")], **kw)  # only the new spec is extracted
    assert passes == [1, 1] and np.array_equal(more[0].x, first[0].x)


def test_agreement_and_table_of_rows():
    rows = [{"candidate": f"m/layer{i}/mean", "logme": -1.0 + i / 10, "h_score": float(i), "h_score_shrunk": 1.0 * i,
             "probe_accuracy": [0.5, 0.7, 0.6][i]} for i in range(3)]  # fmt: skip
    agree = cmd.agreement(rows)
    assert set(agree) == {"logme", "h_score", "h_score_shrunk"}
    assert agree["logme"]["spearman_rho"] == pytest.approx(0.5)
    assert agree["logme"]["kendall_tau"] == pytest.approx(1 / 3)
    table = cmd.format_table(rows, agree).splitlines()
    assert table[1].startswith("m/layer2/mean") and table[-1].startswith("h_score_shrunk")
    assert cmd.agreement(rows[:2]) == {}  # two candidates: no ranking to compare
    assert cmd.parse_layers("all", 3) == [0, 1, 2] and cmd.parse_layers("0,-1", 6) == [0, -1]
    with pytest.raises(ValueError, match="comma-separated ints"):
        cmd.parse_layers("first", 6)


def _fake_run(workdir, name: str, num_layers: int, acc: float, train="wordnet_lexnames:train", pooling="mean"):
    """A finished run folder as the sweep runner leaves it (point.json, config.json, results.json)."""
    import json

    folder = workdir / "runs" / name
    folder.mkdir(parents=True)
    config = {"model": {"name": "m", "num_layers": num_layers, "pooling": pooling}, "data": {"train": train}}
    point = {"name": name, "values": {"depth": num_layers}, "overrides": {}, "folder": name}
    (folder / "point.json").write_text(json.dumps(point))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "results.json").write_text(json.dumps({"config": config, "test_accuracy": acc, "status": "completed"}))


def test_finetuned_accuracies_from_a_depth_sweep(tmp_path):
    """--finetuned: a sweep's runs over model.num_layers average per (checkpoint, top block, pooling) and attach to
    the candidates they match (num_layers 0 = every block = the last layer); the agreement is over those only."""
    for i, (k, acc) in enumerate([(1, 0.60), (1, 0.62), (2, 0.70), (0, 0.66), (3, 0.66)]):
        _fake_run(tmp_path / "sweep", f"run{i}", k, acc)
    (tmp_path / "sweep" / "runs" / "broken").mkdir()  # unfinished: left out
    (tmp_path / "sweep" / "runs" / "broken" / "point.json").write_text(
        '{"name": "broken", "values": {"depth": 4}, "overrides": {}, "folder": "broken"}'
    )
    found = cmd.finetuned_accuracies([tmp_path / "sweep"], "wordnet_lexnames")
    assert found == {("m", 0, "mean"): [0.60, 0.62], ("m", 1, "mean"): [0.70], ("m", None, "mean"): [0.66],
                     ("m", 2, "mean"): [0.66]}  # fmt: skip
    rows = [{"candidate": f"m/layer{i}/{p}", "checkpoint": "m", "layer": i, "pooling": p, "blocks": 3,
             "logme": s, "h_score": -s, "probe_accuracy": 0.5 + s}
            for i, (p, s) in enumerate([("mean", 0.1), ("mean", 0.3), ("mean", 0.2)])]  # fmt: skip
    rows.append({**rows[0], "candidate": "m/layer0/cls", "pooling": "cls"})
    assert cmd.add_finetuned(rows, found) == 3
    assert rows[0]["finetuned_accuracy"] == pytest.approx(0.61) and rows[0]["finetuned_runs"] == 2
    assert rows[0]["finetuned_std"] == pytest.approx(np.std([0.6, 0.62], ddof=1))
    assert rows[2]["finetuned_accuracy"] == pytest.approx(0.66) and rows[2]["finetuned_runs"] == 2  # 3 and 0 (all)
    assert rows[1]["finetuned_std"] is None and "finetuned_accuracy" not in rows[3]
    agree = cmd.agreement(rows, "finetuned_accuracy", cmd.SCORE_KEYS + ("probe_accuracy",))
    assert set(agree) == {"logme", "h_score", "probe_accuracy"}
    assert agree["logme"]["kendall_tau"] == pytest.approx(1.0) and agree["h_score"]["spearman_rho"] == pytest.approx(-1)
    assert "ft_acc" in cmd.format_table(rows, {}, agree).splitlines()[0]
    _fake_run(tmp_path / "other", "run0", 1, 0.5, train="wordnet_examples:train")
    with pytest.raises(ValueError, match="fine-tunes on 'wordnet_examples', not the target 'wordnet_lexnames'"):
        cmd.finetuned_accuracies([tmp_path / "other"], "wordnet_lexnames")
    _fake_run(tmp_path / "unpooled", "run0", 1, 0.5, pooling=None)
    with pytest.raises(ValueError, match="model.pooling is unset"):
        cmd.finetuned_accuracies([tmp_path / "unpooled"], "wordnet_lexnames")
    (tmp_path / "sweep" / "runs" / "broken").rename(tmp_path / "broken")
    (tmp_path / "unfinished" / "runs").mkdir(parents=True)
    (tmp_path / "broken").rename(tmp_path / "unfinished" / "runs" / "broken")
    with pytest.raises(ValueError, match="no finished fine-tuning run"):
        cmd.finetuned_accuracies([tmp_path / "unfinished"], "wordnet_lexnames")
    with pytest.raises(FileNotFoundError, match="not a sweep"):
        cmd.finetuned_accuracies([tmp_path], "wordnet_lexnames")
