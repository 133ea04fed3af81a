"""Runs a sweep of the fine-tuning job and reports it: a work directory per point, sweep.csv, summary.md, plots/.

    python -m experiments.sweep --config experiments/configs/sweeps/schedules.py --workdir runs/sweeps/schedules
    python -m experiments.sweep --config experiments/configs/sweeps/tiny.py:/path/to/model --workdir /tmp/tiny
    python -m experiments.sweep --config ... --parallel 2        # 2 `python -m experiments.finetune` at a time
    python -m experiments.sweep --config ... --shard 0/2         # this host of 2: points 0, 2, 4, ...
    python -m experiments.sweep --config ... --report_only       # CSV, summary and plots again from the run folders

Sweep configs: see tljax.sweep and experiments/configs/sweeps/. Rerunning the command resumes the sweep: finished
runs are reported without training, interrupted ones resume, failed ones are tried again. A failed run is retried
once, then the sweep goes on; the exit status is 1 if a run failed (or is stale: finished with another config).
--parallel N > 1 runs each point as its own process (mode subprocess) with this environment (XLA_FLAGS,
OMP_NUM_THREADS, ...): on a 2-core CPU one run already uses both cores, so parallel > 1 only helps when runs are
IO-bound. With --shard, run `--report_only` once every host is done.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from experiments.cli import positive_int


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="sweep config file (file.py or file.py:arg)")
    p.add_argument("--workdir", default=None, help="work directory (default: runs/sweeps/<sweep name>)")
    p.add_argument("--parallel", type=positive_int, default=1, help="runs at a time (> 1: one process per run)")
    p.add_argument("--mode", choices=("inprocess", "subprocess"), default=None,
                   help="default: inprocess, or subprocess when --parallel > 1")  # fmt: skip
    p.add_argument("--shard", type=shard, default=None, help="i/n: run points i, i+n, ... (one process per host)")
    p.add_argument("--report_only", action="store_true", help="only write sweep.csv, summary.md and plots/")
    p.add_argument("--compilation_cache", default="~/.cache/tljax/jax",
                   help="JAX's persistent compilation cache ('': off): seeds of a setting compile once")  # fmt: skip
    return p.parse_args(argv)


def shard(text: str) -> tuple[int, int]:
    from tljax import sweep

    try:
        return sweep.parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None) -> int:
    args = parse(argv)
    from experiments.cli import quiet_logs
    from tljax import sweep

    quiet_logs()  # each run's plan and compile times on stderr, as experiments.finetune prints them
    signal.signal(signal.SIGTERM, _stop)
    config = sweep.load_config(args.config)
    workdir = args.workdir or f"runs/sweeps/{config.get('name') or Path(args.config.partition(':')[0]).stem}"
    report = sweep.report(workdir) if args.report_only else run(args, config, workdir).report
    print(report.summary)
    print("\n".join(str(f) for f in report.files))
    return 1 if report.failed else 0


def _stop(signum, frame):
    """SIGTERM (a scheduler, `kill`): the runs in flight get it too (each saves a checkpoint), then the sweep exits;
    rerunning it resumes them."""
    from tljax.sweep import runner

    runner.stop_children(signum)
    raise SystemExit(f"stopped by signal {signum}: the runs in flight were told to save and stop; rerun to resume")


def run(args: argparse.Namespace, config, workdir: str):
    from tljax import engine, sweep

    cache = os.path.expanduser(args.compilation_cache)  # '' : off, here and in every subprocess
    mode = args.mode or ("subprocess" if args.parallel > 1 else "inprocess")
    if cache and mode == "inprocess":
        engine.enable_compilation_cache(cache)
    part = "/".join(map(str, args.shard)) if args.shard else "all"
    print(f"sweep {args.config} -> {workdir} ({mode}, parallel {args.parallel}, shard {part})", flush=True)
    echo = lambda line: print(line, flush=True)
    return sweep.run(config, workdir, parallel=args.parallel, mode=mode, shard=args.shard, compilation_cache=cache,
                     progress=mode == "inprocess", echo=echo)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
