"""The main job: fine-tune a pretrained model on a dataset with a freezing schedule and report test accuracy.

    python -m experiments.finetune                                              # the embedded default, offline
    python -m experiments.finetune --config experiments/configs/fashion_mnist_resnet.py --workdir runs/fm
    python -m experiments.finetune --config.data.train_size=20000 --config.schedule.args.ft_steps=600

Configs are Python files returning an ml_collections ConfigDict (`get_config(arg)`, `file.py:arg` passes arg);
`--config.<key>=<value>` overrides any key and unknown keys are errors. The work directory (default
runs/<config name>) receives config.json, metrics.jsonl, tensorboard/, evals.json, checkpoints/, export/ and
results.json; rerunning a finished one prints its results, rerunning an interrupted one resumes it.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/default.py", "Config file (py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (default: runs/<config name>).")
_CACHE = flags.DEFINE_string(
    "compilation_cache", "~/.cache/tljax/jax", "JAX's persistent compilation cache ('' : off): reruns skip compiling."
)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from tljax import job

    quiet_logs()
    if _CACHE.value:
        from tljax import engine

        engine.enable_compilation_cache(os.path.expanduser(_CACHE.value))
    config = _CONFIG.value
    workdir = _WORKDIR.value or f"runs/{config.name or 'finetune'}"
    print(f"config {flags.FLAGS['config'].config_filename} -> {workdir}", flush=True)
    results = job.run(config, workdir)
    print(job.flat_summary(results))
    keys = ("test_accuracy", "test_accuracy_by_phase", "best_validation", "wall_seconds", "train_examples_per_second")
    print(json.dumps({k: results[k] for k in keys if k in results}))
    return 0


def quiet_logs() -> None:
    """tljax's own INFO lines (plan, compile times, resume) on stderr; other libraries (orbax) at WARNING."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    ours = logging.getLogger("tljax")
    ours.setLevel(logging.INFO)
    ours.addHandler(handler)
    ours.propagate = False


def run(argv=None) -> None:
    app.run(main, argv=argv)


if __name__ == "__main__":
    run(sys.argv)
