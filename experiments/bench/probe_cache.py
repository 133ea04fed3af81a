"""`probe_cache`: a linear probe trained on cached features against the same probe recomputing the frozen backbone
every epoch. Real MiniLM-L6 on 1,024 `wordnet_lexnames` definitions (batch 32, max length 64 with buckets), mean
pooling, a 26-way linear head, Adam at 1e-2 for 10 epochs both ways:

- recomputed: `engine.fit` with the `linear_probe` schedule (the head trains, the backbone's forward runs every
  step: what a freezing schedule does without a cache);
- cached: `features.cached_extract` once (one forward pass over the data, written to disk), then the same 10 epochs
  of Adam on the head over the cached arrays (the same batches in the same order).

Prints both times, `cached_probe_speedup` (goal >= 8) and both probes' validation accuracy. They train the same
head on the same batches; the engine runs the frozen backbone in train mode (dropout active, as every training
step does), the cache holds inference-mode features, so the accuracies differ slightly. `--quick`: a tiny random
BERT, 256 examples.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import tljax.models as tm
from experiments.bench.common import emit, scratch_dir, tiny_bert_dir
from tljax import data, engine, features, freezing
from tljax.assets import minilm_path

EPOCHS, LR, BATCH = 10, 1e-2, 32


def _setup(quick: bool):
    folder = tiny_bert_dir() if quick else str(minilm_path())
    tokenizer = tm.load_tokenizer(minilm_path())
    n = 256 if quick else 1024
    train = data.subsample(data.load("wordnet_lexnames:train"), n, seed=0)
    val = data.subsample(data.load("wordnet_lexnames:validation"), n // 4, seed=0)
    batcher = data.TextBatcher(tokenizer, 64, (32, 48, 64))
    loaded = tm.load_pretrained(folder, num_classes=26, pooling="mean")
    if quick:  # the tiny model's vocabulary is smaller than the tokenizer's
        batcher = _clipped(batcher, loaded.hf_config.vocab_size)
    return loaded, train, val, batcher


def _clipped(batcher, vocab):
    def collate(records):
        out = batcher(records)
        out["input_ids"] = np.minimum(out["input_ids"], vocab - 1)
        return out

    return collate


def recomputed(loaded, train, val, batcher) -> tuple[float, float]:
    """Seconds and validation accuracy of the probe through the engine (forward every step)."""
    stream = data.TrainData(train, batch_size=BATCH, seed=0, collate=batcher)
    sched = freezing.FreezingSchedule((freezing.Phase(epochs=EPOCHS, rules="linear_probe", learning_rate=LR),))
    cfg = engine.EngineConfig(devices=1, progress=False, steps_per_epoch=stream.steps_per_epoch)
    evals = data.EvalData(val, batch_size=64, collate=batcher)
    t = time.perf_counter()
    result = engine.fit(loaded, sched, stream, cfg, eval_data=evals)
    return time.perf_counter() - t, result.eval["accuracy"]


def cached(loaded, train, val, batcher) -> tuple[float, float]:
    """Seconds (extraction + training) and validation accuracy of the probe on cached features."""
    stream = data.TrainData(train, batch_size=BATCH, seed=0, collate=batcher)
    steps = EPOCHS * stream.steps_per_epoch
    cache = scratch_dir("tljax-bench-features-")
    t = time.perf_counter()
    order = data.TrainData(data.records.Split("order", data.records.ArrayRecords({"i": np.arange(len(train)),
                           "label": train.labels}), train.labels, train.label_names, "text"), batch_size=BATCH,
                           seed=0)  # fmt: skip
    feats = features.cached_extract(loaded, lambda: data.EvalData(train, batch_size=64, collate=batcher),
                                    cache_dir=cache, data_key="bench-train", pooling="mean")  # fmt: skip
    x, y = jnp.asarray(feats.x), jnp.asarray(feats.labels)
    rows = jnp.asarray(np.stack([order.batch(s)["i"] for s in range(steps)]))  # the engine run's batches
    w, b = _train_head(x, y, rows, train.num_classes)
    seconds = time.perf_counter() - t
    v = features.extract(loaded, data.EvalData(val, batch_size=64, collate=batcher), pooling="mean")
    return seconds, float((np.asarray(v.x @ np.asarray(w) + np.asarray(b)).argmax(-1) == v.labels).mean())


def _train_head(x, y, rows, classes: int):
    """Adam on a zero-initialised linear head over the given minibatches of cached features (one scan)."""
    tx = optax.adam(LR)
    params = {"w": jnp.zeros((x.shape[1], classes)), "b": jnp.zeros((classes,))}

    def loss(p, idx):
        logits = x[idx] @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()

    def step(carry, idx):
        p, s = carry
        g = jax.grad(loss)(p, idx)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.jit(lambda p, r: jax.lax.scan(step, (p, tx.init(p)), r))(params, rows)
    return params["w"], params["b"]


def run(quick: bool) -> list[dict]:
    loaded, train, val, batcher = _setup(quick)
    slow, slow_acc = recomputed(loaded, train, val, batcher)
    fast, fast_acc = cached(loaded, train, val, batcher)
    common = {"model": "tiny-bert" if quick else "all-MiniLM-L6-v2", "examples": len(train), "epochs": EPOCHS,
              "batch": BATCH, "device": jax.devices()[0].platform}  # fmt: skip
    return [
        emit("probe_cache/recomputed", "seconds", slow, val_accuracy=slow_acc, **common),
        emit("probe_cache/cached", "seconds", fast, val_accuracy=fast_acc, **common),
        emit("probe_cache", "cached_probe_speedup", slow / fast, target=">= 8", **common),
    ]
