"""Few-shot and zero-shot classification: N-way K-shot episodes over frozen features, mean accuracy +- 95% CI.

    python -m experiments.fewshot --config experiments/configs/fewshot.py:text
    python -m experiments.fewshot --config experiments/configs/fewshot.py:text --config.fewshot.episodes=100

The config is a `tljax.job` config in mode "probe" plus a `fewshot` section (experiments/configs/fewshot.py says
each key). The job's features of train / validation / test are extracted once and cached in
<workdir>/features (`tljax.job.untrained.probe_features`), so a rerun only redraws episodes. Writes
<workdir>/results.json: per K, per classifier {"mean", "ci95", "std", "episodes"}; the text zero-shot accuracy
(whole split and on the episodes); the support-set fine-tunes when asked for.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from absl import app

from experiments import cli

TRANSFORMS = ("cl2n", "l2n", "none")


def transformed(source, train, how: str) -> np.ndarray:
    """The episode source's features after the configured transform (CL2N centres on the train features' mean)."""
    from tljax import fewshot

    if how not in TRANSFORMS:
        raise ValueError(f"fewshot.transform must be one of {TRANSFORMS}, got {how!r}")
    if how == "none":
        return source.x
    return fewshot.simpleshot(source.x, center=train.x.mean(0) if how == "cl2n" else None)


def label_of(spec: dict) -> str:
    """`prototype(metric=euclidean)`: a classifier dict as a table row name."""
    options = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return f"{spec['name']}({options})" if options else spec["name"]


def episode_sets(cfg, labels: np.ndarray) -> tuple[dict, np.ndarray]:
    """{K: Episodes} drawn from one class pool: the classes with enough rows for the largest K, so every K sees
    the same classes. Each K gets its own seed (cfg.seed + K)."""
    from tljax import fewshot

    pool = fewshot.classes_with(labels, max(cfg.shots) + cfg.n_query)
    sets = {int(k): fewshot.episodes(labels, cfg.n_way, int(k), cfg.n_query, cfg.episodes, cfg.seed + int(k),
                                     classes=pool) for k in cfg.shots}  # fmt: skip
    return sets, pool


def frozen_results(classifiers, x: np.ndarray, sets: dict) -> dict:
    """{"<K>shot": {classifier label: summary + seconds + per-episode accuracies}} over precomputed features."""
    from tljax import fewshot

    out = {}
    for k, eps in sets.items():
        row = out[f"{k}shot"] = {}
        for spec in classifiers:
            spec = dict(spec)
            t0 = time.perf_counter()
            accs = fewshot.evaluate(x, eps, spec["name"], **{o: v for o, v in spec.items() if o != "name"})
            row[label_of(spec)] = {**fewshot.summary(accs), "seconds": time.perf_counter() - t0,
                                   "accuracies": [float(a) for a in accs]}  # fmt: skip
    return out


def text_zero_shot(job, source, sets: dict) -> dict:
    """Class-name zero-shot with the job's encoder: accuracy over the whole source split, and on each K's episodes
    (restricted to the episode's classes, queries only: the 0-shot point of the same table)."""
    from tljax import fewshot, probes
    from tljax import text_zero_shot as tzs
    from tljax.job import model_folder
    from tljax.models import load_tokenizer

    if job.splits.train.kind != "text":
        raise ValueError(
            "fewshot.text_zero_shot needs text data; CLIP's zero-shot is experiments/configs/clip_zero_shot.py"
        )
    names = list(job.config.zero_shot.class_names or tzs.label_words(job.label_names))
    if len(names) != len(job.label_names):
        raise ValueError(f"zero_shot.class_names has {len(names)} names for {len(job.label_names)} classes")
    templates = list(job.config.zero_shot.templates or tzs.TEMPLATES)
    tokenizer = load_tokenizer(model_folder(job.config.model.name))
    # The class prompts pooled like the texts (probe.pooling / probe.layer): scores compare like with like.
    classes = tzs.class_embeddings(job.loaded, tokenizer, names, templates, max_length=job.config.data.max_length,
                                   pooling=source.pooling, layer=source.layer)  # fmt: skip
    scores = tzs.scores(source.x, classes)
    return {
        "class_names": names,
        "templates": templates,
        "accuracy": probes.accuracy(scores.argmax(-1), source),
        "classes": len(names),
        "episodes": {f"{k}shot": fewshot.summary(fewshot.evaluate_scores(scores, eps)) for k, eps in sets.items()},
    }


def finetune_episode(job, model, ordered, eps, e: int, cfg) -> float:
    """Query accuracy after `engine.fit` trains `model` (an N-way head on the job's backbone) with the configured
    schedule on episode `e`'s support set only; nothing is written to disk."""
    import jax

    from tljax import data, engine, evaluation, freezing

    def split(rows, name):  # episode labels 0..N-1 in the episode's class order
        return data.label_subset(ordered.take(rows, f"episode{e}-{name}"), [int(c) for c in eps.classes[e]])

    support, query = split(eps.support[e], "support"), split(eps.query[e], "query")
    batch = cfg.batch_size or len(support)
    train = data.TrainData(support, batch_size=batch, seed=e, **job.inputs.train_kwargs(support))
    schedule = freezing.get(cfg.schedule, model, **dict(cfg.args))
    # A support set (N x K rows) rarely splits evenly over the devices: train it on as many as divide the batch.
    devices = math.gcd(batch, jax.device_count())
    config = engine.EngineConfig(workdir=None, progress=False, tensorboard=False, seed=e, log_every=10**6,
                                 optimizer=dict(job.config.optimizer), devices=devices)  # fmt: skip
    result = engine.fit(model, schedule, train, config, loss_fn=job.loss_fn)
    queries = data.EvalData(query, batch_size=job.config.data.eval_batch_size, **job.inputs.eval_kwargs())
    metrics = evaluation.evaluate(model, queries(), params=result.state.params, collections=result.state.collections)
    return float(metrics["accuracy"])


def finetune_results(job, source_split, sets: dict, cfg) -> dict:
    """The first `cfg.episodes` episodes of each K, fine-tuned on their support sets (a fresh N-way head each)."""
    from tljax import fewshot
    from tljax.job.build import load_model

    model = load_model(job.config.model, len(next(iter(sets.values())).classes[0]), job.config.seed)
    ordered = job.inputs.eval_order(source_split)  # the row order of the extracted features
    out = {}
    for k, eps in sets.items():
        t0 = time.perf_counter()
        accs = [finetune_episode(job, model, ordered, eps, e, cfg) for e in range(min(cfg.episodes, len(eps)))]
        out[f"{k}shot"] = {**fewshot.summary(accs), "seconds": time.perf_counter() - t0,
                           "schedule": cfg.schedule, "args": dict(cfg.args), "accuracies": accs}  # fmt: skip
    return out


def frozen_on_finetuned(frozen: dict, finetuned: dict) -> dict:
    """{"<K>shot": {classifier label: summary}} of the frozen classifiers on the episodes that were fine-tuned (the
    first ones): the paired baseline, as fine-tuning runs on a handful of episodes only."""
    from tljax import fewshot

    return {k: {label: fewshot.summary(r["accuracies"][: ft["episodes"]]) for label, r in frozen[k].items()}
            for k, ft in finetuned.items()}  # fmt: skip


def run(config, workdir: str | Path) -> dict:
    """Features (cached), episodes, classifiers, zero-shot, fine-tunes -> results dict (also results.json)."""
    from tljax import engine, job
    from tljax.job.untrained import probe_features

    t0 = time.perf_counter()
    cfg, workdir = config.fewshot, Path(workdir)
    built = job.build(config, str(workdir))
    feats = probe_features(built, workdir)
    if cfg.split not in feats:
        raise ValueError(f"fewshot.split {cfg.split!r} is not one of the job's splits {sorted(feats)}")
    source = feats[cfg.split]
    sets, pool = episode_sets(cfg, source.labels)
    names = built.label_names
    results = {
        "protocol": {"split": cfg.split, "n_way": cfg.n_way, "n_query": cfg.n_query, "episodes": cfg.episodes,
                     "seed": cfg.seed, "transform": cfg.transform, "rows": len(source),
                     "feature_dim": int(source.x.shape[1]), "classes": [names[c] for c in pool],
                     "left_out": [n for i, n in enumerate(names) if i not in set(pool.tolist())]},
        "fewshot": frozen_results(cfg.classifiers, transformed(source, feats["train"], cfg.transform), sets),
    }  # fmt: skip
    if cfg.text_zero_shot:
        results["zero_shot"] = text_zero_shot(built, source, sets)
    if cfg.finetune.episodes:
        results["finetune"] = finetune_results(built, getattr(built.splits, cfg.split), sets, cfg.finetune)
        results["frozen_on_finetuned_episodes"] = frozen_on_finetuned(results["fewshot"], results["finetune"])
    results["wall_seconds"] = time.perf_counter() - t0
    results["config"] = job.resolved(config)
    engine.write_json_atomic(workdir / "results.json", results)
    return results


def table(results: dict) -> str:
    """Markdown rows: method x K, mean +- 95% CI."""
    p = results["protocol"]
    shots = list(results["fewshot"])
    n = p["episodes"]
    head = f"| {p['n_way']}-way ({p['episodes']} episodes, {p['n_query']} queries/class) | " + " | ".join(shots) + " |"
    lines = [head, "|" + "---|" * (len(shots) + 1)]
    fmt = lambda s: f"{s['mean']:.4f} ± {s['ci95']:.4f}" + ("" if s["episodes"] == n else f" (n={s['episodes']})")
    rows = {m: [results["fewshot"][k][m] for k in shots] for m in results["fewshot"][shots[0]]}
    if "finetune" in results:
        rows[f"fine-tune ({results['finetune'][shots[0]]['schedule']})"] = [results["finetune"][k] for k in shots]
        same = results["frozen_on_finetuned_episodes"]
        first = next(iter(same[shots[0]]))
        rows[f"{first}, the fine-tuned episodes"] = [same[k][first] for k in shots]
    if "zero_shot" in results:
        rows["zero-shot (class names, same episodes)"] = [results["zero_shot"]["episodes"][k] for k in shots]
    lines += [f"| {m} | " + " | ".join(fmt(s) for s in cells) + " |" for m, cells in rows.items()]
    if "zero_shot" in results:
        z = results["zero_shot"]
        lines.append(f"\nzero-shot over the whole split ({z['classes']} classes): accuracy {z['accuracy']:.4f}")
    return "\n".join(lines)


def main(argv) -> int:
    config, workdir = cli.start(argv, "fewshot")
    results = run(config, workdir)
    print(table(results))
    print(json.dumps({"wall_seconds": results["wall_seconds"]}))
    return 0


if __name__ == "__main__":
    cli.define_flags("experiments/configs/fewshot.py")
    app.run(main, argv=sys.argv, flags_parser=cli.parse_flags)
