"""The pure training step: `train_step(state, batch) -> (state, metrics)`, built from a model and a partition.

Frozen parameters pass through `lax.stop_gradient` inside the loss, so XLA builds no backward pass for them (and
none below the lowest trainable block); their optimizer transform is stateless `set_to_zero`. The dropout RNG is
derived from the step count, so a resumed run draws the same masks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tljax.partition import Partition


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: step counter, params, optimizer state, other collections (BatchNorm stats)."""

    step: jax.Array
    params: Any
    opt_state: Any
    collections: Any
    rng: jax.Array


def init_state(
    params, tx: optax.GradientTransformation, collections: Mapping | None = None, seed: int = 0
) -> TrainState:
    """A fresh `TrainState` at step 0 (optimizer moments only for trainable groups)."""
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), dict(collections or {}), jax.random.key(seed))


def cross_entropy(logits, labels) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def classification_loss(outputs: Mapping, batch: Mapping) -> tuple[jax.Array, dict]:
    """Loss and metrics of a `WithHead` classifier; batch holds the model inputs plus `labels`."""
    logits = outputs["logits"]
    loss = cross_entropy(logits, batch["labels"])
    return loss, {"loss": loss, "accuracy": (logits.argmax(-1) == batch["labels"]).mean()}


def model_inputs(batch: Mapping) -> dict:
    """The batch without the targets."""
    return {k: v for k, v in batch.items() if k != "labels"}


def apply_updates(params, updates, trainable_mask):
    """`optax.apply_updates` for trainable leaves; frozen leaves are passed through untouched, so the jitted step
    forwards their (donated) buffers instead of computing `p + 0` over every frozen weight."""
    return jax.tree.map(lambda p, u, t: optax.apply_updates(p, u) if t else p, params, updates, trainable_mask)


def make_train_step(
    model: nn.Module,
    partition: Partition,
    loss_fn: Callable[[Mapping, Mapping], tuple[jax.Array, dict]] = classification_loss,
):
    """Returns the pure `train_step(state, batch) -> (state, metrics)`; jit it with `donate_argnums=0`."""
    tx = partition.tx

    def loss_and_updates(params, state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        variables = {"params": partition.stop_gradient(params), **state.collections}
        mutable = list(state.collections) or False
        outputs = model.apply(variables, **model_inputs(batch), train=True, rngs={"dropout": rng}, mutable=mutable)
        outputs, new_collections = outputs if mutable else (outputs, {})
        loss, metrics = loss_fn(outputs, batch)
        return loss, (metrics, dict(new_collections))

    def train_step(state: TrainState, batch):
        grads, (metrics, collections) = jax.grad(loss_and_updates, has_aux=True)(state.params, state, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = apply_updates(state.params, updates, partition.trainable_mask)
        new = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, collections=collections or state.collections
        )
        return new, metrics

    return train_step
