"""Training batches for domain adaptation: a labelled source half and an unlabelled target half per step.

    data = AdaptationData(TrainData(source, batch_size=32, ...), TrainData(target, batch_size=32, ...), total_steps)
    engine.fit(loaded, schedule, data, config, loss_fn=adaptation_loss("dann"))

`data(step)` is resumable like `TrainData` (both halves restart at `step`). Each batch is the source batch's rows
followed by the target batch's rows, plus
  domain     (B,) int32: 0 source, 1 target;
  labels     the source labels, 0 on target rows (placeholders: the adaptation loss reads source rows only, so no
             target label is ever seen in training);
  grl_coeff  (B,) float32: the reversal coefficient `coefficient(step / total_steps)` on every row. The schedule
             is a function of the global step, so it travels with the batch: the jitted step stays one program and
             a resumed run continues the schedule where it was.
Text halves padded to different lengths are right-padded with 0 to the longer one (attention_mask 0 hides it).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from .losses import dann_coefficient

ROW_KEYS = ("domain", "grl_coeff")


def _pad_to(x: np.ndarray, shape: tuple) -> np.ndarray:
    return np.pad(x, [(0, want - have) for have, want in zip(x.shape, shape, strict=True)])


def concat_rows(first: Mapping, second: Mapping) -> dict:
    """Row-wise concatenation of two batches with the same keys; a shorter sequence axis is padded with zeros."""
    if set(first) != set(second):
        raise ValueError(f"source and target batches hold different keys: {sorted(first)} vs {sorted(second)}")
    out = {}
    for k in first:
        a, b = np.asarray(first[k]), np.asarray(second[k])
        if a.ndim != b.ndim or (a.ndim > 2 and a.shape[1:] != b.shape[1:]):
            raise ValueError(f"{k!r}: source rows {a.shape[1:]} and target rows {b.shape[1:]} do not stack")
        width = np.maximum(a.shape[1:], b.shape[1:])
        out[k] = np.concatenate([_pad_to(a, (len(a), *width)), _pad_to(b, (len(b), *width))])
    return out


class AdaptationData:
    """`train_data(step)` for `engine.fit`: source and target `TrainData` zipped into one batch per step.

    Args:
      source, target: `train_data(step)` callables (e.g. `TrainData`); source batches need `labels`. target None:
        source rows only (a source-only baseline whose BatchNorm statistics never see the target domain).
      total_steps: the schedule's length (progress p = step / total_steps).
      coefficient: p -> reversal coefficient (default DANN's `dann_coefficient`).
    """

    def __init__(self, source, target, total_steps: int, coefficient: Callable = dann_coefficient):
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int (the schedule's length), got {total_steps!r}")
        self.source, self.target, self.total_steps, self.coefficient = source, target, total_steps, coefficient

    @property
    def steps_per_epoch(self) -> int:
        return self.source.steps_per_epoch

    def combine(self, source: Mapping, target: Mapping | None, step: int) -> dict:
        """One adaptation batch from a source and a target batch (see the module docstring)."""
        if "labels" not in source:
            raise ValueError(f"source batches need labels, got keys {sorted(source)}")
        clash = [k for k in ROW_KEYS if k in source or k in (target or {})]
        if clash:
            raise ValueError(f"batches already hold {clash}: AdaptationData sets these keys itself")
        labels = np.asarray(source["labels"])
        batch = {k: np.asarray(v) for k, v in source.items() if k != "labels"}
        nt = 0
        if target is not None:
            target = {k: v for k, v in target.items() if k != "labels"}  # unlabelled: never reaches the loss
            batch, nt = concat_rows(batch, target), len(next(iter(target.values())))
        ns = len(labels)
        batch["labels"] = np.concatenate([labels, np.zeros(nt, labels.dtype)])
        batch["domain"] = np.r_[np.zeros(ns, np.int32), np.ones(nt, np.int32)]
        coeff = float(self.coefficient(step / self.total_steps))
        batch["grl_coeff"] = np.full(ns + nt, coeff, np.float32)
        return batch

    def __call__(self, step: int = 0) -> Iterator[dict]:
        targets = itertools.repeat(None) if self.target is None else self.target(step)
        for i, (s, t) in enumerate(zip(self.source(step), targets, strict=False)):
            yield self.combine(s, t, step + i)
