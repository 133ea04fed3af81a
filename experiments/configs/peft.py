"""Parameter-efficient fine-tuning of the default task (MiniLM-L6 on WordNet noun definitions, 26 classes): one
config per method, picked by the argument; everything but the model's PEFT methods and the schedule is the default
job's (experiments/configs/default.py), with the same 230-step budget as its LP-FT.

    python -m experiments.finetune --config experiments/configs/peft.py            # LoRA r=8 on query/value
    python -m experiments.finetune --config experiments/configs/peft.py:lora_r16
    python -m experiments.finetune --config experiments/configs/peft.py:adapter    # Houlsby adapters, m=64
    python -m experiments.finetune --config experiments/configs/peft.py:pfeiffer   # one adapter per block, m=64
    python -m experiments.finetune --config experiments/configs/peft.py:prompt     # 20 soft prompt tokens
    python -m experiments.finetune --config experiments/configs/peft.py:lora_then_full   # LoRA 80 steps, then all

Learning rates (not tuned per method; a tuned comparison sweeps them): LoRA and adapters cosine peak 1e-3 with 20
warm-up steps (their papers use 1e-4 .. 1e-3; this budget is ~1 epoch), prompts 3e-2 (soft prompts need large
steps: Lester et al. use 0.3 with Adafactor). The head trains with the method at the same rate. The export merges
LoRA into the kernels (transformers loads it); adapters and prompts are saved beside the base weights.
"""

from experiments.configs.default import get_config as default_config

STEPS = 230  # the default LP-FT's 80 + 150
LR = {"schedule": "cosine", "peak": 1e-3, "warmup_steps": 20}

METHODS = {
    "lora": [{"method": "lora", "rank": 8, "alpha": 16}],
    "lora_r4": [{"method": "lora", "rank": 4, "alpha": 8}],
    "lora_r16": [{"method": "lora", "rank": 16, "alpha": 32}],
    "adapter": [{"method": "adapter", "size": 64, "style": "houlsby"}],
    "pfeiffer": [{"method": "adapter", "size": 64, "style": "pfeiffer"}],
    "prompt": [{"method": "prompt", "length": 20}],
    "lora_then_full": [{"method": "lora", "rank": 8, "alpha": 16}],
}


def schedule(method: str) -> tuple[str, dict]:
    if method == "lora_then_full":
        return "peft_then_full", {"peft_steps": 80, "ft_steps": 150, "peft_lr": 1e-3,
                                  "ft_lr": {"schedule": "cosine", "peak": 1e-4, "warmup_steps": 20}}  # fmt: skip
    lr = {**LR, "peak": 3e-2} if method == "prompt" else LR
    return "peft", {"steps": STEPS, "lr": lr}


def get_config(arg=None):
    method = arg or "lora"
    if method not in METHODS:
        raise ValueError(f"unknown PEFT config {method!r}; choose one of {sorted(METHODS)}")
    c = default_config()
    c.name = f"minilm_wordnet_{method}"
    c.model.peft = METHODS[method]
    c.schedule.name, c.schedule.args = schedule(method)
    return c
