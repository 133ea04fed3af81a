"""Running a job: `run(config, workdir)` builds it, trains it with `engine.fit` (or runs an untrained mode), evaluates
the test split at the end of every phase and on the selected model, exports it and writes `results.json`."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np

import tljax
import tljax.models as tm
from tljax import engine, evaluation, prefix_cache, tree
from tljax.job.build import Job, TextInputs, build
from tljax.job.defaults import base_config

log = logging.getLogger("tljax")

RESULTS = "results.json"
CONFIG = "config.json"
EXPORT = "export"
DATA_FILE = "tljax_data.json"  # in the export: how inputs were preprocessed, for predict


def resolved(config) -> dict:
    """The config as plain data (what config.json and results.json record, and what a rerun is compared with)."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def run(config, workdir: str | os.PathLike, *, progress: bool = True) -> dict:
    """Trains, evaluates and exports; returns the results dict (also written to workdir/results.json).

    A workdir holding `results.json` of the same config returns it without training; one holding a run of another
    config (results or a checkpoint) is an error (use a new workdir); an interrupted one is resumed. An attempt of
    another config that saved nothing (rejected at its first step) is moved to workdir/attempts/<n>/.
    """
    workdir = Path(workdir)
    finished = finished_run(workdir, config)
    if finished is not None:
        log.info("%s is finished: reporting its results without training", workdir)
        return finished
    t0 = time.perf_counter()
    job = build(config, str(workdir))
    if not progress:
        job.engine_config = engine.EngineConfig(**{**vars(job.engine_config), "progress": False})
    write_config(workdir, config)
    log.info("data: %s; inputs: %s", job.splits.sizes(), job.inputs.describe())
    from tljax.job import untrained as modes  # probe / zero_shot: jobs that train no schedule

    untrained = {"probe": modes.run_probe, "zero_shot": modes.run_zero_shot}.get(config.get("mode", "finetune"))
    if untrained is not None:
        results = untrained(job, workdir, time.perf_counter() - t0)
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


def finished_run(workdir: Path, config) -> dict | None:
    """The results of a finished run of `config` in `workdir`, else None (nothing there, or a run to resume); a run
    of another config there is a ValueError naming the changed keys (shared by the adapt and multitask jobs)."""
    if (workdir / CONFIG).is_file():
        changed = config_changes(json.loads((workdir / CONFIG).read_text()), resolved(config))
        if changed and _holds_a_run(workdir):
            raise ValueError(
                f"{workdir} holds a run of another config ({', '.join(changed[:6])} differ): use a new --workdir, or "
                "delete it to start over"
            )
        if changed:
            _set_aside(workdir, changed)
    if (workdir / RESULTS).is_file():
        return json.loads((workdir / RESULTS).read_text())
    return None


ATTEMPTS = "attempts"
ATTEMPT_FILES = (CONFIG, "metrics.jsonl", engine.EvalLog.FILE, "tensorboard")  # what a run writes before its first save


def _holds_a_run(workdir: Path) -> bool:
    """Results or a saved checkpoint: something a rerun would report or resume. An attempt that stopped before its
    first checkpoint (a config rejected at the first step, a crash) holds neither."""
    checkpoints = workdir / "checkpoints"
    saved = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())  # orbax: one dir per step
    return saved or (workdir / RESULTS).is_file()


def _set_aside(workdir: Path, changed: list[str]) -> None:
    """Moves the files of an attempt that saved nothing to workdir/attempts/<n>/: the new run starts clean, and the
    failed attempt's config and logs are kept."""
    if jax.process_index() != 0:
        return
    earlier = [int(p.name) for p in (workdir / ATTEMPTS).glob("*") if p.name.isdigit()]
    target = workdir / ATTEMPTS / str(max(earlier, default=0) + 1)
    target.mkdir(parents=True)
    for name in ATTEMPT_FILES:
        if (workdir / name).exists():
            os.replace(workdir / name, target / name)
    log.warning("%s held an attempt of another config (%s differ) that saved no checkpoint: its files are moved to "
                "%s; starting over", workdir, ", ".join(changed[:6]), target)  # fmt: skip


def config_changes(saved: Mapping, current: Mapping) -> list[str]:
    """Dotted keys where `current` differs from a run's saved config. A key the saved config lacks is no change when
    `current` holds its default (`tljax.job.defaults`): the run predates the key, which was added doing nothing. The
    top-level `name` is a label, not a setting: a finished run read into another sweep under its name is that run."""
    old, new, defaults = _flat(saved), _flat(current), _flat(resolved(base_config()))
    keys = sorted((set(old) | set(new)) - LABELS)
    changed = [k for k in keys if old.get(k, _MISSING) != new.get(k, _MISSING)]
    return [k for k in changed if not (k not in old and k in defaults and new[k] == defaults[k])]


_MISSING = object()
LABELS = {"name"}  # config keys that change no result


def _flat(d: Mapping, prefix: str = "") -> dict:
    """Nested dicts -> {"a.b": leaf}; an empty dict is a leaf (a default like `options = {}`)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_config(workdir: Path, config) -> None:
    """config.json (resolved), before training: a checkpoint always has its config beside it."""
    if jax.process_index() == 0:
        engine.write_json_atomic(workdir / CONFIG, resolved(config))


def _report(job: Job, result: engine.FitResult, workdir: Path) -> dict:
    """Test evaluation per phase and of the selected model, the export, and the results dict."""
    tests = TestAt(job, result.plan, workdir)
    phases = _phases(job, result, tests)
    selected, step = _selected(job, result)
    test = tests.report(step) if job.test_data else None
    _export(job, tests.state(step), workdir)
    es = job.engine_config.early_stopping
    metric = es.metric if es else job.engine_config.checkpoint.best_metric or "accuracy"
    mode = es.mode if es else job.engine_config.checkpoint.best_mode
    best = _best_eval(result.evals, metric, mode, step if selected == "best_validation" else None)
    timing = _timing(result, job.train_data.batch_size)
    out = {
        "test_accuracy": test.metrics["accuracy"] if test else None,
        "test": test.metrics if test else None,
        "test_accuracy_by_phase": {p["name"]: (p["test"] or {}).get("accuracy") for p in phases},
        "selected": {"which": selected, "step": step},
        "status": result.status,
        "phases": phases,
        "best_validation": best,
        **test_fields(job, test),
        **timing,
        **common_fields(job),
    }  # fmt: skip
    return out


def _phases(job: Job, result: engine.FitResult, tests: TestAt) -> list[dict]:
    """Each phase as it ran: its actual end (an early-stopped phase ends where it stopped, `planned_end` is the
    plan's), its evaluation there and the test evaluation of the checkpoint there."""
    final, total = int(jax.device_get(result.state.step)), tree.count(job.loaded.params)
    evals = {e["step"]: e["metrics"] for e in result.evals}
    cache = job.engine_config.prefix_cache
    phases = []
    for p in result.plan.phases:
        end = max(p.start, min(p.stop, final))  # a phase after an early stop (none today) did not run: end = start
        validation = evals.get(end) if end > p.start else None
        test = tests.report(end).metrics if validation is not None and job.test_data else None
        cached = prefix_cache.cached_blocks(cache, job.loaded, p.partition)
        phases.append({"name": p.name, "start": p.start, "end": end, "planned_end": p.stop,
                       "trainable_params": p.partition.count("train"), "total_params": total,
                       "prefix_cached_blocks": cached, "validation": validation, "test": test})  # fmt: skip
    return phases


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


def _best_eval(evals: list[dict], metric: str, mode: str, step: int | None = None) -> dict | None:
    """The best evaluation by `metric`: the one at `step` (the selected checkpoint's) when given, else the best
    value with ties going to the latest step, the rule by which the checkpoint manager picks its best step."""
    rows = [e for e in evals if metric in e["metrics"]]
    at_step = [e for e in rows if e["step"] == step]
    finite = [e for e in rows if np.isfinite(e["metrics"][metric])]
    if not at_step and not finite:
        return None
    sign = 1.0 if mode == "max" else -1.0
    pick = at_step[0] if at_step else max(finite, key=lambda e: (sign * e["metrics"][metric], e["step"]))
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
    else:  # the statistics it was trained with: a transfer run loading this folder preprocesses the same way
        (folder / "preprocessor_config.json").write_text(json.dumps(job.inputs.preprocess.to_hf_config(), indent=1))
    (folder / DATA_FILE).write_text(json.dumps(job.inputs.describe(), indent=1))


def versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers")
    return {"tljax": tljax.__version__, **{n: md.version(n) for n in names}}


def devices() -> dict:
    """Where the run computed: the float reduction order, hence the last digits, depends on the device count."""
    d = jax.devices()[0]
    return {"platform": d.platform, "kind": d.device_kind, "count": jax.device_count(),
            "processes": jax.process_count()}  # fmt: skip


def flat_summary(results: Mapping) -> str:
    """The lines the job prints at the end."""
    lines = []
    if results.get("mode") == "probe":
        p = results["probe"]
        return (f"linear probe on layer {p['layer']} ({p['pooling']}, {p['feature_dim']} features), l2 {p['l2']:g}: "
                f"test_accuracy {results['test_accuracy']:.4f}")  # fmt: skip
    if results.get("mode") == "zero_shot":
        z, test = results["zero_shot"], results["test_accuracy"]
        return (f"zero-shot CLIP, {len(z['templates'])} templates x {len(z['class_names'])} classes: validation "
                f"accuracy {results['validation']['accuracy']:.4f}, test_accuracy "
                f"{'n/a' if test is None else format(test, '.4f')}")  # fmt: skip
    for p in results["phases"]:
        val, test = p["validation"] or {}, p["test"] or {}
        planned = p.get("planned_end", p["end"])  # results.json before planned_end: the plan's end
        lines.append(
            f"phase {p['name']:<10} steps {p['start']}-{p['end']:<6} trainable {p['trainable_params']:>12,} / "
            f"{p['total_params']:,}   val acc {val.get('accuracy', float('nan')):.4f}   "
            f"test acc {test.get('accuracy', float('nan')):.4f}"
            + (f"   stopped early (planned {p['start']}-{planned})" if planned != p["end"] else "")
        )
    if results["test_accuracy"] is not None:
        lines.append(f"test_accuracy {results['test_accuracy']:.4f} ({results['selected']['which']} model, step "
                     f"{results['selected']['step']})")  # fmt: skip
    return "\n".join(lines)


def common_fields(job: Job) -> dict:
    """What every mode's results.json records about the run: data, seed, config and library versions."""
    return {
        "data": {"sizes": job.splits.sizes(), "names": {k: v.name for k, v in vars(job.splits).items() if v},
                 "label_names": list(job.label_names), "inputs": job.inputs.describe()},
        "seed": job.config.seed,
        "config": resolved(job.config),
        "versions": versions(),
        "devices": devices(),
    }  # fmt: skip


def test_fields(job: Job, test: evaluation.EvalReport | None) -> dict:
    """Per-class test accuracy by name and the confusion matrix (rows: true class) of a test report."""
    if test is None:
        return {"per_class_test_accuracy": None, "confusion_matrix": None}
    per_class = dict(zip(job.label_names, _nan_none(test.per_class_accuracy), strict=True))
    confusion = test.confusion.tolist() if test.confusion is not None else None
    return {"per_class_test_accuracy": per_class, "confusion_matrix": confusion}
