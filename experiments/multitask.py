"""Multi-task fine-tuning: one backbone, one head per task, rows of every task mixed in each batch.

    python -m experiments.multitask --config experiments/configs/multitask.py:multi --seeds 0,1,2
    python -m experiments.multitask --config experiments/configs/multitask.py:single_examples --workdir runs/x

Each seed trains in <workdir>/seed_<s> (default workdir runs/<config name>) and writes results.json there (per-task
test accuracy, the mixing rates, learned log-variances); <workdir>/summary.json holds mean and std over the seeds.
config.json is written before training: a seed finished with the same config is read, not retrained, one interrupted
(SIGTERM: "preempted at step N", exit 1) resumes when rerun, and a seed dir holding a run of another config is an
error naming the changed keys (use a new --workdir). `build(config)` and `run(config, workdir)` are the
importable steps (tests build every argument of the config without training).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from absl import app

from experiments import cli
from tljax import data, engine, multitask
from tljax.job.build import make_inputs, make_schedule, model_folder
from tljax.job.run import RESULTS, finished_run, resolved, write_config
from tljax.models import hub


@dataclass
class MultiTaskJob:
    """Everything one multi-task run needs, built from its config; nothing is trained."""

    loaded: Any
    train: dict  # task -> training split
    test: dict  # task -> test split
    rates: dict[str, float]
    train_data: multitask.MixedTrainData
    test_data: dict  # task -> EvalData
    schedule: Any
    engine_config: engine.EngineConfig
    loss_fn: multitask.MultiTaskLoss


def load_task_splits(tasks, seed: int) -> tuple[dict, dict]:
    """({task: train split}, {task: test split}), subsampled (stratified) as each task's entry asks."""
    train, test = {}, {}
    for name, t in tasks.items():
        train[name] = data.load(t["train"])
        if t.get("train_size"):
            train[name] = data.subsample(train[name], min(t["train_size"], len(train[name])), seed)
        test[name] = data.load(t["test"])
        if t.get("test_size"):
            test[name] = data.subsample(test[name], min(t["test_size"], len(test[name])), seed)
    return train, test


def build(config, workdir: str | None = None) -> MultiTaskJob:
    """Config -> model with one head per task, mixed training data, loss, schedule, engine config."""
    train, test = load_task_splits(config.tasks, config.seed)
    m, d = config.model, config.data
    folder = model_folder(m.name)
    weighting = config.loss.weighting
    if weighting not in multitask.WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {multitask.WEIGHTINGS}")
    loaded = multitask.load(
        folder,
        {t: s.num_classes for t, s in train.items()},
        uncertainty=weighting == "uncertainty",
        hidden=m.head_hidden,
        dropout=m.head_dropout,
        pooling=m.pooling,
        seed=config.seed,
    )
    inputs = make_inputs(loaded, str(hub.resolve(folder)), "text", d, 0)
    mix = config.mixing
    rates = multitask.mixing_rates(
        {t: len(s) for t, s in train.items()}, mix.how, temperature=mix.temperature, weights=dict(mix.weights) or None
    )
    train_data = multitask.MixedTrainData(
        train, rates, batch_size=d.batch_size, collate=inputs.batcher, seed=config.seed
    )
    test_data = {
        t: data.EvalData(inputs.eval_order(s), batch_size=d.eval_batch_size, collate=inputs.eval_batcher)
        for t, s in test.items()
    }
    loss_fn = multitask.MultiTaskLoss(
        tuple(train), weights=dict(config.loss.weights) or None, uncertainty=weighting == "uncertainty"
    )
    schedule = make_schedule(config.schedule, loaded)
    values = {
        **config.engine.to_dict(),
        "workdir": workdir,
        "seed": config.seed,
        "optimizer": dict(config.optimizer),
        "steps_per_epoch": train_data.steps_per_epoch,
    }
    engine_config = engine.EngineConfig.from_config(values)
    return MultiTaskJob(loaded, train, test, rates, train_data, test_data, schedule, engine_config, loss_fn)


def run(config, workdir: str | Path) -> dict:
    """Trains one seed, evaluates every head on its task's test split; results.json in `workdir` (atomic). A workdir
    holding results of the same config returns them; one holding a run of another config (results or a checkpoint) is
    a ValueError naming the changed keys (as `tljax.job.run`)."""
    workdir = Path(workdir)
    finished = finished_run(workdir, config)
    if finished is not None:
        return finished
    t0 = time.perf_counter()
    job = build(config, str(workdir))
    write_config(workdir, config)  # before training: a checkpoint always has its config beside it
    result = engine.fit(job.loaded, job.schedule, job.train_data, job.engine_config, loss_fn=job.loss_fn)
    if result.status == "preempted":
        raise SystemExit(f"preempted at step {int(result.state.step)}: rerun the same command to resume")
    params = result.state.params
    tests = multitask.evaluate_tasks(job.loaded, job.test_data, params=params)
    last = result.history[-1].metrics if result.history else {}
    results = {
        "name": config.name,
        "seed": config.seed,
        "tasks": list(job.train),
        "rates": job.rates,
        "train_sizes": {t: len(s) for t, s in job.train.items()},
        "test_sizes": {t: len(s) for t, s in job.test.items()},
        "test_accuracy": {t: m["accuracy"] for t, m in tests.items()},
        "test": tests,
        "log_variances": multitask.log_variances(params),
        "final_train_metrics": last,
        "steps": int(result.state.step),
        "config": resolved(config),
        "wall_seconds": time.perf_counter() - t0,
    }
    engine.write_json_atomic(workdir / RESULTS, results)
    return results


def summarize(runs: list[dict]) -> dict:
    """Mean and sample std (ddof=1) of each task's test accuracy over the seeds."""
    out = {}
    for task in runs[0]["test_accuracy"]:
        acc = np.asarray([r["test_accuracy"][task] for r in runs])
        out[task] = {
            "mean": float(acc.mean()),
            "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "runs": acc.tolist(),
        }
    return {"name": runs[0]["name"], "seeds": [r["seed"] for r in runs], "test_accuracy": out}


def main(argv) -> int:
    config, workdir = cli.start(argv, "multitask")
    workdir, seeds = Path(workdir), cli.seeds(config.seed)
    runs = []
    for seed in seeds:
        config.seed = seed
        runs.append(run(config, workdir / f"seed_{seed}"))
        print(json.dumps({"seed": seed, "test_accuracy": runs[-1]["test_accuracy"]}), flush=True)
    summary = summarize(runs)
    engine.write_json_atomic(workdir / "summary.json", summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    cli.define_flags("experiments/configs/multitask.py", seeds=[])
    app.run(main, argv=sys.argv, flags_parser=cli.parse_flags)
