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
    python -m experiments.bench peer              # tljax vs PyTorch + transformers, same checkpoint, batch, AdamW
    python -m experiments.bench mfu               # peak matmul FLOP/s, XLA's step FLOPs vs 6*N*tokens, MFU
    python -m experiments.bench memory            # peak memory and largest batch: full vs top-3 vs head-only
    python -m experiments.bench scaling           # examples/s at 1, 2, 4, 8 devices, data parallel and FSDP
    python -m experiments.bench profile           # a traced step's time by kind (matmul, elementwise, ...) and source

Each benchmark is a module of this package with `run(quick: bool) -> list[dict]`; its docstring says what it
measures. A module with its own flags defines `add_arguments(parser)` and takes them as keyword arguments of `run`
(`python -m experiments.bench peer --help` lists them). `fsdp` runs on 8 fake CPU devices unless XLA_FLAGS already
sets a device count (on an accelerator host: its devices).
"""

from __future__ import annotations

import argparse
import importlib
import os

BENCHMARKS = (
    "freeze", "schedule", "fsdp", "pipeline", "probe_cache", "vmap_seeds", "prefix_cache", "peft",
    "peer", "mfu", "memory", "scaling", "profile",
)  # fmt: skip
_WITH_FLAGS = ("peer", "mfu", "memory", "scaling", "profile")  # modules with `add_arguments(parser)`


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False
    )
    parser.add_argument("-h", "--help", action="store_true", help="this help, or a benchmark's own flags")
    parser.add_argument("benchmark", nargs="?", choices=BENCHMARKS)
    parser.add_argument("--quick", action="store_true", help="tiny random model, a few seconds")
    args, rest = parser.parse_known_args(argv)
    if args.benchmark is None or (args.help and args.benchmark not in _WITH_FLAGS):
        parser.print_help()
        return 0 if args.help else 2
    if args.benchmark == "fsdp" and "device_count" not in os.environ.get("XLA_FLAGS", ""):
        # before the first device query: JAX reads XLA_FLAGS when it creates the CPU backend
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    module = importlib.import_module(f"experiments.bench.{args.benchmark}")
    if args.benchmark not in _WITH_FLAGS:
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        module.run(args.quick)
        return 0
    own = argparse.ArgumentParser(prog=f"python -m experiments.bench {args.benchmark}", description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    module.add_arguments(own)
    module.run(args.quick, **vars(own.parse_args(rest + (["--help"] if args.help else []))))
    return 0
