"""Orbax checkpoints of a `TrainState`: periodic/final saves, keep-N plus best-by-metric, atomic, reshardable.

Orbax writes each step into a temporary directory and renames it when complete, so a crash (kill -9, preemption)
mid-write leaves nothing that `latest_step` would pick up; `cleanup_tmp_directories` removes the debris at the next
start. Restoring takes an abstract state whose leaves carry the *current* shardings, so a checkpoint written on 8
devices restores onto 1 (or the reverse).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp


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


class Checkpoints:
    """A thin owner of one `ocp.CheckpointManager` for a work directory."""

    def __init__(self, directory: str | os.PathLike, config: CheckpointConfig = CheckpointConfig()):
        if config.best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {config.best_mode!r}")
        self.config = config
        self.directory = Path(directory).absolute()
        policies = [pp.LatestN(config.keep)]
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
        """Starts saving `state` at `step` (async unless configured otherwise); metrics feed best-by-metric."""
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

    def wait(self) -> None:
        """Blocks until background writes have finished (call before exiting)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
    """Attaches shardings to a tree of `jax.ShapeDtypeStruct`s (a restore target)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
