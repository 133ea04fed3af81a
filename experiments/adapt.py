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
import sys
from pathlib import Path

from absl import app

from experiments import cli


def run_seed(config, seed: int, workdir: Path) -> dict:
    from tljax.adaptation import job

    saved = workdir / "results.json"
    if saved.is_file():
        print(f"seed {seed}: finished, reading {saved}", flush=True)
        return json.loads(saved.read_text())
    config = config.copy_and_resolve_references()
    config.seed = seed
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
    app.run(main, sys.argv)
