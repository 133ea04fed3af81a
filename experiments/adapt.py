"""Domain adaptation on a domain-shift pair: source-only, DANN, MMD or CORAL, over seeds; target test accuracy.

    python -m experiments.adapt --config experiments/configs/adapt.py:dann                 # seeds 0,1,2
    python -m experiments.adapt --config experiments/configs/adapt.py:mmd --seeds 0 --workdir runs/mmd0
    python -m experiments.adapt --config experiments/configs/adapt.py:coral,wordnet --config.adapt.weight=10

Each seed trains in <workdir>/seed_<s>/ (default workdir runs/<config name>), writing config.json first and
results.json at the end; a seed finished with the same config is read, not retrained, one interrupted (SIGTERM:
"preempted at step N", exit 1, no results.json) resumes when the command is rerun, and a seed dir holding a run of
another config is an error naming the changed keys (use a new --workdir). <workdir>/results.json holds the mean
and std over seeds of the target and source test accuracies, and every seed's results.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app

from experiments import cli


def run_seed(config, seed: int, workdir: Path) -> dict:
    """One seed in `workdir`: its results when a run of this config finished there, else trained (an interrupted
    run resumes; a run of another config there is a ValueError naming the changed keys)."""
    from tljax.adaptation import job

    config = config.copy_and_resolve_references()
    config.seed = seed
    finished = job.finished_results(workdir, config)
    if finished is not None:
        print(f"seed {seed}: finished, reading {workdir / 'results.json'}", flush=True)
        return finished
    return job.run(config, workdir)


def main(argv) -> int:
    from tljax import engine
    from tljax.adaptation import job

    config, workdir = cli.start(argv, "adapt")
    job.check_config(config)
    workdir, seeds = Path(workdir), cli.seeds(config.seed)
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
    cli.define_flags("experiments/configs/adapt.py", seeds=["0", "1", "2"])
    app.run(main, sys.argv, flags_parser=cli.parse_flags)
