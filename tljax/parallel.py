"""Device layouts: a `Mesh` with one data axis, data-parallel or FSDP shardings, process-local batches, pmap.

Modes (`EngineConfig.parallel`):
  "data"  batch sharded over the `data` axis, params and optimizer state replicated (the default);
  "fsdp"  as "data", plus every large array of params and optimizer state sharded over the `data` axis on its
          largest divisible dimension (XLA all-gathers weights per use); for models that do not fit replicated;
  "pmap"  `jax.pmap` over local devices with `lax.pmean` of gradients, for users who ask for it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger("tljax")

DATA = "data"
MODES = ("data", "fsdp", "pmap")
FSDP_MIN_SIZE = 2**12  # arrays smaller than this stay replicated: sharding them costs more than it saves


# XLA:CPU's default scheduler orders a step for concurrency, keeping activations alive far longer than needed: it
# undoes gradient checkpointing entirely. Memory-optimised scheduling costs no step time on CPU (measured on MiniLM-L6
# at 32 x 128, alternated in one process) and shrinks the step's memory: full fine-tuning 1,716 -> 1,468 MB, LoRA with
# remat="block" 1,257 -> 582 MB. GPUs and TPUs schedule for memory already.
CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def host_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def use_cpu_devices(count: int | str = "auto") -> int:
    """Splits the host CPU into `count` JAX devices ("auto": one per core this process may use), so data
    parallelism runs one batch shard per core. It pays on large steps: on 2 cores MiniLM-L6 at 32 x 128 ran 1.3x
    faster than on one device; at 32 x 32 it gains nothing, as every device repeats the whole optimizer update and
    the gradients are all-reduced (README, Benchmarks). Only the CPU backend is split; on a GPU or TPU host the
    accelerators stay the devices. Call it before JAX's first operation; returns the count. Gradients match one
    device's up to the order of the batch reduction (float rounding): a run reproduces for a given count, not bit
    for bit across counts."""
    if count == "auto":
        count = host_cores()
    try:
        count = int(count)
    except (TypeError, ValueError):
        raise ValueError(f"CPU device count: expected a positive integer or 'auto', got {count!r}") from None
    if count < 1:
        raise ValueError(f"CPU device count: expected a positive integer or 'auto', got {count}")
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        raise RuntimeError(
            f"CPU device count: JAX has already started its backends ({jax.device_count()} device(s)); call "
            "use_cpu_devices before any JAX operation (in a notebook: the first cell, right after `import jax`), or "
            f"start the process with XLA_FLAGS=--xla_force_host_platform_device_count={count}"
        ) from None
    return count


def compiler_options(options: Mapping | None = None) -> dict | None:
    """The XLA options a training step compiles with: `options` as given ({}: XLA's own defaults), or for None
    tljax's defaults for the platform (`CPU_COMPILER_OPTIONS` on CPU, none elsewhere)."""
    if options is not None:
        return dict(options) or None
    return dict(CPU_COMPILER_OPTIONS) if jax.devices()[0].platform == "cpu" else None


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown parallel mode {mode!r}; choose one of {MODES}")
    return mode


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (global) devices with the axis `data`."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), (DATA,), axis_types=(jax.sharding.AxisType.Auto,))


def fsdp_spec(shape: tuple[int, ...], n: int, min_size: int = FSDP_MIN_SIZE) -> PartitionSpec:
    """Shards the largest dimension divisible by `n` (arrays under `min_size` elements stay replicated)."""
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % n == 0:
            return PartitionSpec(*[DATA if i == d else None for i in range(len(shape))])
    return PartitionSpec()


def state_shardings(abstract_state, mesh: Mesh, mode: str, fsdp_min_size: int = FSDP_MIN_SIZE):
    """Shardings for every leaf of a (train) state: replicated, or FSDP by shape (moments follow their params)."""
    n = mesh.shape[DATA]
    spec = (lambda x: fsdp_spec(np.shape(x), n, fsdp_min_size)) if mode == "fsdp" else (lambda x: PartitionSpec())
    return jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def pad_to_devices(local: Mapping, mesh: Mesh) -> dict:
    """An inference batch of any size made shardable: rows padded (copies of the last row, `mask` 0) to a multiple
    of the data devices this process feeds. Evaluation, prediction and feature extraction drop masked rows."""
    per_process = max(1, mesh.shape[DATA] // jax.process_count())
    n = len(next(iter(local.values())))
    extra = -n % per_process
    if not extra:
        return dict(local)
    out = {k: np.concatenate([np.asarray(v), np.repeat(np.asarray(v)[-1:], extra, 0)]) for k, v in local.items()}
    mask = np.asarray(local["mask"], np.float32) if "mask" in local else np.ones(n, np.float32)
    out["mask"] = np.concatenate([mask, np.zeros(extra, np.float32)])
    return out


def global_batch(local: Mapping, mesh: Mesh) -> dict:
    """This process's rows of the batch -> global arrays sharded over `data` (each process loads its shard)."""
    sharding = batch_sharding(mesh)
    n_proc = jax.process_count()

    def to_global(x):
        x = np.asarray(x)
        if x.shape[0] * n_proc % mesh.shape[DATA]:
            raise ValueError(f"global batch {x.shape[0] * n_proc} is not divisible by {mesh.shape[DATA]} devices")
        return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * n_proc, *x.shape[1:]))

    return {k: to_global(v) for k, v in local.items()}


def pmap_batch(local: Mapping) -> dict:
    """(B, ...) -> (local devices, B / devices, ...) for `jax.pmap`."""
    n = jax.local_device_count()

    def split(x):
        x = np.asarray(x)
        if x.shape[0] % n:
            raise ValueError(f"local batch {x.shape[0]} is not divisible by {n} local devices (pmap)")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return {k: split(v) for k, v in local.items()}


def replicate(tree):
    """Copies a pytree onto every local device (leading device axis), for pmap."""
    devices = jax.local_devices()
    sharding = NamedSharding(Mesh(np.asarray(devices), ("replica",)), PartitionSpec("replica"))
    return jax.tree.map(lambda x: jax.device_put(np.stack([np.asarray(x)] * len(devices)), sharding), tree)


class Placement:
    """Where a training state and its batches live for one parallel mode, and how a step compiles for it."""

    def __init__(self, mode: str = "data", devices: int | None = None, fsdp_min_size: int = FSDP_MIN_SIZE):
        self.mode = check_mode(mode)
        if self.mode == "pmap" and jax.process_count() > 1:
            raise ValueError(
                f"parallel='pmap' runs in one process, and this is one of {jax.process_count()}: use parallel='data' "
                "(or 'fsdp'), which shard the same batch over every process's devices"
            )
        self.fsdp_min_size = fsdp_min_size
        all_devices = jax.devices()
        if devices is not None and not 1 <= devices <= len(all_devices):
            raise ValueError(f"devices={devices} but {len(all_devices)} are available")
        self.mesh = make_mesh(all_devices[:devices] if devices else all_devices)

    def shardings(self, abstract):
        """Shardings for a state tree on the mesh (pmap keeps per-device replicas and uses the data layout)."""
        return state_shardings(abstract, self.mesh, "data" if self.mode == "pmap" else self.mode, self.fsdp_min_size)

    def build(self, make, *args):
        """`make(*args)` computed where its result lives: inside jit with output shardings, so a state that does
        not fit one device (FSDP) is never assembled on one. pmap: computed once, then replicated."""
        if self.mode == "pmap":
            return replicate(jax.device_get(jax.jit(make)(*args)))
        shardings = self.shardings(jax.eval_shape(make, *args))
        return jax.jit(make, out_shardings=shardings)(*args)

    def put_state(self, state):
        """A host (or differently placed) state onto this placement."""
        if self.mode == "pmap":
            return replicate(jax.device_get(state))
        return jax.device_put(state, self.shardings(state))

    def host_state(self, state):
        """A state orbax can save: pmap's first replica, else the (sharded) state itself."""
        first = lambda x: x.addressable_data(0).reshape(x.shape[1:])
        return jax.tree.map(first, state) if self.mode == "pmap" else state

    def batch(self, local: Mapping):
        """This process's rows -> the global batch as the step takes it."""
        return pmap_batch(local) if self.mode == "pmap" else global_batch(local, self.mesh)

    def compile(self, step_fn_factory, state, batch, options: Mapping | None = None) -> StepByShape:
        """`step_fn_factory(axis_name)` compiled for this state and batch now (so compile time is measured), and
        for other batch shapes (text length buckets) when they first come; `options`: see `compiler_options`."""
        if self.mode == "pmap":
            pmapped = jax.pmap(step_fn_factory("batch"), axis_name="batch", donate_argnums=0)
            step = StepByShape(pmapped.lower, options=options)
        else:
            shardings = self.shardings(state)
            batch_sh = jax.tree.map(lambda _: batch_sharding(self.mesh), batch)
            jitted = jax.jit(
                step_fn_factory(None),
                in_shardings=(shardings, batch_sh),
                out_shardings=(shardings, replicated(self.mesh)),
                donate_argnums=0,
            )
            step = StepByShape(jitted.lower, options=options)
        step.prepare(state, batch)
        return step

    def examples(self, batch) -> int:
        """Global examples in a placed batch."""
        shape = next(iter(batch.values())).shape
        return shape[0] * shape[1] * jax.process_count() if self.mode == "pmap" else shape[0]

    def metrics(self, metrics):
        return jax.tree.map(lambda x: x[0], metrics) if self.mode == "pmap" else metrics

    def for_eval(self, state):
        """Params and collections laid out for the jitted eval step on the mesh."""
        host = self.host_state(state)
        if self.mode == "pmap":
            host = jax.device_put(jax.device_get(host), replicated(self.mesh))
        return host.params, host.collections


class StepByShape:
    """A step compiled ahead of time once per batch shape (a bounded set: text buckets, a padded last batch).

    Ahead-of-time compilation makes compile time measurable and never hides a recompile: each new shape is logged
    with its compile time. `batch_arg` is the position of the batch among the step's arguments (the others keep
    their shapes); `options`: XLA compiler options (`compiler_options`: None means tljax's platform defaults)."""

    def __init__(self, lower, batch_arg: int = 1, options: Mapping | None = None):
        self.lower, self.batch_arg = lower, batch_arg
        self.options = compiler_options(options)
        self.compiled: dict = {}
        self.compile_seconds = 0.0

    @staticmethod
    def _key(batch) -> tuple:
        return tuple((k, tuple(np.shape(v)), str(np.asarray(v).dtype if not hasattr(v, "dtype") else v.dtype))
                     for k, v in sorted(batch.items()))  # fmt: skip

    def prepare(self, *args):
        key = self._key(args[self.batch_arg])
        if key not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[key] = self.lower(*args).compile(compiler_options=self.options)
            seconds = time.perf_counter() - t0
            self.compile_seconds += seconds
            if len(self.compiled) > 1:
                log.info("compiled the step for batch shape %s in %.2fs", dict((k, s) for k, s, _ in key), seconds)
        return self.compiled[key]

    def __call__(self, *args):
        return self.prepare(*args)(*args)


def device_bytes(tree) -> dict[str, int]:
    """Bytes each device holds of a tree of (sharded) arrays: {device: bytes}."""
    out: dict[str, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            key = str(shard.device)
            out[key] = out.get(key, 0) + shard.data.nbytes
    return out
