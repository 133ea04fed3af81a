"""A training process for the engine's crash, preemption and multi-process tests (run as a subprocess).

    python tests/engine_driver.py --model DIR --workdir W --steps 8 --every 2 [--kill-at 5 | --kill-in-save 4 |
        --sigterm-at 3 | --nan-at 5] [--parallel data] [--devices N] [--coordinator 127.0.0.1:PORT
        --num-processes 2 --process-id I] [--pipeline] [--out params.npz]

Faults are injected from outside the engine: the data iterator kills or signals the process when it is asked for
a given step's batch, feeds token ids out of the vocabulary (NaN embeddings) for --nan-at, and --kill-in-save
SIGKILLs the process inside orbax's commit of a step, after the files are written but before the atomic rename.
With --pipeline the batches come from a tljax grain pipeline (`data.TrainData`: shuffled epochs, a random
per-example transform, per-process shards) instead of a hand-written generator.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys

import numpy as np

GLOBAL_BATCH, SEQ, VOCAB = 16, 8, 99


def make_model(folder: str, num_layers: int = 2) -> None:
    """The tiny BERT checkpoint every run loads (dropout off, so runs on different layouts can agree)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(cfg).save_pretrained(folder)


def global_batch(step: int, nan: bool = False) -> dict:
    rng = np.random.RandomState(step)
    ids = rng.randint(2, VOCAB, (GLOBAL_BATCH, SEQ)).astype(np.int32)
    if nan:
        ids[:, 0] = VOCAB + 7  # out of the vocabulary: the embedding lookup fills NaN
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": rng.randint(0, 3, GLOBAL_BATCH)}


def preempted(n: int, batches=None):
    """A data source (`source(start)`) of `global_batch`es, or of `batches(start)`, that delivers a preemption notice
    (SIGTERM) with the batch of step n - 1: the run saves a checkpoint after n steps and stops."""

    def source(start):
        for step, batch in zip(itertools.count(start), (batches or _global_batches)(start), strict=False):
            if step == n - 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    return source


def _global_batches(start: int):
    return (global_batch(step) for step in itertools.count(start))


def data(args, process_index: int, process_count: int):
    rows = GLOBAL_BATCH // process_count
    local = slice(process_index * rows, (process_index + 1) * rows)

    def iterator(start: int):
        for step in itertools.count(start):
            if step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if step == args.sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            batch = global_batch(step, nan=step == args.nan_at)
            yield {k: v[local] for k, v in batch.items()}

    return iterator


def token_split(n: int = 40):
    """A text-like split of pre-tokenised records (the tiny model has no tokenizer)."""
    from tljax.data.records import ArrayRecords, Split

    rng = np.random.RandomState(0)
    ids = rng.randint(2, VOCAB, (n, SEQ)).astype(np.int32)
    labels = rng.randint(0, 3, n).astype(np.int64)
    return Split("tokens:train", ArrayRecords({"input_ids": ids, "label": labels}), labels, ("a", "b", "c"), "text")


def token_dropout(record, rng):
    """A random per-example transform: replace ~25% of the tokens by id 1 (seeded per stream position)."""
    ids = np.where(rng.random(SEQ) < 0.25, 1, record["input_ids"]).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones(SEQ, np.int32), "labels": np.int32(record["label"])}


def pipeline_data(args):
    from tljax.data import TrainData

    stream = TrainData(token_split(), batch_size=GLOBAL_BATCH, seed=3, random_transform=token_dropout)

    def iterator(start: int):
        for step, batch in zip(itertools.count(start), stream(start), strict=False):
            if step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch

    return iterator


def kill_inside_commit(step: int) -> None:
    """SIGKILL while orbax commits `step`: files written to the temporary directory, rename not done."""
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
        if os.path.basename(str(self._final_path)) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        return await original(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--parallel", default="data")
    p.add_argument("--devices", type=int)
    p.add_argument("--kill-at", type=int)
    p.add_argument("--kill-in-save", type=int)
    p.add_argument("--sigterm-at", type=int)
    p.add_argument("--nan-at", type=int)
    p.add_argument("--coordinator")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--pipeline", action="store_true")
    p.add_argument("--out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from tljax import engine

    if args.coordinator:
        engine.initialize_distributed(
            coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
        )
    import jax

    import tljax.models as tm
    from tljax import freezing
    from tljax.checkpoints import CheckpointConfig

    if args.kill_in_save is not None:
        kill_inside_commit(args.kill_in_save)
    loaded = tm.load_pretrained(args.model, num_classes=3, pooling="mean")
    half = args.steps // 2
    sched = freezing.get("lp_ft", loaded, probe_steps=half, ft_steps=args.steps - half, probe_lr=1e-2, ft_lr=1e-3)
    config = engine.EngineConfig(
        workdir=args.workdir,
        parallel=args.parallel,
        devices=args.devices,
        log_every=1,
        progress=False,
        checkpoint=CheckpointConfig(every=args.every, keep=3),
        optimizer={"weight_decay": 0.01},
    )
    try:
        train = pipeline_data(args) if args.pipeline else data(args, jax.process_index(), jax.process_count())
        result = engine.fit(loaded, sched, train, config)
    except engine.NonFiniteLossError as e:
        print(f"NONFINITE: {e}", flush=True)
        return 3
    if args.out and jax.process_index() == 0:
        from tljax import tree

        np.savez(args.out, **{p: np.asarray(v) for p, v in tree.flatten(result.state.params).items()})
    print(f"STATUS {result.status} STEP {int(result.state.step)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
