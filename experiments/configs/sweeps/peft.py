"""PEFT methods against each other on the default text task (MiniLM-L6 on WordNet noun definitions, 26 classes): LoRA
ranks 4 / 8 / 16, Houlsby adapters, prompt tuning, BitFit, LP-FT and full fine-tuning, 3 seeds each, 230 steps.

    python -m experiments.sweep --config experiments/configs/sweeps/peft.py --workdir runs/sweeps/peft
    python -m experiments.sweep --config experiments/configs/sweeps/peft.py:1 --workdir runs/sweeps/peft   # 1 seed
    python -m experiments.sweep --config experiments/configs/sweeps/peft.py:seeds=1+2,methods=lora_r4+prompt \\
        --workdir runs/sweeps/peft_more   # chosen seeds and methods (a work directory holds one sweep config)

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
    """`peft.py:N` runs seeds 0..N-1 of every method (default 3); `peft.py:seeds=1+2,methods=lora_r4+adapter` the
    seeds and methods named (either key may be left out)."""
    seeds, methods = list(range(3)), list(METHODS)
    if arg and arg.isdigit():
        seeds = list(range(int(arg)))
    elif arg:
        for item in arg.split(","):
            key, _, value = item.partition("=")
            if key not in ("seeds", "methods") or not value:
                raise ValueError(f"peft.py:{arg}: expected N or seeds=A+B,methods=X+Y; got {item!r}")
            if key == "seeds":
                if not all(v.isdigit() for v in value.split("+")):
                    raise ValueError(f"peft.py:{arg}: seeds are non-negative integers joined by '+', got {value!r}")
                seeds = [int(v) for v in value.split("+")]
            else:
                methods = value.split("+")
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise ValueError(f"peft.py:{arg}: unknown methods {unknown}; known: {', '.join(METHODS)}")
    return sweep.config(
        name="peft",
        base="experiments/configs/default.py",
        overrides={"name": "peft_methods", "engine.eval_every": 50},
        axes={"method": {m: METHODS[m] for m in methods}, "seed": seeds},
        metric="test_accuracy",
    )
