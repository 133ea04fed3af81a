"""Multi-task MiniLM-L6 on two real offline WordNet tasks over one shared backbone, and its single-task baselines.

    python -m experiments.multitask --config experiments/configs/multitask.py:multi --seeds 0,1,2
    python -m experiments.multitask --config experiments/configs/multitask.py:single_lexnames --seeds 0,1,2
    python -m experiments.multitask --config experiments/configs/multitask.py:single_examples --seeds 0,1,2
    python -m experiments.multitask --config experiments/configs/multitask.py:uncertainty --seeds 0,1,2
    python -m experiments.multitask --config experiments/configs/multitask.py:multi_equal --seeds 0,1,2
    python -m experiments.multitask --config experiments/configs/multitask.py:single_lexnames_long --seeds 0,1,2

Tasks (26 noun lexicographer classes each, one head per task): `lexnames` = a noun synset's definition ->
its lexname (`wordnet_lexnames`, 8,000 training definitions subsampled, 600 test), `examples` = a usage sentence
of a noun synset -> its lexname (`wordnet_examples`, all 9,102 training sentences, 600 test; stratified
subsamples). Two input distributions, one question: does sharing the backbone with the other task help each?

Arguments: `multi` (both heads, rows mixed by temperature sampling T=2, fixed loss weights 1), `uncertainty` (the
same with learned loss weights, Kendall et al. 2018), `single_<task>` (one head, the same steps and batch size),
`multi_equal` / `uncertainty_equal` (twice the steps: `lexnames` sees 75%, `examples` 125% of its single-task rows),
`single_<task>_long` (one head, twice the steps: the second control, equal steps and compute to `multi_equal`).
Budget (30-60 s a run on a quiet 2-core AVX-512 CPU): batch 32, sequences cut at 32 tokens, 80 steps with the top 2
of 6 blocks (cosine, peak 3e-4, 8 warm-up steps) and the heads (10x that LR) training; the frozen bottom four
blocks make the backward pass cheap. Test accuracy (mean over seeds 0-2, README): multi lexnames 0.681, examples
0.294 (uncertainty: the same); single_lexnames 0.735; single_examples 0.319; multi_equal 0.756 and 0.361 (at 80
steps each task of the multi run sees about half the rows its single-task run sees, and loses; at about equal rows
it wins on both); single_lexnames_long 0.786, single_examples_long 0.395 (at equal steps single-task wins on both).
"""

import ml_collections

from tljax.assets import MINILM_HUB_ID

TASKS = {
    "lexnames": {
        "train": "wordnet_lexnames:train",
        "test": "wordnet_lexnames:test",
        "train_size": 8000,
        "test_size": 600,
    },
    "examples": {"train": "wordnet_examples:train", "test": "wordnet_examples:test", "train_size": 0, "test_size": 600},
}
ARGS = (
    "multi",
    "uncertainty",
    "multi_equal",
    "uncertainty_equal",
    *(f"single_{t}{s}" for t in TASKS for s in ("", "_long")),
)
STEPS = 80


def get_config(arg=None):
    arg = arg or "multi"
    if arg not in ARGS:
        raise ValueError(f"unknown multitask config {arg!r}; choose one of {ARGS}")
    c = ml_collections.ConfigDict()
    c.name = f"multitask_{arg}"
    c.seed = 0
    c.model = ml_collections.ConfigDict(
        {"name": MINILM_HUB_ID, "pooling": "mean", "head_hidden": 0, "head_dropout": 0.0}
    )
    chosen = [arg.removeprefix("single_").removesuffix("_long")] if arg.startswith("single_") else list(TASKS)
    c.tasks = ml_collections.ConfigDict({t: TASKS[t] for t in chosen})
    # rows per task: "explicit" (weights), "proportional" (to the training sizes) or "temperature" (n^(1/T))
    c.mixing = ml_collections.ConfigDict({"how": "temperature", "temperature": 2.0, "weights": {}})
    # "fixed" (weights, default 1 per task) or "uncertainty" (learned log-variances)
    weighting = "uncertainty" if arg.startswith("uncertainty") else "fixed"
    c.loss = ml_collections.ConfigDict({"weighting": weighting, "weights": {}})
    c.data = ml_collections.ConfigDict(
        {"batch_size": 32, "eval_batch_size": 128, "max_length": 32, "buckets": (16, 32), "eval_buckets": ()}
    )
    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "top2"
    c.schedule.phases = [
        {
            # _equal: each task's rows as if alone; _long: a single task for as many steps
            "steps": 2 * STEPS if arg.endswith(("_equal", "_long")) else STEPS,
            "name": "top2",
            "learning_rate": {"schedule": "cosine", "peak": 3e-4, "warmup_steps": 8},
            "rules": [
                [r"^head/", {"lr_mult": 10.0}],
                [r"^backbone/encoder/layer_(4|5)/", "train"],
                [r"^backbone/", "frozen"],
            ],
        },
    ]
    c.optimizer = ml_collections.ConfigDict({"weight_decay": 0.01})
    c.engine = ml_collections.ConfigDict({"log_every": 20, "progress": False, "tensorboard": False})
    return c
