"""The training engine: the one loop, for a notebook, a laptop CPU, one GPU and a TPU pod slice.

    result = engine.fit(loaded, schedule, train_data, EngineConfig(workdir="runs/x", parallel="data"))

- First, parameters the task's loss never reaches are found (`task.unused_params`) and the freezing schedule is
  resolved once into a `freezing.Plan` (each phase's span and partition); the loop, checkpoints and resume read it.
- Parallelism over a 1-D `Mesh` ("data", "fsdp") with explicit shardings; the state is built inside jit with its
  output shardings (FSDP never assembles it on one device) and donated to every step. Or `pmap`.
- Multi-host: call `initialize_distributed()` first; `train_data(step)` yields this process's rows only.
- Orbax checkpoints (periodic, at evaluations for best-by-metric, final, on preemption), resumed automatically from
  the work directory onto any device count; a damaged newest checkpoint falls back to an older one.
- Metrics to `metrics.jsonl`, TensorBoard and a tqdm bar (process 0); a NaN/inf loss stops the run and leaves the
  last good checkpoint as the latest one; labels outside the model's classes stop it before the step.
- `workdir=None` trains in memory (no checkpoints, no files): notebooks and ablation loops.
- A regulariser toward the starting model (`tljax.regularizers`: L2-SP, DELTA): its anchor w0 is rebuilt from
  `loaded.params` at every start (never checkpointed) and placed like the params.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from tljax import evaluation, freezing, partition, prefix_cache, regularizers, task
from tljax.checkpoints import CheckpointConfig, Checkpoints, abstract_with_shardings
from tljax.fields import from_fields
from tljax.losses import classification_loss
from tljax.metrics import MetricWriter
from tljax.parallel import FSDP_MIN_SIZE, Placement
from tljax.prefix_cache import PrefixCache
from tljax.step import TrainState, init_state, make_train_step

log = logging.getLogger("tljax")


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN or inf; the message names the last good checkpoint."""


@dataclass(frozen=True)
class EarlyStopping:
    """Stop when the eval `metric` has not improved by more than `min_delta` for `patience` evaluations in a row.

    Watches the final phase of a schedule only (earlier phases run to their end: a plateaued linear probe must not
    cancel LP-FT's fine-tune). The best checkpoint by `metric` is kept, so a job can restore it for the test
    evaluation.
    """

    metric: str = "accuracy"
    mode: str = "max"
    patience: int = 3
    min_delta: float = 0.0

    def __post_init__(self):
        if self.mode not in ("max", "min"):
            raise ValueError(f"early_stopping mode must be 'max' or 'min', got {self.mode!r}")
        if not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"early_stopping patience must be an int >= 1, got {self.patience!r}")

    def better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best + self.min_delta if self.mode == "max" else value < best - self.min_delta


@dataclass(frozen=True)
class EngineConfig:
    """How to train (what to train is the model and the freezing schedule).

    Attributes:
      workdir: checkpoints/, metrics.jsonl and tensorboard/ go here; an existing run in it is resumed. None: train
        in memory, write nothing.
      parallel: "data" (default), "fsdp" or "pmap" (see `tljax.parallel`).
      devices: use only the first N global devices (None: all).
      fsdp_min_size: under "fsdp", arrays with fewer elements stay replicated.
      accumulate: micro-batches per step (gradient accumulation).
      optimizer: keyword arguments of `partition.build` (optimizer, weight_decay, clip_norm, b1, ...).
      log_every / eval_every: steps between metric lines / evaluations (0: eval only at the end).
      checkpoint: `CheckpointConfig` (every, keep, best_metric, ...).
      steps_per_epoch: resolves phases given in epochs.
      frozen_batchnorm: "inference" (BatchNorm layers a phase freezes use and keep their running statistics, as
        Keras does) or "train" (batch statistics, updated running statistics).
      early_stopping: an `EarlyStopping` (or None); it sets `checkpoint.best_metric` to its metric when unset.
      prefix_cache: a `PrefixCache` (or None): phases that freeze the bottom blocks train the top from their
        cached outputs (`tljax.prefix_cache`; needs a `TrainData` without augmentation).
      compiler_options: XLA options for compiling the train step (`parallel.compiler_options`): None takes
        tljax's defaults for the platform (on CPU, memory-optimised scheduling, without which XLA:CPU keeps
        activations gradient checkpointing meant to drop); {} takes XLA's own defaults.
      regularizer: a penalty toward the starting model, as a config dict (`regularizers.check_config`:
        `{"name": "l2_sp", "alpha": 0.01, "beta": 0.01}`, `{"name": "delta", "alpha": 0.01, "layers": [-1]}`) or a
        resolved `regularizers.L2SP` / `Delta`; None: no penalty. Metrics gain `reg_loss`; `loss` stays the task's.
    """

    workdir: str | None = None
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
    frozen_batchnorm: str = "inference"
    early_stopping: EarlyStopping | None = None
    prefix_cache: PrefixCache | None = None
    regularizer: Mapping[str, Any] | regularizers.Regularizer | None = None
    compiler_options: Mapping[str, Any] | None = None

    def __post_init__(self):
        for name in ("accumulate", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be an int >= 1, got {value!r}")
        self._check_regularizer()
        if self.prefix_cache is not None and self.frozen_batchnorm != "inference":
            raise ValueError(
                "prefix_cache runs the frozen prefix in inference mode, but frozen_batchnorm='train' updates its "
                "BatchNorm statistics every step: use frozen_batchnorm='inference' or prefix_cache=None"
            )
        es, ck = self.early_stopping, self.checkpoint
        if es is None:
            return
        if ck.best_metric is None:
            object.__setattr__(self, "checkpoint", replace(ck, best_metric=es.metric, best_mode=es.mode))
        elif (ck.best_metric, ck.best_mode) != (es.metric, es.mode):
            raise ValueError(
                f"early_stopping watches {es.metric!r} ({es.mode}) but checkpoint.best_metric is "
                f"{ck.best_metric!r} ({ck.best_mode}): the restored best checkpoint must be the one early stopping "
                "judged best; make them agree (or leave checkpoint.best_metric unset)"
            )

    def _check_regularizer(self):
        reg = self.regularizer
        if reg is None:
            return
        if isinstance(reg, Mapping):
            object.__setattr__(self, "regularizer", reg := regularizers.check_config(reg))
        if self.prefix_cache is not None and regularizers.needs_full_forward(reg):
            raise ValueError(
                "regularizer delta compares the outputs of blocks that a frozen-prefix cache never runs: set "
                "prefix_cache=None, or use l2_sp (which works with the cache)"
            )

    @classmethod
    def from_config(cls, cfg) -> EngineConfig:
        """From an ml_collections ConfigDict / dict; unknown keys are an error."""
        cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        if isinstance(cfg.get("checkpoint"), Mapping):
            cfg["checkpoint"] = from_fields(CheckpointConfig, cfg["checkpoint"], "checkpoint config key")
        if isinstance(cfg.get("early_stopping"), Mapping):
            cfg["early_stopping"] = from_fields(EarlyStopping, cfg["early_stopping"], "early_stopping config key")
        if isinstance(cfg.get("prefix_cache"), Mapping):
            cfg["prefix_cache"] = from_fields(PrefixCache, cfg["prefix_cache"], "prefix_cache config key")
        return from_fields(cls, cfg, "engine config key")


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
    metrics: dict  # the last training metrics of the phase
    eval: dict = field(default_factory=dict)  # the evaluation at the phase's last step (when eval_data is given)
    prefix_blocks: int = 0  # bottom blocks trained from the frozen-prefix cache (0: the full model ran)
    prefix_seconds: float = 0.0  # computing (or reading) that cache


@dataclass
class FitResult:
    """What `fit` returns. `history` covers the phases this call trained (a resumed run: from the resumed one on);
    `evals` every evaluation of the run, resumed ones included."""

    state: TrainState  # the final state on its devices (pmap: the first replica); `jax.device_get` to fetch
    history: list[PhaseRecord]
    status: str  # "completed", "early_stopped" or "preempted"
    eval: dict  # the last evaluation's metrics
    plan: freezing.Plan
    evals: list[dict] = field(default_factory=list)  # {"step", "phase", "metrics"} per evaluation, in order
    best_step: int | None = None  # the best checkpoint's step by checkpoint.best_metric (None: not tracked)

    def phase_evals(self) -> dict[str, dict]:
        """Phase name -> the eval metrics at its last step (LP-FT: the probe's accuracy beside the final one)."""
        ends = {p.stop: p.name for p in self.plan.phases}
        return {ends[e["step"]]: e["metrics"] for e in self.evals if e["step"] in ends}


def initialize_distributed(**kwargs) -> None:
    """`jax.distributed.initialize` (automatic on TPU VMs and SLURM; pass coordinator_address, num_processes and
    process_id elsewhere). CPU runs use gloo collectives."""
    if kwargs.get("num_processes", 2) > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


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


class Preemption:
    """Whether to save and stop now. One process: SIGTERM (a preemption notice) sets a flag the loop polls. Several
    processes: JAX's preemption sync point, at which all hosts agree on the same step without a collective."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._single = jax.process_count() == 1

    def __enter__(self):
        # several processes: JAX's coordination service owns SIGTERM; a Python handler would shadow it
        if self._single and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def reached(self, step: int) -> bool:
        if self._single:
            return self.requested
        from jax.experimental import multihost_utils

        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service)
            return False

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class EvalLog:
    """Every evaluation of a run (`{"step", "phase", "metrics"}`), kept in `workdir/evals.json` so a resumed run
    still knows the evaluations before its checkpoint (per-phase results, early stopping); written atomically by
    process 0. Evaluations after the step a run resumes from are dropped: the resumed run measures them again."""

    FILE = "evals.json"

    def __init__(self, workdir: str | None):
        self.path = Path(workdir) / self.FILE if workdir is not None else None
        self.rows: list[dict] = []

    def resume(self, step: int) -> None:
        if self.path is not None and self.path.is_file():
            self.rows = [r for r in json.loads(self.path.read_text()) if r["step"] <= step]

    def at(self, step: int) -> bool:
        return any(r["step"] == step for r in self.rows)

    def add(self, step: int, phase: str, metrics: dict) -> None:
        self.rows = [r for r in self.rows if r["step"] != step] + [{"step": step, "phase": phase, "metrics": metrics}]
        if self.path is not None and jax.process_index() == 0:
            write_json_atomic(self.path, self.rows)


LOCK_FILE = ".lock"


def lock_workdir(workdir: Path):
    """An exclusive `flock` on workdir/.lock for the run (process 0), or a ValueError when another process holds it:
    two trainers in one work directory (a sweep's orphaned child, a second terminal) would interleave checkpoints
    and logs. The OS releases the lock when its process ends, however it ends. Returns the open file (close it to
    release), None on other processes."""
    if jax.process_index() != 0:
        return None
    workdir.mkdir(parents=True, exist_ok=True)
    handle = open(workdir / LOCK_FILE, "a+")  # noqa: SIM115 - held for the run, closed by close()
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ValueError(
            f"{workdir} is in use by {holder}: wait for that run to end (or stop it), or use another workdir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def write_json_atomic(path: Path, obj) -> None:
    """Writes JSON beside `path` and renames it into place: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def initial_state(loaded, part: partition.Partition, placement: Placement, seed: int = 0) -> TrainState:
    """A fresh `TrainState` built where it lives: params placed shard by shard, optimizer state created inside jit
    with output shardings. The state is a copy (steps donate it), so `loaded` stays usable."""

    def make(params, collections):
        params, collections = jax.tree.map(jnp.copy, (params, collections))
        return init_state(params, part.tx, collections, seed=seed)

    if placement.mode != "pmap":
        sh = placement.shardings(jax.eval_shape(make, loaded.params, loaded.state))
        return placement.build(make, *jax.device_put((loaded.params, loaded.state), (sh.params, sh.collections)))
    return placement.build(make, loaded.params, loaded.state)


def place_anchor(anchor, placement: Placement):
    """A regulariser's anchor (`regularizers.anchor`) copied where the state lives, laid out like the params it
    mirrors (FSDP shards it alike); a copy, since steps donate the state and `loaded` stays usable."""
    copy = lambda a: jax.tree.map(jnp.copy, a)
    if placement.mode != "pmap":
        return placement.build(copy, jax.device_put(anchor, placement.shardings(anchor)))
    return placement.build(copy, anchor)


def abstract_state(loaded, plan: freezing.Plan, step: int) -> TrainState:
    """Shapes and dtypes of the `TrainState` saved after `step` steps of `plan` (a restore target)."""
    part = plan.phases[plan.producing_phase(step)].partition
    return jax.eval_shape(lambda: init_state(loaded.params, part.tx, loaded.state))


def restore_state(loaded, plan: freezing.Plan, workdir: str | os.PathLike, step: int, config=None) -> TrainState:
    """The `TrainState` saved after `step` steps of `plan` in `workdir` (e.g. a `FitResult.best_step`, or a phase's
    end), placed as `config` (default: data parallel on all devices) would train it."""
    config = config or EngineConfig()
    place = Placement(config.parallel, config.devices, config.fsdp_min_size)
    ckpts = Checkpoints(Path(workdir) / "checkpoints", config.checkpoint)
    try:
        abstract = abstract_state(loaded, plan, step)
        return ckpts.restore(step, abstract_with_shardings(abstract, place.shardings(abstract)))
    finally:
        ckpts.close()


def fit(
    loaded,
    schedule: freezing.FreezingSchedule,
    train_data: Callable[[int], Iterator[Mapping]] | Iterable[Mapping],
    config: EngineConfig = EngineConfig(),
    *,
    eval_data: Callable[[], Iterable[Mapping]] | None = None,
    loss_fn: Callable = classification_loss,
) -> FitResult:
    """Trains through `schedule`, resuming from `config.workdir` if it holds checkpoints.

    Args:
      train_data: `train_data(step)` -> iterator of this process's batches starting at global `step` (resumable);
        or an iterable of batches, for runs that start at step 0.
      eval_data: `eval_data()` -> iterable of this process's eval batches (labels, optional `mask`).
      loss_fn: `loss_fn(outputs, batch) -> (loss, metrics)`. For a model with one logits array per head, a loss
        with a `check_labels(batch, {head: classes}, where)` method (`multitask.MultiTaskLoss`) checks each
        training batch's labels on the host before the step.
    """
    run = _Run(loaded, schedule, train_data, config, eval_data, loss_fn)
    try:
        return run.train()
    finally:
        run.close()


def _iterator(train_data, start: int) -> Iterator[Mapping]:
    if callable(train_data):
        return iter(train_data(start))
    if start:
        raise ValueError(
            f"resuming at step {start} needs train_data as a function of the start step (train_data(step) -> "
            "iterator), so the run sees the batches an uninterrupted one would; an iterable cannot be rewound"
        )
    return iter(train_data)


@dataclass(frozen=True)
class _Prefix:
    """A phase trained from a frozen-prefix cache."""

    depth: int
    block: str
    batches: Iterator[Mapping]
    seconds: float


class _Run:
    """The state of one `fit` call; methods are the loop's steps."""

    def __init__(self, loaded, schedule, train_data, config: EngineConfig, eval_data, loss_fn):
        self.loaded, self.schedule, self.config = loaded, schedule, config
        self.train_data, self.eval_data, self.loss_fn = train_data, eval_data, loss_fn
        self.place = Placement(config.parallel, config.devices, config.fsdp_min_size)
        self.ckpts = self.lock = None
        if config.workdir is not None:
            self.lock = lock_workdir(Path(config.workdir))
            self.ckpts = Checkpoints(Path(config.workdir) / "checkpoints", config.checkpoint)
        self.writer = None
        self.eval_step = evaluation.jitted_eval_step(loaded.model)
        self.history: list[PhaseRecord] = []
        self.last_eval: dict = {}
        self.evals = EvalLog(config.workdir)
        self.eval_seconds = 0.0
        self.regularizer = None
        if config.regularizer is not None:  # resolved now: a regex that matches nothing fails before any compute
            self.regularizer = regularizers.resolve(config.regularizer, loaded)
        self.prefixes = None
        if config.prefix_cache is not None:
            prefix_cache.check_data(train_data)
            self.prefixes = prefix_cache.Store(config.prefix_cache)

    def close(self):
        if self.ckpts is not None:
            self.ckpts.wait()
            self.ckpts.close()
        if self.writer is not None:
            self.writer.close()
        if self.lock is not None:
            self.lock.close()  # releases the flock

    def train(self) -> FitResult:
        candidate = (self.ckpts.latest_step() or 0) if self.ckpts else 0
        data = _iterator(self.train_data, candidate)
        first = self._next(data, candidate)
        self.plan, self.classes, self.heads = self._resolve(first)
        start, state = self._restore()
        if start != candidate:  # the newest checkpoint was damaged: restart the data where the restored one was
            data = _iterator(self.train_data, start)
            first = self._next(data, start)
        self.saved_step = start or None
        self.evals.resume(start)
        if self.ckpts:
            self.ckpts.kept_steps.steps = {p.stop for p in self.plan.phases}  # phase ends: restorable for reports
        self.writer = MetricWriter(
            self.config.workdir,
            total_steps=self.plan.total_steps,
            initial_step=start,
            progress=self.config.progress,
            tensorboard=self.config.tensorboard,
        )
        index, status = self.plan.phase_at(start), "completed"
        if 0 < start < self.plan.total_steps and self._should_stop(self.plan.phases[self.plan.producing_phase(start)]):
            index, status = len(self.plan.phases), "early_stopped"  # a finished early-stopped run: nothing to do
        previous = self.plan.phases[self.plan.producing_phase(start)].partition if start else None
        with Preemption() as self.preemption:
            while index < len(self.plan.phases) and status == "completed":
                phase = self.plan.phases[index]
                state = self._anchored(self._enter(state, previous, phase.partition))
                prefix = self._prefix(phase, state)
                if prefix is None:
                    state, status = self._phase(phase, state, data, first)
                else:  # the phase reads the cached rows; the next one restarts the plain data where it ended
                    state, status = self._phase(phase, state, prefix.batches, None, prefix)
                    data = _iterator(self.train_data, phase.stop) if index + 1 < len(self.plan.phases) else data
                previous, index, first = phase.partition, index + 1, None
        host = self.place.host_state(state)
        if self.ckpts and self.saved_step != int(host.step):
            self._save(host, None)
        if self.ckpts:
            self.ckpts.wait()
        best = self.ckpts.best_step() if self.ckpts else None
        last = self.last_eval or (self.evals.rows[-1]["metrics"] if self.evals.rows else {})
        host = host.replace(anchor=None)
        return FitResult(host, self.history, status, last, self.plan, list(self.evals.rows), best)

    def _resolve(self, batch):
        """The plan, the number of classes (or of each head's classes), from the model, the loss and one batch's
        shapes; unused parameters are logged."""
        loaded, c = self.loaded, self.config
        unused = task.unused_params(loaded.model, loaded.params, batch, collections=loaded.state, loss_fn=self.loss_fn)
        classes = task.num_classes(loaded.model, loaded.params, batch, collections=loaded.state)
        heads = None if classes else task.head_classes(loaded.model, loaded.params, batch, collections=loaded.state)
        plan = freezing.resolve(self.schedule, loaded, steps_per_epoch=c.steps_per_epoch, unused=unused, **c.optimizer)
        if unused:
            log.info("%d parameter(s) are not reached by the loss and stay frozen: %s", len(unused), sorted(unused)[:8])
        log.info("plan of schedule %r:\n%s", self.schedule.name, plan.summary())
        return plan, classes, heads

    def _restore(self):
        if self.ckpts is None:
            return 0, None

        def target(step):
            abstract = abstract_state(self.loaded, self.plan, step)
            return abstract_with_shardings(abstract, self.place.shardings(abstract))

        step, state = self.ckpts.restore_newest(target)
        if step is None:
            return 0, None
        log.info("resuming from step %d (%s)", step, self.ckpts.directory)
        return step, self.place.put_state(state) if self.place.mode == "pmap" else state

    def _enter(self, state, previous, part):
        """The state a phase starts from: fresh, resumed as is, or with optimizer state carried over."""
        if state is None:
            return initial_state(self.loaded, part, self.place, self.config.seed)
        if previous is None or previous is part:  # resumed inside this phase: the state already has its layout
            return state
        carry = lambda s: s.replace(opt_state=partition.carry_state(s.opt_state, previous, part, s.params))
        if self.place.mode == "pmap":
            return self.place.put_state(carry(jax.device_get(self.place.host_state(state))))
        return self.place.build(carry, state)

    def _anchored(self, state):
        """The state with the regulariser's anchor: w0 from `loaded` (where every run, resumed ones too, starts)
        for the parameters some phase trains, placed like the params; once per `fit` call."""
        if self.regularizer is None or state.anchor is not None:
            return state
        w0 = regularizers.anchor_for_plan(self.regularizer, self.loaded, self.plan)
        return state.replace(anchor=place_anchor(w0, self.place))

    def _next(self, data, step: int) -> Mapping:
        try:
            return next(data)
        except StopIteration:
            raise ValueError(
                f"train_data ran out of batches at step {step}: make it yield as many batches as the schedule "
                "has steps (repeat epochs)"
            ) from None

    def _placed(self, batch, step: int):
        task.check_training_batch(batch, self.classes, where=f"training batch for step {step}")
        if self.heads and hasattr(self.loss_fn, "check_labels"):  # one logits array per head: the loss maps columns
            self.loss_fn.check_labels(batch, self.heads, where=f"training batch for step {step}")
        return self.place.batch(batch)

    def _prefix(self, phase: freezing.PlannedPhase, state) -> _Prefix | None:
        """The cached prefix this phase trains from, or None (no cache configured, too few frozen blocks)."""
        if self.prefixes is None:
            return None
        depth = prefix_cache.cached_blocks(self.config.prefix_cache, self.loaded, phase.partition)
        if not depth:
            log.info("phase %s: too few frozen bottom blocks to cache, runs the full model", phase.name)
            return None
        t0, host = time.perf_counter(), self.place.host_state(state)
        hidden = self.prefixes.get(
            self.loaded, self.train_data, depth, params=host.params, collections=host.collections
        )
        seconds = time.perf_counter() - t0
        log.info("phase %s: trains above %d cached frozen block(s) (%.1fs for the cache)", phase.name, depth, seconds)
        batches = prefix_cache.batches(self.train_data, hidden, int(host.step))
        return _Prefix(depth, prefix_cache.output_block(self.loaded, depth), batches, seconds)

    def _phase(self, phase: freezing.PlannedPhase, state, data, first, prefix: _Prefix | None = None):
        begin = int(self.place.host_state(state).step)
        part = phase.partition
        batch = self._placed(first if first is not None else self._next(data, begin), begin)
        factory = lambda axis: make_train_step(
            self.loaded.model,
            part,
            self.loss_fn,
            accumulate=self.config.accumulate,
            axis_name=axis,
            frozen_batchnorm=self.config.frozen_batchnorm,
            prefix_block=prefix.block if prefix else None,
            regularizer=self.regularizer,
        )
        step_fn = self.place.compile(factory, state, batch, self.config.compiler_options)
        compile_s = step_fn.compile_seconds
        log.info(
            "phase %d (%s): steps %d-%d, %s trainable, compiled in %.2fs",
            phase.index,
            phase.name,
            begin,
            phase.stop,
            f"{part.count('train'):,}",
            compile_s,
        )
        t0, pending, metrics, status = time.perf_counter(), [], {}, "completed"
        eval0 = self.eval_seconds
        for s in range(begin, phase.stop):
            if s > begin:
                batch = self._placed(self._next(data, s), s)
            state, out = step_fn(state, batch)
            pending.append((s + 1, self.place.metrics(out)))
            if len(pending) > 1:  # check one step behind, so the host never stalls the device queue
                metrics = self._check(*pending.pop(0))
            preempted = self.preemption.reached(s + 1)
            if self._due(s + 1, phase.stop) or preempted:
                metrics = self._flush(pending, batch)
                status = self._periodic(s + 1, state, preempted, phase)
                if status != "completed":
                    break
        metrics = self._flush(pending, batch) or metrics
        jax.block_until_ready(state)
        end = int(self.place.host_state(state).step)
        self.history.append(
            PhaseRecord(
                phase.index,
                phase.name,
                begin,
                end,
                part.count("train"),
                partition.state_nbytes(self.place.host_state(state).opt_state),
                step_fn.compile_seconds,
                (time.perf_counter() - t0 - (step_fn.compile_seconds - compile_s) - self.eval_seconds + eval0)
                / max(1, end - begin),  # training only: later shapes' compiles and evaluations excluded
                metrics,
                self.last_eval if end == phase.stop and self.evals.at(end) else {},
                prefix.depth if prefix else 0,
                prefix.seconds if prefix else 0.0,
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
            latest = self.ckpts.latest_step() if self.ckpts else None
            where = f"step {latest} in {self.ckpts.directory}" if latest is not None else "none"
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

    def _periodic(self, step: int, state, preempted: bool, phase: freezing.PlannedPhase) -> str:
        """Evaluation and checkpoint at `step`; eval metrics go only with the checkpoint of the step they measured.
        Every phase ends with an evaluation and a kept checkpoint (LP-FT reports the probe beside the fine-tune)."""
        c = self.config
        phase_end = step == phase.stop
        measured = None
        if self.eval_data is not None and (phase_end or (c.eval_every and step % c.eval_every == 0)):
            measured = self._evaluate(step, state, phase)
        stop = measured is not None and not phase_end and self._should_stop(phase)
        periodic = c.checkpoint.every and step % c.checkpoint.every == 0
        at_eval = measured is not None and c.checkpoint.best_metric is not None
        if self.ckpts and (periodic or at_eval or phase_end or preempted or stop):
            self._save(self.place.host_state(state), measured)
        if preempted or stop:
            if self.ckpts:
                self.ckpts.wait()
            if stop:
                log.info("early stopping at step %d: %s", step, self.config.early_stopping)
            return "preempted" if preempted else "early_stopped"
        return "completed"

    def _should_stop(self, phase: freezing.PlannedPhase) -> bool:
        """Early stopping: the last `patience` evaluations of the final phase did not beat the best before them.

        Only the final phase (the one that makes the final model) stops early: earlier phases of a schedule run to
        their end (a plateaued linear probe must not cancel LP-FT's fine-tune)."""
        es = self.config.early_stopping
        if es is None or phase.index != len(self.plan.phases) - 1:
            return False
        if self.last_eval and es.metric not in self.last_eval:
            raise ValueError(
                f"early_stopping metric {es.metric!r} is not an eval metric; eval gives {sorted(self.last_eval)}"
            )
        values = [e["metrics"][es.metric] for e in self.evals.rows if phase.start < e["step"] <= phase.stop]
        if len(values) <= es.patience:
            return False
        best = None
        for v in values[: -es.patience]:
            best = v if es.better(v, best) else best
        return not any(es.better(v, best) for v in values[-es.patience :])

    def _evaluate(self, step: int, state, phase: freezing.PlannedPhase) -> dict:
        t0 = time.perf_counter()
        params, collections = self.place.for_eval(state)
        self.last_eval = evaluation.evaluate(
            self.loaded,
            self.eval_data(),
            params=params,
            collections=collections,
            mesh=self.place.mesh,
            eval_step=self.eval_step,
            num_classes=self.classes,
        )
        self.writer.write(step, "eval", self.last_eval)
        self.evals.add(step, phase.name, self.last_eval)
        self.eval_seconds += time.perf_counter() - t0
        return self.last_eval

    def _save(self, host_state, measured: dict | None):
        step = int(host_state.step)
        best = self.config.checkpoint.best_metric
        if best and measured is not None and best not in measured:
            es = self.config.early_stopping
            key = "early_stopping metric" if es is not None and es.metric == best else "checkpoint best_metric"
            raise ValueError(f"{key} {best!r} is not an eval metric; eval gives {sorted(measured)}")
        self.ckpts.save(step, host_state.replace(anchor=None), measured if best else None)  # rebuilt on resume
        self.saved_step = step
