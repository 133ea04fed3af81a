"""What a task's loss reads from a model: parameters it never reaches, the number of classes, valid labels.

A parameter that receives no gradient from the loss must not change during fine-tuning: CLIP trained as an image
classifier never runs its text tower or `logit_scale`, BERT with mean pooling never reads its pooler, yet AdamW's
weight decay would shrink them all. `unused_params` finds such parameters once per model and task by tracing the
loss and removing (dead-code elimination) everything the loss value does not depend on; partitions then keep them
frozen and stateless (`partition.build(..., unused=...)`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import numpy as np

from tljax import tree
from tljax.losses import classification_loss, model_inputs


def _spec(x):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)


def apply_for_loss(model, params, collections: Mapping, batch: Mapping, rng, **apply_kwargs):
    """`model.apply` as the training step calls it: train mode, dropout RNG, mutable non-param collections.

    Returns (outputs, updated collections)."""
    mutable = list(collections) or False
    out = model.apply(
        {"params": params, **collections},
        **model_inputs(batch),
        train=True,
        rngs={"dropout": rng},
        mutable=mutable,
        **apply_kwargs,
    )
    return out if mutable else (out, {})


def unused_params(
    model, params, batch: Mapping, *, collections: Mapping | None = None, loss_fn: Callable = classification_loss
) -> frozenset[str]:
    """Paths of the parameters the loss value does not depend on, for this model, task and batch structure.

    Args:
      model, params, collections: as in `model.apply({"params": params, **collections}, ...)`; arrays or
        `jax.ShapeDtypeStruct`s (nothing is computed: the loss is only traced).
      batch: one batch (or its shapes) with the model inputs and `labels`.
      loss_fn: `loss_fn(outputs, batch) -> (loss, metrics)`, as given to the training step.
    """
    from jax._src.interpreters import partial_eval as pe  # DCE of a jaxpr; no public equivalent in jax 0.10

    collections = dict(collections or {})

    def loss(p, b):
        out, _ = apply_for_loss(model, p, collections, b, jax.random.key(0))
        return loss_fn(out, b)[0]

    specs = jax.tree.map(_spec, (params, dict(batch)))
    closed = jax.make_jaxpr(loss)(*specs)
    _, used_inputs = pe.dce_jaxpr(closed.jaxpr, [True])
    paths = tree.paths(params)
    return frozenset(p for p, used in zip(paths, used_inputs[: len(paths)], strict=True) if not used)


def _logits_spec(model, params, batch: Mapping, collections: Mapping | None):
    """The shape (traced, not computed) of the model's `logits` output for this batch structure, or None."""
    variables = {"params": params, **dict(collections or {})}
    specs = jax.tree.map(_spec, (variables, model_inputs(batch)))
    out = jax.eval_shape(lambda v, b: model.apply(v, **b), *specs)
    return out.get("logits") if isinstance(out, Mapping) else None


def num_classes(model, params, batch: Mapping, *, collections: Mapping | None = None) -> int | None:
    """Width of the model's `logits` for this batch structure (None when logits are not one array)."""
    logits = _logits_spec(model, params, batch, collections)
    return int(logits.shape[-1]) if isinstance(logits, jax.ShapeDtypeStruct) else None


def head_classes(model, params, batch: Mapping, *, collections: Mapping | None = None) -> dict[str, int] | None:
    """{head: width of its logits} of a model with one logits array per head (multi-task), else None."""
    logits = _logits_spec(model, params, batch, collections)
    if not isinstance(logits, Mapping):
        return None
    return {str(k): int(v.shape[-1]) for k, v in logits.items() if isinstance(v, jax.ShapeDtypeStruct)}


def check_training_batch(batch: Mapping, classes: int | None, where: str = "batch") -> None:
    """`check_labels`, and no padding rows: the training loss counts every row (it reads no `mask`), so padding
    rows would train as examples."""
    if "mask" in batch and not (np.asarray(batch["mask"]) > 0).all():
        raise ValueError(
            f"{where} has padding rows (mask 0): the training loss counts every row, so they would train as "
            "examples. Train on full batches (data.TrainData drops the remainder); padded batches (data.EvalData) "
            "are for evaluation."
        )
    check_labels(batch, classes, where)


def check_labels(batch: Mapping, classes: int | None, where: str = "batch") -> None:
    """Raises a ValueError naming the first label outside `[0, classes)` (cheap: a pass over the labels on the host).

    Integer labels (B,) must be class indices; float labels (B, classes) are probabilities (mixup / cutmix). Rows
    whose `mask` is 0 are padding: their labels are not read, so they may hold anything (e.g. -1).
    """
    if classes is None or "labels" not in batch:
        return
    labels = np.asarray(batch["labels"])
    if np.issubdtype(labels.dtype, np.floating) and labels.ndim == 2:
        if labels.shape[-1] != classes:
            raise ValueError(
                f"{where}: soft labels have {labels.shape[-1]} columns but the model has {classes} classes"
            )
        return
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{where}: labels must be integer class indices (or float (batch, {classes}) probabilities), "
            f"got dtype {labels.dtype} and shape {labels.shape}"
        )
    if labels.ndim != 1:
        raise ValueError(
            f"{where}: integer labels must be one class index per row, shape (batch,), got shape {labels.shape}"
            + (": squeeze the last axis" if labels.ndim == 2 and labels.shape[-1] == 1 else "")
        )
    rows = np.arange(len(labels))
    if "mask" in batch and np.shape(batch["mask"]) == labels.shape:
        rows = rows[np.asarray(batch["mask"]) > 0]
    bad = rows[(labels[rows] < 0) | (labels[rows] >= classes)]
    if bad.size:
        raise ValueError(
            f"{where}: label {int(labels[bad[0]])} (row {int(bad[0])}) is outside [0, {classes}): the model has "
            f"num_classes={classes}. Check the label map of the data, or load the model with the right num_classes."
        )
