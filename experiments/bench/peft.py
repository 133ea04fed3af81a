"""`peft`: memory and step time of full fine-tuning vs LoRA vs adapters vs head-only on the same model.

Each variant runs in its own process: load the model, weave the method in, compile the jitted train step, then (peak
RSS reset, so compilation is not counted) build the train state and run the step. Memory is reported three ways: the
process's peak RSS while training (on a GPU: the device's `peak_bytes_in_use`), its growth over the RSS before the
state was built (what training adds), and XLA's account of the compiled step (arguments + outputs not aliased +
temporaries: parameters, optimizer state, gradients and activations). `lora_over_full_memory` and
`lora_over_full_step` are LoRA's ratios to full fine-tuning; `..._remat` the same with gradient checkpointing of every
block (`remat="block"` on both sides): activations kept for the backward pass dominate both at 32 x 128, and LoRA
saves only what full fine-tuning spends on gradients and optimizer state unless they are recomputed.
`lora_remat_over_full_memory`: LoRA with remat (the memory-saving recipe) against full fine-tuning as it runs by
default. Steps compile as `engine.fit` compiles them (`parallel.compiler_options`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from experiments.bench.common import emit, reset_peak_rss, setup, status_mb, time_fn, tiny_bert_dir, xla_step_bytes

LORA = [{"method": "lora", "rank": 8, "alpha": 16}]
VARIANTS = {  # name: (PEFT methods, rule set, remat policy)
    "full": ([], "full", "none"),
    "lora_r8": (LORA, "peft", "none"),
    "adapter_64": ([{"method": "adapter", "size": 64}], "peft", "none"),
    "head_only": ([], "linear_probe", "none"),
    "full_remat": ([], "full", "block"),
    "lora_r8_remat": (LORA, "peft", "block"),
}


def measure(variant: str, quick: bool, folder: str | None = None) -> dict:
    """One variant in this process: its step time and memory (--quick: the tiny BERT in `folder`)."""
    from tljax import partition, peft, rules, task
    from tljax.parallel import compiler_options
    from tljax.step import init_state, make_train_step

    methods, rule_set, remat = VARIANTS[variant]
    loaded, batch, common = setup(quick, folder, remat=remat)
    if methods:
        loaded = peft.apply(loaded, [peft.from_config(m) for m in methods])
    unused = task.unused_params(loaded.model, loaded.params, batch)
    part = partition.build(loaded.params, rules.get(rule_set, loaded), learning_rate=1e-4, unused=unused)
    step = jax.jit(make_train_step(loaded.model, part), donate_argnums=0)
    fresh = lambda: init_state(jax.tree.map(jnp.copy, loaded.params), part.tx)  # the step donates its state
    compiled = step.lower(jax.eval_shape(fresh), batch).compile(compiler_options=compiler_options())
    jax.block_until_ready(loaded.params)
    reset_peak_rss()
    base_rss = status_mb("VmRSS")  # the process with the model loaded and the step compiled
    state = fresh()
    xla_bytes = xla_step_bytes(compiled)
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics["loss"]

    seconds = time_fn(run, reps=3 if quick else 5)
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    peak_rss = status_mb("VmHWM")  # since the reset: state, steps, activations
    return {
        "variant": variant, "remat": remat, "step_ms": 1e3 * seconds, "trainable_params": part.count(True),
        "peak_mb": stats["peak_bytes_in_use"] / 2**20 if stats else peak_rss, "peak_kind": "device" if stats else "rss",
        "train_mb": (stats["peak_bytes_in_use"] / 2**20) if stats else peak_rss - base_rss,
        "xla_step_mb": xla_bytes / 2**20, "opt_state_mb": partition.state_nbytes(holder["state"].opt_state) / 2**20,
        **common,
    }  # fmt: skip


def run(quick: bool) -> list[dict]:
    results = {}
    quick_args = ["--quick", tiny_bert_dir()] if quick else []  # one tiny checkpoint for every variant
    for variant in VARIANTS:
        cmd = [sys.executable, "-m", "experiments.bench.peft", variant, *quick_args]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
        results[variant] = r = json.loads(out.stdout.strip().splitlines()[-1])
    rows = []
    for variant, r in results.items():
        extra = {k: r[k] for k in ("model", "batch", "seq", "device", "trainable_params", "peak_kind", "remat")}
        for metric in ("step_ms", "peak_mb", "train_mb", "xla_step_mb", "opt_state_mb"):
            rows.append(emit(f"peft/{variant}", metric, round(r[metric], 3), **extra))
    for suffix in ("", "_remat"):
        full, lora = results["full" + suffix], results["lora_r8" + suffix]
        common = {k: full[k] for k in ("model", "batch", "seq", "device", "remat")}
        ratios = {"train_ratio": lora["train_mb"] / full["train_mb"],
                  "xla_ratio": lora["xla_step_mb"] / full["xla_step_mb"]}  # fmt: skip
        memory = lora["peak_mb"] / full["peak_mb"]
        rows.append(emit("peft/lora_r8", "lora_over_full_memory" + suffix, memory, target="<= 0.7", **ratios, **common))
        rows.append(emit("peft/lora_r8", "lora_over_full_step" + suffix, lora["step_ms"] / full["step_ms"], **common))
    # LoRA as a memory-saving recipe (with gradient checkpointing) against full fine-tuning as it runs by default
    full, lora = results["full"], results["lora_r8_remat"]
    common = {k: full[k] for k in ("model", "batch", "seq", "device")}
    rows.append(emit("peft/lora_r8_remat", "lora_remat_over_full_memory", lora["peak_mb"] / full["peak_mb"],
                     target="<= 0.7", train_ratio=lora["train_mb"] / full["train_mb"],
                     xla_ratio=lora["xla_step_mb"] / full["xla_step_mb"], **common))  # fmt: skip
    remat = results["full_remat"]["xla_step_mb"] / results["full"]["xla_step_mb"]
    rows.append(emit("peft/full", "remat_over_none_xla_memory", remat, **common))
    rows.append(emit("peft/full", "remat_over_none_step", results["full_remat"]["step_ms"] / results["full"]["step_ms"],
                     **common))  # fmt: skip
    return rows


if __name__ == "__main__":  # one variant, in its own process (run() starts these)
    _quick = "--quick" in sys.argv
    print(json.dumps(measure(sys.argv[1], _quick, sys.argv[sys.argv.index("--quick") + 1] if _quick else None)))
