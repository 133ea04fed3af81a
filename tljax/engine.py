"""The training engine: one code path for a laptop CPU, one GPU and a TPU pod slice.

    result = engine.fit(loaded, schedule, train_data, EngineConfig(workdir="runs/x", parallel="data"))

- Parallelism over a 1-D `Mesh` ("data", "fsdp") with explicit shardings and donated state, or `pmap`.
- Multi-host: call `initialize_distributed()` first; `train_data(step)` yields this process's rows only.
- Orbax checkpoints (periodic, final, on SIGTERM), resumed automatically from the work directory, onto any device
  count; the freezing schedule's phase and optimizer-state structure follow from the restored step.
- Metrics to `metrics.jsonl`, TensorBoard and a tqdm bar (process 0); a NaN/inf loss stops the run and leaves the
  last good checkpoint as the latest one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tljax import freezing, parallel, partition
from tljax.checkpoints import CheckpointConfig, Checkpoints, abstract_with_shardings
from tljax.metrics import MetricWriter
from tljax.parallel import FSDP_MIN_SIZE
from tljax.step import TrainState, classification_loss, make_train_step, model_inputs
from tljax.train import PhaseRecord, abstract_state, enter_phase, resume_partition, state_for_phase

log = logging.getLogger("tljax")


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN or inf; the message names the last good checkpoint."""


@dataclass(frozen=True)
class EngineConfig:
    """How to train (what to train is the model and the freezing schedule).

    Attributes:
      workdir: checkpoints/, metrics.jsonl and tensorboard/ go here; an existing run in it is resumed.
      parallel: "data" (default), "fsdp" or "pmap" (see `tljax.parallel`).
      devices: use only the first N global devices (None: all).
      fsdp_min_size: under "fsdp", arrays with fewer elements stay replicated.
      accumulate: micro-batches per step (gradient accumulation).
      optimizer: keyword arguments of `partition.build` (optimizer, weight_decay, clip_norm, b1, ...).
      log_every / eval_every: steps between metric lines / evaluations (0: eval only at the end).
      checkpoint: `CheckpointConfig` (every, keep, best_metric, ...).
      steps_per_epoch: resolves phases given in epochs.
    """

    workdir: str
    parallel: str = "data"
    devices: int | None = None
    fsdp_min_size: int = FSDP_MIN_SIZE
    accumulate: int = 1
    seed: int = 0
    optimizer: Mapping[str, Any] = field(default_factory=dict)
    log_every: int = 10
    eval_every: int = 0
    checkpoint: CheckpointConfig = CheckpointConfig()
    steps_per_epoch: int | None = None
    progress: bool = True
    tensorboard: bool = True

    @classmethod
    def from_config(cls, cfg) -> EngineConfig:
        """From an ml_collections ConfigDict / dict; unknown keys are an error."""
        cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - valid)
        if unknown:
            raise ValueError(f"unknown engine config key(s) {unknown}; valid keys: {sorted(valid)}")
        if isinstance(cfg.get("checkpoint"), Mapping):
            cfg["checkpoint"] = CheckpointConfig(**cfg["checkpoint"])
        return cls(**cfg)


@dataclass
class FitResult:
    state: TrainState  # host-addressable (unreplicated under pmap)
    history: list[PhaseRecord]
    status: str  # "completed" or "preempted"
    eval: dict


def initialize_distributed(**kwargs) -> None:
    """`jax.distributed.initialize` (automatic on TPU VMs and SLURM; pass coordinator_address, num_processes and
    process_id elsewhere). CPU runs use gloo collectives."""
    if kwargs.get("num_processes", 2) > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


class Preemption:
    """Turns SIGTERM (a TPU VM preemption notice) into a flag the loop polls; all hosts agree on it."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _Placement:
    """Where state and batches live for one parallel mode."""

    def __init__(self, mode: str, devices: int | None, fsdp_min_size: int = parallel.FSDP_MIN_SIZE):
        self.mode = parallel.check_mode(mode)
        self.fsdp_min_size = fsdp_min_size
        all_devices = jax.devices()
        if devices is not None and not 1 <= devices <= len(all_devices):
            raise ValueError(f"devices={devices} but {len(all_devices)} are available")
        self.mesh = parallel.make_mesh(all_devices[:devices] if devices else all_devices)

    def shardings(self, abstract):
        mode = "data" if self.mode == "pmap" else self.mode
        return parallel.state_shardings(abstract, self.mesh, mode, self.fsdp_min_size)

    def put_state(self, state):
        if self.mode == "pmap":
            return parallel.replicate(jax.device_get(state))
        return jax.device_put(state, self.shardings(state))

    def host_state(self, state):
        """A state orbax can save: pmap's first replica, else the sharded state itself."""
        first = lambda x: x.addressable_data(0).reshape(x.shape[1:])
        return jax.tree.map(first, state) if self.mode == "pmap" else state

    def batch(self, local: Mapping):
        return parallel.pmap_batch(local) if self.mode == "pmap" else parallel.global_batch(local, self.mesh)

    def compile(self, step_fn_factory, state, batch):
        if self.mode == "pmap":
            pmapped = jax.pmap(step_fn_factory("batch"), axis_name="batch", donate_argnums=0)
            return pmapped.lower(state, batch).compile()  # compile now, so compile time is measured per phase
        shardings = self.shardings(state)
        batch_sh = jax.tree.map(lambda _: parallel.batch_sharding(self.mesh), batch)
        jitted = jax.jit(
            step_fn_factory(None),
            in_shardings=(shardings, batch_sh),
            out_shardings=(shardings, parallel.replicated(self.mesh)),
            donate_argnums=0,
        )
        return jitted.lower(state, batch).compile()

    def examples(self, batch) -> int:
        """Global examples in a placed batch."""
        shape = next(iter(batch.values())).shape
        return shape[0] * shape[1] * jax.process_count() if self.mode == "pmap" else shape[0]

    def metrics(self, metrics):
        return jax.tree.map(lambda x: x[0], metrics) if self.mode == "pmap" else metrics


def make_eval_step(model, *, top_k: int = 5):
    """`eval_step(params, collections, batch) -> sums` of loss, correct, top-k correct and examples.

    Sums (not means) so batches of any size aggregate exactly; an optional `mask` in the batch drops padding rows.
    """

    def eval_step(params, collections, batch):
        out = model.apply({"params": params, **collections}, **model_inputs(_unmasked(batch)))
        logits, labels = out["logits"].astype(jnp.float32), batch["labels"]
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


def _unmasked(batch):
    return {k: v for k, v in batch.items() if k != "mask"}


def evaluate(eval_step, params, collections, batches: Iterable[Mapping], placement: _Placement) -> dict:
    """Runs `eval_step` over all batches and turns the sums into loss / accuracy / top-k accuracy."""
    totals: dict[str, float] = {}
    for local in batches:
        sums = eval_step(params, collections, parallel.global_batch(local, placement.mesh))
        for k, v in jax.device_get(sums).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    n = max(totals.pop("count", 0.0), 1.0)
    out = {"loss": totals.pop("loss", math.nan) / n, "accuracy": totals.pop("correct", 0.0) / n}
    out.update({k.replace("_correct", "_accuracy"): v / n for k, v in totals.items()})
    return out


def fit(
    loaded,
    schedule: freezing.FreezingSchedule,
    train_data: Callable[[int], Iterator[Mapping]],
    config: EngineConfig,
    *,
    eval_data: Callable[[], Iterable[Mapping]] | None = None,
    loss_fn: Callable = classification_loss,
) -> FitResult:
    """Trains through `schedule`, resuming from `config.workdir` if it holds checkpoints.

    Args:
      train_data: `train_data(step)` -> iterator of this process's batches starting at global `step`.
      eval_data: `eval_data()` -> iterable of this process's eval batches (labels, optional `mask`).
    """
    run = _Run(loaded, schedule, train_data, config, eval_data, loss_fn)
    try:
        return run.train()
    finally:
        run.close()


class _Run:
    """The state of one `fit` call; methods are the loop's steps."""

    def __init__(self, loaded, schedule, train_data, config: EngineConfig, eval_data, loss_fn):
        self.loaded, self.schedule, self.config = loaded, schedule, config
        self.train_data, self.eval_data, self.loss_fn = train_data, eval_data, loss_fn
        freezing.validate(schedule, loaded, config.steps_per_epoch)
        self.place = _Placement(config.parallel, config.devices, config.fsdp_min_size)
        self.spe = config.steps_per_epoch
        self.total = schedule.total_steps(self.spe)
        self.ckpts = Checkpoints(Path(config.workdir) / "checkpoints", config.checkpoint)
        self.start = self.ckpts.latest_step() or 0
        self.writer = MetricWriter(
            config.workdir,
            total_steps=self.total,
            initial_step=self.start,
            progress=config.progress,
            tensorboard=config.tensorboard,
        )
        self.eval_step = jax.jit(make_eval_step(loaded.model))
        self.history: list[PhaseRecord] = []
        self.last_eval: dict = {}
        self.saved_step = self.start if self.start else None

    def close(self):
        self.ckpts.wait()
        self.ckpts.close()
        self.writer.close()

    def train(self) -> FitResult:
        state = self._restore(self.start) if self.start else None
        index, status = self.schedule.phase_at(self.start, self.spe), "completed"
        previous = resume_partition(
            self.loaded, self.schedule, self.start, steps_per_epoch=self.spe, **self.config.optimizer
        )
        data = self.train_data(self.start)
        with Preemption() as preemption:
            while index < len(self.schedule.phases) and status == "completed":
                part = state_for_phase(
                    self.loaded, self.schedule, index, steps_per_epoch=self.spe, **self.config.optimizer
                )
                state = self._enter(state, previous, part)
                state, status = self._phase(index, part, state, data, preemption)
                previous, index = part, index + 1
        host = self.place.host_state(state)
        if self.saved_step != int(host.step):
            self._save(host)
        self.ckpts.wait()
        return FitResult(jax.device_get(host), self.history, status, self.last_eval)

    def _restore(self, step: int):
        abstract = abstract_state(self.loaded, self.schedule, step, steps_per_epoch=self.spe, **self.config.optimizer)
        target = abstract_with_shardings(abstract, self.place.shardings(abstract))
        log.info("resuming from step %d (%s)", step, self.ckpts.directory)
        return self.place.put_state(self.ckpts.restore(step, target))  # pmap: back to per-device replicas

    def _enter(self, state, previous, part):
        host = None if state is None else self.place.host_state(state)
        return self.place.put_state(enter_phase(host, previous, part, self.loaded, self.config.seed))

    def _phase(self, index, part, state, data, preemption):
        phase, begin = self.schedule.phases[index], int(self.place.host_state(state).step)
        stop = self.schedule.starts(self.spe)[index] + self.schedule.lengths(self.spe)[index]
        batch = self.place.batch(next(data))
        factory = lambda axis: make_train_step(
            self.loaded.model, part, self.loss_fn, accumulate=self.config.accumulate, axis_name=axis
        )
        t0 = time.perf_counter()
        step_fn = self.place.compile(factory, state, batch)
        compile_s = time.perf_counter() - t0
        log.info(
            "phase %d (%s): steps %d-%d, %s trainable, compiled in %.2fs",
            index,
            phase.name,
            begin,
            stop,
            f"{part.count(True):,}",
            compile_s,
        )
        t0, pending, metrics, status = time.perf_counter(), [], {}, "completed"
        for s in range(begin, stop):
            if s > begin:
                batch = self.place.batch(next(data))
            state, out = step_fn(state, batch)
            pending.append((s + 1, self.place.metrics(out)))
            if len(pending) > 1:  # check one step behind, so the host never stalls the device queue
                metrics = self._check(*pending.pop(0))
            if self._due(s + 1, stop) or preemption.agreed():
                metrics = self._flush(pending, batch)
                status = self._periodic(s + 1, state, preemption)
                if status == "preempted":
                    break
        metrics = self._flush(pending, batch) or metrics
        jax.block_until_ready(state)
        per_step = (time.perf_counter() - t0) / max(1, int(self.place.host_state(state).step) - begin)
        self.history.append(
            PhaseRecord(
                index,
                phase.name,
                begin,
                int(self.place.host_state(state).step),
                part.count(True),
                partition.state_nbytes(self.place.host_state(state).opt_state),
                compile_s,
                per_step,
                metrics,
            )
        )
        return state, status

    def _due(self, step: int, stop: int) -> bool:
        c = self.config
        every = [c.log_every, c.eval_every, c.checkpoint.every]
        return step == stop or any(e and step % e == 0 for e in every)

    def _check(self, step: int, metrics) -> dict:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        bad = {k: v for k, v in metrics.items() if k in ("loss", "grad_norm") and not math.isfinite(v)}
        if bad:
            latest = self.ckpts.latest_step()
            where = f"step {latest} in {self.ckpts.directory}" if latest is not None else "none yet"
            what = ", ".join(f"{k} is {v}" for k, v in bad.items())
            raise NonFiniteLossError(
                f"{what} at step {step}: training stopped. Last good checkpoint: {where} "
                "(a rerun resumes from it). Lower the learning rate, set optimizer clip_norm, or check the data."
            )
        return metrics

    def _flush(self, pending, batch) -> dict:
        metrics = {}
        while pending:
            step, raw = pending.pop(0)
            metrics = self._check(step, raw)
            if step % max(self.config.log_every, 1) == 0 or not pending:
                extra = self.writer.progress(step, metrics, self.place.examples(batch))
                self.writer.write(step, "train", metrics, **extra)
        return metrics

    def _periodic(self, step: int, state, preemption) -> str:
        c = self.config
        if self.eval_data is not None and (step == self.total or (c.eval_every and step % c.eval_every == 0)):
            self._evaluate(step, state)
        if preemption.agreed():
            self._save(self.place.host_state(state))
            self.ckpts.wait()
            return "preempted"
        if c.checkpoint.every and step % c.checkpoint.every == 0:
            self._save(self.place.host_state(state))
        return "completed"

    def _evaluate(self, step: int, state):
        host = self.place.host_state(state)
        if self.place.mode == "pmap":
            host = jax.device_put(jax.device_get(host), parallel.replicated(self.place.mesh))
        self.last_eval = evaluate(self.eval_step, host.params, host.collections, self.eval_data(), self.place)
        self.writer.write(step, "eval", self.last_eval)

    def _save(self, host_state):
        step = int(host_state.step)
        self.ckpts.save(step, host_state, self.last_eval if self.config.checkpoint.best_metric else None)
        self.saved_step = step
