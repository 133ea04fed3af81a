"""PEFT methods against each other on the default text task (MiniLM-L6 on WordNet noun definitions, 26 classes): LoRA
ranks 4 / 8 / 16, Houlsby adapters, prompt tuning, BitFit, LP-FT and full fine-tuning, 3 seeds each, 230 steps.

    python -m experiments.sweep --config experiments/configs/sweeps/peft.py --workdir runs/sweeps/peft
    python -m experiments.sweep --config experiments/configs/sweeps/peft.py:1 --workdir runs/sweeps/peft   # 1 seed

The PEFT points are experiments/configs/peft.py's configs; BitFit, LP-FT and full fine-tuning are those of the
schedule ablation (experiments/configs/sweeps/schedules.py), so the two tables share their rows. summary.md gives
mean ± std test accuracy, trainable parameters and seconds per run; plots/ accuracy vs trainable parameters.
"""

from experiments.configs import peft as peft_configs
from experiments.configs.sweeps.schedules import SCHEDULES
from tljax import sweep


def method(name: str) -> dict:
    schedule_name, args = peft_configs.schedule(name)
    return {"model.peft": peft_configs.METHODS[name], "schedule.name": schedule_name, "schedule.args": args}


METHODS = {
    "lora_r4": method("lora_r4"),
    "lora_r8": method("lora"),
    "lora_r16": method("lora_r16"),
    "adapter": method("adapter"),
    "prompt": method("prompt"),
    "bitfit": SCHEDULES["bitfit"],
    "lp_ft": SCHEDULES["lp_ft"],
    "full": SCHEDULES["full"],
}


def get_config(arg=None):
    """`peft.py:N` runs N seeds (default 3); the same work directory resumes with more seeds later."""
    seeds = list(range(int(arg) if arg else 3))
    return sweep.config(
        name="peft",
        base="experiments/configs/default.py",
        overrides={"name": "peft_methods", "engine.eval_every": 50},
        axes={"method": METHODS, "seed": seeds},
        metric="test_accuracy",
    )
