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
    rng: jax.Array  # raw uint32 key data (checkpointable); wrapped with `jax.random.wrap_key_data` when used


def init_state(
    params, tx: optax.GradientTransformation, collections: Mapping | None = None, seed: int = 0
) -> TrainState:
    """A fresh `TrainState` at step 0 (optimizer moments only for trainable groups)."""
    return TrainState(
        jnp.zeros((), jnp.int32),
        params,
        tx.init(params),
        dict(collections or {}),
        jax.random.key_data(jax.random.key(seed)),
    )


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
    *,
    accumulate: int = 1,
    axis_name: str | None = None,
):
    """Returns the pure `train_step(state, batch) -> (state, metrics)`; jit it with `donate_argnums=0`.

    Args:
      accumulate: split each batch into this many micro-batches and average their gradients (one update).
      axis_name: under `pmap`, the device axis: gradients, metrics and BatchNorm stats are averaged over it and
        each device draws its own dropout masks.
    """

    def grads_of(params, collections, batch, rng):
        def loss(p):
            variables = {"params": partition.stop_gradient(p), **collections}
            mutable = list(collections) or False
            out = model.apply(variables, **model_inputs(batch), train=True, rngs={"dropout": rng}, mutable=mutable)
            out, new_collections = out if mutable else (out, {})
            value, metrics = loss_fn(out, batch)
            return value, (metrics, dict(new_collections) or collections)

        return jax.grad(loss, has_aux=True)(params)

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        if accumulate == 1:
            grads, (metrics, collections) = grads_of(state.params, state.collections, batch, rng)
        else:
            grads, (metrics, collections) = _accumulated(grads_of, state, batch, rng, accumulate)
        if axis_name is not None:
            grads, metrics, collections = jax.lax.pmean((grads, metrics, collections), axis_name)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}  # a NaN here stops the engine too
        updates, opt_state = partition.tx.update(grads, state.opt_state, state.params)
        params = apply_updates(state.params, updates, partition.trainable_mask)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, collections=collections)
        return new, metrics

    return train_step


def micro_batches(batch: Mapping, k: int) -> dict:
    """(B, ...) leaves -> (k, B/k, ...) with micro-batch j = rows j, j+k, ...: strided, so a batch sharded over
    devices stays local to each device."""

    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by accumulate={k}")
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, dict(batch))


def _accumulated(grads_of, state: TrainState, batch, rng, k: int):
    """Mean gradients and metrics over `k` micro-batches (BatchNorm stats thread through them in order)."""

    def body(carry, xs):
        total, collections = carry
        micro, i = xs
        grads, (metrics, collections) = grads_of(state.params, collections, micro, jax.random.fold_in(rng, i))
        total = jax.tree.map(lambda a, g: a + g / k, total, grads)
        return (total, collections), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, collections), metrics = jax.lax.scan(
        body, (zeros, state.collections), (micro_batches(batch, k), jnp.arange(k))
    )
    return grads, (jax.tree.map(lambda m: m.mean(0), metrics), collections)
