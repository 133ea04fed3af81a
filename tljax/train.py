"""Running a freezing schedule: one compiled step per phase, optimizer state carried across boundaries.

    state, history = run_schedule(loaded, schedule, batches)          # batches: iterator of dicts with labels

Resuming: pass the restored `state`; the run continues in the phase its step counter falls in, rebuilding that
phase's partition (ages come from the schedule), so the restored optimizer state has the right structure.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from tljax import freezing, partition
from tljax.step import TrainState, classification_loss, init_state, make_train_step

log = logging.getLogger("tljax")


def enable_compilation_cache(path: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache, so repeated ablation runs do not compile twice.

    Safe to call after other compilations: the cache is reset so the new directory takes effect.
    """
    from jax.experimental.compilation_cache import compilation_cache

    path = path or os.environ.get("TLJAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/tljax/jax"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()
    return path


@dataclass
class PhaseRecord:
    """What happened in one phase: its span, trainable size, compile and step times, last metrics."""

    index: int
    name: str
    start: int
    end: int
    trainable_params: int
    opt_state_bytes: int
    compile_seconds: float
    step_seconds: float
    metrics: dict


def state_for_phase(loaded, schedule, index, *, steps_per_epoch=None, **build_kwargs) -> partition.Partition:
    """Partition of phase `index` (shorthand for `freezing.partition_for` with the loaded params)."""
    return freezing.partition_for(
        schedule, index, loaded, loaded.params, steps_per_epoch=steps_per_epoch, **build_kwargs
    )


def producing_phase(schedule, step: int, steps_per_epoch=None) -> int:
    """The phase whose partition shaped the state saved after `step` steps: the one that ran step - 1 (at a phase
    boundary that is the phase before `phase_at(step)`)."""
    return schedule.phase_at(max(step - 1, 0), steps_per_epoch)


def abstract_state(loaded, schedule, step: int, *, steps_per_epoch=None, **build_kwargs) -> TrainState:
    """Shapes and dtypes of the `TrainState` saved after `step` steps (a restore target for checkpoints)."""
    part = state_for_phase(
        loaded,
        schedule,
        producing_phase(schedule, step, steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        **build_kwargs,
    )
    return jax.eval_shape(lambda: init_state(loaded.params, part.tx, loaded.state))


def resume_partition(loaded, schedule, step: int, *, steps_per_epoch=None, **build_kwargs):
    """For a state resumed at a phase boundary, the partition it was saved under (so entering the next phase
    carries its optimizer state over exactly as an uninterrupted run does); None when resumed mid-phase."""
    saved, index = producing_phase(schedule, step, steps_per_epoch), schedule.phase_at(step, steps_per_epoch)
    if step == 0 or saved == index or index >= len(schedule.phases):
        return None
    return state_for_phase(loaded, schedule, saved, steps_per_epoch=steps_per_epoch, **build_kwargs)


def run_schedule(
    loaded,
    schedule: freezing.FreezingSchedule,
    batches: Iterator[Mapping],
    *,
    state: TrainState | None = None,
    steps_per_epoch: int | None = None,
    until: int | None = None,
    loss_fn: Callable = classification_loss,
    on_step: Callable[[int, dict], None] | None = None,
    seed: int = 0,
    **build_kwargs,
) -> tuple[TrainState, list[PhaseRecord]]:
    """Trains `loaded` through `schedule`, from `state` (or fresh) up to `until` (or the end).

    Args:
      batches: iterator of batches (model inputs plus `labels`), positioned at the state's step.
      state: a `TrainState` to resume from (its opt_state must be that of the phase its step lies in).
      until: stop after this global step (e.g. to checkpoint); the schedule's end by default.
      build_kwargs: passed to `partition.build` for every phase (optimizer, weight_decay, clip_norm, ...).
    Returns:
      The final state and one `PhaseRecord` per phase run.
    """
    freezing.validate(schedule, loaded, steps_per_epoch)
    starts, lengths = schedule.starts(steps_per_epoch), schedule.lengths(steps_per_epoch)
    end = schedule.total_steps(steps_per_epoch) if until is None else until
    step = 0 if state is None else int(state.step)
    index, history = schedule.phase_at(step, steps_per_epoch), []
    previous = resume_partition(loaded, schedule, step, steps_per_epoch=steps_per_epoch, **build_kwargs)
    while step < end and index < len(schedule.phases):
        part = state_for_phase(loaded, schedule, index, steps_per_epoch=steps_per_epoch, **build_kwargs)
        state = enter_phase(state, previous, part, loaded, seed)
        stop = min(starts[index] + lengths[index], end)
        record, state = _run_phase(loaded, schedule, index, part, state, batches, stop, loss_fn, on_step)
        history.append(record)
        step, previous, index = stop, part, index + 1
    return state, history


def enter_phase(state, previous, part, loaded, seed: int = 0) -> TrainState:
    """The state to start a phase with: fresh, resumed as is, or carried over from the previous partition."""
    if state is None:  # the step donates its state: copy, so `loaded` stays usable (notebooks, ablation loops)
        params, collections = jax.tree.map(jnp.copy, (loaded.params, loaded.state))
        return init_state(params, part.tx, collections, seed=seed)
    if previous is None:  # resumed: the restored opt_state already belongs to this phase
        return state
    return state.replace(opt_state=partition.carry_state(state.opt_state, previous, part, state.params))


def _run_phase(loaded, schedule, index, part, state, batches, stop, loss_fn, on_step):
    phase = schedule.phases[index]
    start = int(state.step)
    batch = next(batches)
    t0 = time.perf_counter()
    step_fn = jax.jit(make_train_step(loaded.model, part, loss_fn), donate_argnums=0).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    log.info(
        "phase %d (%s): steps %d-%d, %s trainable, compiled in %.2fs",
        index,
        phase.name,
        start,
        stop,
        f"{part.count(True):,}",
        compile_s,
    )
    t0, metrics = time.perf_counter(), {}
    for s in range(start, stop):
        if s > start:
            batch = next(batches)
        state, metrics = step_fn(state, batch)
        if on_step is not None:
            on_step(s + 1, metrics)
    jax.block_until_ready(state)
    per_step = (time.perf_counter() - t0) / max(1, stop - start)
    metrics = {k: float(v) for k, v in metrics.items()}
    opt_bytes = partition.state_nbytes(state.opt_state)
    record = PhaseRecord(index, phase.name, start, stop, part.count(True), opt_bytes, compile_s, per_step, metrics)
    return record, state
