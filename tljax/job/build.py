"""Config -> objects: `build(config)` loads the model, opens the data sources and pipelines, resolves the freezing
schedule and the `EngineConfig`, without training (tests, notebooks and every mode of `tljax.job.run` start here).

Config sections (tljax/job/defaults.py lists every key with its default):
  model     name (hub id or folder), pooling, head_hidden, head_dropout, reinit, dtype, param_dtype, options,
            config (from scratch), peft (a list of tljax.peft method dicts)
  data      train / validation / test ("source:split"; validation and test in train's label space),
            text_column / label_column / label_names (options of file: sources), validation_fraction,
            train_size, validation_size,
            test_size, kshot, classes, batch_size, eval_batch_size, max_length, buckets, eval_buckets,
            group_by_length, image_size, augment, seed
  schedule  name + args (a built-in of `tljax.freezing`) or phases (a list of phase dicts)
  optimizer keyword arguments of `partition.build` (optimizer, weight_decay, clip_norm, ...)
  loss      label_smoothing
  engine    `EngineConfig` fields (parallel, eval_every, checkpoint, early_stopping, ...)
  seed, name
  mode      "finetune"; "probe" (linear probe on cached frozen features, section `probe`); "zero_shot" (CLIP's
            zero-shot classifier from class-name prompts, section `zero_shot`: templates, class_names)
  fewshot   N-way K-shot episodes over the probe features, read by experiments/fewshot.py (the job ignores it)
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import jax
import ml_collections
import numpy as np

import tljax.models as tm
from tljax import data, engine, freezing, peft
from tljax.assets import MINILM_HUB_ID, minilm_path
from tljax.data.records import Split
from tljax.data.splits import Relabelled
from tljax.losses import classification_loss
from tljax.models import hub

# fewshot: read by experiments/fewshot.py (episodes over this job's probe features)
SECTIONS = ("model", "data", "schedule", "optimizer", "loss", "engine", "seed", "name", "mode", "probe", "zero_shot",
            "fewshot")  # fmt: skip
MODES = ("finetune", "probe", "zero_shot")


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
    """Train, validation (carved from train when the source has none) and test splits, subsampled as asked.

    Validation and test are read in train's label space (before `classes` selects a subset): a file gets train's
    label names, another source's classes are mapped to train's by name, so either may lack a class of train."""
    seed = cfg.seed
    _check_file_keys(cfg)
    train = _load(cfg, "train", tuple(cfg.get("label_names") or ()) or None)
    names = train.label_names
    if cfg.get("classes"):
        train = data.label_subset(train, list(cfg.classes))
    if cfg.get("validation"):
        validation = _same_space(_load(cfg, "validation", names), train, cfg)
    else:
        train, validation = data.carve_validation(train, cfg.validation_fraction, seed)
    test = _same_space(_load(cfg, "test", names), train, cfg) if cfg.get("test") else None
    if cfg.get("kshot"):
        train = data.k_shot(train, cfg.kshot, seed)
    elif cfg.get("train_size"):
        train = data.subsample(train, min(cfg.train_size, len(train)), seed)
    if cfg.get("validation_size"):
        validation = data.subsample(validation, min(cfg.validation_size, len(validation)), seed)
    if test is not None and cfg.get("test_size"):
        test = data.subsample(test, min(cfg.test_size, len(test)), seed)
    _check_classes(train, cfg.train)
    return Splits(train, validation, test)


def _check_classes(train: Split, spec: str) -> None:
    """Training data of one class makes a classifier that is always right: a mistake (a label column, a subset)."""
    present = np.flatnonzero(train.class_counts())
    if len(present) < 2:
        names = [train.label_names[i] for i in present]
        raise ValueError(
            f"data.train ({spec}) has examples of {len(present)} class ({names}) after data.classes / kshot / "
            f"train_size: classification needs at least 2; check the label column (data.label_column) and the "
            "data (labels of one value?)"
        )


# data keys of `file:` sources -> their `tljax.data.files.text_file` defaults (label_names: train's file only)
FILE_KEYS = {"text_column": "text", "label_column": "label", "label_names": ()}


def _check_file_keys(cfg) -> None:
    """data.text_column / label_column / label_names are options of `file:` sources: set for none, a mistake."""
    for key, default in FILE_KEYS.items():
        value = cfg.get(key, default)
        splits = ("train",) if key == "label_names" else ("train", "validation", "test")
        specs = [cfg.get(k) or "" for k in splits]
        if value != default and not any(s.startswith("file:") for s in specs):
            raise ValueError(
                f"data.{key} {value!r} is an option of file: sources, but data.{' / data.'.join(splits)} "
                f"({', '.join(s for s in specs if s)}) is none: leave it at {default!r}"
            )


def _load(cfg, key: str, label_names: tuple[str, ...] | None = None) -> Split:
    """The split data.`key` names, in the label space `label_names` when given: a `file:` one read with the
    configured columns and those names, another mapped into them by class name."""
    spec = cfg[key]
    if not spec.startswith("file:"):
        split = data.load(spec)
        return split if label_names is None else _in_label_space(split, label_names)
    columns = {k: cfg.get(k, FILE_KEYS[k]) for k in ("text_column", "label_column")}
    try:
        return data.load(spec, **columns, **({} if label_names is None else {"label_names": label_names}))
    except data.DataFileError as e:
        raise _in_job_terms(e, key) from None


def _in_job_terms(error: data.DataFileError, key: str) -> data.DataFileError:
    """A file reader's error whose fix names `text_file` keywords ("pass text_column=") with the job's keys added."""
    named = [k for k in FILE_KEYS if f"{k}=" in str(error)]
    if not named:
        return error
    keys = ", ".join(f"--config.data.{k}" for k in named)
    return data.DataFileError(f"{error} (reading data.{key}; in the job: {keys})")


def _in_label_space(split: Split, names: tuple[str, ...]) -> Split:
    """`split` relabelled by class name into `names` (train's classes); a class that train lacks is an error."""
    if split.label_names == names:
        return split
    extra = [n for n in split.label_names if n not in names]
    if extra:
        raise ValueError(
            f"{split.name} has class(es) {extra[:8]} that the training data ({len(names)} classes: "
            f"{list(names)[:8]}) lacks: a model trained on train's classes cannot be evaluated on them; evaluate on "
            "data whose classes train covers"
        )
    remap = np.asarray([names.index(n) for n in split.label_names], np.int64)
    return Relabelled.of(split, remap, names)


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
        if not self.augment.random:  # deterministic: the same examples every epoch (a frozen prefix can be cached)
            return {"transform": self.preprocess}
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


def make_inputs(loaded, folder: str | None, kind: str, cfg, num_classes: int):
    """How records become batches; `folder` (None: a model from scratch) holds the tokenizer / image statistics."""
    if folder is None and kind == "text":
        raise ValueError("a text model trained from scratch (model.config) has no tokenizer folder; load a checkpoint")
    if kind == "text":
        tokenizer = tm.load_tokenizer(folder)
        fine = tuple(range(8, cfg.max_length, 8)) + (cfg.max_length,)
        return TextInputs(
            data.TextBatcher(tokenizer, cfg.max_length, tuple(cfg.get("buckets") or ())),
            data.TextBatcher(tokenizer, cfg.max_length, tuple(cfg.get("eval_buckets") or fine)),
            bool(cfg.get("group_by_length", False)),
        )
    overrides = {"size": cfg.image_size} if cfg.get("image_size") else {}
    if folder is None and not overrides:
        raise ValueError("a model trained from scratch (model.config) needs data.image_size")
    preprocess = (
        data.ImagePreprocess(**overrides)
        if folder is None
        else data.ImagePreprocess.from_pretrained(folder, **overrides)
    )
    augment = data.Augment(**dict(cfg.get("augment") or {}))
    return ImageInputs(preprocess, augment, num_classes)


def check_text_length(loaded, max_length: int) -> None:
    """The longest batch the job makes (data.max_length tokens) traced through the model (shapes only, nothing is
    computed): a length beyond its position table fails now, not at the first evaluation after training."""
    batch = {k: jax.ShapeDtypeStruct((1, max_length), np.int32) for k in ("input_ids", "attention_mask")}
    try:
        jax.eval_shape(lambda variables, b: loaded.model.apply(variables, **b), loaded.variables, batch)
    except ValueError as e:
        raise ValueError(
            f"data.max_length {max_length} does not fit the model: {e}. Set --config.data.max_length to at most "
            "that limit (and data.buckets / data.eval_buckets to end there)"
        ) from None


def load_model(cfg, num_classes: int, seed: int = 0):
    """The checkpoint `cfg.name` names, or with `cfg.config` (an HF config dict) a model trained from scratch."""
    head = tm.ClassificationHead(num_classes, hidden=cfg.get("head_hidden", 0), dropout=cfg.get("head_dropout", 0.0))
    common = dict(head=head, pooling=cfg.get("pooling"), dtype=cfg.get("dtype", "float32"),
                  param_dtype=cfg.get("param_dtype"), **dict(cfg.get("options") or {}))  # fmt: skip
    if from_scratch(cfg):
        if cfg.get("name") or cfg.get("reinit") or cfg.get("num_layers"):
            raise ValueError(
                "model.config trains a model from scratch: leave model.name, model.reinit and model.num_layers empty "
                "(depth is model.config's num_hidden_layers), or drop model.config to load a checkpoint"
            )
        return with_peft(tm.from_config(_plain(cfg.config), seed=seed, **common), cfg, seed)
    if not cfg.get("name"):
        raise ValueError("set model.name (a hub id or checkpoint folder) or model.config (an HF config dict)")
    loaded = tm.load_pretrained(model_folder(cfg.name), reinit=list(cfg.get("reinit") or []), seed=seed,
                                num_layers=cfg.get("num_layers") or None, **common)  # fmt: skip
    return with_peft(loaded, cfg, seed)


def with_peft(loaded, cfg, seed: int):
    """The PEFT methods `model.peft` lists (dicts such as {"method": "lora", "rank": 8}) woven into the model."""
    methods = _plain(cfg.get("peft") or [])
    if isinstance(methods, dict):
        raise ValueError(f"model.peft takes a list of method dicts, got one dict; wrap it: [{methods}]")
    return peft.apply(loaded, [peft.from_config(m) for m in methods], seed=seed) if methods else loaded


def from_scratch(cfg) -> bool:
    return bool(cfg.get("config"))


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
    if not (values.get("prefix_cache") or {}).get("min_blocks"):
        values["prefix_cache"] = None
    else:
        values["prefix_cache"] = {k: v or None for k, v in values["prefix_cache"].items()}  # "" -> None
    values["regularizer"] = _regularizer(values.get("regularizer") or {})
    values.update(workdir=workdir, seed=config.seed, steps_per_epoch=steps_per_epoch,
                  optimizer=dict(config.get("optimizer", {})))  # fmt: skip
    return engine.EngineConfig.from_config(values)


def eval_metric_names(num_classes: int) -> tuple[str, ...]:
    """The metrics every evaluation of the job gives (`evaluation.report_from_sums` with the engine's top-5, at most
    the number of classes), which early stopping and the best checkpoint may watch."""
    return ("loss", "accuracy", f"top{min(5, num_classes)}_accuracy", "macro_f1", "balanced_accuracy", "ece")


def check_selection_metrics(engine_cfg, num_classes: int) -> None:
    """engine.checkpoint.best_metric and engine.early_stopping.metric (when on) name evaluation metrics: a typo
    fails now, naming its key, not at the first evaluation."""
    keys = {"engine.checkpoint.best_metric": engine_cfg.get("checkpoint", {}).get("best_metric")}
    if engine_cfg.get("early_stopping", {}).get("patience"):
        keys["engine.early_stopping.metric"] = engine_cfg.early_stopping.get("metric")
    valid = eval_metric_names(num_classes)
    for key, metric in keys.items():
        if metric and metric not in valid:
            raise ValueError(f"{key} {metric!r} is not an evaluation metric; evaluation gives {list(valid)}")


REGULARIZER_KEYS = {"l2_sp": ("alpha", "beta", "rules"), "delta": ("alpha", "layers", "channel_weights")}


def _regularizer(cfg: dict) -> dict | None:
    """The engine section's regularizer: name "" is off; each name takes its own keys of the shared section (a
    config file may also give l2_sp `rules` or delta `channel_weights`); `layers` [] means every block."""
    if not cfg.get("name"):
        return None
    keys = REGULARIZER_KEYS.get(cfg["name"], tuple(cfg))  # an unknown name: the library's error names the choices
    out = {"name": cfg["name"], **{k: v for k, v in cfg.items() if k in keys}}
    if out.get("layers"):
        out["layers"] = list(out["layers"])  # a tuple in the config (settable on the command line)
    else:
        out.pop("layers", None)
    if "rules" in out:
        out.pop("alpha", None), out.pop("beta", None)
    return out


def build(config, workdir: str | None = None) -> Job:
    """Resolves `config` into a `Job` (model loaded, data sources opened, schedule resolved), without training."""
    check_config(config)
    d = config.data
    splits = load_splits(d)
    classes = splits.train.num_classes
    loaded = load_model(config.model, classes, config.seed)
    folder = None if from_scratch(config.model) else str(hub.resolve(model_folder(config.model.name)))
    inputs = make_inputs(loaded, folder, splits.train.kind, d, classes)
    if isinstance(inputs, TextInputs):
        check_text_length(loaded, d.max_length)
    train_data = data.TrainData(splits.train, batch_size=d.batch_size, seed=d.get("seed", config.seed),
                                **inputs.train_kwargs(splits.train))  # fmt: skip
    evaluated = lambda split: data.EvalData(inputs.eval_order(split), batch_size=d.eval_batch_size,
                                            **inputs.eval_kwargs())  # fmt: skip
    eval_data = evaluated(splits.validation)
    test_data = evaluated(splits.test) if splits.test is not None else None
    engine_config = make_engine_config(config, workdir, train_data.steps_per_epoch)
    schedule = None  # the probe mode trains no schedule
    if config.get("mode", "finetune") == "finetune":
        check_selection_metrics(config.engine, classes)
        schedule = make_schedule(config.schedule, loaded)
        freezing.resolve(schedule, loaded, steps_per_epoch=train_data.steps_per_epoch, **engine_config.optimizer)
    smoothing = config.get("loss", {}).get("label_smoothing", 0.0)
    loss_fn = functools.partial(classification_loss, label_smoothing=smoothing) if smoothing else classification_loss
    return Job(config, loaded, splits, inputs, train_data, eval_data, test_data, schedule, engine_config, loss_fn)


# ---- running -------------------------------------------------------------------------------------------------------
