"""The fine-tuning job: a config in, a test accuracy you can put in a table out.

    config = experiments.configs.default.get_config()
    results = job.run(config, workdir="runs/minilm-lpft")      # resumes an interrupted run; a finished one is read
    job.build(config)                                           # every object, nothing trained (tests, notebooks)

`build` resolves the config into library calls (`load_pretrained`, data sources and pipelines, a freezing
schedule, an `EngineConfig`); `run` trains with `engine.fit`, evaluates the test split at the end of every phase
(LP-FT: the linear probe's test accuracy beside the fine-tune's) and on the selected model (the best validation
checkpoint when early stopping or a best metric is configured, else the final one), exports the model as an HF
folder that `load_pretrained` and `experiments.predict` read, and writes `results.json` atomically.

Config sections (see experiments/configs/default.py for every key with its default):
  model     name (hub id or folder), pooling, head_hidden, head_dropout, reinit, dtype, param_dtype, options
  data      train / validation / test ("source:split"), validation_fraction, train_size, validation_size,
            test_size, kshot, classes, batch_size, eval_batch_size, max_length, buckets, image_size, augment, seed
  schedule  name + args (a built-in of `tljax.freezing`) or phases (a list of phase dicts)
  optimizer keyword arguments of `partition.build` (optimizer, weight_decay, clip_norm, ...)
  loss      label_smoothing
  engine    `EngineConfig` fields (parallel, eval_every, checkpoint, early_stopping, ...)
  seed
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

import tljax
import tljax.models as tm
from tljax import data, engine, evaluation, features, freezing, probes, tree
from tljax.assets import MINILM_HUB_ID, minilm_path
from tljax.data.records import Split
from tljax.losses import classification_loss
from tljax.models import hub

log = logging.getLogger("tljax")

RESULTS = "results.json"
CONFIG = "config.json"
EXPORT = "export"
DATA_FILE = "tljax_data.json"  # in the export: how inputs were preprocessed, for predict
SECTIONS = ("model", "data", "schedule", "optimizer", "loss", "engine", "seed", "name", "mode", "probe")
MODES = ("finetune", "probe")


@dataclass
class Splits:
    train: Split
    validation: Split
    test: Split | None

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in vars(self).items() if v is not None}


@dataclass
class Job:
    """Everything a run needs, built from a config; nothing is trained until `run`."""

    config: ml_collections.ConfigDict
    loaded: Any
    splits: Splits
    inputs: Any  # TextInputs or ImageInputs: how records become model batches
    train_data: data.TrainData
    eval_data: data.EvalData
    test_data: data.EvalData | None
    schedule: freezing.FreezingSchedule | None
    engine_config: engine.EngineConfig
    loss_fn: Any

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.splits.train.label_names


# ---- config -> objects ---------------------------------------------------------------------------------------------


def check_config(config) -> None:
    """Unknown top-level sections are errors (a typo would otherwise be ignored)."""
    unknown = sorted(set(config.keys()) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; valid: {list(SECTIONS)}")
    if config.get("mode", "finetune") not in MODES:
        raise ValueError(f"unknown mode {config.mode!r}; valid: {list(MODES)}")


def model_folder(name: str) -> str:
    """The checkpoint to load: the offline MiniLM package stands in for its hub id when installed."""
    if name == MINILM_HUB_ID:
        try:
            return str(minilm_path())
        except ImportError:
            return name
    return name


def load_splits(cfg) -> Splits:
    """Train, validation (carved from train when the source has none) and test splits, subsampled as asked."""
    seed = cfg.seed
    train = data.load(cfg.train)
    if cfg.get("classes"):
        train = data.label_subset(train, list(cfg.classes))
    if cfg.get("validation"):
        validation = _same_space(data.load(cfg.validation), train, cfg)
    else:
        train, validation = data.carve_validation(train, cfg.validation_fraction, seed)
    test = _same_space(data.load(cfg.test), train, cfg) if cfg.get("test") else None
    if cfg.get("kshot"):
        train = data.k_shot(train, cfg.kshot, seed)
    elif cfg.get("train_size"):
        train = data.subsample(train, min(cfg.train_size, len(train)), seed)
    if cfg.get("validation_size"):
        validation = data.subsample(validation, min(cfg.validation_size, len(validation)), seed)
    if test is not None and cfg.get("test_size"):
        test = data.subsample(test, min(cfg.test_size, len(test)), seed)
    return Splits(train, validation, test)


def _same_space(split: Split, train: Split, cfg) -> Split:
    if cfg.get("classes"):
        split = data.label_subset(split, list(cfg.classes))
    if split.label_names != train.label_names:
        raise ValueError(
            f"{split.name} has other classes than {train.name}: {list(split.label_names)[:8]} vs "
            f"{list(train.label_names)[:8]}; evaluation needs one label space"
        )
    return split


@dataclass
class TextInputs:
    """Text records -> token batches: coarse buckets for training (each is a compiled train step), finer ones for
    evaluation, which also reads the split sorted by length so that a batch pads to its own texts' length."""

    batcher: data.TextBatcher
    eval_batcher: data.TextBatcher
    group_by_length: bool = False

    def train_kwargs(self, split: Split) -> dict:
        lengths = self.token_counts(split) if self.group_by_length else None
        return {"collate": self.batcher, "lengths": lengths}

    def token_counts(self, split: Split) -> np.ndarray:
        texts = [split[i]["text"] for i in range(len(split))]
        ids = self.eval_batcher.tokenizer(texts, truncation=True, max_length=self.eval_batcher.max_length)
        return np.asarray([len(x) for x in ids["input_ids"]])

    def eval_kwargs(self) -> dict:
        return {"collate": self.eval_batcher}

    def eval_order(self, split: Split) -> Split:
        """The split sorted by token count, so each eval batch pads to its own texts' length (evaluation sums do not
        depend on the order)."""
        return split.take(np.argsort(self.token_counts(split), kind="stable"), "by_length")

    def describe(self) -> dict:
        b = self.eval_batcher
        return {"kind": "text", "max_length": b.max_length, "buckets": list(self.batcher.buckets),
                "eval_buckets": list(b.buckets), "group_by_length": self.group_by_length}  # fmt: skip


@dataclass
class ImageInputs:
    """Image records -> pixel batches: seeded augmentation for training, deterministic preprocessing for eval."""

    preprocess: data.ImagePreprocess
    augment: data.Augment
    num_classes: int

    def train_kwargs(self, split: Split) -> dict:
        mix = self.augment.batch_transform(self.num_classes)
        return {"random_transform": data.train_transform(self.preprocess, self.augment), "batch_transform": mix}

    def eval_kwargs(self) -> dict:
        return {"transform": self.preprocess}

    def eval_order(self, split: Split) -> Split:
        return split

    def describe(self) -> dict:
        p = self.preprocess
        return {"kind": "image", "size": p.size, "mean": list(p.mean), "std": list(p.std), "crop_pct": p.crop_pct,
                "resample": int(p.resample), "rescale_factor": p.rescale_factor}  # fmt: skip


def make_inputs(loaded, folder: str, kind: str, cfg, num_classes: int):
    if kind == "text":
        tokenizer = tm.load_tokenizer(folder)
        fine = tuple(range(8, cfg.max_length, 8)) + (cfg.max_length,)
        return TextInputs(
            data.TextBatcher(tokenizer, cfg.max_length, tuple(cfg.get("buckets") or ())),
            data.TextBatcher(tokenizer, cfg.max_length, tuple(cfg.get("eval_buckets") or fine)),
            bool(cfg.get("group_by_length", False)),
        )
    overrides = {"size": cfg.image_size} if cfg.get("image_size") else {}
    preprocess = data.ImagePreprocess.from_pretrained(folder, **overrides)
    augment = data.Augment(**dict(cfg.get("augment") or {}))
    return ImageInputs(preprocess, augment, num_classes)


def load_model(cfg, num_classes: int):
    head = tm.ClassificationHead(num_classes, hidden=cfg.get("head_hidden", 0), dropout=cfg.get("head_dropout", 0.0))
    return tm.load_pretrained(
        model_folder(cfg.name),
        head=head,
        pooling=cfg.get("pooling"),
        dtype=cfg.get("dtype", "float32"),
        param_dtype=cfg.get("param_dtype"),
        reinit=list(cfg.get("reinit") or []),
        **dict(cfg.get("options") or {}),
    )


def make_schedule(cfg, loaded) -> freezing.FreezingSchedule:
    cfg = _plain(cfg)
    if cfg.get("phases"):
        return freezing.FreezingSchedule.from_config({"name": cfg.get("name") or "custom", "phases": cfg["phases"]})
    return freezing.get(cfg["name"], loaded, **(cfg.get("args") or {}))


def _plain(cfg) -> dict:
    """A ConfigDict section as plain dicts and lists (library calls check `Mapping`, not ConfigDict)."""
    return json.loads(json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg))


def make_engine_config(config, workdir: str | None, steps_per_epoch: int) -> engine.EngineConfig:
    """`EngineConfig` from the engine section; `checkpoint.best_metric` "" and `early_stopping.patience` 0 mean
    off (configs keep every key present so the command line can set it)."""
    values = dict(config.engine.to_dict()) if "engine" in config else {}
    if "checkpoint" in values and not values["checkpoint"].get("best_metric"):
        values["checkpoint"] = {**values["checkpoint"], "best_metric": None}
    if not (values.get("early_stopping") or {}).get("patience"):
        values["early_stopping"] = None
    values.update(workdir=workdir, seed=config.seed, steps_per_epoch=steps_per_epoch,
                  optimizer=dict(config.get("optimizer", {})))  # fmt: skip
    return engine.EngineConfig.from_config(values)


def build(config, workdir: str | None = None) -> Job:
    """Resolves `config` into a `Job` (model loaded, data sources opened, schedule resolved), without training."""
    check_config(config)
    d = config.data
    splits = load_splits(d)
    classes = splits.train.num_classes
    loaded = load_model(config.model, classes)
    folder = str(hub.resolve(model_folder(config.model.name)))  # hub ids: the cached snapshot
    inputs = make_inputs(loaded, folder, splits.train.kind, d, classes)
    train_data = data.TrainData(splits.train, batch_size=d.batch_size, seed=d.get("seed", config.seed),
                                **inputs.train_kwargs(splits.train))  # fmt: skip
    evaluated = lambda split: data.EvalData(inputs.eval_order(split), batch_size=d.eval_batch_size,
                                            **inputs.eval_kwargs())  # fmt: skip
    eval_data = evaluated(splits.validation)
    test_data = evaluated(splits.test) if splits.test is not None else None
    engine_config = make_engine_config(config, workdir, train_data.steps_per_epoch)
    schedule = None  # the probe mode trains no schedule
    if config.get("mode", "finetune") == "finetune":
        schedule = make_schedule(config.schedule, loaded)
        freezing.resolve(schedule, loaded, steps_per_epoch=train_data.steps_per_epoch, **engine_config.optimizer)
    smoothing = config.get("loss", {}).get("label_smoothing", 0.0)
    loss_fn = functools.partial(classification_loss, label_smoothing=smoothing) if smoothing else classification_loss
    return Job(config, loaded, splits, inputs, train_data, eval_data, test_data, schedule, engine_config, loss_fn)


# ---- running -------------------------------------------------------------------------------------------------------


def resolved(config) -> dict:
    """The config as plain data (what config.json and results.json record, and what a rerun is compared with)."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def run(config, workdir: str | os.PathLike, *, progress: bool = True) -> dict:
    """Trains, evaluates and exports; returns the results dict (also written to workdir/results.json).

    A workdir holding `results.json` of the same config returns it without training; one holding a run of another
    config is an error (use a new workdir); an interrupted one is resumed.
    """
    workdir = Path(workdir)
    finished = _finished(workdir, config)
    if finished is not None:
        log.info("%s is finished: reporting its results without training", workdir)
        return finished
    t0 = time.perf_counter()
    job = build(config, str(workdir))
    if not progress:
        job.engine_config = engine.EngineConfig(**{**vars(job.engine_config), "progress": False})
    _write_config(workdir, config)
    log.info("data: %s; inputs: %s", job.splits.sizes(), job.inputs.describe())
    if config.get("mode", "finetune") == "probe":
        results = run_probe(job, workdir, time.perf_counter() - t0)
        engine.write_json_atomic(workdir / RESULTS, results)
        return results
    result = engine.fit(job.loaded, job.schedule, job.train_data, job.engine_config, eval_data=job.eval_data,
                        loss_fn=job.loss_fn)  # fmt: skip
    if result.status == "preempted":
        raise SystemExit(f"preempted at step {int(result.state.step)}: rerun the same command to resume")
    results = _report(job, result, workdir)
    results["wall_seconds"] = time.perf_counter() - t0  # everything: loading, training, test evaluations, export
    engine.write_json_atomic(workdir / RESULTS, results)
    return results


def probe_features(job: Job, workdir: Path) -> dict[str, features.Features]:
    """Frozen-backbone features of each split (train without augmentation), cached in workdir/features."""
    cfg = job.config.probe
    pooling = cfg.get("pooling") or job.loaded.model.pooling
    described = json.dumps(job.inputs.describe(), sort_keys=True)
    out = {}
    for name, split in vars(job.splits).items():
        if split is None:
            continue
        batches = data.EvalData(job.inputs.eval_order(split), batch_size=job.config.data.eval_batch_size,
                                **job.inputs.eval_kwargs())  # fmt: skip
        out[name] = features.cached_extract(job.loaded, batches, cache_dir=workdir / "features",
                                            data_key=f"{split.name}|{described}", layer=cfg.get("layer"),
                                            pooling=pooling)  # fmt: skip
    return out


def run_probe(job: Job, workdir: Path, setup_seconds: float) -> dict:
    """The linear-probe protocol: features once, L2 logistic regression with its strength chosen on validation."""
    t0 = time.perf_counter()
    feats = probe_features(job, workdir)
    grid = list(job.config.probe.get("l2_grid") or probes.DEFAULT_L2_GRID)
    probe = probes.logistic_regression(feats["train"], feats["validation"], l2_grid=grid)
    test = probe.accuracy(feats["test"]) if "test" in feats else None
    return {
        "test_accuracy": test,
        "mode": "probe",
        "probe": {"layer": feats["train"].layer, "pooling": feats["train"].pooling, "l2": probe.hparams["l2"],
                  "validation_accuracy_by_l2": {str(k): v for k, v in probe.val_accuracy.items()},
                  "feature_dim": int(feats["train"].x.shape[1])},
        "best_validation": {"metric": "accuracy", "value": max(probe.val_accuracy.values())},
        "data": {"sizes": job.splits.sizes(), "names": {k: v.name for k, v in vars(job.splits).items() if v},
                 "label_names": list(job.label_names), "inputs": job.inputs.describe()},
        "wall_seconds": setup_seconds + time.perf_counter() - t0,
        "seed": job.config.seed,
        "config": resolved(job.config),
        "versions": versions(),
    }  # fmt: skip


def _finished(workdir: Path, config) -> dict | None:
    if (workdir / CONFIG).is_file():
        saved = json.loads((workdir / CONFIG).read_text())
        if saved != resolved(config):
            changed = sorted(k for k in set(saved) | set(resolved(config)) if saved.get(k) != resolved(config).get(k))
            raise ValueError(
                f"{workdir} holds a run of another config (sections {changed} differ): use a new --workdir, or "
                "delete it to start over"
            )
    if (workdir / RESULTS).is_file():
        return json.loads((workdir / RESULTS).read_text())
    return None


def _write_config(workdir: Path, config) -> None:
    if jax.process_index() == 0:
        engine.write_json_atomic(workdir / CONFIG, resolved(config))


def _report(job: Job, result: engine.FitResult, workdir: Path) -> dict:
    """Test evaluation per phase and of the selected model, the export, and the results dict."""
    plan, total = result.plan, tree.count(job.loaded.params)
    tests = TestAt(job, plan, workdir)
    phases = []
    for p in plan.phases:
        reached = [e for e in result.evals if e["step"] == p.stop]
        test = tests.report(p.stop).metrics if reached and job.test_data else None
        phases.append({"name": p.name, "start": p.start, "end": p.stop, "trainable_params": p.partition.count("train"),
                       "total_params": total, "validation": reached[0]["metrics"] if reached else None,
                       "test": test})  # fmt: skip
    selected, step = _selected(job, result)
    test = tests.report(step) if job.test_data else None
    _export(job, tests.state(step), workdir)
    es = job.engine_config.early_stopping
    metric = es.metric if es else job.engine_config.checkpoint.best_metric or "accuracy"
    best = _best_eval(result.evals, metric, es.mode if es else job.engine_config.checkpoint.best_mode)
    timing = _timing(result, job.train_data.batch_size)
    out = {
        "test_accuracy": test.metrics["accuracy"] if test else None,
        "test": test.metrics if test else None,
        "test_accuracy_by_phase": {p["name"]: (p["test"] or {}).get("accuracy") for p in phases},
        "selected": {"which": selected, "step": step},
        "status": result.status,
        "phases": phases,
        "best_validation": best,
        "per_class_test_accuracy": dict(zip(job.label_names, _nan_none(test.per_class_accuracy), strict=True))
        if test else None,
        "confusion_matrix": test.confusion.tolist() if test is not None and test.confusion is not None else None,
        "data": {"sizes": job.splits.sizes(), "names": {k: v.name for k, v in vars(job.splits).items() if v},
                 "label_names": list(job.label_names), "inputs": job.inputs.describe()},
        **timing,
        "seed": job.config.seed,
        "config": resolved(job.config),
        "versions": versions(),
    }  # fmt: skip
    return out


class TestAt:
    """Test reports of checkpoints by step: each checkpoint restored and evaluated once."""

    def __init__(self, job: Job, plan, workdir: Path):
        self.job, self.plan, self.workdir = job, plan, workdir
        self.states, self.reports = {}, {}

    def state(self, step: int):
        if step not in self.states:
            self.states = {step: engine.restore_state(self.job.loaded, self.plan, self.workdir, step,
                                                      self.job.engine_config)}  # fmt: skip
        return self.states[step]

    def report(self, step: int) -> evaluation.EvalReport:
        if step not in self.reports:
            s, job = self.state(step), self.job
            self.reports[step] = evaluation.evaluate_detailed(
                job.loaded, job.test_data(), params=s.params, collections=s.collections, label_names=job.label_names
            )
        return self.reports[step]  # fmt: skip


def _selected(job: Job, result: engine.FitResult) -> tuple[str, int]:
    """The best validation checkpoint when a best metric is tracked, else the final state."""
    if result.best_step is not None:
        return "best_validation", int(result.best_step)
    return "final", int(jax.device_get(result.state.step))


def _best_eval(evals: list[dict], metric: str, mode: str) -> dict | None:
    rows = [e for e in evals if metric in e["metrics"]]
    if not rows:
        return None
    pick = (max if mode == "max" else min)(rows, key=lambda e: e["metrics"][metric])
    return {"metric": metric, "value": pick["metrics"][metric], "step": pick["step"], "phase": pick["phase"]}


def _timing(result: engine.FitResult, batch_size: int) -> dict:
    steps = sum(h.end - h.start for h in result.history)
    seconds = sum(h.step_seconds * (h.end - h.start) for h in result.history)
    return {
        "train_steps_this_run": steps,
        "train_examples_per_second": steps * batch_size / seconds if seconds else None,
        "compile_seconds": sum(h.compile_seconds for h in result.history),
    }


def _nan_none(values) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, float)]


def _export(job: Job, state, workdir: Path) -> None:
    """The selected model as an HF folder (+ tokenizer, + how inputs were preprocessed) for load_pretrained and
    experiments.predict."""
    if jax.process_index() != 0:
        return
    params, collections = jax.device_get((state.params, state.collections))
    folder = tm.save_pretrained(workdir / EXPORT, job.loaded, params=params, state=collections,
                                label_names=job.label_names, overwrite=True)  # fmt: skip
    if isinstance(job.inputs, TextInputs):
        job.inputs.batcher.tokenizer.save_pretrained(folder)
    (folder / DATA_FILE).write_text(json.dumps(job.inputs.describe(), indent=1))


def versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers")
    return {"tljax": tljax.__version__, **{n: md.version(n) for n in names}}


def flat_summary(results: Mapping) -> str:
    """The lines the job prints at the end."""
    lines = []
    if results.get("mode") == "probe":
        p = results["probe"]
        return (f"linear probe on layer {p['layer']} ({p['pooling']}, {p['feature_dim']} features), l2 {p['l2']:g}: "
                f"test_accuracy {results['test_accuracy']:.4f}")  # fmt: skip
    for p in results["phases"]:
        val, test = p["validation"] or {}, p["test"] or {}
        lines.append(
            f"phase {p['name']:<10} steps {p['start']}-{p['end']:<6} trainable {p['trainable_params']:>12,} / "
            f"{p['total_params']:,}   val acc {val.get('accuracy', float('nan')):.4f}   "
            f"test acc {test.get('accuracy', float('nan')):.4f}"
        )
    if results["test_accuracy"] is not None:
        lines.append(f"test_accuracy {results['test_accuracy']:.4f} ({results['selected']['which']} model, step "
                     f"{results['selected']['step']})")  # fmt: skip
    return "\n".join(lines)
