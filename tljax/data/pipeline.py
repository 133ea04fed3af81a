"""Grain pipelines in the shape `engine.fit` takes: `train_data(step)` and `eval_data()`.

    train = TrainData(split, batch_size=32, collate=TextBatcher(tokenizer, 128), seed=0)
    result = engine.fit(loaded, schedule, train, config, eval_data=EvalData(val, batch_size=64, collate=...))

Training data is one index-based stream: epoch e is a seeded permutation of the split (a different one per epoch),
the epochs follow each other without end, and global batch s holds stream positions [s*B, (s+1)*B). Everything is
a pure function of the position, so `train_data(step)` starts anywhere without replaying an iterator (a resumed
run sees exactly the batches an uninterrupted one would), and random per-example transforms (augmentation) draw
from a generator seeded by (seed, position): reproducible, resumable and the same for any number of processes.
Process p of P takes positions p, p+P, ... of each global batch (`jax.process_index()` / `process_count()`), so
the local batches of one step are disjoint and together are the global batch.

Evaluation reads the split in order, once, padded to whole global batches; padding rows repeat the last example
with `mask` 0, so jit sees one batch shape (per text bucket) and metrics stay exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from tljax.data.records import Split
from tljax.data.splits import check_nonempty

Transform = Callable[[Mapping], Mapping]
RandomTransform = Callable[[Mapping, np.random.Generator], Mapping]


def stack(examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """The default collate: stacks every key (image batches: pixel_values, labels)."""
    return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
    return process_index, process_count


def _local_batch(batch_size: int, process_count: int) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if batch_size % process_count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by the {process_count} processes")
    return batch_size // process_count


def _read_options(threads: int, prefetch: int) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)


class TrainData:
    """`train_data(step)` for `engine.fit`: an iterator of this process's batches from global step `step` on.

    Args:
      split: the examples (a `Split`, or anything with `len` and `[i]`).
      batch_size: the global batch size (all processes together); each process yields batch_size / P rows.
      seed: the shuffle seed (epoch permutations) and the root of the per-example augmentation seeds.
      transform: record -> example, deterministic (e.g. `ImagePreprocess`).
      random_transform: (record, rng) -> example (e.g. `augment.train_transform(...)`); rng seeded per position.
      collate: examples -> batch (default `stack`; text: a `TextBatcher`).
      batch_transform: (batch, rng) -> batch after collation (mixup / cutmix); rng seeded per (seed, step).
      process_index, process_count: this process and how many (default: JAX's).
      lengths: per-example lengths (e.g. token counts) to group batches by length (`LengthGroupedOrder`);
        window: global batches per sorted window. None: plain seeded shuffles.
      threads, prefetch: grain's read threads and prefetch buffer (batches).
    """

    def __init__(
        self,
        split,
        *,
        batch_size: int,
        seed: int = 0,
        transform: Transform | None = None,
        random_transform: RandomTransform | None = None,
        collate: Callable[[Sequence[Mapping]], Mapping] | None = None,
        batch_transform: RandomTransform | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        lengths: np.ndarray | None = None,
        window: int = 50,
        threads: int = 4,
        prefetch: int = 8,
    ):
        if transform is not None and random_transform is not None:
            raise ValueError("pass transform or random_transform, not both (compose them into one)")
        if isinstance(split, Split):
            check_nonempty(split)
        self.split, self.seed, self.batch_size = split, int(seed), batch_size
        self.process_index, self.process_count = _processes(process_index, process_count)
        self.local_batch_size = _local_batch(batch_size, self.process_count)
        if len(split) < batch_size:
            raise ValueError(f"{_name(split)} has {len(split)} examples, fewer than one batch of {batch_size}")
        self.transform, self.random_transform = transform, random_transform
        self.collate, self.batch_transform = collate or stack, batch_transform
        self.threads, self.prefetch = threads, prefetch
        self.order = None
        if lengths is not None:
            self.order = LengthGroupedOrder(np.asarray(lengths), batch_size, window, self.seed)
            if len(self.order.lengths) != len(split):
                raise ValueError(f"lengths has {len(lengths)} entries for {len(split)} examples of {_name(split)}")
        self.dataset = self._dataset()

    @property
    def steps_per_epoch(self) -> int:
        """Whole global batches in one pass over the split (what phases given in epochs count)."""
        return len(self.split) // self.batch_size

    def _ordered(self, source) -> grain.MapDataset:
        """Stream position -> `source[example index]`: the epoch permutations (or length-grouped order)."""
        if self.order is None:
            return grain.MapDataset.source(source).seed(self.seed).shuffle().repeat(None)
        order = self.order
        return grain.MapDataset.range(order.positions).seed(self.seed).map(lambda pos: source[order[pos]])

    def _dataset(self) -> grain.MapDataset:
        ds = self._ordered(self.split)
        # per-example transforms before the process slice: seeds follow the global position, not the local one
        if self.random_transform is not None:
            ds = ds.random_map(self.random_transform, seed=self.seed)
        elif self.transform is not None:
            ds = ds.map(self.transform)
        ds = ds.slice(slice(self.process_index, None, self.process_count))
        ds = ds.batch(self.local_batch_size, drop_remainder=True, batch_fn=self.collate)
        if self.batch_transform is not None:
            ds = ds.random_map(self.batch_transform, seed=self.seed + 1)
        return ds

    def batch(self, step: int) -> Mapping:
        """This process's batch of global step `step` (random access; no prefetching)."""
        return self.dataset[step]

    def __call__(self, step: int = 0) -> Iterator[Mapping]:
        return self._iterate(self.dataset, step)

    def indices(self, step: int = 0) -> Iterator[np.ndarray]:
        """The example indices of this process's batches from global step `step` on, in the rows' order (what a
        cache of per-example values, e.g. `tljax.prefix_cache`, gathers by)."""
        ds = self._ordered(range(len(self.split))).slice(slice(self.process_index, None, self.process_count))
        ds = ds.batch(self.local_batch_size, drop_remainder=True, batch_fn=lambda xs: np.asarray(xs, np.int64))
        return self._iterate(ds, step)

    def _iterate(self, ds: grain.MapDataset, step: int) -> Iterator:
        if not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"train_data(step) takes a step >= 0, got {step!r}")
        tail = ds.slice(slice(int(step), None))
        return iter(tail.to_iter_dataset(_read_options(self.threads, self.prefetch)))


class LengthGroupedOrder:
    """Stream position -> example index, grouping examples of similar length into batches (HF Trainer's
    `group_by_length`, fairseq's bucketing): each epoch is a seeded permutation cut into windows of `window` global
    batches; a window is sorted by length, cut into batches, and its batches are shuffled. Batches then pad to their
    own length bucket (text: most pad to the smallest), while which examples meet in a batch stays random.

    Each epoch holds `len // batch_size` whole batches (a different remainder is left out each epoch). Positions map
    to indices by arithmetic and a per-epoch permutation, so resuming at any step needs nothing stored."""

    def __init__(self, lengths: np.ndarray, batch_size: int, window: int, seed: int):
        self.lengths, self.batch_size, self.window, self.seed = lengths, batch_size, int(window), seed
        self.per_epoch = (len(lengths) // batch_size) * batch_size
        self.positions = np.iinfo(np.int64).max // 2  # endless epochs
        self._cache: tuple[int, np.ndarray] | None = None

    def epoch(self, e: int) -> np.ndarray:
        """The example indices of epoch e, in stream order."""
        if self._cache is not None and self._cache[0] == e:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, e])
        perm = rng.permutation(len(self.lengths))[: self.per_epoch]
        step = self.window * self.batch_size
        batches = []
        for start in range(0, self.per_epoch, step):
            chunk = perm[start : start + step]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        order = np.concatenate([batches[i] for i in rng.permutation(len(batches))])
        self._cache = (e, order)
        return order

    def __getitem__(self, position: int) -> int:
        e, within = divmod(int(position), self.per_epoch)
        return int(self.epoch(e)[within])


class EvalData:
    """`eval_data()` for `engine.fit` / `evaluation.evaluate`: this process's padded batches of the whole split.

    Args: as `TrainData` (no shuffling, no random transforms); batch_size is global.
    """

    def __init__(
        self,
        split,
        *,
        batch_size: int,
        transform: Transform | None = None,
        collate: Callable[[Sequence[Mapping]], Mapping] | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        threads: int = 4,
        prefetch: int = 8,
    ):
        if isinstance(split, Split):
            check_nonempty(split)
        elif len(split) == 0:
            raise ValueError("eval split has no examples")
        self.split, self.batch_size = split, batch_size
        self.process_index, self.process_count = _processes(process_index, process_count)
        self.local_batch_size = _local_batch(batch_size, self.process_count)
        self.transform, self.collate = transform, collate or stack
        self.threads, self.prefetch = threads, prefetch
        self.num_batches = -(-len(split) // batch_size)
        self.dataset = self._dataset()

    def _dataset(self) -> grain.MapDataset:
        n, last = self.num_batches * self.batch_size, len(self.split) - 1
        ds = grain.MapDataset.range(n).map(lambda i: (self.split[min(i, last)], float(i <= last)))
        if self.transform is not None:
            transform = self.transform
            ds = ds.map(lambda pair: (transform(pair[0]), pair[1]))
        ds = ds.slice(slice(self.process_index, None, self.process_count))
        return ds.batch(self.local_batch_size, drop_remainder=True, batch_fn=self._collate)

    def _collate(self, pairs: Sequence[tuple[Mapping, float]]) -> dict:
        batch = dict(self.collate([p[0] for p in pairs]))
        batch["mask"] = np.asarray([p[1] for p in pairs], np.float32)
        return batch

    def __len__(self) -> int:
        return self.num_batches

    def __call__(self) -> Iterator[Mapping]:
        return iter(self.dataset.to_iter_dataset(_read_options(self.threads, self.prefetch)))

    def __iter__(self) -> Iterator[Mapping]:
        return self()


def _name(split) -> str:
    return getattr(split, "name", type(split).__name__)
