"""Config -> a domain-adaptation run on a `tljax.data.shift` pair -> source and target test accuracy.

    results = run(get_config("dann"), "runs/adapt_dann")       # experiments/configs/adapt.py
    build(config)                                             # everything, nothing trained (tests, notebooks)

Sections: model, schedule, optimizer, engine, seed, name as in `tljax.job` (the same builders are used), plus
  data   pair, corruption, severity, train_size / test_size (per domain, 0: all), batch_size (per domain: a step
         sees 2x), eval_batch_size, and the text / image keys `tljax.job` reads (max_length, buckets, image_size, ...)
  adapt  method (source_only | dann | mmd | coral), weight (lambda), domain_hidden, domain_dropout (dann's head),
         kernels, kernel_mul (mmd). source_only trains on source rows alone: its BatchNorm statistics never see
         the target domain (the other methods forward both halves together, as DANN / DAN implementations do).
One training loop: `engine.fit` with `AdaptationData` and `adaptation_loss`. Target labels are used only for the
final test accuracy (no model selection on the target: the final state is evaluated).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from tljax import data, engine, evaluation, freezing
from tljax.data.records import Split
from tljax.job.build import from_scratch, load_model, make_engine_config, make_inputs, make_schedule, model_folder
from tljax.job.run import RESULTS, finished_run, resolved, write_config
from tljax.models import hub

from .data import AdaptationData
from .losses import METHODS, adaptation_loss
from .model import DomainClassifier, train_domain_head, with_domain_head

SECTIONS = ("model", "data", "schedule", "optimizer", "engine", "adapt", "seed", "name")


@dataclass
class AdaptJob:
    config: ml_collections.ConfigDict
    loaded: Any  # the model wrapped with `WithDomainHead`
    splits: dict[str, Split]  # source_train, target_train, source_test, target_test
    train_data: AdaptationData
    test_data: dict[str, data.EvalData]  # "source", "target"
    schedule: freezing.FreezingSchedule
    engine_config: engine.EngineConfig
    loss_fn: Any


def check_config(config) -> None:
    """Unknown sections, an unknown method or pair, or a negative weight: a ValueError naming the fix."""
    unknown = sorted(set(config.keys()) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; valid: {list(SECTIONS)}")
    if config.adapt.method not in METHODS:
        raise ValueError(f"unknown adapt.method {config.adapt.method!r}; choose one of {list(METHODS)}")
    if config.data.pair not in data.PAIRS:
        raise ValueError(f"unknown data.pair {config.data.pair!r}; choose one of {sorted(data.PAIRS)}")
    if not config.adapt.weight >= 0:
        raise ValueError(f"adapt.weight must be >= 0, got {config.adapt.weight!r}")


def _sized(split: Split, n: int, seed: int) -> Split:
    return data.subsample(split, min(n, len(split)), seed) if n else split


def load_splits(cfg, seed: int) -> dict[str, Split]:
    """The pair's train and test splits of both domains, subsampled (stratified) to train_size / test_size."""
    kw = dict(corruption=cfg.corruption, severity=cfg.severity, seed=0)  # the corrupted copies are fixed data
    source_train, target_train = data.domain_pair(cfg.pair, "train", **kw)
    source_test, target_test = data.domain_pair(cfg.pair, "test", **kw)
    return {"source_train": _sized(source_train, cfg.train_size, seed),
            "target_train": _sized(target_train, cfg.train_size, seed),
            "source_test": _sized(source_test, cfg.test_size, 0),
            "target_test": _sized(target_test, cfg.test_size, 0)}  # fmt: skip


def build(config, workdir: str | None = None) -> AdaptJob:
    """Resolves `config` into an `AdaptJob` (model loaded and wrapped, data opened, schedule resolved)."""
    check_config(config)
    d, a, seed = config.data, config.adapt, config.seed
    splits = load_splits(d, seed)
    train = splits["source_train"]
    loaded = load_model(config.model, train.num_classes, seed)
    folder = None if from_scratch(config.model) else str(hub.resolve(model_folder(config.model.name)))
    inputs = make_inputs(loaded, folder, train.kind, d, train.num_classes)
    halves = [data.TrainData(splits[k], batch_size=d.batch_size, seed=seed + i, **inputs.train_kwargs(splits[k]))
              for i, k in enumerate(("source_train", "target_train"))]  # fmt: skip
    engine_config = make_engine_config(config, workdir, halves[0].steps_per_epoch)
    schedule = make_schedule(config.schedule, loaded)
    source, target = halves[0], None if a.method == "source_only" else halves[1]  # source-only never sees target
    train_data = AdaptationData(source, target, schedule.total_steps(source.steps_per_epoch))
    head = DomainClassifier(tuple(a.domain_hidden), a.domain_dropout) if a.method == "dann" else None
    loaded = with_domain_head(loaded, head, train_data.combine(halves[0].batch(0), halves[1].batch(0), 0), seed)
    evaluated = lambda split: data.EvalData(inputs.eval_order(split), batch_size=d.eval_batch_size,
                                            **inputs.eval_kwargs())  # fmt: skip
    tests = {"source": evaluated(splits["source_test"]), "target": evaluated(splits["target_test"])}
    loss_fn = adaptation_loss(a.method, a.weight, kernels=a.kernels, kernel_mul=a.kernel_mul)
    schedule = train_domain_head(schedule, loaded)
    return AdaptJob(config, loaded, splits, train_data, tests, schedule, engine_config, loss_fn)


def run(config, workdir: str | os.PathLike | None) -> dict:
    """Trains one seed and writes `workdir/results.json` (atomically): source / target test metrics, the last
    training metrics, the config and timings. workdir None: in memory, nothing written.

    As `tljax.job.run`: config.json is written before training; a workdir holding results of the same config returns
    them without training, one holding a run of another config (results or a checkpoint) is a ValueError (use a new
    workdir), and a preempted run raises SystemExit, writes no results and resumes when rerun."""
    t0 = time.perf_counter()
    if workdir is not None:
        workdir = Path(workdir)
        finished = finished_results(workdir, config)
        if finished is not None:
            return finished
    job = build(config, None if workdir is None else str(workdir))
    if workdir is not None:
        write_config(workdir, config)
    result = engine.fit(job.loaded, job.schedule, job.train_data, job.engine_config, loss_fn=job.loss_fn)
    if result.status == "preempted":  # the state is part-trained: no result; a rerun resumes from the checkpoint
        raise SystemExit(f"preempted at step {int(result.state.step)}: rerun the same command to resume")
    state = result.state
    tests = {name: evaluation.evaluate(job.loaded, d(), params=state.params, collections=state.collections)
             for name, d in job.test_data.items()}  # fmt: skip
    out = {
        "method": config.adapt.method,
        "pair": config.data.pair,
        "seed": config.seed,
        "target_test_accuracy": tests["target"]["accuracy"],
        "source_test_accuracy": tests["source"]["accuracy"],
        "test": tests,
        "train_metrics": result.history[-1].metrics if result.history else {},
        "steps": int(state.step),
        "planned_steps": result.plan.total_steps,
        "sizes": {k: len(v) for k, v in job.splits.items()},
        "status": result.status,
        "config": resolved(config),
        "wall_seconds": time.perf_counter() - t0,
    }
    if workdir is not None:
        engine.write_json_atomic(workdir / RESULTS, out)
    return out


def finished_results(workdir: Path, config) -> dict | None:
    """The results of a finished run of `config` in `workdir`, else None (nothing, or an interrupted run to resume).
    A run of another config there is a ValueError naming the changed keys. A results.json of a preempted run (which
    earlier versions wrote: not a result) is renamed results.preempted.json and the run resumes from its checkpoint."""
    stale = workdir / RESULTS
    if stale.is_file() and json.loads(stale.read_text()).get("status") == "preempted":
        os.replace(stale, workdir / "results.preempted.json")
    return finished_run(workdir, config)


def summarize(runs: list[dict]) -> dict:
    """Mean and standard deviation (ddof 1 when several runs) of the test accuracies over seeds."""
    out = {"method": runs[0]["method"], "pair": runs[0]["pair"], "seeds": [r["seed"] for r in runs]}
    for key in ("target_test_accuracy", "source_test_accuracy"):
        values = np.asarray([r[key] for r in runs], np.float64)
        out[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                    "values": values.tolist()}  # fmt: skip
    out["runs"] = runs
    return out
