"""K runs of one freezing schedule as one vmapped, jitted program: K seeds (data order, dropout) or K learning rates.

    seeds = fit_seeds(loaded, sched, lambda s: TrainData(split, batch_size=16, seed=s), range(8), eval_data=val)
    seeds.params(3)                   # run 3's final parameters (a nested dict like `loaded.params`)
    seeds.phase_evals(3)              # {"probe": {...}, "finetune": {...}} with eval_data
    seeds.metrics["loss"]             # (K, steps) training loss of every run at every step

Run k is `engine.fit(loaded, schedule, train_data_for_seed(seeds[k]), EngineConfig(seed=seeds[k], devices=1,
optimizer=optimizer))` computed together with the others, equal up to floating-point reduction order (batched
matmuls and sums reassociate: a few 1e-6 after a few steps, not bitwise). What makes the runs differ is exactly what
`EngineConfig.seed` and the data's seed change there:
  - the dropout key: `jax.random.key(seed)`, folded with the step count (`step.init_state(..., seed=seed)`);
  - the batches: `train_data_for_seed(seed)` (a `TrainData(seed=seed)`: its shuffles and augmentations).
The initial parameters are `loaded.params` for every run, as in `engine.fit`: a new head is initialised when the
model is loaded, before any seed exists (`load_pretrained(..., seed=...)`), and tljax's `ClassificationHead` starts
at zero, so there is nothing seed-dependent to draw. To vary the head, load K models and run them apart.

Memory: a parameter no phase has trained yet is the same in every run, so it is kept once and enters the vmapped
step unbatched (`in_axes=None`); it becomes K copies when a phase first trains it (LP-FT: the head from step 0, the
backbone from the fine-tune on). K linear probes hold one backbone. The plan (phases, partitions) is resolved once
and shared; optimizer state and BatchNorm statistics are per run, and at a phase boundary the optimizer state carries
over per run (`partition.carry_state` under vmap: it is a pytree reshuffle).

Learning rates: `learning_rate_scales=[s_0, ...]` multiplies run k's parameter updates by s_k. For every optimizer in
`partition.OPTIMIZERS` (each ends by multiplying by the learning rate, after decoupled weight decay) this is training
with every group's learning rate and LR schedule times s_k (an `optimizer=` callable must end the same way); gradient
clipping acts before and is unchanged. Pass `seeds=[0] * K` for K learning rates on the same data.

A regulariser toward the starting model (`regularizer=`, as `EngineConfig.regularizer`) pulls every run toward the
same `loaded.params`: its anchor is kept once, like the shared parameters.

A run whose loss turns NaN or inf does not stop the others (a too-large learning rate is a sweep's normal outcome):
`diverged[k]` is the first step where run k's loss or gradient norm was not finite.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tljax import evaluation, freezing, parallel, partition, regularizers, task, tree
from tljax.losses import classification_loss
from tljax.step import TrainState, make_train_step

Batch = Mapping[str, Any]


@dataclass
class SeedsPhase:
    """One phase of the K runs: span, sizes, timings (all runs together), last metrics and evaluation per run."""

    index: int
    name: str
    start: int
    stop: int
    trainable_params: int  # per run
    per_run_params: int  # parameters held K times (trained in this phase or an earlier one); the rest are shared
    compile_seconds: float
    step_seconds: float  # wall seconds of one step of all K runs (compiles and evaluation excluded)
    metrics: list[dict]  # per run: the training metrics of the phase's last step
    eval: list[dict] = field(default_factory=list)  # per run: eval metrics at the phase's end (with eval_data)


@dataclass
class SeedsResult:
    """What `fit_seeds` returns. Run k's parameters are `trained[p][k]` for the paths some phase trained and
    `shared[p]` (one array, `loaded.params`'s own) for those none did."""

    seeds: tuple[int, ...]
    trained: dict[str, jax.Array]  # flat path -> (K, ...)
    shared: dict[str, jax.Array]  # flat path -> the untouched parameter, one copy for all runs
    collections: Any  # non-param collections (BatchNorm statistics), leaves (K, ...)
    history: list[SeedsPhase]
    metrics: dict[str, np.ndarray]  # metric -> (K, steps)
    diverged: list[int | None]  # per run: first step with a non-finite loss or gradient norm, or None
    plan: freezing.Plan
    learning_rate_scales: tuple[float, ...] | None = None

    def params(self, k: int) -> dict:
        """Run k's final parameters, a nested dict like `loaded.params` (`result.params(k)` for evaluation)."""
        return tree.unflatten({**{p: v[k] for p, v in self.trained.items()}, **self.shared})

    def phase_evals(self, k: int) -> dict[str, dict]:
        """Phase name -> run k's eval metrics at the phase's end (as `engine.FitResult.phase_evals`)."""
        return {r.name: r.eval[k] for r in self.history if r.eval}


def fit_seeds(
    loaded,
    schedule: freezing.FreezingSchedule,
    train_data_for_seed: Callable[[int], Callable[[int], Iterator[Batch]] | Iterable[Batch]],
    seeds: Sequence[int],
    *,
    optimizer: Mapping[str, Any] | None = None,
    loss_fn: Callable = classification_loss,
    steps_per_epoch: int | None = None,
    eval_data: Callable[[], Iterable[Batch]] | None = None,
    learning_rate_scales: Sequence[float] | None = None,
    accumulate: int = 1,
    frozen_batchnorm: str = "inference",
    regularizer: Mapping[str, Any] | regularizers.Regularizer | None = None,
) -> SeedsResult:
    """Trains `len(seeds)` runs of `schedule` in one vmapped program per phase, on the default device.

    Args:
      train_data_for_seed: seed -> that run's data, as `engine.fit` takes it: `data(step)` -> iterator of batches
        from `step` (a `TrainData`), or an iterable of batches. Batches of one step must have the same shapes.
      seeds: one per run (repeats allowed: with `learning_rate_scales`, runs that differ by learning rate only).
      optimizer: keyword arguments of `partition.build` (as `EngineConfig.optimizer`).
      eval_data: `eval_data()` -> eval batches; every run is evaluated on them at every phase end.
      learning_rate_scales: per run, a factor on every learning rate of the schedule (see the module docstring).
      accumulate, frozen_batchnorm, regularizer: as in `EngineConfig`.

    Returns:
      a `SeedsResult`: per-run parameters, metrics at every step, per-phase records and evaluations.
    """
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("fit_seeds needs at least one seed")
    reg = None if regularizer is None else regularizers.resolve(regularizer, loaded)
    scales = _scales(learning_rate_scales, len(seeds))
    streams = [_stream(train_data_for_seed(s)) for s in seeds]
    first = _next_batches(streams, 0)
    plan, classes = _resolve(loaded, schedule, first[0], loss_fn, steps_per_epoch, optimizer or {})
    state, shared = _initial(loaded, seeds)
    anchor = None if reg is None else regularizers.anchor_for_plan(reg, loaded, plan)  # one copy for all runs
    evaluate = _Evaluator(loaded.model, eval_data, classes) if eval_data is not None else None
    history, rows, previous = [], [], None
    for phase in plan.phases:
        state, shared = _enter(state, shared, previous, phase.partition)
        vmapped = _vmapped_step(loaded.model, phase.partition, loss_fn, accumulate, frozen_batchnorm, reg)
        step = parallel.StepByShape(vmapped.lower, batch_arg=3)
        state, record, phase_rows = _train_phase(step, phase, state, (shared, anchor), scales, streams, first, classes)
        if evaluate is not None:
            record.eval = evaluate(state.params, shared, state.collections)
        history.append(record)
        rows += phase_rows
        previous, first = phase.partition, None
    return _result(seeds, state, shared, history, rows, plan, learning_rate_scales)


def _scales(scales: Sequence[float] | None, k: int) -> jax.Array:
    """The runs' LR factors as a (K,) step input (ones by default: `u * 1.0` is exact, so unscaled runs take the
    engine's updates bit for bit, and runs with and without scales share one program)."""
    if scales is None:
        return jnp.ones((k,), jnp.float32)
    if len(scales) != k:
        raise ValueError(f"learning_rate_scales has {len(scales)} entries for {k} seeds: give one per run")
    return jnp.asarray([partition.check_number("learning_rate_scales entry", s) for s in scales], jnp.float32)


def _stream(data) -> Iterator[Batch]:
    return iter(data(0)) if callable(data) else iter(data)


def _next_batches(streams: list[Iterator[Batch]], step: int) -> list[Batch]:
    try:
        return [next(s) for s in streams]
    except StopIteration:
        raise ValueError(
            f"the train data of a seed ran out of batches at step {step}: make it yield as many batches as the "
            "schedule has steps (repeat epochs)"
        ) from None


def _stacked(batches: list[Batch], step: int, classes: int | None) -> dict:
    """K batches of one step -> one batch with a leading run axis."""
    for k, b in enumerate(batches):
        task.check_training_batch(b, classes, where=f"training batch of run {k} for step {step}")
    shapes = [{key: np.shape(v) for key, v in b.items()} for b in batches]
    odd = next((k for k, s in enumerate(shapes) if s != shapes[0]), None)
    if odd is not None:
        raise ValueError(
            f"the batches of step {step} differ in shape between runs 0 and {odd} ({shapes[0]} vs {shapes[odd]}): "
            "vmapped runs need one shape per step (pad text to a fixed length instead of length buckets)"
        )
    return {key: np.stack([np.asarray(b[key]) for b in batches]) for key in batches[0]}


def _resolve(loaded, schedule, batch, loss_fn, steps_per_epoch, optimizer) -> tuple[freezing.Plan, int | None]:
    """The plan as `engine.fit` resolves it: parameters the loss never reaches stay frozen in every phase."""
    unused = task.unused_params(loaded.model, loaded.params, batch, collections=loaded.state, loss_fn=loss_fn)
    classes = task.num_classes(loaded.model, loaded.params, batch, collections=loaded.state)
    plan = freezing.resolve(schedule, loaded, steps_per_epoch=steps_per_epoch, unused=unused, **optimizer)
    return plan, classes


def _copies(x, k: int) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(x), (k, *np.shape(x)))


def _initial(loaded, seeds: tuple[int, ...]) -> tuple[TrainState, dict]:
    """The K runs before the first phase: nothing trained yet, so every parameter is shared; per-run step counters,
    dropout keys (`init_state`'s: `jax.random.key(seed)`) and collections."""
    k = len(seeds)
    state = TrainState(
        step=jnp.zeros((k,), jnp.int32),
        params={},
        opt_state=None,
        collections=jax.tree.map(lambda x: _copies(x, k), dict(loaded.state)),
        rng=jnp.stack([jax.random.key_data(jax.random.key(s)) for s in seeds]),
    )
    return state, tree.flatten(loaded.params)


def _merged(stacked: dict, shared: dict) -> dict:
    """One run's parameter tree from its own leaves and the shared ones."""
    return tree.unflatten({**stacked, **shared})


def _enter(state: TrainState, shared: dict, previous: partition.Partition | None, part: partition.Partition):
    """The runs' state for a new phase: parameters it trains for the first time become K copies; the optimizer
    state starts fresh (first phase) or carries over per run."""
    k = state.step.shape[0]
    trains = {p for p, t in tree.flatten(part.trainable_mask).items() if t}
    thawed = {p: _copies(v, k) for p, v in shared.items() if p in trains}
    shared = {p: v for p, v in shared.items() if p not in thawed}
    params = {**state.params, **thawed}

    def opt_state(old, own, shared):
        full = _merged(own, shared)
        return part.tx.init(full) if previous is None else partition.carry_state(old, previous, part, full)

    opt = jax.jit(jax.vmap(opt_state, in_axes=(0, 0, None), axis_size=k))(state.opt_state, params, shared)
    return state.replace(params=params, opt_state=opt), shared


def _scaled(tx: optax.GradientTransformation, scale) -> optax.GradientTransformation:
    """`tx` with its updates times `scale`; the same state, so optimizer state carries over as for `tx`."""

    def update(updates, state, params=None):
        updates, state = tx.update(updates, state, params)
        return jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates), state

    return optax.GradientTransformation(tx.init, update)


def _vmapped_step(model, part: partition.Partition, loss_fn, accumulate: int, frozen_batchnorm: str, reg=None):
    """The K runs' step, jitted with their state donated: `make_train_step`'s step of one run on (its state, the
    shared parameters, the regulariser's anchor, its batch, its LR scale), vmapped with the shared parameters and
    the anchor unbatched. A run's new state holds its own parameters only: shared ones are never written, so they
    are never copied K times."""

    def run_step(state: TrainState, shared: dict, anchor, batch, scale):
        run_part = dataclasses.replace(part, tx=_scaled(part.tx, scale))
        train_step = make_train_step(
            model, run_part, loss_fn, accumulate=accumulate, frozen_batchnorm=frozen_batchnorm, regularizer=reg
        )
        new, metrics = train_step(state.replace(params=_merged(state.params, shared), anchor=anchor), batch)
        flat = tree.flatten(new.params)
        return new.replace(params={p: flat[p] for p in state.params}, anchor=None), metrics

    return jax.jit(jax.vmap(run_step, in_axes=(0, None, None, 0, 0)), donate_argnums=0)


def _train_phase(
    step: parallel.StepByShape, phase: freezing.PlannedPhase, state, fixed, scales, streams, first, classes
):
    """Steps [phase.start, phase.stop) of all runs. Metrics are fetched one step behind, as the engine does: the
    host never waits for the step it just queued, and the queue stays one step deep. `fixed`: the step's unbatched
    inputs (shared parameters, anchor).

    Returns the state, the phase's record and one metrics row ({name: (K,) array}) per step."""
    batch = _stacked(first if first is not None else _next_batches(streams, phase.start), phase.start, classes)
    step.prepare(state, *fixed, batch, scales)
    compiled = step.compile_seconds
    t0, pending, rows = time.perf_counter(), None, []
    for s in range(phase.start, phase.stop):
        if s > phase.start:
            batch = _stacked(_next_batches(streams, s), s, classes)
        state, out = step(state, *fixed, batch, scales)
        if pending is not None:
            rows.append(jax.device_get(pending))
        pending = out
    rows.append(jax.device_get(pending))
    jax.block_until_ready(state)
    seconds = (time.perf_counter() - t0 - (step.compile_seconds - compiled)) / (phase.stop - phase.start)
    last = [{k: float(v[i]) for k, v in rows[-1].items()} for i in range(state.step.shape[0])]
    record = SeedsPhase(
        phase.index,
        phase.name,
        phase.start,
        phase.stop,
        phase.partition.count("train"),
        tree.count(state.params) // state.step.shape[0],
        step.compile_seconds,
        seconds,
        last,
    )
    return state, record, rows


class _Evaluator:
    """Every run evaluated on the same eval batches in one vmapped eval step (`evaluation.make_eval_step`'s sums,
    the shared parameters unbatched), then `evaluation.report_from_sums` per run."""

    def __init__(self, model, eval_data: Callable[[], Iterable[Batch]], classes: int | None):
        def run_sums(own, shared, collections, batch):
            return evaluation.make_eval_step(model)(_merged(own, shared), collections, batch)

        self.sums = jax.jit(jax.vmap(run_sums, in_axes=(0, None, 0, None)))
        self.eval_data, self.classes = eval_data, classes

    def __call__(self, own: dict, shared: dict, collections) -> list[dict]:
        totals: dict = {}
        for i, batch in enumerate(self.eval_data()):
            task.check_labels(batch, self.classes, where=f"eval batch {i}")
            evaluation.check_rows(batch, where=f"eval batch {i}")
            evaluation.add_sums(totals, jax.device_get(self.sums(own, shared, collections, dict(batch))))
        if not totals:
            raise ValueError("evaluation saw no examples: the eval data is empty")
        runs = len(next(iter(totals.values())))
        return [evaluation.report_from_sums({k: v[i] for k, v in totals.items()}).metrics for i in range(runs)]


def _diverged(metrics: dict[str, np.ndarray]) -> list[int | None]:
    """Per run, the first step (1-based, as logs count) whose loss or gradient norm is NaN or inf."""
    bad = np.zeros_like(next(iter(metrics.values())), bool)
    for key in ("loss", "grad_norm"):
        if key in metrics:
            bad |= ~np.isfinite(metrics[key])
    return [int(np.argmax(row)) + 1 if row.any() else None for row in bad]


def _result(seeds, state: TrainState, shared, history, rows, plan, scales) -> SeedsResult:
    metrics = {k: np.stack([np.asarray(r[k]) for r in rows], axis=1) for k in rows[0]}
    return SeedsResult(
        seeds,
        state.params,
        shared,
        state.collections,
        history,
        metrics,
        _diverged(metrics),
        plan,
        None if scales is None else tuple(float(s) for s in scales),
    )
