"""Frozen-prefix caching: train the top of a model from stored activations of its frozen bottom blocks.

When a phase freezes the stem and blocks 0..n-1 (top-k fine-tuning, a linear probe at any depth, the early stages of
gradual unfreezing), the output of block n-1 on the un-augmented training set is the same every epoch. The engine
(`EngineConfig(prefix_cache=PrefixCache())`) then computes it once, in inference mode, and trains the phase from it:

    config = EngineConfig(prefix_cache=PrefixCache())   # in memory; PrefixCache(directory=..., data_key=...) on disk
    top_1 = freezing.FreezingSchedule((freezing.Phase(500, rules="top_k", rule_args={"k": 1}, learning_rate=1e-4),))
    result = engine.fit(loaded, top_1, train_data, config)    # result.history[0].prefix_blocks: 5 (MiniLM-L6)

Per phase, the partition decides: `frozen_depth` counts the bottom blocks whose parameters (stem included) are all
frozen; a phase with fewer than `min_blocks` of them (one that thaws a cached block, full fine-tuning) runs the
full model as always. The training step then replaces block n-1's output by the cached rows (`replaced_output`, a
Flax method interceptor): the blocks below it become dead code that XLA removes, so a step costs the top's forward
and backward only. Batches are the same ones, in the same order, as without the cache (`TrainData.indices`).

Semantics: the prefix runs in inference mode (no dropout; frozen BatchNorm uses its running statistics, as the
engine's default `frozen_batchnorm="inference"` does anyway). With dropout-free prefix blocks the cached run equals
the uncached one (tests: within float tolerance); with dropout, it equals the uncached run with the prefix in
inference mode, which is what a feature-extraction probe trains on too. Needs a `TrainData` without random
augmentation (cached rows are of the un-augmented examples), one process (each host would need other rows).
Text: rows are stored up to the longest bucket; a batch padded to a shorter bucket reads its first positions
(positions past an example's length are padding, masked out of attention and pooling).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import flax.linen as nn
import jax
import numpy as np

from tljax import features, parallel, tree
from tljax.data.pipeline import EvalData, TrainData
from tljax.losses import PREFIX_KEY, model_inputs
from tljax.rules import at_backbone


@dataclass(frozen=True)
class PrefixCache:
    """How the engine caches frozen prefixes (`EngineConfig.prefix_cache`; None: never).

    Attributes:
      min_blocks: cache only when at least this many bottom blocks are frozen (the extraction pass costs about
        one epoch of forward passes of the prefix; one block rarely pays for it in a short phase).
      directory: keep the activations on disk here (`.npz` per prefix, keyed like the feature cache), so the runs
        of a sweep share them; None keeps them in memory for this `fit` call only.
      data_key: names the training data and its preprocessing (required with `directory`, as for
        `features.cached_extract`): the split, subset and seed that pick its rows too. A file is served only to
        the data that filled it (same rows, same hash of their model inputs, checked with one pass of the input
        pipeline); other data under the same key is an error, never a run on the wrong activations.
    """

    min_blocks: int = 1
    directory: str | None = None
    data_key: str | None = None

    def __post_init__(self):
        if not isinstance(self.min_blocks, int) or self.min_blocks < 1:
            raise ValueError(f"prefix_cache.min_blocks must be an int >= 1, got {self.min_blocks!r}")
        if self.directory is not None and not self.data_key:
            raise ValueError(
                "prefix_cache.directory needs a data_key naming the training data and its preprocessing "
                "(e.g. 'wordnet_lexnames:train|tok=minilm|len=48'), or no directory to cache in memory"
            )


# --- which blocks ---


def frozen_depth(loaded, trainable_mask) -> int:
    """How many bottom blocks, with the stem below them, have every parameter frozen in this partition (0: the
    stem or block 0 trains, nothing to cache)."""
    trainable = [p for p, t in tree.flatten(trainable_mask).items() if t]
    frozen = lambda regex: not any(re.match(at_backbone(loaded, regex), p) for p in trainable)
    if not frozen(loaded.family.STEM_REGEX):
        return 0
    depth = 0
    while depth < features.num_blocks(loaded) and frozen(loaded.family.block_regex(depth)):
        depth += 1
    return depth


def cached_blocks(config: PrefixCache | None, loaded, partition) -> int:
    """The blocks a phase with this partition trains above from the cache (0: it runs the full model)."""
    if config is None:
        return 0
    depth = frozen_depth(loaded, partition.trainable_mask)
    return depth if depth >= config.min_blocks else 0


def output_block(loaded, depth: int) -> str:
    """The full-model regex of the block whose output the cache holds (block depth-1)."""
    return at_backbone(loaded, loaded.family.block_regex(depth - 1))


@contextlib.contextmanager
def replaced_output(block: str | None, value) -> Iterator[None]:
    """While a model is applied (and traced) in this context, the module `block` names (a full-model block regex as
    `output_block` gives) returns `value` instead of running. None: a no-op."""
    if block is None:
        yield
        return
    if value is None:
        raise ValueError(f"the step replaces {block!r} by the cached prefix but the batch has no {PREFIX_KEY!r}")

    def intercept(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and features.is_block(context.module.path, block):
            return value
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(intercept):
        yield


# --- computing the activations ---


def check_data(train_data) -> None:
    """The training data a prefix can be cached for: a `TrainData` without random transforms, one process."""
    if not isinstance(train_data, TrainData):
        raise ValueError(
            f"prefix_cache needs the training data as a tljax.data.TrainData (to read its examples in order), "
            f"got {type(train_data).__name__}; build it with TrainData(...) or set prefix_cache=None"
        )
    if train_data.random_transform is not None or train_data.batch_transform is not None:
        raise ValueError(
            "prefix_cache caches the un-augmented examples, but this TrainData has a random_transform or "
            "batch_transform (augmentation, mixup): drop the augmentation, or set prefix_cache=None"
        )
    if train_data.process_count > 1:
        raise ValueError("prefix_cache supports single-process runs (each host would need every example's rows)")


@functools.partial(jax.jit, static_argnames=("module", "block"))
def hidden_step(variables, inputs, *, module, block: str):
    """One batch -> the output of the backbone block `block` names (a backbone regex), inference mode; the blocks
    above it are dead code."""
    capture = lambda mdl, method: method == "__call__" and features.is_block(mdl.path, block)
    _, state = module.apply(variables, **inputs, train=False, capture_intermediates=capture, mutable=["intermediates"])
    return features.captured(state["intermediates"], block)


def _in_order(train_data: TrainData) -> EvalData:
    """Every example of `train_data.split` once, in index order, as the model sees it (no augmentation)."""
    return EvalData(
        train_data.split,
        batch_size=train_data.batch_size,
        transform=train_data.transform,
        collate=train_data.collate,
        process_index=0,
        process_count=1,
    )


def _hash_rows(digest, batch: Mapping) -> None:
    """Adds the model inputs of the batch's real rows to `digest`, padding excluded (token arrays cut to their
    attention mask), so the same examples hash the same whatever the batch size or padding bucket."""
    real = np.asarray(batch["mask"]) > 0
    inputs = {k: np.asarray(v)[real] for k, v in sorted(model_inputs(batch).items())}
    attention = inputs.get("attention_mask")
    for i in range(int(real.sum())):
        for name, value in inputs.items():
            row = value[i]
            if attention is not None and row.ndim >= 1 and row.shape[:1] == attention.shape[1:2]:
                row = row[attention[i] > 0]
            row = np.ascontiguousarray(row)
            digest.update(f"{name}:{row.dtype}:{row.shape};".encode())
            digest.update(row.tobytes())


def fingerprint(train_data: TrainData) -> tuple[int, str]:
    """(rows, hash of their model inputs) of the data a prefix is cached for: one pass of the input pipeline, no
    model (what the disk cache compares before serving a file)."""
    digest, rows = hashlib.blake2b(digest_size=16), 0
    for batch in _in_order(train_data):
        _hash_rows(digest, batch)
        rows += int((np.asarray(batch["mask"]) > 0).sum())
    return rows, digest.hexdigest()


def compute(
    loaded, train_data: TrainData, depth: int, *, params=None, collections=None, mesh=None, with_fingerprint=False
):
    """The output of block depth-1 for every example of `train_data.split`, in index order: (N, ...) with the
    model's activation dtype; token rows zero-padded to the longest batch's length. `with_fingerprint`: returns
    (rows, `fingerprint(train_data)`'s hash), hashed in the same pass."""
    check_data(train_data)
    module, variables = features.backbone_of(loaded, params, collections)
    mesh = mesh or parallel.make_mesh()
    variables = jax.device_put(variables, parallel.replicated(mesh))
    block = loaded.family.block_regex(depth - 1)
    digest = hashlib.blake2b(digest_size=16)
    rows = []
    for batch in _in_order(train_data):
        if with_fingerprint:
            _hash_rows(digest, batch)
        batch = parallel.pad_to_devices(batch, mesh)
        out = hidden_step(variables, parallel.global_batch(model_inputs(batch), mesh), module=module, block=block)
        rows.append(features.local_rows(out)[np.asarray(batch["mask"]) > 0])
    if rows[0].ndim == 3:  # tokens: batches padded to different buckets
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    hidden = np.concatenate(rows)
    return (hidden, digest.hexdigest()) if with_fingerprint else hidden


def _prefix_variables(loaded, variables: Mapping, depth: int) -> dict:
    """The leaves of the backbone's variables that the cached output depends on: the stem and blocks < depth."""
    regexes = [loaded.family.STEM_REGEX] + [loaded.family.block_regex(i) for i in range(depth)]
    flat = tree.flatten(variables)
    keep = {p: v for p, v in flat.items() if any(re.match(rx, p.partition("/")[2]) for rx in regexes)}
    return tree.unflatten(keep)


class Store:
    """The activations of the current prefix: in memory (the latest one only: phases come one after another) and,
    with a directory, on disk for other runs."""

    def __init__(self, config: PrefixCache):
        self.config = config
        self.latest: tuple[str, np.ndarray] | None = None

    def get(self, loaded, train_data: TrainData, depth: int, *, params=None, collections=None) -> np.ndarray:
        module, variables = features.backbone_of(loaded, params, collections)
        checkpoint = features.checkpoint_id(module, _prefix_variables(loaded, variables, depth))
        key = f"{checkpoint}|{depth}"
        if self.latest is not None and self.latest[0] == key:
            return self.latest[1]
        path = parts = None
        if self.config.directory is not None:
            dtype = str(np.dtype(getattr(module, "dtype", np.float32)))
            parts = features.cache_parts(checkpoint, depth - 1, "prefix", self.config.data_key, dtype)
            path = features.cache_path(self.config.directory, parts)
        hidden = None
        feats, meta = features.load_cached(path) if path is not None else (None, None)
        if meta is not None and {k: meta.get(k) for k in parts} == parts and "fingerprint" in meta:  # older: none
            self._check_same_data(path, len(feats.x), meta["fingerprint"], train_data)
            hidden = feats.x
        if hidden is None:
            if path is None:
                hidden = compute(loaded, train_data, depth, params=params, collections=collections)
            else:
                hidden, digest = compute(loaded, train_data, depth, params=params, collections=collections,
                                         with_fingerprint=True)  # fmt: skip
                labels = np.full((len(hidden),), -1, np.int64)
                meta = {**parts, "fingerprint": digest}
                features.save_features(path, features.Features(hidden, labels, depth - 1, "prefix"), meta)
        self.latest = (key, hidden)
        return hidden

    def _check_same_data(self, path, cached_rows: int, cached_digest: str, train_data: TrainData) -> None:
        """The file at `path` holds the rows of `train_data`, or a ValueError saying what to change."""
        rows, digest = fingerprint(train_data)
        if rows == cached_rows and digest == cached_digest:
            return
        what = (
            f"{cached_rows} rows, but the training data has {rows}"
            if rows != cached_rows
            else "the rows of other training data with the same number of rows (its model inputs differ)"
        )
        raise ValueError(
            f"prefix_cache: the cached activations under data_key {self.config.data_key!r} in directory "
            f"{self.config.directory!r} ({os.path.basename(path)}) hold {what}. The data_key must name the data "
            f"exactly (split, subset, seed, preprocessing), e.g. {self.config.data_key + '|seed=1'!r} for a sweep "
            f"whose seed picks the rows; or use a fresh directory"
        )


# --- batches with the cached rows ---


def with_prefix(batch: Mapping, rows: np.ndarray) -> dict:
    """`batch` plus its cached rows under `PREFIX_KEY`; token rows cut to the batch's padded length."""
    tokens = next((batch[k] for k in ("input_ids", "attention_mask") if k in batch), None)
    if rows.ndim == 3 and tokens is not None and np.ndim(tokens) == 2:
        length = np.shape(tokens)[1]
        if length > rows.shape[1]:
            raise ValueError(f"a batch is padded to {length} tokens but the cached prefix has {rows.shape[1]}")
        rows = rows[:, :length]
    return {**batch, PREFIX_KEY: rows}


def batches(train_data: TrainData, hidden: np.ndarray, start: int) -> Iterator[dict]:
    """`train_data(start)`'s batches, each with the cached rows of its examples."""
    for batch, index in zip(train_data(start), train_data.indices(start), strict=False):
        yield with_prefix(batch, hidden[index])
