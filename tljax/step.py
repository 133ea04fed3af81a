"""The pure training step: `train_step(state, batch) -> (state, metrics)`, built from a model and a partition.

Gradients are taken with respect to the trainable parameters only: frozen ones enter the loss as constants, so XLA
builds no backward pass for them (nor below the lowest trainable block), accumulation carries no gradient buffers
for them, and their optimizer transform is stateless `set_to_zero`. BatchNorm layers whose scale and bias are
frozen run in inference mode (Keras' rule; `frozen_batchnorm="train"` keeps batch statistics). The dropout RNG is
derived from the step count, so a resumed run draws the same masks.

A regulariser toward the starting model (`tljax.regularizers`: L2-SP, DELTA) adds its penalty to the loss inside the
differentiated function; it reads the starting values w0 from `TrainState.anchor`, an input of the jitted step like
the params (never a constant baked into the program).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tljax import prefix_cache, tree
from tljax.losses import PREFIX_KEY, classification_loss
from tljax.models import batchnorm
from tljax.partition import Partition
from tljax.task import apply_for_loss

if TYPE_CHECKING:
    from tljax.regularizers import Regularizer

FROZEN_BATCHNORM_MODES = ("inference", "train")


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a step changes: step counter, params, optimizer state, other collections (BatchNorm stats); plus
    the regulariser's anchor, which it only reads."""

    step: jax.Array
    params: Any
    opt_state: Any
    collections: Any
    rng: jax.Array  # raw uint32 key data (checkpointable); wrapped with `jax.random.wrap_key_data` when used
    anchor: Any = None  # `regularizers.anchor(...)`: the starting values w0 a regulariser pulls toward, or None

    def replace(self, **updates) -> TrainState:
        return dataclasses.replace(self, **updates)


_FIELDS = ("step", "params", "opt_state", "collections", "rng")


def _flatten_state(s: TrainState):
    """Without an anchor a state is the five-field tree it always was, so checkpoints keep their layout (the engine
    saves states without their anchor and rebuilds it from the starting weights on resume)."""
    names = _FIELDS + (("anchor",) if s.anchor is not None else ())
    return [(jax.tree_util.GetAttrKey(n), getattr(s, n)) for n in names], s.anchor is not None


jax.tree_util.register_pytree_with_keys(TrainState, _flatten_state, lambda _, children: TrainState(*children))


def init_state(
    params, tx: optax.GradientTransformation, collections: Mapping | None = None, seed: int = 0, anchor=None
) -> TrainState:
    """A fresh `TrainState` at step 0 (optimizer moments only for trainable groups).

    `anchor`: `regularizers.anchor(...)` for a step with a regulariser; its leaves must not share buffers with
    `params` (the step donates both), so pass copies."""
    return TrainState(
        jnp.zeros((), jnp.int32),
        params,
        tx.init(params),
        dict(collections or {}),
        jax.random.key_data(jax.random.key(seed)),
        anchor,
    )


def apply_updates(params, updates, trainable_mask):
    """`optax.apply_updates` for trainable leaves; frozen leaves are passed through untouched, so the jitted step
    forwards their (donated) buffers instead of computing `p + 0` over every frozen weight."""
    return jax.tree.map(lambda p, u, t: optax.apply_updates(p, u) if t else p, params, updates, trainable_mask)


def _is_none(x) -> bool:
    return x is None


def split_trainable(params, trainable_mask) -> tuple[Any, Any]:
    """(trainable, frozen): two trees shaped like `params` with None in place of the other kind's leaves."""
    pick = lambda keep: jax.tree.map(lambda p, t: p if t == keep else None, params, trainable_mask)
    return pick(True), pick(False)


def merge_trainable(trainable, frozen):
    """Inverse of `split_trainable`."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=_is_none)


def make_train_step(
    model: nn.Module,
    partition: Partition,
    loss_fn: Callable[[Mapping, Mapping], tuple[jax.Array, dict]] = classification_loss,
    *,
    accumulate: int = 1,
    axis_name: str | None = None,
    frozen_batchnorm: str = "inference",
    prefix_block: str | None = None,
    regularizer: Regularizer | None = None,
):
    """Returns the pure `train_step(state, batch) -> (state, metrics)`; jit it with `donate_argnums=0`.

    Args:
      accumulate: split each batch into this many micro-batches and average their gradients (one update).
      axis_name: under `pmap`, the device axis: gradients, metrics and BatchNorm stats are averaged over it and
        each device draws its own dropout masks.
      frozen_batchnorm: "inference" (default): BatchNorm layers whose parameters this partition freezes normalise
        with their running statistics and keep them; "train": they use batch statistics and update them.
      prefix_block: train from a frozen-prefix cache: the block this regex names (`prefix_cache.output_block`)
        returns the batch's `prefix_hidden` rows instead of running, and the blocks below it are dead code.
      regularizer: a `tljax.regularizers` penalty toward the starting model (L2-SP, DELTA), read from
        `state.anchor`; it is minimised with the task loss and reported as metric `reg_loss`, while `loss` stays the
        task loss (curves with and without a regulariser compare). None: the plain step.
    """
    if frozen_batchnorm not in FROZEN_BATCHNORM_MODES:
        raise ValueError(f"frozen_batchnorm must be one of {FROZEN_BATCHNORM_MODES}, got {frozen_batchnorm!r}")
    if regularizer is not None and prefix_block is not None and regularizer.needs_full_forward:
        raise ValueError(
            f"regularizer {type(regularizer).__name__} compares feature maps of the whole model, but a frozen-prefix "
            "cache does not run the bottom blocks: set prefix_cache=None (or use L2-SP)"
        )
    mask = partition.trainable_mask
    frozen_norms = batchnorm.frozen_modules(tree.flatten(mask)) if frozen_batchnorm == "inference" else frozenset()

    def grads_of(trainable, frozen, collections, batch, rng, anchor):
        reference = None if regularizer is None else regularizer.reference(model, frozen, anchor, batch)

        def loss(t):
            cached = batch.get(PREFIX_KEY)
            with (
                batchnorm.running_average(frozen_norms),
                prefix_cache.replaced_output(prefix_block, cached),
                contextlib.nullcontext() if regularizer is None else regularizer.capture() as seen,
            ):
                out, new_collections = apply_for_loss(model, merge_trainable(t, frozen), collections, batch, rng)
            value, metrics = loss_fn(out, batch)
            if regularizer is not None:  # inside the differentiated function: its gradient joins the task's
                penalty = regularizer.penalty(t, anchor, seen, reference, batch)
                value, metrics = value + penalty, {**metrics, "reg_loss": penalty}
            return value, (metrics, dict(new_collections) or collections)

        return jax.grad(loss, has_aux=True)(trainable)

    def train_step(state: TrainState, batch):
        if regularizer is not None and state.anchor is None:
            raise ValueError(
                "make_train_step(regularizer=...) reads the starting values from state.anchor, which is None: build "
                "the state with init_state(..., anchor=regularizers.anchor(regularizer, params, ...)) (copies)"
            )
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        trainable, frozen = split_trainable(state.params, mask)
        if accumulate == 1:
            grads, (metrics, collections) = grads_of(trainable, frozen, state.collections, batch, rng, state.anchor)
        else:
            grads, (metrics, collections) = _accumulated(grads_of, trainable, frozen, state, batch, rng, accumulate)
        if axis_name is not None:
            grads, metrics, collections = jax.lax.pmean((grads, metrics, collections), axis_name)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}  # a NaN here stops the engine too
        # frozen leaves get zero "gradients" that set_to_zero ignores: XLA removes them, nothing is allocated
        full = jax.tree.map(lambda g, p: jnp.zeros_like(p) if g is None else g, grads, state.params, is_leaf=_is_none)
        updates, opt_state = partition.tx.update(full, state.opt_state, state.params)
        params = apply_updates(state.params, updates, mask)
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


def _accumulated(grads_of, trainable, frozen, state: TrainState, batch, rng, k: int):
    """Mean gradients and metrics over `k` micro-batches (BatchNorm stats thread through them in order); the
    carried sum holds trainable gradients only."""

    def body(carry, xs):
        total, collections = carry
        micro, i = xs
        rng_i = jax.random.fold_in(rng, i)
        grads, (metrics, collections) = grads_of(trainable, frozen, collections, micro, rng_i, state.anchor)
        total = jax.tree.map(lambda a, g: a + g / k, total, grads)
        return (total, collections), metrics

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    (grads, collections), metrics = jax.lax.scan(
        body, (zeros, state.collections), (micro_batches(batch, k), jnp.arange(k))
    )
    return grads, (jax.tree.map(lambda m: m.mean(0), metrics), collections)
