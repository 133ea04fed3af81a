"""Evaluating a classifier: loss, accuracy and top-k over batches, exact for padded final batches.

    metrics = evaluation.evaluate(loaded, eval_batches)                      # loaded's own params
    metrics = evaluation.evaluate(loaded, eval_batches, params=result.state.params, collections=...)

Batches hold the model inputs, `labels` and an optional float `mask` (0 marks padding rows, so a last partial batch
can be padded to the fixed shape jit compiled for). The engine evaluates with the same functions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from tljax import parallel, task
from tljax.losses import hard_labels, model_inputs


def make_eval_step(model, *, top_k: int = 5):
    """`eval_step(params, collections, batch) -> sums` of loss, correct, top-k correct and examples.

    Sums (not means) so batches of any size aggregate exactly; an optional `mask` in the batch drops padding rows.
    """

    def eval_step(params, collections, batch):
        out = model.apply({"params": params, **collections}, **model_inputs(batch))
        logits, labels = out["logits"].astype(jnp.float32), hard_labels(batch["labels"])
        mask = batch.get("mask", jnp.ones(labels.shape, jnp.float32)).astype(jnp.float32)
        losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
        k = min(top_k, logits.shape[-1])
        in_top = (jax.lax.top_k(logits, k)[1] == labels[:, None]).any(-1)
        return {
            "loss": (losses * mask).sum(),
            "correct": ((logits.argmax(-1) == labels) * mask).sum(),
            f"top{k}_correct": (in_top * mask).sum(),
            "count": mask.sum(),
        }

    return eval_step


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
    """Loss, accuracy and top-k accuracy of `loaded.model` over `data` (this process's rows of each batch).

    Args:
      loaded: a `Pretrained` with a classification head; its params/state are used unless given.
      params, collections: e.g. a trained `TrainState`'s `params` and `collections` (BatchNorm statistics).
      mesh: the devices batches are sharded over (default: all devices, data parallel).
      eval_step: a jitted `make_eval_step(...)` to reuse (the engine passes one, so it compiles once).
      num_classes: labels are checked against it; read from the model's logits when None.
    """
    params = loaded.params if params is None else params
    collections = dict(loaded.state if collections is None else collections)
    mesh = mesh or parallel.make_mesh()
    eval_step = eval_step or jax.jit(make_eval_step(loaded.model))
    totals: dict[str, float] = {}
    for i, local in enumerate(data):
        if num_classes is None:
            num_classes = task.num_classes(loaded.model, params, local, collections=collections)
        task.check_labels(local, num_classes, where=f"eval batch {i}")
        sums = eval_step(params, collections, parallel.global_batch(local, mesh))
        for k, v in jax.device_get(sums).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    n = totals.pop("count", 0.0)
    if n == 0:
        raise ValueError("evaluation saw no examples: the eval data is empty (or every row is masked out)")
    out = {"loss": totals.pop("loss", math.nan) / n, "accuracy": totals.pop("correct", 0.0) / n}
    out.update({k.replace("_correct", "_accuracy"): v / n for k, v in totals.items()})
    return out
