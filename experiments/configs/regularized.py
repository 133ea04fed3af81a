"""Full fine-tuning of the default task (MiniLM-L6 on WordNet noun definitions) with a regulariser toward the
pretrained model, picked by the argument; the rest is the default job's, with the schedule ablation's full
fine-tuning (230 steps, cosine peak 1e-4) and no weight decay (decoupled decay would pull toward zero, not w0).

    python -m experiments.finetune --config experiments/configs/regularized.py           # L2-SP
    python -m experiments.finetune --config experiments/configs/regularized.py:delta     # DELTA (block outputs)
    python -m experiments.finetune --config experiments/configs/regularized.py --config.engine.regularizer.alpha=0.1

Strengths: L2-SP alpha 0.01 / beta 0.01 (Li et al. 2018's range for fine-tuning), DELTA alpha 0.01 on every block's
output (the distance is averaged over tokens, so alpha does not scale with sequence length). Not tuned here.
"""

from experiments.configs.default import get_config as default_config

REGULARIZERS = {
    "l2_sp": {"name": "l2_sp", "alpha": 0.01, "beta": 0.01},
    "delta": {"name": "delta", "alpha": 0.01},
}


def get_config(arg=None):
    name = arg or "l2_sp"
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regulariser config {name!r}; choose one of {sorted(REGULARIZERS)}")
    c = default_config()
    c.name = f"minilm_wordnet_full_{name}"
    c.engine.regularizer.update(REGULARIZERS[name])
    c.optimizer.weight_decay = 0.0
    c.schedule.name = "full"
    c.schedule.args = {"steps": 230, "lr": {"schedule": "cosine", "peak": 1e-4, "warmup_steps": 20}}
    return c
