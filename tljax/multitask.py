"""Multi-task learning over one shared backbone: one head per task, mixed batches, weighted per-task losses.

    loaded = multitask.load(path, {"lexnames": 26, "examples": 26}, pooling="mean", uncertainty=True)
    rates = multitask.mixing_rates({"lexnames": 65_672, "examples": 9_102}, "temperature", temperature=2.0)
    train = multitask.MixedTrainData({"lexnames": a, "examples": b}, rates, batch_size=32, collate=batcher)
    result = engine.fit(loaded, schedule, train, config, loss_fn=multitask.MultiTaskLoss(train.tasks, uncertainty=True))
    multitask.evaluate_tasks(loaded, {"lexnames": test_a, "examples": test_b}, params=result.state.params)

Batches mix tasks row by row (T5's example mixing): each row's task is drawn by the mixing rates, and `labels` is
(B, tasks) int: column t holds the row's class under task t if the row belongs to it and -1 (no label) otherwise, in
the tasks' order (`MixedTrainData.tasks`, `MultiTaskLoss.tasks`). The shapes do not depend on the draw, so one
compiled step serves every mixture, and a task missing from a batch simply adds nothing. Rates: explicit weights,
proportional to dataset size, or temperature sampling p_t ~ n_t^(1/T) (T = 1: proportional, T -> inf: uniform;
multilingual MT and T5 use it to up-sample small tasks).

The model is a `WithHead` whose head is a `MultiHead` (params `head/heads_<task>/...`), so rule sets and freezing
schedules (LP-FT, top-k, ...) act on the shared `backbone/` exactly as for one task. Uncertainty weighting (Kendall,
Gal & Cipolla 2018) learns one log-variance s_t per task and minimises sum_t exp(-s_t) L_t + s_t; the s_t are
parameters of the head (`head/task_weights/<task>`), so every rule set that trains the heads trains them too (a
linear probe included) and a rule on `^head/task_weights/` freezes them or gives them their own learning rate.

`engine.fit` runs the training; it evaluates single-head models only, so pass no `eval_data` and evaluate each
head afterwards with `evaluate_tasks`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.core import FrozenDict

import tljax.models as tm
from tljax import evaluation
from tljax.data.pipeline import stack
from tljax.models.heads import ClassificationHead, MultiHead, WithHead, check_num_classes

NO_LABEL = -1  # a row's label under the tasks it does not belong to
MIXINGS = ("explicit", "proportional", "temperature")
WEIGHTINGS = ("fixed", "uncertainty")


# ---- model -------------------------------------------------------------------------------------------------------


class LogVariances(nn.Module):
    """One learned scalar s_t = log sigma_t^2 per task, starting at 0 (every task weighted 1)."""

    tasks: tuple[str, ...]

    @nn.compact
    def __call__(self) -> dict:
        return {t: self.param(t, nn.initializers.zeros_init(), (), jnp.float32) for t in self.tasks}


class UncertaintyHeads(MultiHead):
    """`MultiHead` that also owns the tasks' log-variances (`head/task_weights/<task>`)."""

    def setup(self):
        self.task_weights = LogVariances(tuple(self.heads))

    def __call__(self, features, *, train: bool = False):
        if self.is_initializing():  # created with the heads by whichever model initialises them (`tm.from_config`)
            self.task_weights()
        return super().__call__(features, train=train)

    def log_vars(self) -> dict:
        return self.task_weights()


class MultiTaskModel(WithHead):
    """backbone -> pool -> one head per task. Outputs `logits` {task: (B, C_t)}, plus `log_vars` {task: ()} with
    `UncertaintyHeads`."""

    def __call__(self, *, train: bool = False, **inputs):
        outputs = super().__call__(train=train, **inputs)
        if isinstance(self.head, UncertaintyHeads):
            outputs["log_vars"] = self.head.log_vars()
        return outputs


def heads_for(tasks: Mapping[str, int], *, uncertainty: bool = False, hidden: int = 0, dropout: float = 0.0):
    """A `MultiHead` (or `UncertaintyHeads`) of `ClassificationHead`s, {task: num_classes}, in the given order.

    The heads are held in a FrozenDict so the model hashes (the engine caches one compiled eval step per model)."""
    check_tasks(tasks)
    heads = FrozenDict({t: ClassificationHead(check_num_classes(n), hidden, dropout) for t, n in tasks.items()})
    return UncertaintyHeads(heads) if uncertainty else MultiHead(heads)


def load(
    name_or_path,
    tasks: Mapping[str, int],
    *,
    uncertainty: bool = False,
    hidden: int = 0,
    dropout: float = 0.0,
    **load_kwargs,
):
    """`load_pretrained` with one new head per task, as a `MultiTaskModel`.

    Args:
      tasks: {task name: number of classes}.
      uncertainty: learn per-task loss weights (`MultiTaskLoss(..., uncertainty=True)`).
      hidden, dropout: each head's `ClassificationHead` layout.
      load_kwargs: passed to `tm.load_pretrained` (pooling, seed, dtype, reinit, ...).
    """
    head = heads_for(tasks, uncertainty=uncertainty, hidden=hidden, dropout=dropout)
    return as_multitask(tm.load_pretrained(name_or_path, head=head, **load_kwargs))


def as_multitask(loaded):
    """A `Pretrained` whose `WithHead` model has a `MultiHead`, as a `MultiTaskModel` (same parameters)."""
    model = loaded.model
    if not (isinstance(model, WithHead) and isinstance(model.head, MultiHead)):
        raise ValueError(f"as_multitask needs a WithHead model with a MultiHead head, got {type(model).__name__}")
    return dataclasses.replace(loaded, model=MultiTaskModel(model.backbone, model.head, model.pooling))


def task_names(loaded) -> tuple[str, ...]:
    return tuple(loaded.model.head.heads)


def task_model(loaded, task: str, params=None):
    """The single-head model of one task (`WithHead(backbone, heads[task])`) and its params: what
    `evaluation.evaluate` / `predict` take."""
    check_known(task, task_names(loaded))
    params = loaded.params if params is None else params
    m = loaded.model
    view = {"backbone": params["backbone"], "head": params["head"][f"heads_{task}"]}
    return dataclasses.replace(loaded, model=WithHead(m.backbone, m.head.heads[task], m.pooling), params=view)


def evaluate_tasks(loaded, data: Mapping[str, Iterable[Mapping]], *, params=None, collections=None) -> dict:
    """{task: `evaluation.evaluate` metrics of its head} over each task's eval batches (plain `labels`)."""
    out = {}
    for task, batches in data.items():
        view = task_model(loaded, task, params)
        out[task] = evaluation.evaluate(view, batches, collections=collections)
    return out


def log_variances(params) -> dict[str, float]:
    """The learned s_t = log sigma_t^2 of an uncertainty-weighted model ({} without them)."""
    return {t: float(v) for t, v in params["head"].get("task_weights", {}).items()}


# ---- mixing ------------------------------------------------------------------------------------------------------


def mixing_rates(
    sizes: Mapping[str, int],
    how: str = "proportional",
    *,
    temperature: float = 1.0,
    weights: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Sampling probabilities of the tasks, summing to 1.

    Args:
      sizes: {task: training examples}.
      how: "explicit" (the given `weights`, normalised), "proportional" (p_t ~ n_t) or "temperature"
        (p_t ~ n_t^(1/T)).
      temperature: T > 0 of temperature sampling.
    """
    check_tasks(sizes)
    if how not in MIXINGS:
        raise ValueError(f"unknown mixing {how!r}; choose one of {MIXINGS}")
    if how == "explicit":
        if weights is None:
            raise ValueError("mixing 'explicit' needs weights={task: weight}")
        raw = dict(check_positive(weights, sizes, "mixing weight"))
    else:
        if weights:
            raise ValueError(f"mixing {how!r} derives the rates from the sizes: drop weights (or use 'explicit')")
        check_positive(sizes, sizes, "dataset size")
        if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        power = 1.0 / temperature if how == "temperature" else 1.0
        raw = {t: float(n) ** power for t, n in sizes.items()}
    total = sum(raw.values())
    return {t: raw[t] / total for t in sizes}


class MixedTrainData:
    """`train_data(step)` for `engine.fit`: batches whose rows come from several tasks, drawn by `rates`.

    Row j of global step s belongs to task `row_tasks(s)[j]`, drawn with `np.random.default_rng([seed, s])`; each
    task reads its own split as an endless stream of seeded epoch permutations, and the stream position of its rows
    at step s is the number of its rows before s. Everything is a function of (seed, step), so `train_data(step)`
    restarts anywhere and a resumed run sees the batches an uninterrupted one would. One process (not multi-host).

    Args:
      splits: {task: split of records with `label`}; the order is the tasks' order.
      rates: {task: probability} (`mixing_rates`); normalised, each must be > 0.
      batch_size: rows per batch.
      collate: records (without `label`) -> model inputs, e.g. a `TextBatcher` (default: `stack`).
      seed: the task draws and the epoch permutations.
    """

    def __init__(
        self,
        splits: Mapping[str, Sequence],
        rates: Mapping[str, float],
        *,
        batch_size: int,
        collate: Callable | None = None,
        seed: int = 0,
        threads: int = 4,
        prefetch: int = 8,
    ):
        check_tasks(splits)
        probs = check_positive(rates, splits, "mixing rate")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        empty = [t for t, s in splits.items() if len(s) == 0]
        if empty:
            raise ValueError(f"task(s) {empty} have no training examples")
        self.tasks, self.splits = tuple(splits), dict(splits)
        self.probs = np.asarray([probs[t] for t in self.tasks]) / sum(probs.values())
        self.batch_size, self.seed, self.collate = batch_size, int(seed), collate or stack
        self.threads, self.prefetch = threads, prefetch
        self._cum = np.zeros((1, len(self.tasks)), np.int64)  # rows of each task before step s
        self._lock = threading.Lock()

    @property
    def steps_per_epoch(self) -> int:
        """Batches in one pass over all tasks' examples together (for phases given in epochs)."""
        return max(1, sum(len(s) for s in self.splits.values()) // self.batch_size)

    def row_tasks(self, step: int) -> np.ndarray:
        """(B,) task index of each row of global step `step`."""
        rng = np.random.default_rng([self.seed, int(step)])
        return rng.choice(len(self.tasks), self.batch_size, p=self.probs)

    def rows_before(self, step: int) -> np.ndarray:
        """(tasks,) rows each task contributed to the steps before `step` (its stream position)."""
        with self._lock:
            have = len(self._cum)
            if step >= have:
                counts = [np.bincount(self.row_tasks(s), minlength=len(self.tasks)) for s in range(have - 1, step)]
                self._cum = np.concatenate([self._cum, self._cum[-1] + np.cumsum(counts, axis=0)])
            return self._cum[step]

    def batch(self, step: int) -> dict:
        """The batch of global step `step` (random access): model inputs and `labels` (B, tasks), -1 = none."""
        rows, start = self.row_tasks(step), self.rows_before(step)
        records, labels = [None] * len(rows), np.full((len(rows), len(self.tasks)), NO_LABEL, np.int32)
        for k, task in enumerate(self.tasks):
            where = np.flatnonzero(rows == k)
            for j, pos in zip(where, range(start[k], start[k] + len(where)), strict=True):
                record = dict(self.splits[task][self._example(k, pos)])
                if "label" not in record:
                    raise ValueError(f"task {task!r}: record {pos} has no 'label' (keys {sorted(record)})")
                labels[j, k] = label = record.pop("label")
                if label < 0:
                    raise ValueError(f"task {task!r}: record {pos} has label {label}; labels are class indices >= 0")
                records[j] = record
        batch = dict(self.collate(records))
        batch.pop("labels", None)
        return {**batch, "labels": labels}

    def _example(self, k: int, position: int) -> int:
        epoch, within = divmod(int(position), len(self.splits[self.tasks[k]]))
        return int(self._permutation(k, epoch)[within])

    @functools.lru_cache(maxsize=16)  # noqa: B019 (a few permutations per object; the object lives for one run)
    def _permutation(self, k: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, k + 1, epoch]).permutation(len(self.splits[self.tasks[k]]))

    def __call__(self, step: int = 0) -> Iterator[dict]:
        if not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"train_data(step) takes a step >= 0, got {step!r}")
        ds = grain.MapDataset.range(int(step), np.iinfo(np.int64).max // 2).map(self.batch)
        options = grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=self.prefetch)
        return iter(ds.to_iter_dataset(options))


# ---- loss --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MultiTaskLoss:
    """`loss_fn(outputs, batch) -> (loss, metrics)` for `engine.fit` over a `MultiTaskModel`.

    L_t is task t's mean cross-entropy over its rows of the batch (0 when it has none). The loss is
    sum_t w_t L_t with fixed `weights` (default 1 each), or with `uncertainty` sum_t exp(-s_t) L_t + s_t over the
    tasks present in the batch, s_t the model's learned log-variances. Metrics: `loss` (the total), `accuracy` (all
    rows), and per task `loss_<t>`, `accuracy_<t>`, `rows_<t>` (its share of the batch), `log_var_<t>`.
    """

    tasks: tuple[str, ...]
    weights: Mapping[str, float] | None = None
    uncertainty: bool = False

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        check_tasks(dict.fromkeys(self.tasks))
        if self.uncertainty and self.weights:
            raise ValueError("uncertainty weighting learns the task weights: drop the fixed weights")
        if self.weights is not None:
            w = check_positive(self.weights, dict.fromkeys(self.tasks), "loss weight", allow_zero=True)
            if not any(w.values()):
                raise ValueError("every loss weight is 0: nothing would train")
            object.__setattr__(self, "weights", FrozenDict(w))

    def __call__(self, outputs: Mapping, batch: Mapping) -> tuple[jax.Array, dict]:
        logits, labels = outputs["logits"], batch["labels"]
        self._check(logits, labels, outputs)
        total, metrics, hits, rows = 0.0, {}, 0, 0
        for k, t in enumerate(self.tasks):
            loss_t, hits_t, n_t = _task_terms(logits[t], labels[:, k])
            if self.uncertainty:
                s = outputs["log_vars"][t]
                total = total + jnp.where(n_t > 0, jnp.exp(-s) * loss_t + s, 0.0)
                metrics[f"log_var_{t}"] = s
            else:
                total = total + (self.weights[t] if self.weights else 1.0) * loss_t
            n = labels.shape[0]
            metrics.update({f"loss_{t}": loss_t, f"accuracy_{t}": hits_t / jnp.maximum(n_t, 1), f"rows_{t}": n_t / n})
            hits, rows = hits + hits_t, rows + n_t
        return total, {"loss": total, "accuracy": hits / jnp.maximum(rows, 1), **metrics}

    def _check(self, logits, labels, outputs) -> None:
        if not isinstance(logits, Mapping):
            raise ValueError("MultiTaskLoss needs a MultiTaskModel (a MultiHead: logits per task)")
        if set(logits) != set(self.tasks):
            raise ValueError(f"loss tasks {list(self.tasks)} differ from the model's heads {list(logits)}")
        if labels.ndim != 2 or labels.shape[1] != len(self.tasks):
            raise ValueError(
                f"labels must be (batch, {len(self.tasks)}) ints, one column per task {list(self.tasks)} (-1: the "
                f"row has no label for that task), got shape {labels.shape}: use MixedTrainData"
            )
        if self.uncertainty and "log_vars" not in outputs:
            raise ValueError("uncertainty weighting needs the model's log-variances: load with uncertainty=True")

    def check_labels(self, batch: Mapping, classes: Mapping[str, int], where: str = "batch") -> None:
        """Raises a ValueError naming the first label of column k outside [0, classes[task k]) and not -1 (on the
        host, before the step: in the step a label past a head's classes makes its loss NaN, one below -1 drops
        the row)."""
        labels = np.asarray(batch["labels"])
        if labels.ndim != 2 or labels.shape[1] != len(self.tasks):
            return  # the traced step's `_check` names the shape
        for k, t in enumerate(self.tasks):
            col, n = labels[:, k], classes.get(t)
            bad = np.flatnonzero((col != NO_LABEL) & ((col < 0) | (col >= (n if n is not None else np.inf))))
            if bad.size:
                raise ValueError(
                    f"{where}: task {t!r} has label {int(col[bad[0]])} (row {int(bad[0])}), outside [0, {n}) and not "
                    f"{NO_LABEL} (no label): check the task's label map, or its head's number of classes"
                )


def _task_terms(logits, labels):
    """(mean loss over the task's rows, correct rows, rows) with label -1 marking rows of other tasks."""
    valid = labels >= 0
    safe = jnp.where(valid, labels, 0)
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    n = valid.sum()
    loss = jnp.where(valid, per_row, 0.0).sum() / jnp.maximum(n, 1)
    hits = (valid & (logits.argmax(-1) == safe)).sum()
    return loss, hits, n


# ---- checks ------------------------------------------------------------------------------------------------------


def check_tasks(tasks: Mapping) -> None:
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError(f"tasks must be a non-empty mapping {{task name: ...}}, got {tasks!r}")
    bad = [t for t in tasks if not (isinstance(t, str) and t.isidentifier())]
    if bad:
        raise ValueError(f"task names must be identifiers (they name parameters and metrics), got {bad}")


def check_known(task: str, tasks: Sequence[str]) -> None:
    if task not in tasks:
        raise ValueError(f"unknown task {task!r}; the model's tasks are {list(tasks)}")


def check_positive(values: Mapping, tasks: Mapping, what: str, allow_zero: bool = False) -> dict[str, float]:
    """{task: float} with exactly the tasks' keys, each finite and > 0 (>= 0 with `allow_zero`)."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{what}s must be a mapping {{task: number}}, got {values!r}")
    unknown, missing = sorted(set(values) - set(tasks)), sorted(set(tasks) - set(values))
    if unknown or missing:
        raise ValueError(f"{what}s name unknown task(s) {unknown} and miss task(s) {missing}; tasks: {list(tasks)}")
    out = {}
    for t in tasks:
        v = values[t]
        ok = isinstance(v, int | float | np.number) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or v < 0 or (v == 0 and not allow_zero):
            need = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{what} of task {t!r} must be a finite number {need}, got {v!r}")
        out[t] = float(v)
    return out
