"""Jobs that train no schedule: the linear-probe protocol on cached frozen features (mode "probe") and CLIP's
zero-shot classifier from class-name prompts (mode "zero_shot"). Both write results.json like the fine-tuning job."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from tljax import data, features, probes, zero_shot
from tljax.job.build import Job, model_folder
from tljax.job.run import common_fields, test_fields


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
        "wall_seconds": setup_seconds + time.perf_counter() - t0,
        **common_fields(job),
    }  # fmt: skip


def zero_shot_prompts(job: Job) -> tuple[list[str], list[str]]:
    """(class names, templates) of the `zero_shot` section: [] means the data's label names / `TEMPLATES`."""
    cfg = job.config.get("zero_shot") or {}
    names = list(cfg.get("class_names") or job.label_names)
    if len(names) != len(job.label_names):
        raise ValueError(
            f"zero_shot.class_names has {len(names)} names but the data has {len(job.label_names)} classes "
            f"{list(job.label_names)[:8]}: give one name per class, in label order"
        )
    return names, list(cfg.get("templates") or zero_shot.TEMPLATES)


def run_zero_shot(job: Job, workdir: Path, setup_seconds: float) -> dict:
    """CLIP's zero-shot protocol: class embeddings from prompts (templates x class names, ensembled), the validation
    and test splits scored against them; nothing is trained (the job's classification head is unused)."""
    t0 = time.perf_counter()
    names, templates = zero_shot_prompts(job)
    tokenizer = zero_shot.load_tokenizer(model_folder(job.config.model.name))
    weights = zero_shot.class_embeddings(job.loaded, tokenizer, names, templates)
    score = lambda d: zero_shot.zero_shot_evaluate(job.loaded, weights, d(), label_names=job.label_names)
    val, test = score(job.eval_data), score(job.test_data) if job.test_data else None
    _, variables = zero_shot.text_tower(job.loaded)
    return {
        "test_accuracy": test.metrics["accuracy"] if test else None,
        "test": test.metrics if test else None,
        "test_accuracy_by_phase": {"zero_shot": test.metrics["accuracy"] if test else None},  # one phase, untrained
        "mode": "zero_shot",
        "zero_shot": {"templates": templates, "class_names": names, "embedding_dim": int(weights.shape[1]),
                      "logit_scale": float(np.exp(variables["params"]["logit_scale"]))},
        "validation": val.metrics,
        "best_validation": {"metric": "accuracy", "value": val.metrics["accuracy"]},  # one model: nothing selected
        **test_fields(job, test),
        "train_examples_per_second": None,  # nothing is trained
        "wall_seconds": setup_seconds + time.perf_counter() - t0,
        **common_fields(job),
    }  # fmt: skip
