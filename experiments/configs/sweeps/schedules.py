"""The freezing-schedule ablation on the default text task (MiniLM-L6 on WordNet noun definitions, 26 classes): full
fine-tuning, linear probe, LP-FT, gradual unfreezing, chain-thaw, layer-wise LR decay and BitFit, 3 seeds each.

    python -m experiments.sweep --config experiments/configs/sweeps/schedules.py --workdir runs/sweeps/schedules
    python -m experiments.sweep --config experiments/configs/sweeps/schedules.py:1 --workdir runs/sweeps/schedules

Budget: each schedule gets ~230 optimizer steps, the default job's (LP-FT: 80 probe + 150 fine-tuning steps), on
the default job's data (6,400 training definitions, batch 32); the rest of the default config is unchanged but for
a validation evaluation every 50 steps (curves in plots/validation_curves.png). 7 schedules x 3 seeds took 223
minutes of runs on a 2-core CPU (multi-stage schedules compile per stage: 17-20 min each); rerunning the command
resumes where it stopped. Result: README, "Sweeps and K seeds in one program".
Learning rates: the default job's (probe 1e-2, fine-tuning cosine peak 1e-4 with 20 warm-up steps); multi-stage
schedules take a constant 1e-4 per stage (a fresh cosine per 29-step stage would mostly warm up); BitFit 1e-3 (its
paper's range: biases move slowly). Not tuned per schedule: a tuned comparison sweeps their LRs too.
Expected (default job, README): linear probe ~0.71, LP-FT ~0.81 test accuracy; see summary.md for the rest.
"""

from tljax import sweep

FT_LR = {"schedule": "cosine", "peak": 1e-4, "warmup_steps": 20}  # the default job's fine-tuning LR
STEPS = 230  # = the default LP-FT's 80 + 150


def schedule(name: str, **args) -> dict:
    return {"schedule.name": name, "schedule.args": args}


SCHEDULES = {
    "full": schedule("full", steps=STEPS, lr=FT_LR),
    "linear_probe": schedule("linear_probe", steps=STEPS, lr=1e-2),
    "lp_ft": schedule("lp_ft", probe_steps=80, ft_steps=150, probe_lr=1e-2, ft_lr=FT_LR),
    # MiniLM-L6: head, top_1 ... top_6, all = 8 stages of 29 steps (232)
    "gradual_unfreeze": schedule("gradual_unfreeze", steps_per_stage=29, lr=1e-4),
    # head, stem, block 0 ... block 5 alone (8 x 15 steps), then everything for 110 steps (230)
    "chain_thaw": schedule("chain_thaw", steps_per_stage=15, lr=1e-4, final_steps=110),
    "llrd": schedule("llrd", steps=STEPS, decay=0.65, lr=FT_LR),
    "bitfit": schedule("bitfit", steps=STEPS, lr={"schedule": "cosine", "peak": 1e-3, "warmup_steps": 20}),
}


def get_config(arg=None):
    """`schedules.py:N` runs N seeds (default 3); the same work directory resumes with more seeds later."""
    seeds = list(range(int(arg) if arg else 3))
    return sweep.config(
        name="schedules",
        base="experiments/configs/default.py",
        overrides={"name": "schedule_ablation", "engine.eval_every": 50},  # validation curves: 5 points per run
        axes={"schedule": SCHEDULES, "seed": seeds},
        metric="test_accuracy",
    )
