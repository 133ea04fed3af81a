"""Orbax checkpoints of a `TrainState`: periodic/final saves, keep-N plus best-by-metric, atomic, reshardable.

Orbax writes each step into a temporary directory and renames it when complete, so a crash (kill -9, preemption)
mid-write leaves nothing that `latest_step` would pick up; `cleanup_tmp_directories` removes the debris at the next
start. Restoring takes an abstract state whose leaves carry the *current* shardings, so a checkpoint written on 8
devices restores onto 1 (or the reverse). A complete checkpoint that was damaged later (a disk error, a truncated
copy) is skipped by `restore_newest`, which falls back to the newest one that restores and moves the bad one to
`<directory>.corrupt/` with a warning (never deleted).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

log = logging.getLogger("tljax")


@dataclass(frozen=True)
class CheckpointConfig:
    """When and what to keep.

    Attributes:
      every: save every this many steps (0: only at the end and on preemption).
      keep: number of most recent checkpoints kept.
      best_metric: also keep the `keep_best` checkpoints with the best value of this eval metric (e.g. "accuracy").
      best_mode: "max" or "min" for `best_metric`.
      async_save: write in a background thread while training continues.
    """

    every: int = 0
    keep: int = 2
    best_metric: str | None = None
    best_mode: str = "max"
    keep_best: int = 1
    async_save: bool = True

    def __post_init__(self):
        if self.best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {self.best_mode!r}")
        if not (isinstance(self.every, int) and self.every >= 0):
            raise ValueError(f"checkpoint every must be an int >= 0 (0: only at the end), got {self.every!r}")
        if not (isinstance(self.keep, int) and self.keep >= 1) or not (
            isinstance(self.keep_best, int) and self.keep_best >= 1
        ):
            raise ValueError(f"checkpoint keep and keep_best must be ints >= 1, got {self.keep!r}, {self.keep_best!r}")


class KeepSteps:
    """An orbax preservation policy keeping the checkpoints of given steps (phase ends), set once the plan is known."""

    def __init__(self):
        self.steps: set[int] = set()

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        return [c.step in self.steps for c in checkpoints]


class Checkpoints:
    """A thin owner of one `ocp.CheckpointManager` for a work directory."""

    def __init__(self, directory: str | os.PathLike, config: CheckpointConfig = CheckpointConfig()):
        self.config = config
        self.directory = Path(directory).absolute()
        self.kept_steps = KeepSteps()
        policies = [pp.LatestN(config.keep), self.kept_steps]
        if config.best_metric:
            metric = config.best_metric
            policies.append(
                pp.BestN(
                    get_metric_fn=lambda m: m[metric],
                    reverse=config.best_mode == "min",
                    n=config.keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            # best_fn makes orbax write each checkpoint's metrics to disk, so a resumed run still knows the best
            best_fn=(lambda m: m[config.best_metric]) if config.best_metric else None,
            best_mode=config.best_mode,
            enable_async_checkpointing=config.async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state",))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def best_step(self) -> int | None:
        return self.manager.best_step() if self.config.best_metric else None

    def save(self, step: int, state, metrics: dict | None = None) -> bool:
        """Starts saving `state` at `step` (async unless configured otherwise).

        `metrics` must be the evaluation measured at this very step (they decide best-by-metric); None otherwise.
        """
        metrics = {k: float(v) for k, v in (metrics or {}).items()} or None
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), metrics=metrics, force=True
        )

    def restore(self, step: int | None, abstract_state):
        """The state at `step` (latest when None), laid out as `abstract_state`'s shardings say."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]

    def restore_newest(self, abstract_state: Callable[[int], object]):
        """(step, state) of the newest checkpoint that restores, or (None, None) when there is none.

        Args:
          abstract_state: `abstract_state(step)` -> restore target with shardings (the layout depends on the step).

        A checkpoint that fails while an older one restores is damaged: it is moved to `<directory>.corrupt/` and
        named in a warning. When none restores, the newest one's error is raised and nothing is moved (a changed
        model or schedule fails on every checkpoint alike; that is a configuration error, not damage).
        """
        failures = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state = self.restore(step, abstract_state(step))
            except Exception as e:  # orbax surfaces damage as JSONDecodeError, ValueError, OSError, ...
                failures.append((step, e))
                continue
            for bad, error in failures:
                self._quarantine(bad, error)
            return step, state
        if failures:
            step, error = failures[0]
            raise RuntimeError(
                f"no checkpoint in {self.directory} restores; the newest (step {step}) fails: "
                f"{type(error).__name__}: {str(error)[:600]}\nWhen every checkpoint fails alike, the work directory "
                "holds a run of another model, number of classes, PEFT setup or freezing schedule than this one: "
                "use a new workdir, or the model and schedule it was trained with (orbax's advice above does not "
                "apply to tljax's runs)"
            ) from error
        return None, None

    def _quarantine(self, step: int, error: Exception) -> None:
        target = self.directory.with_name(self.directory.name + ".corrupt") / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target))
        log.warning(
            "checkpoint step %d in %s does not restore (%s: %s); moved it to %s and resumed from an older one",
            step,
            self.directory,
            type(error).__name__,
            str(error)[:300],
            target,
        )
        self.manager.reload()

    def wait(self) -> None:
        """Blocks until background writes have finished (call before exiting)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
    """Attaches shardings to a tree of `jax.ShapeDtypeStruct`s (a restore target)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
