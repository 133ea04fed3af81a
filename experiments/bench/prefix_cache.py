"""`prefix_cache`: top-1 and top-3 fine-tuning of MiniLM-L6 with the frozen bottom blocks cached against running the
full model. One epoch of 16 batches (32 x 128 tokens, 512 examples), AdamW at 1e-4, `engine.fit` both ways; the
cached run computes the prefix once (one inference-mode forward pass of the frozen blocks over the epoch's examples)
and trains the top from it.

Prints per partition the epoch's training time both ways (compiles excluded), the one-time cache cost,
`prefix_cache_speedup_top1` / `..._top3` (uncached epoch / cached epoch, steady state) with their FLOP ideals
(top-1: 6 forward + 1 backward block against 1 + 1, ~2.7x; top-3: 6 + 3 against 3 + 3, ~1.3x, counting a backward
as twice a forward), the speedup over 10 epochs with the cache's cost included, and the largest difference of the
trained weights (dropout off in both runs, so the runs are the same computation). `--quick`: tiny random BERT.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from experiments.bench.common import emit, setup
from tljax import engine, freezing, tree
from tljax.data import TrainData
from tljax.engine import EngineConfig
from tljax.prefix_cache import PrefixCache

STEPS, EPOCHS_AMORTISED = 16, 10


def _records(batch: dict, copies: int) -> list[dict]:
    """`copies` batches' worth of examples: the benchmark batch's rows with shifted ids (distinct examples)."""
    vocab = int(batch["input_ids"].max()) + 1
    out = []
    for c in range(copies):
        for i in range(len(batch["labels"])):
            ids = (batch["input_ids"][i] + c) % vocab
            out.append({"input_ids": ids, "attention_mask": batch["attention_mask"][i], "labels": batch["labels"][i]})
    return out


def _no_dropout(loaded):
    """The same weights with dropout off, so the cached and uncached runs compute the same thing."""
    backbone = loaded.model.backbone.clone(dropout=0.0, attention_dropout=0.0)
    return dataclasses.replace(loaded, model=loaded.model.clone(backbone=backbone))


def _fit(loaded, k: int, records, batch_size: int, cache: bool):
    phase = freezing.Phase(STEPS, rules="top_k", rule_args={"k": k}, learning_rate=1e-4, name=f"top_{k}")
    data = TrainData(records, batch_size=batch_size, seed=0, threads=2)
    config = EngineConfig(
        progress=False,
        log_every=STEPS,
        devices=1,
        optimizer={"weight_decay": 0.01},
        prefix_cache=PrefixCache() if cache else None,
    )
    result = engine.fit(loaded, freezing.FreezingSchedule((phase,), f"top_{k}"), data, config)
    record = result.history[0]
    return record.step_seconds * STEPS, record.prefix_seconds, tree.flatten(jax.device_get(result.state.params))


def run(quick: bool) -> list[dict]:
    loaded, batch, common = setup(quick)
    loaded = _no_dropout(loaded)
    records = _records(batch, STEPS)
    ideal = {1: 8 / 3, 3: 12 / 9}
    out = []
    for k in (1, 3):
        plain_s, _, plain_params = _fit(loaded, k, records, len(batch["labels"]), cache=False)
        cached_s, prefix_s, cached_params = _fit(loaded, k, records, len(batch["labels"]), cache=True)
        diff = max(float(np.max(np.abs(plain_params[p] - cached_params[p]))) for p in plain_params)
        amortised = EPOCHS_AMORTISED * plain_s / (prefix_s + EPOCHS_AMORTISED * cached_s)
        extra = dict(steps_per_epoch=STEPS, **common)
        out.append(emit(f"prefix_cache/top_{k}/uncached", "epoch_seconds", plain_s, **extra))
        out.append(emit(f"prefix_cache/top_{k}/cached", "epoch_seconds", cached_s, cache_seconds=prefix_s, **extra))
        out.append(
            emit(
                f"prefix_cache/top_{k}",
                f"prefix_cache_speedup_top{k}",
                plain_s / cached_s,
                flop_ideal=ideal[k],
                speedup_10_epochs_with_cache_cost=amortised,
                max_abs_param_diff=diff,
                **extra,
            )
        )
    return out
