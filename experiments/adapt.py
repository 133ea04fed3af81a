"""Domain adaptation on a domain-shift pair: source-only, DANN, MMD or CORAL, over seeds; target test accuracy.

    python -m experiments.adapt --config experiments/configs/adapt.py:dann                 # seeds 0,1,2
    python -m experiments.adapt --config experiments/configs/adapt.py:mmd --seeds 0 --workdir runs/mmd0
    python -m experiments.adapt --config experiments/configs/adapt.py:coral,wordnet --config.adapt.weight=10

Each seed trains in <workdir>/seed_<s>/ (default workdir runs/<config name>) and writes its results.json there; a
seed whose results.json exists is read, not retrained. <workdir>/results.json holds the mean and std over seeds of
the target and source test accuracies, and every seed's results.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/adapt.py", "Config file (py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (default: runs/<config name>).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds to run (config.seed is set to each).")
_CACHE = flags.DEFINE_string(
    "compilation_cache", "~/.cache/tljax/jax", "JAX's persistent compilation cache ('' : off): reruns skip compiling."
)


def run_seed(config, seed: int, workdir: Path) -> dict:
    from tljax.adaptation import job

    saved = workdir / "results.json"
    if saved.is_file():
        print(f"seed {seed}: finished, reading {saved}", flush=True)
        return json.loads(saved.read_text())
    config = config.copy_and_resolve_references()
    config.seed = seed
    return job.run(config, workdir)


def quiet_logs() -> None:
    """tljax's INFO lines (plan, compile times) on stderr, other libraries at WARNING (as experiments.finetune)."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    ours = logging.getLogger("tljax")
    ours.setLevel(logging.INFO)
    ours.addHandler(handler)
    ours.propagate = False


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from tljax import engine
    from tljax.adaptation import job

    quiet_logs()
    if _CACHE.value:
        engine.enable_compilation_cache(os.path.expanduser(_CACHE.value))
    config = _CONFIG.value
    job.check_config(config)
    try:
        seeds = [int(s) for s in _SEEDS.value]
    except ValueError:
        raise app.UsageError(f"--seeds takes integers, got {_SEEDS.value}") from None
    workdir = Path(_WORKDIR.value or f"runs/{config.name}")
    runs = []
    for seed in seeds:
        result = run_seed(config, seed, workdir / f"seed_{seed}")
        print(f"seed {seed}: target {result['target_test_accuracy']:.4f} source {result['source_test_accuracy']:.4f}")
        runs.append(result)
    summary = job.summarize(runs)
    engine.write_json_atomic(workdir / "results.json", summary)
    t, s = summary["target_test_accuracy"], summary["source_test_accuracy"]
    print(f"{config.name}: target {t['mean']:.4f} ± {t['std']:.4f}, source {s['mean']:.4f} ± {s['std']:.4f} "
          f"over seeds {seeds}")  # fmt: skip
    return 0


if __name__ == "__main__":
    app.run(main, sys.argv)
