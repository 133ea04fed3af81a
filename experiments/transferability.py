"""Rank what to transfer before fine-tuning: LogME, H-score (and LEEP / NCE with a source classifier) of every
candidate's frozen features on the target's train split, checked against the accuracy a linear probe reaches.

    python -m experiments.transferability --target wordnet_lexnames                 # MiniLM-L6, 6 layers x 2 poolings
    python -m experiments.transferability --target wordnet_lexnames --layers 1,3,5 --poolings mean --source ""
    python -m experiments.transferability --checkpoints sentence-transformers/all-MiniLM-L6-v2,bert-base-uncased
    python -m experiments.transferability --finetuned runs/sweeps/depth     # + the accuracy fine-tuning reaches

Candidates are (checkpoint, layer, pooling) triples: every block's output of every checkpoint (`--layers all`),
pooled each way `--poolings` lists; one forward pass per split and checkpoint serves every layer
(`features.extract_many`) and features are cached on disk (`--cache_dir`). Checkpoints are hub ids or folders,
resolved like the fine-tuning job's `model.name` (the default MiniLM id loads the offline package's copy).

Source classifier for LEEP / NCE. MiniLM has no classification head, so by default each candidate gets a source
head trained on another task: a linear probe (L2 chosen on the source's validation split) on the same candidate's
features of `--source` (default `wordnet_examples`: usage sentences of the same 26 kinds of synsets, another input
domain), whose probabilities on the target rows are theta(x). A checkpoint that carries its own head (a folder
written by `save_pretrained` after fine-tuning) also gets `leep_head` / `nce_head` from that head. `--source ""`
turns the probe head off.

Real transfer: per candidate, L2 logistic regression (`probes.logistic_regression`, strength chosen on validation)
on the target train features, accuracy on the test split; the JSON holds Kendall's tau and Spearman's rho of each
score against it. The stronger check is the accuracy fine-tuning reaches from each layer: `--finetuned DIR` reads a
sweep of the fine-tuning job over `model.num_layers` (the checkpoint cut after block k, e.g.
experiments/configs/sweeps/depth.py), averages its test accuracy over seeds per (checkpoint, layer, pooling), and
ranks the candidates it covers against it (the probe accuracy included as one more predictor). Data settings (max
length, eval batch size) are the default job's (experiments/configs/default.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import scipy.stats


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.transferability", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="wordnet_lexnames", help="registered data source to transfer to")
    p.add_argument("--checkpoints", type=lambda t: t.split(","), default=None,
                   help="comma-separated hub ids or folders (default: the default job's MiniLM-L6)")  # fmt: skip
    p.add_argument("--layers", default="all", help="'all' or comma-separated block indices (negative: from the top)")
    p.add_argument("--poolings", type=lambda t: t.split(","), default=["mean", "cls"], help="e.g. mean,cls")
    p.add_argument("--source", default="wordnet_examples", help="source task of the LEEP/NCE probe head ('': none)")
    p.add_argument("--train_size", type=int, default=3000, help="target train examples (stratified; 0: all)")
    p.add_argument("--validation_size", type=int, default=1000, help="target (and source) validation examples")
    p.add_argument("--test_size", type=int, default=2000, help="target test examples for the probe accuracy")
    p.add_argument("--source_train_size", type=int, default=3000, help="source train examples for the probe head")
    p.add_argument("--accuracy", choices=("probe", "none"), default="probe", help="measure real transfer or not")
    p.add_argument("--finetuned", type=lambda t: t.split(","), default=[],
                   help="comma-separated sweep work directories of fine-tuning runs over model.num_layers")  # fmt: skip
    p.add_argument("--out", default=None, help="JSON file (default: runs/transferability/<target>.json)")
    p.add_argument("--cache_dir", default="runs/transferability/features", help="feature cache folder")
    p.add_argument("--seed", type=int, default=0, help="subsampling seed")
    return p.parse_args(argv)


SCORE_KEYS = ("logme", "h_score", "h_score_shrunk", "leep", "nce", "leep_head", "nce_head")


# --- data and model, through the default job's helpers ---


def data_config(target: str, sizes: dict, seed: int):
    """The default job's data section pointed at `target`'s splits (validation carved from train if it has none)."""
    from experiments.configs import default
    from tljax.data import sources

    if target not in sources.SOURCES:
        raise ValueError(f"unknown target {target!r}; registered sources: {sorted(sources.SOURCES)}")
    splits = sources.SOURCES[target].splits
    d = default.get_config().data
    d.train = f"{target}:train"
    d.validation = f"{target}:validation" if "validation" in splits else ""
    d.test = f"{target}:test" if "test" in splits else ""
    d.train_size, d.validation_size, d.test_size, d.seed = sizes["train"], sizes["validation"], sizes["test"], seed
    d.kshot = 0
    return d


def load_checkpoint(name: str):
    """(loaded, folder) of a checkpoint with whatever head it carries (none for a plain backbone)."""
    import tljax.models as tm
    from tljax.job.build import model_folder
    from tljax.models import hub

    return tm.load_pretrained(model_folder(name)), str(hub.resolve(model_folder(name)))


def batches(inputs, split, batch_size: int):
    from tljax import data

    return data.EvalData(inputs.eval_order(split), batch_size=batch_size, **inputs.eval_kwargs())


def cached_layers(loaded, batches_fn, specs, *, cache_dir, data_key: str, checkpoint: str) -> list:
    """`features.cached_extract` for several (layer, pooling) specs: cached ones are read, the rest come from one
    `extract_many` pass (not one pass per layer)."""
    from tljax import features

    module, _ = features.backbone_of(loaded)
    dtype = str(jnp.dtype(getattr(module, "dtype", jnp.float32)))
    specs = [(features.resolve_layer(loaded, layer), pooling) for layer, pooling in specs]
    parts = [features.cache_parts(checkpoint, layer, pooling, data_key, dtype) for layer, pooling in specs]
    paths = [features.cache_path(cache_dir, p) for p in parts]
    found = [features.load_cached(p) for p in paths]
    out = [f if meta == p else None for (f, meta), p in zip(found, parts, strict=True)]
    missing = [i for i, f in enumerate(out) if f is None]
    if missing:
        fresh = features.extract_many(loaded, batches_fn(), [specs[i] for i in missing])
        for i, f in zip(missing, fresh, strict=True):
            features.save_features(paths[i], f, parts[i])
            out[i] = f
    return out


# --- scoring ---


def parse_layers(text: str, blocks: int) -> list[int]:
    if text == "all":
        return list(range(blocks))
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--layers takes 'all' or comma-separated ints, got {text!r}") from None


def source_head_probs(source_train, source_val, target) -> np.ndarray:
    """theta(x) on the target rows from a linear probe trained on the source task's features of the same candidate,
    as (N, source classes) probabilities."""
    from tljax import probes

    return probes.logistic_regression(source_train, source_val).predict_proba(target)


def candidate_row(name: str, feats: dict, head_probs, src: dict | None, accuracy: bool = True) -> dict:
    """Scores and probe accuracy of one candidate (`feats`: its target splits; `src`: its source splits)."""
    from tljax import probes, transferability

    t = time.perf_counter()
    train = feats["train"]
    theta = source_head_probs(src["train"], src["validation"], train) if src else None
    row = {"candidate": name, "layer": train.layer, "pooling": train.pooling, "dims": int(train.x.shape[1]),
           **transferability.scores(train.x, train.labels, theta)}  # fmt: skip
    if head_probs is not None:
        row["leep_head"] = transferability.leep(head_probs, train.labels)
        row["nce_head"] = transferability.nce(head_probs.argmax(1), train.labels)
    row["score_seconds"] = time.perf_counter() - t
    if "test" in feats and accuracy:
        probe = probes.logistic_regression(train, feats["validation"])
        row.update(probe_accuracy=probe.accuracy(feats["test"]), probe_l2=probe.hparams["l2"],
                   probe_val_accuracy=max(probe.val_accuracy.values()))  # fmt: skip
    return row


def checkpoint_rows(name: str, target_cfg, source_splits, args: argparse.Namespace) -> list[dict]:
    """Every candidate of one checkpoint: features of all splits in one pass each, then scores per candidate."""
    from tljax import evaluation, features
    from tljax.job.build import load_splits, make_inputs
    from tljax.models.heads import WithHead

    splits = vars(load_splits(target_cfg))
    loaded, folder = load_checkpoint(name)
    inputs = make_inputs(loaded, folder, splits["train"].kind, target_cfg, splits["train"].num_classes)
    layers = parse_layers(args.layers, features.num_blocks(loaded))
    specs = [(features.resolve_layer(loaded, layer), pooling) for layer in layers for pooling in args.poolings]
    if len(set(specs)) < len(specs):
        raise ValueError(f"--layers/--poolings name a candidate twice ({specs}): -1 and the last index are one block")
    checkpoint = features.checkpoint_id(*features.backbone_of(loaded))
    described = json.dumps(inputs.describe(), sort_keys=True)

    def extract(split):
        key = f"{split.name}|{described}"
        return cached_layers(loaded, lambda: batches(inputs, split, target_cfg.eval_batch_size), specs,
                             cache_dir=args.cache_dir, data_key=key, checkpoint=checkpoint)  # fmt: skip

    target = {k: extract(s) for k, s in splits.items() if s is not None}
    source = {k: extract(s) for k, s in source_splits.items()} if source_splits else None
    head = None
    if isinstance(loaded.model, WithHead):  # the checkpoint's own classifier, for leep_head / nce_head
        head = evaluation.predict(loaded, batches(inputs, splits["train"], target_cfg.eval_batch_size)()).probs
    rows = []
    for i, (layer, pooling) in enumerate(specs):
        label = f"{name}/layer{layer}/{pooling}"
        one = {k: v[i] for k, v in target.items()}
        src = {k: v[i] for k, v in source.items()} if source else None
        rows.append(candidate_row(label, one, head, src, accuracy=args.accuracy == "probe"))
        rows[-1].update(checkpoint=name, blocks=features.num_blocks(loaded))
        print(format_row(rows[-1]), flush=True)
    return rows


def load_source(spec: str, train_size: int, val_size: int, seed: int) -> dict | None:
    """The source task's train and validation splits (the probe head's data), or None for `--source ""`."""
    from tljax.job.build import load_splits

    if not spec:
        return None
    s = load_splits(data_config(spec, {"train": train_size, "validation": val_size, "test": 0}, seed))
    return {"train": s.train, "validation": s.validation}


# --- report ---


def rank_agreement(score: Mapping[str, float], accuracy: Mapping[str, float]) -> dict[str, float]:
    """Kendall's tau (tau-b) and Spearman's rho, with their p-values, between a score and the accuracy real transfer
    reaches, over the candidates both name (they must name the same ones, at least 3, with finite values)."""
    if set(score) != set(accuracy):
        differ = sorted(set(score) ^ set(accuracy))
        raise ValueError(f"score and accuracy must cover the same candidates; they differ on {differ}")
    names = sorted(score)
    a, b = np.array([score[k] for k in names], float), np.array([accuracy[k] for k in names], float)
    if len(names) < 3 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        got = {k: (score[k], accuracy[k]) for k in names}
        raise ValueError(f"rank agreement needs >= 3 candidates with finite values, got (score, accuracy) {got}")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        raise ValueError("a constant score or accuracy has no ranking: the correlation is undefined")
    tau, rho = scipy.stats.kendalltau(a, b), scipy.stats.spearmanr(a, b)
    return {"kendall_tau": float(tau.statistic), "kendall_p": float(tau.pvalue),
            "spearman_rho": float(rho.statistic), "spearman_p": float(rho.pvalue)}  # fmt: skip


def agreement(rows: list[dict], accuracy: str = "probe_accuracy", predictors: tuple = SCORE_KEYS) -> dict:
    """Kendall's tau / Spearman's rho of each predictor (the scores) against `accuracy`, over the candidates that
    have it."""
    rows = [r for r in rows if accuracy in r]
    if len(rows) < 3:
        return {}  # a ranking of fewer than 3 candidates says nothing
    acc = {r["candidate"]: r[accuracy] for r in rows}
    present = [k for k in predictors if all(k in r for r in rows)]
    return {k: rank_agreement({r["candidate"]: r[k] for r in rows}, acc) for k in present}


def finetuned_accuracies(workdirs, target: str, metric: str = "test_accuracy") -> dict[tuple, list[float]]:
    """{(checkpoint, layer, pooling): [metric of each finished run]} from sweeps of the fine-tuning job; layer is the
    top kept block (`model.num_layers` - 1; None where the run kept all blocks). Runs on another target are an
    error, failed / unfinished / stale runs are left out (the sweep's report lists them)."""
    from tljax import sweep

    out: dict[tuple, list[float]] = {}
    for workdir in workdirs:
        for run in sweep.read_runs(workdir):
            if run.results is None or run.stale or run.value(metric) is None:
                continue
            config = run.results["config"]
            source = config["data"]["train"].partition(":")[0]
            if source != target:
                raise ValueError(f"{run.folder} fine-tunes on {source!r}, not the target {target!r}")
            model = config["model"]
            if not model.get("pooling"):
                raise ValueError(f"{run.folder}: model.pooling is unset; name it so the run matches a candidate")
            key = (model["name"], model["num_layers"] - 1 if model.get("num_layers") else None, model["pooling"])
            out.setdefault(key, []).append(run.value(metric))
    if not out:
        raise ValueError(f"no finished fine-tuning run in {list(workdirs)} (run the sweep first)")
    return out


def add_finetuned(rows: list[dict], found: Mapping[tuple, list[float]]) -> int:
    """Adds `finetuned_accuracy` (mean over seeds), `finetuned_std` and `finetuned_runs` to the candidates a run
    matches; returns how many matched."""
    matched = 0
    for r in rows:
        keys = [(r["checkpoint"], r["layer"], r["pooling"])]
        keys += [(r["checkpoint"], None, r["pooling"])] if r["layer"] == r["blocks"] - 1 else []  # all blocks kept
        scores = [v for k in keys for v in found.get(k, [])]
        if scores:
            r.update(finetuned_accuracy=float(np.mean(scores)), finetuned_runs=len(scores),
                     finetuned_std=float(np.std(scores, ddof=1)) if len(scores) > 1 else None)  # fmt: skip
            matched += 1
    return matched


def format_row(r: dict) -> str:
    cells = [f"{r.get(k, float('nan')):>9.4f}" for k in SCORE_KEYS[:5]]
    acc = " ".join("" if r.get(k) is None else format(r[k], "9.4f") for k in ("probe_accuracy", "finetuned_accuracy"))
    return f"{r['candidate']:<58} {' '.join(cells)} {acc}".rstrip()


def format_table(rows: list[dict], agree: dict, agree_finetuned: dict | None = None) -> str:
    head = f"{'candidate (by LogME)':<58} " + " ".join(f"{k:>9}" for k in SCORE_KEYS[:5]) + f" {'probe_acc':>9}"
    head += f" {'ft_acc':>9}" if agree_finetuned else ""
    lines = [head] + [format_row(r) for r in sorted(rows, key=lambda r: -r["logme"])]
    for what, table in (("probe", agree), ("fine-tuned", agree_finetuned or {})):
        for k, a in table.items():
            lines.append(f"{k:<15} vs {what} accuracy: Kendall tau {a['kendall_tau']:+.3f} (p {a['kendall_p']:.3f}), "
                         f"Spearman rho {a['spearman_rho']:+.3f} (p {a['spearman_p']:.3f})")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    from tljax import engine
    from tljax.assets import MINILM_HUB_ID

    t0 = time.perf_counter()
    sizes = {"train": args.train_size, "validation": args.validation_size, "test": args.test_size}
    target_cfg = data_config(args.target, sizes, args.seed)
    source = load_source(args.source, args.source_train_size, args.validation_size, args.seed)
    rows = []
    for name in args.checkpoints or [MINILM_HUB_ID]:
        rows += checkpoint_rows(name, target_cfg, source, args)
    agree, agree_ft = agreement(rows), {}
    if args.finetuned:
        found = finetuned_accuracies(args.finetuned, args.target)
        if add_finetuned(rows, found) < 3:
            candidates = sorted({(r["checkpoint"], r["layer"], r["pooling"]) for r in rows})
            raise ValueError(f"fewer than 3 candidates have fine-tuned runs: the runs cover (checkpoint, top block, "
                             f"pooling) {sorted(found, key=str)}; the candidates are {candidates}")  # fmt: skip
        agree_ft = agreement(rows, "finetuned_accuracy", SCORE_KEYS + ("probe_accuracy",))
    print(format_table(rows, agree, agree_ft))
    out = Path(args.out or f"runs/transferability/{args.target}.json")
    report = {"target": args.target, "source": args.source or None, "sizes": sizes,
              "source_train_size": args.source_train_size, "seed": args.seed, "candidates": rows,
              "agreement_with_probe_accuracy": agree, "finetuned": args.finetuned,
              "agreement_with_finetuned_accuracy": agree_ft, "wall_seconds": time.perf_counter() - t0}  # fmt: skip
    engine.write_json_atomic(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
