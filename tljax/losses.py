"""Task losses: `loss_fn(outputs, batch) -> (loss, metrics)`, the contract the training step and the engine take."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

PREFIX_KEY = "prefix_hidden"  # cached activations of frozen bottom blocks (`tljax.prefix_cache`)
NOT_INPUTS = ("labels", "mask", PREFIX_KEY)  # batch entries the model does not take


def model_inputs(batch: Mapping) -> dict:
    """The batch without targets and padding masks: what goes into `model.apply` as keyword arguments."""
    return {k: v for k, v in batch.items() if k not in NOT_INPUTS}


def cross_entropy(logits, labels, label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy; `labels` are class indices (B,) or probabilities (B, C) (mixup, cutmix).

    `label_smoothing` mixes the targets with the uniform distribution (Szegedy et al. 2016): (1 - e) y + e / C.
    """
    logits = logits.astype(jnp.float32)
    if label_smoothing:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if not jnp.issubdtype(labels.dtype, jnp.floating):
            labels = jax.nn.one_hot(labels, logits.shape[-1])
        labels = optax.smooth_labels(labels.astype(jnp.float32), label_smoothing)
    if jnp.issubdtype(labels.dtype, jnp.floating):
        return optax.softmax_cross_entropy(logits, labels.astype(jnp.float32)).mean()
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def hard_labels(labels) -> jax.Array:
    """Class indices of labels given as indices or as probabilities (their argmax)."""
    return labels.argmax(-1) if jnp.issubdtype(labels.dtype, jnp.floating) else labels


def classification_loss(outputs: Mapping, batch: Mapping, label_smoothing: float = 0.0) -> tuple[jax.Array, dict]:
    """Loss and accuracy of a `WithHead` classifier; the batch holds the model inputs plus `labels`.

    With `label_smoothing` use `functools.partial(classification_loss, label_smoothing=0.1)` as the loss_fn."""
    logits = outputs["logits"]
    loss = cross_entropy(logits, batch["labels"], label_smoothing)
    return loss, {"loss": loss, "accuracy": (logits.argmax(-1) == hard_labels(batch["labels"])).mean()}
