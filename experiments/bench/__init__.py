"""Benchmarks that print one JSON object per line (`{"name", "metric", "value", ...}`), ratios measured side by side
in one run.

    python -m experiments.bench freeze            # real MiniLM-L6, batch 32, seq 128 (CPU: a few minutes)
    python -m experiments.bench freeze --quick    # tiny random BERT, seconds
    python -m experiments.bench schedule          # gradual unfreezing: step and compile time per phase
    python -m experiments.bench fsdp              # bytes of params + optimizer state per device, data vs FSDP
    python -m experiments.bench pipeline          # input pipeline examples/s vs the train step's consumption
    python -m experiments.bench probe_cache       # linear probe on cached features vs recomputing the backbone
    python -m experiments.bench vmap_seeds        # 8 seeds of LP-FT as one vmapped program vs 8 engine.fit runs
    python -m experiments.bench prefix_cache      # top-1 / top-3 fine-tuning from cached frozen blocks vs full
    python -m experiments.bench peft              # memory and step time: full FT vs LoRA vs adapters vs head-only

Each benchmark is a module of this package with `run(quick: bool) -> list[dict]`; its docstring says what it
measures. `fsdp` runs on 8 fake CPU devices unless XLA_FLAGS already sets a device count (on an accelerator host:
its devices).
"""

from __future__ import annotations

import argparse
import importlib
import os

BENCHMARKS = ("freeze", "schedule", "fsdp", "pipeline", "probe_cache", "vmap_seeds", "prefix_cache", "peft")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=BENCHMARKS)
    parser.add_argument("--quick", action="store_true", help="tiny random model, a few seconds")
    args = parser.parse_args(argv)
    if args.benchmark == "fsdp" and "device_count" not in os.environ.get("XLA_FLAGS", ""):
        # before the first device query: JAX reads XLA_FLAGS when it creates the CPU backend
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    importlib.import_module(f"experiments.bench.{args.benchmark}").run(args.quick)
    return 0
