"""Parameter-efficient transfer: LoRA, bottleneck adapters and prompt tuning woven into a loaded model.

    loaded = tm.load_pretrained(path, num_classes=26)
    lora = peft.apply(loaded, [peft.LoRA(rank=8, alpha=16)])
    part = partition.build(lora.params, rules.peft(lora), learning_rate=1e-3)   # factors + head train
    ...
    tm.save_pretrained(folder, lora, params=trained)        # LoRA merged: an ordinary HF folder

Schedules use the rule set "peft" (`freezing.peft`, `freezing.peft_then_full`); job configs set `model.peft`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from tljax.peft.adapters import Adapter
from tljax.peft.core import Method, Peft, added_paths, apply, methods_of, param_regex, trainable_count
from tljax.peft.export import merge
from tljax.peft.lora import LoRA
from tljax.peft.prompts import PromptTuning

METHODS: dict[str, type[Method]] = {"lora": LoRA, "adapter": Adapter, "prompt": PromptTuning}


def from_config(cfg: Mapping) -> Method:
    """A method from a dict such as {"method": "lora", "rank": 8, "alpha": 16, "targets": [...]}."""
    cfg = dict(cfg)
    kind = cfg.pop("method", None)
    if kind not in METHODS:
        raise ValueError(f"unknown PEFT method {kind!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[kind]
    fields = {f.name for f in dataclasses.fields(cls)} - {"modules"}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise ValueError(f"PEFT method {kind!r} has no option(s) {unknown}; its options: {sorted(fields)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


__all__ = ["METHODS", "Adapter", "LoRA", "Method", "Peft", "PromptTuning", "added_paths", "apply", "from_config",
           "merge", "methods_of", "param_regex", "trainable_count"]  # fmt: skip
