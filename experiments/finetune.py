"""The main job: fine-tune a pretrained model on a dataset with a freezing schedule and report test accuracy.

    python -m experiments.finetune                                              # the embedded default, offline
    python -m experiments.finetune --config experiments/configs/fashion_mnist_resnet.py --workdir runs/fm
    python -m experiments.finetune --config.data.train_size=20000 --config.schedule.args.ft_steps=600

Configs are Python files returning an ml_collections ConfigDict (`get_config(arg)`, `file.py:arg` passes arg);
`--config.<key>=<value>` overrides any key and unknown keys are errors. The work directory (default
runs/<config name>) receives config.json, metrics.jsonl, tensorboard/, evals.json, checkpoints/, export/ and
results.json; rerunning a finished one prints its results, rerunning an interrupted one resumes it. List-valued
keys are tuples: `--config.data.classes='(0,1)'` (or the flag repeated); `--config.data.text_column=sentence` names a
file's text column.
"""

from __future__ import annotations

import json
import sys

from absl import app

from experiments import cli

DEFAULT_CONFIG = "experiments/configs/default.py"


def main(argv) -> int:
    from tljax import job

    config, workdir = cli.start(argv, "finetune")
    results = job.run(config, workdir)
    print(job.flat_summary(results))
    keys = ("test_accuracy", "test_accuracy_by_phase", "best_validation", "wall_seconds", "train_examples_per_second")
    print(json.dumps({k: results[k] for k in keys if k in results}))
    return 0


if __name__ == "__main__":
    cli.define_flags(DEFAULT_CONFIG)
    app.run(main, argv=sys.argv, flags_parser=cli.parse_flags)
