"""`vmap_seeds`: eight seeds of one LP-FT fine-tune as one vmapped program (`tljax.multiseed.fit_seeds`) against
eight `engine.fit` runs one after another (`--quick`: two seeds), on the benchmark's tiny random BERT (4 layers, width
64, dropout 0.1), batch 16 x 32 tokens from 512 random pre-tokenised examples, 4 classes, `TrainData(seed=k)` per seed.

Both sides train the same steps on the same batches (LP-FT: 24 probe + 24 fine-tune steps; `--quick`: 6 + 6) and
are timed end to end, compiles included: the vmapped side compiles one program per phase, the sequential side one
per phase per run (each `engine.fit` builds its own steps; no persistent compilation cache). Prints both wall times,
`vmap_seeds_speedup` (sequential / vmapped, goal >= 3 on CPU), the compile totals, and
`vmap_seeds_step_speedup`: steady-state training time of all eight runs (compiles excluded), sequential / vmapped.
"""

from __future__ import annotations

import time

import jax
import numpy as np

import tljax.models as tm
from experiments.bench.common import emit, tiny_bert_dir
from tljax import engine, freezing, multiseed
from tljax.data import TrainData
from tljax.data.records import ArrayRecords, Split

SEEDS, QUICK_SEEDS, BATCH, SEQ, CLASSES, EXAMPLES = tuple(range(8)), (0, 1), 16, 32, 4, 512


def _split(vocab: int) -> Split:
    rng = np.random.default_rng(0)
    ids = rng.integers(2, vocab, (EXAMPLES, SEQ)).astype(np.int32)
    labels = rng.integers(0, CLASSES, EXAMPLES)
    names = tuple(f"c{i}" for i in range(CLASSES))
    return Split("random_tokens:train", ArrayRecords({"input_ids": ids, "label": labels}), labels, names, "text")


def _example(record) -> dict:
    ids = record["input_ids"]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": np.int32(record["label"])}


def _timed(fn):
    """(fn(), wall seconds); both trainers return after their last step finished (they block on the state)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _train_seconds(history, lengths: list[int]) -> float:
    """Steady-state training seconds of a run's phases: per-step time (compiles excluded) times steps."""
    return sum(r.step_seconds * n for r, n in zip(history, lengths, strict=True))


def run(quick: bool) -> list[dict]:
    """K=8 seeds of LP-FT (--quick: 2), vmapped vs sequential `engine.fit`: wall times, speedups, compile totals."""
    steps, seeds = (6, QUICK_SEEDS) if quick else (24, SEEDS)
    loaded = tm.load_pretrained(tiny_bert_dir(), num_classes=CLASSES, pooling="mean")
    split = _split(loaded.hf_config.vocab_size)
    data = lambda seed: TrainData(split, batch_size=BATCH, seed=seed, transform=_example)
    sched = freezing.get("lp_ft", loaded, probe_steps=steps, ft_steps=steps, probe_lr=1e-3, ft_lr=1e-4)
    optimizer = {"weight_decay": 0.01}
    vmapped, vmapped_s = _timed(lambda: multiseed.fit_seeds(loaded, sched, data, seeds, optimizer=optimizer))

    def sequential():
        config = lambda seed: engine.EngineConfig(seed=seed, devices=1, progress=False, optimizer=optimizer)
        return [engine.fit(loaded, sched, data(seed), config(seed)) for seed in seeds]

    runs, sequential_s = _timed(sequential)
    common = {
        "model": "tiny-bert",
        "seeds": len(seeds),
        "batch": BATCH,
        "seq": SEQ,
        "steps": 2 * steps,
        "device": jax.devices()[0].platform,
    }
    seq_train = sum(_train_seconds(r.history, sched.lengths()) for r in runs)
    vm_train = _train_seconds(vmapped.history, sched.lengths())
    final = np.asarray([r.history[-1].metrics["loss"] for r in runs])
    return [
        emit("vmap_seeds/vmapped", "wall_s", vmapped_s, **common),
        emit("vmap_seeds/sequential", "wall_s", sequential_s, **common),
        emit("vmap_seeds", "vmap_seeds_speedup", sequential_s / vmapped_s, **common),
        emit("vmap_seeds/vmapped", "compile_s", sum(r.compile_seconds for r in vmapped.history), **common),
        emit("vmap_seeds/sequential", "compile_s", sum(p.compile_seconds for r in runs for p in r.history), **common),
        emit("vmap_seeds/vmapped", "train_s", vm_train, **common),
        emit("vmap_seeds/sequential", "train_s", seq_train, **common),
        emit("vmap_seeds", "vmap_seeds_step_speedup", seq_train / vm_train, **common),
        emit(
            "vmap_seeds",
            "final_loss_max_abs_diff",
            float(np.abs(vmapped.metrics["loss"][:, -1] - final).max()),
            **common,
        ),
    ]
