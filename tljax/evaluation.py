"""Evaluating and running a classifier: metrics a researcher can check, and predictions with names.

    metrics = evaluation.evaluate(loaded, eval_batches)                      # flat floats, as the engine logs them
    report = evaluation.evaluate_detailed(loaded, eval_batches, params=..., label_names=names)
    report.confusion, report.per_class_accuracy, report.to_json()
    preds = evaluation.predict(loaded, batches, label_names=names)           # logits, probs, top-k as numpy
    print(evaluation.format_top_classes(preds, rows=range(3)))

Batches hold the model inputs, `labels` ((B,) class indices, or (B, C) probabilities whose argmax is the class) and
an optional `mask` (B,) of 0 (padding row) and 1 (example), so a last partial batch can be padded to the shape jit
compiled for. The jitted eval step returns *sums* over the rows of a batch: the loss, top-k hits, per-class counts
(support, predictions, true positives), a confusion matrix and calibration-bin sums. Counts are integers, so
batches aggregate exactly whatever their size and padding; every metric is then computed once on the host.

Classes absent from the eval data (no row has that label):
  per_class_accuracy  NaN for them (the recall of a class without examples is undefined);
  balanced_accuracy   mean recall over the classes present, as scikit-learn's `balanced_accuracy_score`;
  macro_f1            mean over *all* C classes, an absent class scoring 0, as scikit-learn's
                      `f1_score(average="macro", labels=range(C), zero_division=0)`; a model that predicts an
                      absent class is penalised by the same rule (its precision is 0).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tljax import parallel, task
from tljax.losses import hard_labels, model_inputs

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error (Guo et al., 2017)
MAX_CONFUSION_CLASSES = 2048  # above this a (C, C) matrix per batch costs more than it tells; per-class counts stay


# ---------------------------------------------------------------------------------------------------- device side


def _logits(model, params, collections: Mapping, batch: Mapping) -> jax.Array:
    """The model's float32 logits in inference mode (labels and mask are not model inputs)."""
    out = model.apply({"params": params, **collections}, **model_inputs(batch))
    logits = out["logits"] if isinstance(out, Mapping) else out
    if isinstance(logits, Mapping):
        raise TypeError(f"the model returns one logits array per head ({sorted(logits)}): evaluate one head at a time")
    return logits.astype(jnp.float32)


def _valid_rows(batch: Mapping, rows: int) -> jax.Array:
    """Rows that are examples (mask 1), as bool; padding rows may hold anything, even NaN logits."""
    mask = batch.get("mask")
    return jnp.ones(rows, bool) if mask is None else mask > 0


def _nll_sum(logits, labels, valid) -> jax.Array:
    losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    return jnp.where(valid, losses, 0.0).sum()


def nonfinite_rows(logits) -> jax.Array:
    """(B,) rows whose logits hold NaN or +inf: they name no class (argmax would say class 0). -inf is a class
    ruled out, not an error."""
    return jnp.isnan(logits).any(-1) | jnp.isposinf(logits).any(-1)


def _top_k_hits(logits, labels, valid, top_k: int) -> dict:
    k = min(top_k, logits.shape[-1])
    in_top = (jax.lax.top_k(logits, k)[1] == labels[:, None]).any(-1)
    return {f"top{k}_correct": (in_top & valid).sum()}


def _class_counts(labels, preds, valid, classes: int) -> dict:
    """Per class: rows with that label (support), rows predicted as it, and rows both (true positives)."""
    w = valid.astype(jnp.int32)
    zeros = jnp.zeros(classes, jnp.int32)
    return {
        "support": zeros.at[labels].add(w),
        "predicted": zeros.at[preds].add(w),
        "true_positives": zeros.at[labels].add(w * (preds == labels)),
    }


def _confusion(labels, preds, valid, classes: int) -> jax.Array:
    """(C, C) counts, rows = true class, columns = predicted (scikit-learn's layout)."""
    return jnp.zeros((classes, classes), jnp.int32).at[labels, preds].add(valid.astype(jnp.int32))


def _calibration_sums(logits, correct, valid, bins: int) -> dict:
    """Rows, correct rows and summed confidence per bin (lo, hi] of the top-1 softmax probability."""
    conf = jax.nn.softmax(logits).max(-1)
    idx = jnp.clip(jnp.ceil(conf * bins).astype(jnp.int32) - 1, 0, bins - 1)
    w = valid.astype(jnp.int32)
    zeros = jnp.zeros(bins, jnp.int32)
    return {
        "bin_count": zeros.at[idx].add(w),
        "bin_correct": zeros.at[idx].add(w * correct),
        "bin_confidence": jnp.zeros(bins, jnp.float32).at[idx].add(jnp.where(valid, conf, 0.0)),
    }


def make_eval_step(model, *, top_k: int = 5, bins: int = ECE_BINS, max_confusion_classes: int = MAX_CONFUSION_CLASSES):
    """`eval_step(params, collections, batch) -> sums` over the batch's example rows (mask 1), to jit.

    Sums (not means) so batches of any size aggregate exactly: `loss`, `top{k}_correct`, per-class `support`,
    `predicted`, `true_positives`, calibration `bin_count` / `bin_correct` / `bin_confidence`, `nonfinite_rows`
    (rows whose logits hold NaN or +inf: counted as wrong, in no bin), and `confusion` when the model has at most
    `max_confusion_classes` classes (a non-finite row in no column). `report_from_sums` turns their totals into metrics.
    """

    def eval_step(params, collections, batch):
        logits = _logits(model, params, collections, batch)
        labels = hard_labels(batch["labels"])
        valid = _valid_rows(batch, labels.shape[0])
        classes = logits.shape[-1]
        # A row with NaN or +inf logits predicts nothing: no class (an index past the last, which the counts'
        # scatters drop), never correct, outside the calibration bins; argmax would call it class 0.
        nonfinite = nonfinite_rows(logits)
        preds, finite = jnp.where(nonfinite, classes, logits.argmax(-1)), valid & ~nonfinite
        sums = {
            "loss": _nll_sum(logits, labels, valid),
            **_top_k_hits(logits, labels, finite, top_k),
            **_class_counts(labels, preds, valid, classes),
            **_calibration_sums(logits, preds == labels, finite, bins),
            "nonfinite_rows": (valid & nonfinite).sum(),
        }
        if classes <= max_confusion_classes:
            sums["confusion"] = _confusion(labels, preds, valid, classes)
        return sums

    return eval_step


# ------------------------------------------------------------------------------------------------------ host side


@functools.lru_cache(maxsize=8)
def jitted_eval_step(model):
    """`jax.jit(make_eval_step(model))`, one per model (linen modules hash by value): evaluating the validation and
    test sets, or several checkpoints, compiles each batch shape once."""
    return jax.jit(make_eval_step(model))


def check_rows(batch: Mapping, where: str = "batch") -> None:
    """Raises a ValueError unless every array of the batch has the same number of rows and its `mask` (if any)
    is (B,) of 0 and 1.

    Metrics count rows, so a fractional weight would count as a whole example in the confusion matrix but as a
    fraction in nothing else; refusing it keeps every metric about the same rows."""
    rows = {k: np.shape(v)[0] for k, v in batch.items() if np.ndim(v)}
    if len(set(rows.values())) > 1:
        raise ValueError(f"{where}: its arrays have different numbers of rows: {rows}; each row is one example")
    if "mask" not in batch:
        return
    mask = np.asarray(batch["mask"])
    if mask.ndim != 1:
        raise ValueError(f"{where}: mask has shape {mask.shape}, it must be (batch,): 1 per example, 0 per padding row")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError(f"{where}: mask must hold 0 (padding row) or 1 (example), got values {np.unique(mask)[:5]}")


def _fetched(device_outputs: Iterable, fetch: Callable = jax.device_get) -> Iterator:
    """Host copies of a stream of device results, one step behind, so the next batch runs while one is copied."""
    pending = None
    for out in device_outputs:
        if pending is not None:
            yield fetch(pending)
        pending = out
    if pending is not None:
        yield fetch(pending)


def add_sums(totals: dict, sums: Mapping) -> dict:
    """Adds one batch's sums in int64 (counts) or float64 (loss, confidence), so totals do not overflow or drift."""
    for k, v in sums.items():
        v = np.asarray(v)
        v = v.astype(np.int64 if np.issubdtype(v.dtype, np.integer) else np.float64)
        totals[k] = totals[k] + v if k in totals else v
    return totals


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den is 0 (an undefined rate, not zero)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.full(np.shape(num), np.nan), where=den > 0)


def macro_f1(true_positives: np.ndarray, support: np.ndarray, predicted: np.ndarray) -> float:
    """Mean F1 over all classes, 0 for a class with neither examples nor predictions (`zero_division=0`).

    F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (support + predicted) per class."""
    f1 = np.nan_to_num(_ratio(2 * true_positives, support + predicted), nan=0.0)
    return float(f1.mean())


def expected_calibration_error(bin_count: np.ndarray, bin_correct: np.ndarray, bin_confidence: np.ndarray) -> float:
    """sum_m |B_m| / n * |acc(B_m) - conf(B_m)| = sum_m |correct_m - confidence_m| / n (Guo et al., 2017)."""
    n = bin_count.sum()
    if n == 0:
        return math.nan  # no row with finite logits
    return float(np.abs(bin_correct - bin_confidence).sum() / n)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A reliability diagram: per equal-width confidence bin (lo, hi], its rows, accuracy and mean confidence."""

    edges: np.ndarray  # (bins + 1,)
    count: np.ndarray  # (bins,) int64
    accuracy: np.ndarray  # (bins,) NaN for an empty bin
    confidence: np.ndarray  # (bins,) NaN for an empty bin


@dataclasses.dataclass(frozen=True)
class EvalReport:
    """Everything one evaluation measured; `metrics` is the flat dict of floats that logs and checkpoints keep.

    `confusion` is (C, C) int64, rows = true class, columns = predicted; None above `MAX_CONFUSION_CLASSES`.
    `per_class_accuracy` is each class's recall, NaN for classes absent from the data (`support` 0)."""

    metrics: dict[str, float]
    confusion: np.ndarray | None
    per_class_accuracy: np.ndarray
    support: np.ndarray
    calibration: Calibration
    label_names: tuple[str, ...] | None = None

    def to_json(self) -> dict:
        """Plain lists and numbers (NaN and inf as None) for `json.dumps(..., allow_nan=False)`."""
        cal = self.calibration
        return {
            "metrics": {k: None if not math.isfinite(v) else v for k, v in self.metrics.items()},
            "label_names": None if self.label_names is None else list(self.label_names),
            "support": self.support.tolist(),
            "per_class_accuracy": _json_floats(self.per_class_accuracy),
            "confusion": None if self.confusion is None else self.confusion.tolist(),
            "calibration": {
                "edges": _json_floats(cal.edges),
                "count": cal.count.tolist(),
                "accuracy": _json_floats(cal.accuracy),
                "confidence": _json_floats(cal.confidence),
            },
        }


def _json_floats(x: np.ndarray) -> list:
    return [float(v) if math.isfinite(v) else None for v in np.asarray(x, np.float64).ravel()]


def _names(label_names: Sequence[str] | None, classes: int) -> tuple[str, ...] | None:
    if label_names is None:
        return None
    if len(label_names) != classes:
        raise ValueError(f"{len(label_names)} label names for a model with {classes} classes")
    return tuple(str(n) for n in label_names)


def report_from_sums(totals: Mapping[str, np.ndarray], label_names: Sequence[str] | None = None) -> EvalReport:
    """Metrics from the summed outputs of `make_eval_step` over a whole eval set (see the module docstring).

    Raises:
      ValueError: no example rows were seen.
    """
    tp, support, predicted = (np.asarray(totals[k]) for k in ("true_positives", "support", "predicted"))
    n = int(support.sum())
    if n == 0:
        raise ValueError("evaluation saw no examples: the eval data is empty (or every row is masked out)")
    recall = _ratio(tp, support)
    metrics = {"loss": float(totals["loss"]) / n, "accuracy": float(tp.sum()) / n}
    for key, hits in totals.items():
        if key.startswith("top") and key.endswith("_correct"):
            metrics[key.replace("_correct", "_accuracy")] = float(hits) / n
    metrics["macro_f1"] = macro_f1(tp, support, predicted)
    metrics["balanced_accuracy"] = float(np.nanmean(recall))
    count, correct, confidence = (np.asarray(totals[k]) for k in ("bin_count", "bin_correct", "bin_confidence"))
    metrics["ece"] = expected_calibration_error(count, correct, confidence)
    nonfinite = int(totals.get("nonfinite_rows", 0))
    if nonfinite:
        metrics["nonfinite_rows"] = nonfinite
        warnings.warn(
            f"{nonfinite} of {n} example rows have NaN or +inf logits (a diverged model, or NaN in the inputs): "
            "they count as wrong predictions, the loss is NaN and the ECE covers the other rows",
            stacklevel=2,
        )
    calibration = Calibration(
        np.linspace(0.0, 1.0, len(count) + 1), count, _ratio(correct, count), _ratio(confidence, count)
    )
    confusion = totals.get("confusion")
    return EvalReport(metrics, confusion, recall, support, calibration, _names(label_names, len(support)))


def _on_mesh(tree, mesh: Mesh):
    """Arrays on devices other than the mesh's (a state trained on one device, evaluated on all) copied onto it,
    replicated, as jit needs one device set; arrays already on the mesh keep their layout (FSDP shards stay)."""
    devices = set(mesh.devices.flat)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding.device_set != devices:
            return jax.device_put(x, parallel.replicated(mesh))
        return x

    return jax.tree.map(put, tree)


def _variables(loaded, params, collections, mesh: Mesh) -> tuple:
    """`params` and `collections` (default: `loaded`'s) placed for a step on `mesh`."""
    params = loaded.params if params is None else params
    collections = dict(loaded.state if collections is None else collections)
    return _on_mesh(params, mesh), _on_mesh(collections, mesh)


def _model_classes(loaded, params, collections, batch: Mapping, expected: int | None) -> int:
    """The width of the model's logits (traced, not computed), which must equal `expected` when one is given."""
    logits = jax.eval_shape(functools.partial(_logits, loaded.model), params, collections, model_inputs(batch))
    classes = int(logits.shape[-1])
    if expected is not None and expected != classes:
        raise ValueError(f"num_classes={expected}, but the model's logits have {classes} classes")
    return classes


def evaluate_detailed(
    loaded,
    data: Iterable[Mapping],
    *,
    params=None,
    collections: Mapping | None = None,
    mesh: Mesh | None = None,
    eval_step=None,
    num_classes: int | None = None,
    label_names: Sequence[str] | None = None,
) -> EvalReport:
    """Metrics, confusion matrix, per-class accuracy and calibration of `loaded.model` over `data`.

    Args:
      loaded: a `Pretrained` (or anything with `.model`, `.params`, `.state`) whose model returns `logits`.
      data: batches of this process's rows (see the module docstring); metrics cover all processes' rows.
      params, collections: e.g. a trained `TrainState`'s `params` and `collections` (BatchNorm statistics).
      mesh: the devices batches are sharded over (default: all devices, data parallel).
      eval_step: a jitted `make_eval_step(...)` to reuse (the engine passes one, so it compiles once).
      num_classes: labels are checked against it; read from the model's logits when None (a different number
        is an error: labels past the logits would drop out of every count).
      label_names: one name per class, kept in the report.

    Returns:
      an `EvalReport`; `.metrics` holds loss, accuracy, top{k}_accuracy, macro_f1, balanced_accuracy and ece.
    """
    mesh = mesh or parallel.make_mesh()
    params, collections = _variables(loaded, params, collections, mesh)
    eval_step = eval_step or jitted_eval_step(loaded.model)

    def device_sums():
        nonlocal num_classes
        for i, local in enumerate(data):
            if i == 0:
                num_classes = _model_classes(loaded, params, collections, local, num_classes)
            task.check_labels(local, num_classes, where=f"eval batch {i}")
            check_rows(local, where=f"eval batch {i}")
            yield eval_step(params, collections, parallel.global_batch(parallel.pad_to_devices(local, mesh), mesh))

    totals: dict = {}
    for sums in _fetched(device_sums()):
        add_sums(totals, sums)
    if not totals:
        raise ValueError("evaluation saw no examples: the eval data is empty")
    return report_from_sums(totals, label_names)


def evaluate(
    loaded,
    data: Iterable[Mapping],
    *,
    params=None,
    collections: Mapping | None = None,
    mesh: Mesh | None = None,
    eval_step=None,
    num_classes: int | None = None,
) -> dict[str, float]:
    """The flat metrics of `evaluate_detailed` (loss, accuracy, top{k}_accuracy, macro_f1, balanced_accuracy, ece):
    floats for logs and checkpoints. Arguments as `evaluate_detailed`."""
    report = evaluate_detailed(
        loaded,
        data,
        params=params,
        collections=collections,
        mesh=mesh,
        eval_step=eval_step,
        num_classes=num_classes,
    )
    return report.metrics


# ----------------------------------------------------------------------------------------------------- prediction


@dataclasses.dataclass(frozen=True)
class Predictions:
    """Model outputs for the example rows of every batch, in order (padding rows dropped), as numpy arrays."""

    logits: np.ndarray  # (N, C) float32
    probs: np.ndarray  # (N, C) softmax of the logits
    labels: np.ndarray  # (N,) predicted class: argmax of the logits
    top_k: np.ndarray  # (N, k) class indices, most probable first
    top_k_probs: np.ndarray  # (N, k)
    targets: np.ndarray | None = None  # (N,) true classes, when every batch had `labels`
    label_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.logits)

    def name(self, index: int) -> str:
        """A class's name, or its index as text without `label_names`."""
        return str(index) if self.label_names is None else self.label_names[index]

    @property
    def names(self) -> list[str]:
        """Predicted class names (indices as text without `label_names`)."""
        return [self.name(i) for i in self.labels]

    def top_classes(self, row: int) -> list[tuple[str, float]]:
        """[(name, probability), ...] of one row's top-k classes, most probable first."""
        return [(self.name(i), float(p)) for i, p in zip(self.top_k[row], self.top_k_probs[row], strict=True)]


def format_top_classes(predictions: Predictions, rows: Iterable[int] | None = None, *, digits: int = 3) -> str:
    """One line per row, e.g. `0: cat 0.912 | dog 0.051 | fox 0.020  (true: cat)`, for printing."""
    lines = []
    for row in range(len(predictions)) if rows is None else rows:
        top = " | ".join(f"{name} {p:.{digits}f}" for name, p in predictions.top_classes(row))
        truth = "" if predictions.targets is None else f"  (true: {predictions.name(predictions.targets[row])})"
        lines.append(f"{row}: {top}{truth}")
    return "\n".join(lines)


def _predict_step(model, top_k: int):
    def predict_step(params, collections, batch):
        logits = _logits(model, params, collections, batch)
        return logits, jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[1]

    return predict_step


def _process_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of an array sharded over the batch axis, in order (every row in one process)."""
    shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _host_rows(outputs: tuple) -> tuple[np.ndarray, ...]:
    return tuple(_process_rows(x) for x in outputs)


def _targets(labels: list, kept: list[np.ndarray]) -> np.ndarray | None:
    """The kept rows' true classes when every batch had labels (argmax of soft labels), else None."""
    if any(y is None for y in labels):
        return None
    hard = [np.asarray(y) for y in labels]
    hard = [y.argmax(-1) if np.issubdtype(y.dtype, np.floating) else y for y in hard]
    return np.concatenate([y[k] for y, k in zip(hard, kept, strict=True)]).astype(np.int64)


def predict(
    loaded,
    data: Iterable[Mapping],
    *,
    params=None,
    collections: Mapping | None = None,
    label_names: Sequence[str] | None = None,
    top_k: int = 5,
    mesh: Mesh | None = None,
) -> Predictions:
    """Runs `loaded.model` (jitted, inference mode) over batches and returns its outputs for the example rows.

    Args:
      loaded: a `Pretrained` (or anything with `.model`, `.params`, `.state`) whose model returns `logits`.
      data: batches of model inputs, this process's rows; `labels` are optional (kept as `targets`) and rows whose
        `mask` is 0 are dropped.
      params, collections: weights to use instead of `loaded`'s (e.g. a trained state's).
      label_names: one name per class, for `Predictions.names` and `format_top_classes`.
      top_k: how many classes to keep per row (at most C).
      mesh: the devices batches are sharded over (default: all devices); each process gets its own rows back.

    Returns:
      `Predictions` with (N, C) `logits` and `probs`, (N,) `labels`, (N, k) `top_k` and `top_k_probs`.
    """
    mesh = mesh or parallel.make_mesh()
    params, collections = _variables(loaded, params, collections, mesh)
    step = jax.jit(_predict_step(loaded.model, top_k), out_shardings=parallel.batch_sharding(mesh))
    kept, labels, classes = [], [], None

    def device_outputs():
        nonlocal classes
        for i, local in enumerate(data):
            if i == 0:
                classes = _model_classes(loaded, params, collections, local, None)
            task.check_labels(local, classes, where=f"batch {i}")
            check_rows(local, where=f"batch {i}")
            local = parallel.pad_to_devices(local, mesh)
            rows = len(next(iter(model_inputs(local).values())))
            kept.append(np.asarray(local["mask"]) > 0 if "mask" in local else np.ones(rows, bool))
            labels.append(local.get("labels"))
            yield step(params, collections, parallel.global_batch(model_inputs(local), mesh))

    outs = [(lg[kept[i]], top[kept[i]]) for i, (lg, top) in enumerate(_fetched(device_outputs(), _host_rows))]
    if not outs:
        raise ValueError("predict saw no batches: the data is empty")
    logits, top = (np.concatenate(parts) for parts in zip(*outs, strict=True))
    nonfinite = int(nonfinite_rows(logits).sum())
    if nonfinite:
        warnings.warn(
            f"{nonfinite} of {len(logits)} rows have NaN or +inf logits (a diverged model, or NaN in the inputs): "
            "their predicted labels and probabilities mean nothing",
            stacklevel=2,
        )
    probs = _softmax(logits)
    top_probs = np.take_along_axis(probs, top, -1)
    names = _names(label_names, logits.shape[-1])
    return Predictions(logits, probs, logits.argmax(-1), top, top_probs, _targets(labels, kept), names)
