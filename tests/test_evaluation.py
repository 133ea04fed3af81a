"""Evaluation metrics against scikit-learn on fixed logits (padded batches, absent classes), ECE against a numpy
reference, and prediction on a tiny BERT classifier against `model.apply`."""

import json
from types import SimpleNamespace

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import token_batch
from sklearn import metrics as skm

import tljax.models as tm
from tljax import evaluation, parallel

C = 6  # class 4 never occurs in the labels but is predicted; class 5 neither occurs nor is predicted
N, B = 45, 16  # 45 examples in batches of 16: the last one padded with 3 rows


class LogitsAreInputs(nn.Module):
    """A "model" whose logits are its input, so metrics can be checked on logits chosen by the test."""

    @nn.compact
    def __call__(self, *, pixel_values, train: bool = False):
        return {"logits": pixel_values}


def fixed(model=None):
    return SimpleNamespace(model=model or LogitsAreInputs(), params={}, state={})


@pytest.fixture(scope="module")
def examples():
    rng = np.random.RandomState(0)
    labels = rng.choice([0, 1, 2, 3], N)
    logits = rng.normal(0, 1.5, (N, C)).astype(np.float32)
    logits[np.arange(N), labels] += 1.0  # better than chance, not perfect
    logits[:, 5] = -30.0  # class 5 is never predicted
    logits[:4, 4] = 10.0  # class 4 is predicted for a few rows although it never occurs
    return logits, labels


def batches(logits, labels, soft: bool = False):
    """Batches of B rows; the last one padded with rows whose logits predict class 5 (they must not count)."""
    out = []
    for start in range(0, len(labels), B):
        x, y = logits[start : start + B], labels[start : start + B]
        pad = B - len(y)
        mask = np.r_[np.ones(len(y)), np.zeros(pad)].astype(np.float32)
        x = np.concatenate([x, np.tile(np.eye(C, dtype=np.float32)[5] * 50, (pad, 1))])
        y = np.r_[y, np.full(pad, 5)]
        out.append({"pixel_values": x, "labels": np.eye(C, dtype=np.float32)[y] if soft else y, "mask": mask})
    return out


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference_ece(probs, labels, bins=15):
    """Guo et al. 2017: bins (lo, hi] of the top-1 confidence, weighted |accuracy - confidence|."""
    conf, pred = probs.max(-1), probs.argmax(-1)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs((pred[in_bin] == labels[in_bin]).mean() - conf[in_bin].mean())
    return ece


def test_metrics_match_sklearn_on_padded_batches_with_absent_classes(examples):
    logits, labels = examples
    report = evaluation.evaluate_detailed(fixed(), batches(logits, labels))
    pred, probs, m = logits.argmax(-1), softmax(logits.astype(np.float64)), report.metrics
    assert 4 in pred and 5 not in pred and not {4, 5} & set(labels)  # the absent-class cases are exercised
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert m["top5_accuracy"] == pytest.approx(skm.top_k_accuracy_score(labels, logits, k=5, labels=range(C)))
    f1 = skm.f1_score(labels, pred, average="macro", labels=range(C), zero_division=0)
    assert m["macro_f1"] == pytest.approx(f1)
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        balanced = skm.balanced_accuracy_score(labels, pred)  # sklearn averages over the classes in y_true
    assert m["balanced_accuracy"] == pytest.approx(balanced)
    assert m["loss"] == pytest.approx(skm.log_loss(labels, probs, labels=range(C)), rel=1e-5)
    assert m["ece"] == pytest.approx(reference_ece(probs, labels), abs=1e-6)
    np.testing.assert_array_equal(report.confusion, skm.confusion_matrix(labels, pred, labels=range(C)))
    assert report.confusion.dtype == np.int64 and report.confusion.sum() == N
    recall = skm.recall_score(labels, pred, labels=range(4), average=None)
    np.testing.assert_allclose(report.per_class_accuracy[:4], recall)
    assert np.isnan(report.per_class_accuracy[4:]).all()  # absent classes have no accuracy, not 0
    np.testing.assert_array_equal(report.support, np.bincount(labels, minlength=C))


def test_batches_aggregate_exactly_whatever_their_size(examples):
    """One batch of all rows and padded batches of 16 give the same metrics and the same counts."""
    logits, labels = examples
    whole = evaluation.evaluate_detailed(fixed(), [{"pixel_values": logits, "labels": labels}], mesh=one_device())
    split = evaluation.evaluate_detailed(fixed(), batches(logits, labels))
    np.testing.assert_array_equal(whole.confusion, split.confusion)
    np.testing.assert_array_equal(whole.calibration.count, split.calibration.count)
    assert whole.metrics == pytest.approx(split.metrics, rel=1e-6)


def test_soft_labels_count_as_their_argmax(examples):
    logits, labels = examples
    hard = evaluation.evaluate(fixed(), batches(logits, labels))
    soft = evaluation.evaluate(fixed(), batches(logits, labels, soft=True))
    assert soft == pytest.approx(hard)


def test_evaluate_returns_flat_json_floats_and_the_report_serialises(examples):
    logits, labels = examples
    metrics = evaluation.evaluate(fixed(), batches(logits, labels))
    assert set(metrics) == {"loss", "accuracy", "top5_accuracy", "macro_f1", "balanced_accuracy", "ece"}
    assert all(type(v) is float for v in metrics.values())
    names = [f"class_{i}" for i in range(C)]
    report = evaluation.evaluate_detailed(fixed(), batches(logits, labels), label_names=names)
    blob = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert blob["per_class_accuracy"][4:] == [None, None] and blob["label_names"] == names
    assert blob["confusion"] == report.confusion.tolist() and sum(blob["calibration"]["count"]) == N


def test_calibration_bins_are_a_reliability_diagram(examples):
    logits, labels = examples
    cal = evaluation.evaluate_detailed(fixed(), batches(logits, labels)).calibration
    conf = softmax(logits.astype(np.float64)).max(-1)
    bin_of = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
    np.testing.assert_array_equal(cal.count, np.bincount(bin_of, minlength=15))
    full = cal.count > 0
    np.testing.assert_allclose(cal.confidence[full], [conf[bin_of == b].mean() for b in np.flatnonzero(full)], 1e-6)
    assert np.isnan(cal.accuracy[~full]).all()


def test_many_classes_keep_per_class_counts_without_a_confusion_matrix(examples):
    logits, labels = examples
    step = jax.jit(evaluation.make_eval_step(LogitsAreInputs(), max_confusion_classes=C - 1))
    report = evaluation.evaluate_detailed(fixed(), batches(logits, labels), eval_step=step)
    full = evaluation.evaluate_detailed(fixed(), batches(logits, labels))
    assert report.confusion is None and report.to_json()["confusion"] is None
    assert report.metrics == full.metrics


def test_bad_masks_and_empty_data_are_errors(examples):
    logits, labels = examples
    bad = batches(logits, labels)[:1]
    bad[0]["mask"] = np.full(B, 0.5, np.float32)
    with pytest.raises(ValueError, match="mask must hold 0 .* or 1"):
        evaluation.evaluate(fixed(), bad)
    masked = batches(logits, labels)[:1]
    masked[0]["mask"] = np.zeros(B, np.float32)
    with pytest.raises(ValueError, match="saw no examples"):
        evaluation.evaluate(fixed(), masked)
    with pytest.raises(ValueError, match="saw no examples"):
        evaluation.evaluate(fixed(), [])


def test_rows_labels_and_num_classes_are_checked_before_any_metric(examples):
    """Regressions: rows past a given `num_classes` dropped out of every count (accuracy 1.0 on half the data);
    labels (B, 1) and batches with fewer labels than logits failed deep inside jit; a padding row labelled -1 (the
    "no label" value) was refused although padding rows are never read."""
    logits, labels = examples
    batch = batches(logits, labels)[0]
    with pytest.raises(ValueError, match="num_classes=7, but the model's logits have 6 classes"):
        evaluation.evaluate(fixed(), [batch], num_classes=7)
    with pytest.raises(ValueError, match=r"one class index per row.*\(16, 1\): squeeze the last axis"):
        evaluation.evaluate(fixed(), [{**batch, "labels": batch["labels"][:, None]}])
    for call in (evaluation.evaluate, evaluation.predict):
        with pytest.raises(ValueError, match="different numbers of rows: {'pixel_values': 16, 'labels': 15"):
            call(fixed(), [{"pixel_values": batch["pixel_values"], "labels": batch["labels"][:15]}])
    last = batches(logits, labels)[-1]  # 13 examples and 3 padding rows
    want = evaluation.evaluate(fixed(), [last])
    last["labels"] = np.where(last["mask"] > 0, last["labels"], -1)
    assert evaluation.evaluate(fixed(), [last]) == want
    with pytest.raises(ValueError, match=r"label -1 \(row 0\) is outside \[0, 6\)"):
        evaluation.evaluate(fixed(), [{**last, "labels": np.r_[-1, last["labels"][1:]]}])


def test_rows_with_nan_logits_are_wrong_predictions_and_named(examples):
    """Regression: a row of NaN logits counted as a prediction of class 0 (all-NaN logits scored accuracy 0.5 on
    a balanced set), and `to_json` left the NaN loss in, so `json.dumps(allow_nan=False)` failed."""
    logits, labels = examples
    logits = logits.copy()
    bad = np.flatnonzero(labels == 0)[:3]  # rows whose argmax would name their true class 0
    logits[bad] = np.nan
    logits[bad[0], 1] = np.inf
    with pytest.warns(UserWarning, match="3 of 45 example rows have NaN or \\+inf logits"):
        report = evaluation.evaluate_detailed(fixed(), batches(logits, labels))
    ok = np.setdiff1d(np.arange(N), bad)
    pred = np.where(np.isin(np.arange(N), bad), -1, logits.argmax(-1))
    assert report.metrics["accuracy"] == pytest.approx(np.mean(pred == labels))
    assert report.metrics["nonfinite_rows"] == 3 and np.isnan(report.metrics["loss"])
    assert report.support.sum() == N and report.confusion.sum() == N - 3
    assert report.calibration.count.sum() == N - 3
    assert report.metrics["top5_accuracy"] == pytest.approx(
        np.mean([labels[i] in np.argsort(-logits[i])[:5] for i in ok]) * len(ok) / N
    )
    assert json.loads(json.dumps(report.to_json(), allow_nan=False))["metrics"]["loss"] is None
    with pytest.warns(UserWarning, match="3 of 45 rows have NaN or \\+inf logits"):
        evaluation.predict(fixed(), batches(logits, labels))
    clean = evaluation.evaluate_detailed(fixed(), batches(examples[0], labels))
    assert "nonfinite_rows" not in clean.metrics


def one_device():
    return parallel.make_mesh(jax.devices()[:1])


def test_predict_on_fixed_logits_drops_padding_and_names_classes(examples):
    logits, labels = examples
    names = list("abcdef")
    preds = evaluation.predict(fixed(), batches(logits, labels), label_names=names, top_k=3)
    np.testing.assert_array_equal(preds.logits, logits)
    np.testing.assert_array_equal(preds.labels, logits.argmax(-1))
    np.testing.assert_array_equal(preds.targets, labels)
    np.testing.assert_allclose(preds.probs, softmax(logits.astype(np.float64)), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(preds.top_k, np.argsort(-logits, axis=-1)[:, :3])
    np.testing.assert_allclose(preds.top_k_probs, np.sort(preds.probs, -1)[:, ::-1][:, :3])
    assert preds.names[:4] == ["e"] * 4 and len(preds) == N
    text = evaluation.format_top_classes(preds, rows=[0])
    assert text.startswith("0: e 0.") and text.count(" | ") == 2 and text.endswith(f"(true: {names[labels[0]]})")


def test_predict_on_all_devices_equals_one_device(examples):
    """Batches sharded over every device (8 with XLA_FLAGS=--xla_force_host_platform_device_count=8) come back as
    the same rows in the same order."""
    logits, labels = examples
    data = [{k: v for k, v in b.items() if k != "labels"} for b in batches(logits, labels)]
    many = evaluation.predict(fixed(), data, mesh=parallel.make_mesh())
    one = evaluation.predict(fixed(), data, mesh=one_device())
    np.testing.assert_array_equal(many.logits, one.logits)
    np.testing.assert_array_equal(many.top_k, one.top_k)
    assert many.targets is None and one.targets is None


@pytest.fixture(scope="module")
def bert(tiny_bert_dir):
    loaded = tm.load_pretrained(tiny_bert_dir, num_classes=3, pooling="mean")
    rng = np.random.RandomState(0)
    kernel = loaded.params["head"]["out"]["kernel"]  # zeros when new: give the head something to say
    params = {
        **loaded.params,
        "head": {"out": {**loaded.params["head"]["out"], "kernel": rng.normal(size=kernel.shape)}},
    }
    return loaded, jax.tree.map(lambda x: np.asarray(x, np.float32), params)


def test_predict_on_tiny_bert_equals_model_apply(bert):
    loaded, params = bert
    (ids1, am1), (ids2, am2) = token_batch(8, 7, seed=1), token_batch(8, 7, seed=2)
    mask = np.r_[np.ones(5), np.zeros(3)].astype(np.float32)
    data = [
        {"input_ids": ids1, "attention_mask": am1, "labels": np.arange(8) % 3},
        {"input_ids": ids2, "attention_mask": am2, "labels": np.arange(8) % 3, "mask": mask},
    ]
    preds = evaluation.predict(loaded, data, params=params, label_names=["neg", "neu", "pos"])
    ref = [loaded.model.apply({"params": params}, input_ids=i, attention_mask=a)["logits"] for i, a in [(ids1, am1)]]
    ref.append(loaded.model.apply({"params": params}, input_ids=ids2[:5], attention_mask=am2[:5])["logits"])
    ref = np.concatenate([np.asarray(r) for r in ref])
    assert preds.logits.shape == (13, 3) and preds.top_k.shape == (13, 3)
    np.testing.assert_allclose(preds.logits, ref, atol=1e-5)
    np.testing.assert_array_equal(preds.labels, ref.argmax(-1))
    np.testing.assert_array_equal(preds.targets, np.r_[np.arange(8) % 3, np.arange(5) % 3])
    np.testing.assert_allclose(preds.probs.sum(-1), 1.0, rtol=1e-6)
    assert set(preds.names) <= {"neg", "neu", "pos"}
    assert len(evaluation.format_top_classes(preds).splitlines()) == 13
    with pytest.raises(ValueError, match="2 label names for a model with 3 classes"):
        evaluation.predict(loaded, data, params=params, label_names=["neg", "pos"])


def test_evaluate_on_tiny_bert_agrees_with_predict(bert):
    """The eval step and the predict step see the same logits, so metrics from either agree."""
    loaded, params = bert
    (ids, am), labels = token_batch(8, 7, seed=3), np.array([0, 1, 2, 0, 1, 2, 0, 1])
    data = [{"input_ids": ids, "attention_mask": am, "labels": labels}]
    preds = evaluation.predict(loaded, data, params=params)
    report = evaluation.evaluate_detailed(loaded, data, params=params)
    assert report.metrics["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds.labels))
    f1 = skm.f1_score(labels, preds.labels, average="macro", labels=range(3), zero_division=0)
    assert report.metrics["macro_f1"] == pytest.approx(f1)
    np.testing.assert_array_equal(report.confusion, skm.confusion_matrix(labels, preds.labels, labels=range(3)))


def test_params_on_one_device_evaluate_on_every_device(bert):
    """A state trained on one device (committed there) evaluates and predicts on the default all-device mesh."""
    loaded, params = bert
    (ids, am), labels = token_batch(8, 7, seed=4), np.arange(8) % 3
    data = [{"input_ids": ids, "attention_mask": am, "labels": labels}]
    committed = jax.device_put(params, jax.devices()[0])
    assert evaluation.evaluate(loaded, data, params=committed) == pytest.approx(
        evaluation.evaluate(loaded, data, params=params, mesh=one_device()), rel=1e-5
    )
    np.testing.assert_allclose(
        evaluation.predict(loaded, data, params=committed).logits,
        evaluation.predict(loaded, data, params=params, mesh=one_device()).logits,
        atol=1e-5,
    )
