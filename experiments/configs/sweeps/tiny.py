"""A tiny sweep for tests and notebooks: linear probe vs full fine-tuning x 2 seeds, 3 steps each on 64 WordNet
definitions truncated at 16 tokens. Only the mechanics are meaningful, not the accuracies.

    python -m experiments.sweep --config experiments/configs/sweeps/tiny.py --workdir /tmp/tiny_sweep
    python -m experiments.sweep --config experiments/configs/sweeps/tiny.py:/path/to/model --workdir /tmp/tiny_sweep

The argument is the model (a folder or hub id; default: the default job's offline MiniLM). With the 2-layer test
BERT (tests/test_sweep.py) a run takes about 20 s on 2 CPU cores, most of it compiling, and a second seed a few
seconds with the compilation cache.
"""

from tljax import sweep

TINY_DATA = {"data.train_size": 64, "data.validation_size": 48, "data.test_size": 40, "data.batch_size": 16,
             "data.eval_batch_size": 32, "data.max_length": 16, "data.buckets": [16], "data.eval_buckets": [16],
             "data.group_by_length": False}  # fmt: skip


def get_config(arg=None):
    model = {"model.name": arg} if arg else {}
    return sweep.config(
        name="tiny",
        base="experiments/configs/default.py",
        overrides={**model, **TINY_DATA},
        axes={
            "schedule": {
                "linear_probe": {"schedule.name": "linear_probe", "schedule.args": {"steps": 3, "lr": 1e-2}},
                "full": {"schedule.name": "full", "schedule.args": {"steps": 3, "lr": 1e-3}},
            },
            "seed": [0, 1],
        },
    )
