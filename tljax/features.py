"""Features from a frozen backbone: one pooled vector per example, from the final output or any block, cached on disk.

    feats = features.extract(loaded, batches, layer=-2, pooling="mean")       # Features(x (N, D), labels (N,))
    per_layer = features.extract_many(loaded, batches, [(i, "mean") for i in range(12)])  # one pass, 12 layers
    feats = features.cached_extract(
        loaded, lambda: make_batches("train"), cache_dir="cache/features",
        data_key="wordnet_lexnames:train|tok=minilm|len=64", layer=-2, pooling="mean",
    )

Probes (`tljax.probes`) then train on these arrays in seconds, so the backbone runs once per (checkpoint, layer,
pooling, data) and never again. Batches are dicts as everywhere in tljax: model inputs under HF names, `labels`
and an optional float `mask` whose zero rows are padding (dropped here).

Layers: `layer=None` is the model's final output; `layer=i` the output of block i, 0-based, negative from the top
(the family's blocks: `encoder/layer_i` for BERT/ViT, `stage_i` for ResNet, `vision/encoder/layer_i` for CLIP),
which equals HF's `hidden_states[i + 1]`. Blocks are read with Flax's `capture_intermediates`, so the model code
knows nothing about probing, and XLA drops the blocks above the one asked for.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tljax import parallel, tree
from tljax.losses import model_inputs
from tljax.models.heads import WithHead, mean_pool, pool

log = logging.getLogger("tljax")

HIDDEN_POOLINGS = ("cls", "mean", "spatial_mean")  # poolings of a hidden state; others name a model output
CACHE_VERSION = 1  # bump when the meaning of cached files changes


@dataclass(frozen=True)
class Features:
    """Pooled features of a dataset: `x` (N, D) float32, `labels` (N,) int64 (-1 where the batches had none)."""

    x: np.ndarray
    labels: np.ndarray
    layer: int | None = None  # block index (non-negative), None for the final output
    pooling: str = "cls"

    def __post_init__(self):
        x, labels = np.shape(self.x), np.shape(self.labels)
        if not x or len(labels) != 1 or x[0] != labels[0]:  # x (N, ...): the prefix cache keeps (N, T, D)
            raise ValueError(f"Features need x (N, D) and labels (N,) with the same N, got x {x} and labels {labels}")

    def __len__(self) -> int:
        return len(self.x)


# --- which module, which block, which pooling ---


def backbone_of(loaded, params=None, collections: Mapping | None = None) -> tuple:
    """(module, variables) of the backbone: a `WithHead` model's `backbone` with the `backbone` subtrees.

    Args:
      params, collections: full-model trees shaped like `loaded.params` / `loaded.state` (e.g. fine-tuned ones).
    """
    params = loaded.params if params is None else params
    collections = dict(loaded.state if collections is None else collections)
    if not isinstance(loaded.model, WithHead):
        return loaded.model, {"params": params, **collections}
    state = {k: v["backbone"] for k, v in collections.items() if "backbone" in v}
    return loaded.model.backbone, {"params": params["backbone"], **state}


def num_blocks(loaded) -> int:
    """Blocks `layer` can index: transformer layers (CLIP: the vision tower's) or ResNet stages."""
    return int(loaded.family.num_layers(loaded.hf_config))


def resolve_layer(loaded, layer: int | None) -> int | None:
    """`layer` as a non-negative block index (None stays None); out of range is an error naming the range."""
    if layer is None:
        return None
    n = num_blocks(loaded)
    if isinstance(layer, bool) or not isinstance(layer, int | np.integer) or not -n <= layer < n:
        raise ValueError(
            f"layer {layer!r} is out of range for this {loaded.hf_config.model_type} model with {n} blocks; "
            f"use 0..{n - 1}, -{n}..-1 (from the top), or None for the final output"
        )
    return int(layer) % n


def check_pooling(layer: int | None, pooling: str) -> None:
    """Fails before any compute when `pooling` needs a whole-model output (pooler, embeddings) at a block."""
    if layer is not None and pooling not in HIDDEN_POOLINGS:
        raise ValueError(
            f"pooling {pooling!r} is a whole-model output and does not apply to block {layer}; "
            f"at an intermediate layer choose one of {HIDDEN_POOLINGS}"
        )


def pool_hidden(hidden, how: str, attention_mask=None):
    """A hidden state -> (batch, features): tokens (B, T, D) by "cls" / "mean" (padding excluded), feature maps
    (B, H, W, C) by a spatial mean ("mean" or "spatial_mean"). A pooling that means nothing for the shape is an
    error rather than a silent slice (a "cls" of a feature map would be its first row)."""
    if hidden.ndim == 4 and how in ("mean", "spatial_mean"):
        return hidden.mean(axis=(1, 2))
    if hidden.ndim == 3 and how == "cls":
        return hidden[:, 0]
    if hidden.ndim == 3 and how == "mean":
        # A mask of another length is not this sequence's (CLIP's text mask beside image tokens): no padding here.
        mask = attention_mask if attention_mask is not None and attention_mask.shape[1] == hidden.shape[1] else None
        return mean_pool(hidden, mask)
    kind = {3: "token sequences (B, T, D)", 4: "feature maps (B, H, W, C)"}.get(hidden.ndim, f"{hidden.ndim}-D")
    raise ValueError(f"pooling {how!r} does not apply to {kind}; use 'cls'/'mean' for tokens, 'mean' for maps")


def is_block(module_path: tuple[str, ...], regex: str) -> bool:
    """The outermost module whose parameters `block_regex(i)` covers: the block itself, not its sublayers."""
    here, parent = "/".join(module_path) + "/", "/".join(module_path[:-1]) + "/"
    return re.match(regex, here) is not None and re.match(regex, parent) is None


def captured(intermediates: Mapping, regex: str):
    """The output of the block `regex` names among the captured ones (paths like `encoder/layer_0/__call__`)."""
    outs = [v[0] for p, v in tree.flatten(intermediates).items() if re.match(regex, p.removesuffix("__call__"))]
    if len(outs) != 1:
        raise ValueError(f"expected one captured block for {regex!r}, got {len(outs)}: did that tower run?")
    return outs[0]


# --- the jitted step ---


@functools.partial(jax.jit, static_argnames=("module", "blocks", "poolings"))
def feature_step(variables, inputs, *, module, blocks: tuple, poolings: tuple) -> tuple:
    """One batch -> a (B, D) float32 array per (block, pooling) pair, from a single inference-mode forward pass.

    Args:
      module: the backbone (linen modules hash by value, so equal models share compilations).
      blocks: per output, a `block_regex(i)` naming the block to capture, or None for the final outputs.
      poolings: per output, how to pool it.
    jit compiles once per (module, blocks, poolings, batch shape); blocks above the deepest one asked for are dead
    code that XLA removes.
    """
    wanted = [b for b in blocks if b is not None]
    capture = lambda mdl, method: method == "__call__" and any(is_block(mdl.path, b) for b in wanted)
    outputs, state = module.apply(
        variables, **inputs, train=False, capture_intermediates=capture, mutable=["intermediates"]
    )
    mask = inputs.get("attention_mask")
    out = []
    for block, how in zip(blocks, poolings, strict=True):
        if block is not None:
            x = pool_hidden(captured(state["intermediates"], block), how, mask)
        elif how in HIDDEN_POOLINGS:
            x = pool_hidden(outputs["last_hidden_state"], how, mask)
        else:
            x = pool(outputs, how)
        out.append(x.astype(jnp.float32))
    return tuple(out)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded output (all rows on a single host)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def _labels_and_keep(batch: Mapping, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = batch.get("labels")
    if labels is None:
        labels = np.full((n,), -1, np.int64)
    labels = np.asarray(labels)
    if labels.ndim == 2 and np.issubdtype(labels.dtype, np.floating):
        labels = labels.argmax(-1)  # soft labels (mixup) -> their argmax
    elif labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"batch labels must be (batch,) class indices or float (batch, classes) probabilities, got shape "
            f"{labels.shape} and dtype {labels.dtype} (multi-task labels: one task's column, labels[:, t])"
        )
    keep = np.asarray(batch["mask"]) > 0 if "mask" in batch else np.ones((n,), bool)
    return labels.astype(np.int64), keep


def extract_many(
    loaded,
    batches: Iterable[Mapping],
    specs: Sequence[tuple[int | None, str]],
    *,
    params=None,
    collections: Mapping | None = None,
    mesh: Mesh | None = None,
) -> list[Features]:
    """Features for several (layer, pooling) pairs from one pass over the data: a layer sweep costs one forward
    pass per batch, not one per layer. Arguments as in `extract`; returns one `Features` per spec, in order."""
    specs = [(resolve_layer(loaded, layer), pooling) for layer, pooling in specs]
    for index, pooling in specs:
        check_pooling(index, pooling)
    module, variables = backbone_of(loaded, params, collections)
    mesh = mesh or parallel.make_mesh()
    variables = jax.device_put(variables, parallel.replicated(mesh))
    static = dict(
        module=module,
        blocks=tuple(None if i is None else loaded.family.block_regex(i) for i, _ in specs),
        poolings=tuple(p for _, p in specs),
    )
    xs, ys = [], []
    for batch in batches:
        batch = parallel.pad_to_devices(batch, mesh)
        out = feature_step(variables, parallel.global_batch(model_inputs(batch), mesh), **static)
        labels, keep = _labels_and_keep(batch, out[0].shape[0])
        xs.append([local_rows(x)[keep] for x in out])
        ys.append(labels[keep])
    if not xs:
        raise ValueError("extract saw no batches")
    labels = np.concatenate(ys)
    return [Features(np.concatenate([x[k] for x in xs]), labels, *spec) for k, spec in enumerate(specs)]


def extract(
    loaded,
    batches: Iterable[Mapping],
    *,
    layer: int | None = None,
    pooling: str = "cls",
    params=None,
    collections: Mapping | None = None,
    mesh: Mesh | None = None,
) -> Features:
    """Pooled backbone features of every (unmasked) row of `batches`.

    Args:
      loaded: a `Pretrained`; a `WithHead` model contributes its backbone only.
      batches: dicts of model inputs (HF names), `labels` (optional) and an optional `mask` (0 = padding row).
      layer: None for the final output; i for block i's output (negative counts from the top).
      pooling: "cls", "mean" (padding excluded), "spatial_mean"; at the final layer also "pooler" or any output
        name ("image_embeds").
      params, collections: full-model trees to use instead of `loaded.params` / `loaded.state`.
      mesh: devices to shard batches over (default: all devices; batch sizes must divide evenly).
    Returns:
      `Features` with `x` (N, D) float32 and `labels` (N,) int64 (-1 without labels), in batch order.
    """
    kw = dict(params=params, collections=collections, mesh=mesh)
    return extract_many(loaded, batches, [(layer, pooling)], **kw)[0]


# --- the disk cache ---


def fingerprint(variables) -> str:
    """blake2b of every leaf's path, dtype, shape and bytes, in path order: the identity of the weights.

    Hashing values (not the checkpoint file) is the point: `params=` may be fine-tuned weights, and load options
    (reinit, position-table resampling, dtype) change values without changing any file. It costs one pass over
    the weights (about a second per GB on a CPU core), small next to running the model over a dataset.
    """
    h = hashlib.blake2b(digest_size=20)
    for path, leaf in sorted(tree.flatten(variables).items()):
        a = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{path}|{a.dtype}|{a.shape};".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def checkpoint_id(module, variables) -> str:
    """Weights plus architecture (the module's fields: activation, eps, heads, compute dtype, ...)."""
    arch = re.sub(r" at 0x[0-9a-f]+", "", repr(module))  # object addresses would change on every run
    return hashlib.blake2b(f"{arch}|{fingerprint(variables)}".encode(), digest_size=20).hexdigest()


def cache_parts(checkpoint: str, layer: int | None, pooling: str, data_key: str, dtype: str) -> dict:
    """Everything a cached file depends on; any change is a different file. Each process of a multi-host run
    extracts its own rows, so the process is part of the key too."""
    if not isinstance(data_key, str) or not data_key:
        raise ValueError(f"data_key must be a non-empty string naming the data and its preprocessing, got {data_key!r}")
    return {"version": CACHE_VERSION, "checkpoint": checkpoint, "layer": layer, "pooling": pooling,
            "data": data_key, "dtype": dtype, "process": f"{jax.process_index()}/{jax.process_count()}"}  # fmt: skip


def cache_path(cache_dir: str | os.PathLike, parts: Mapping) -> Path:
    """`<data>.<layer>.<pooling>.<hash>.npz`: readable names, the hash of all parts makes them unique."""
    digest = hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()
    slug = lambda s: re.sub(r"[^A-Za-z0-9_.=-]+", "_", s)[:80]
    layer = "final" if parts["layer"] is None else f"layer{parts['layer']}"
    return Path(cache_dir) / f"{slug(parts['data'])}.{layer}.{slug(parts['pooling'])}.{digest}.npz"


def save_features(path: str | os.PathLike, feats: Features, meta: Mapping) -> None:
    """Writes atomically (temp file in the same folder, then `os.replace`): readers never see half a file, and an
    interrupted run leaves no file that a later run would trust."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, x=feats.x, labels=feats.labels, meta=np.asarray(json.dumps(dict(meta), sort_keys=True)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_features(path: str | os.PathLike) -> tuple[Features, dict]:
    """(features, meta) of a file written by `save_features`."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        return Features(z["x"], z["labels"], meta.get("layer"), meta.get("pooling", "cls")), meta


def load_cached(path: str | os.PathLike) -> tuple[Features | None, dict | None]:
    """`load_features` of a cache file, or (None, None) when there is none or it is damaged (a truncated copy, a
    full disk outside tljax's atomic writes): a warning names it, and the caller computes and overwrites it."""
    if not os.path.exists(path):
        return None, None
    try:
        return load_features(path)
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        log.warning("feature cache file %s is damaged (%s: %s): computing it again", path, type(e).__name__, e)
        return None, None


def cached_extract(
    loaded,
    batches_fn: Callable[[], Iterable[Mapping]],
    *,
    cache_dir: str | os.PathLike,
    data_key: str,
    layer: int | None = None,
    pooling: str = "cls",
    params=None,
    collections: Mapping | None = None,
    checkpoint: str | None = None,
    mesh: Mesh | None = None,
) -> Features:
    """`extract` through a disk cache: the first call runs the model and writes the file, later calls read it.

    Args:
      batches_fn: returns the batches; only called on a cache miss, so a hit loads no data.
      data_key: names the data and its preprocessing, e.g. "wordnet_lexnames:train|tok=minilm|len=64"; the
        cache cannot see inside `batches_fn`, so anything that changes the batches must change this string.
      checkpoint: a known identity of the weights to skip hashing them (default: `checkpoint_id`).
      Others as in `extract`.
    Returns:
      The same `Features` `extract` returns.
    """
    index = resolve_layer(loaded, layer)
    check_pooling(index, pooling)
    module, variables = backbone_of(loaded, params, collections)
    checkpoint = checkpoint or checkpoint_id(module, variables)
    dtype = str(jnp.dtype(getattr(module, "dtype", jnp.float32)))
    parts = cache_parts(checkpoint, index, pooling, data_key, dtype)
    path = cache_path(cache_dir, parts)
    feats, meta = load_cached(path)
    if meta == parts:
        return feats
    feats = extract(
        loaded, batches_fn(), layer=index, pooling=pooling, params=params, collections=collections, mesh=mesh
    )
    save_features(path, feats, parts)
    return feats
