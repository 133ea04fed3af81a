"""What the config-driven entry points (finetune, adapt, multitask, fewshot) share: their absl flags, quiet logs,
the compilation cache and the work directory.

Flags are defined when an entry point runs (`define_flags` under `if __name__ == "__main__"`), never at import:
absl keeps one global flag table, so two modules that each defined `--config` at import could not be imported into
one test process, notebook or sweep.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

CACHE_DEFAULT = "~/.cache/tljax/jax"


def define_flags(default_config: str, seeds: list[str] | None = None) -> None:
    """--config (a Python config file, `file.py:arg`, `--config.key=value` overrides), --workdir,
    --compilation_cache, --cpu_devices, and --seeds when `seeds` is given (its default; [] means the config's own
    seed)."""
    try:  # the default config is read now, with the --config.<key> overrides of sys.argv
        config_flags.DEFINE_config_file("config", default_config, "Config file (py); file.py:arg passes arg.")
    except (AttributeError, KeyError) as e:
        _exit_unknown_key(e, sys.argv)
    flags.DEFINE_string("workdir", None, "Work directory (default: runs/<config name>).")
    flags.DEFINE_string("compilation_cache", CACHE_DEFAULT, "JAX's persistent compilation cache ('' : off).")
    flags.DEFINE_string("cpu_devices", "", "Split the CPU into N devices ('auto': one per core) for data parallelism; "
                        "'' keeps JAX's default (XLA_FLAGS). No effect on GPU/TPU hosts.")  # fmt: skip
    names = ["config", "workdir", "compilation_cache", "cpu_devices"]
    if seeds is not None:
        flags.DEFINE_list("seeds", seeds, "Comma-separated seeds to run (config.seed is set to each).")
        names.append("seeds")
    for name in names:  # listed by --help as the entry point's own flags (absl files them under sys.argv[0])
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])


def parse_flags(argv: list[str]) -> list[str]:
    """`app.run`'s flags_parser: absl's, plus a clear exit for a `--config.<key>` override that names no key of the
    config (ml_collections raises a bare AttributeError from deep inside)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.")
    except (AttributeError, KeyError) as e:
        _exit_unknown_key(e, argv)


def _exit_unknown_key(error: Exception, argv: list[str]):
    leaf = str(error).strip("\"'")
    given = [a.split("=", 1)[0] for a in argv if a.startswith("--config.") and a.split("=", 1)[0].endswith(leaf)]
    sys.exit(
        f"{', '.join(given) or leaf}: the config has no key {leaf!r}. Check the spelling against the config file "
        "(the job's keys and defaults: tljax/job/defaults.py)"
    )


def positive_int(text: str) -> int:
    """An argparse `type` for counts (--top, --parallel): 0 or less is a usage error, not an empty result."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def start(argv, fallback_name: str):
    """Checks the command line, quiets the logs, turns the compilation cache on; returns (config, workdir)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    quiet_logs()
    if flags.FLAGS.cpu_devices:  # before anything starts JAX's backends
        from tljax import parallel

        try:
            parallel.use_cpu_devices(flags.FLAGS.cpu_devices)
        except ValueError as e:
            raise app.UsageError(f"--cpu_devices: {e}") from None
    cache = flags.FLAGS.compilation_cache
    if cache:
        from tljax import engine

        engine.enable_compilation_cache(os.path.expanduser(cache))
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or f"runs/{config.get('name') or fallback_name}"
    print(f"config {flags.FLAGS['config'].config_filename} -> {workdir}", flush=True)
    return config, workdir


def seeds(default: int) -> list[int]:
    """--seeds as integers; `default` (the config's seed) when the list is empty."""
    try:
        values = [int(s) for s in flags.FLAGS.seeds if s.strip()]
    except ValueError:
        raise app.UsageError(f"--seeds takes comma-separated integers, got {','.join(flags.FLAGS.seeds)}") from None
    return values or [default]


def quiet_logs() -> None:
    """tljax's own INFO lines (plan, compile times, resume) on stderr; other libraries (orbax) at WARNING."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    ours = logging.getLogger("tljax")
    ours.setLevel(logging.INFO)
    ours.propagate = False
    if not any(getattr(h, "tljax_cli", False) for h in ours.handlers):  # once, however often it is called
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler.tljax_cli = True
        ours.addHandler(handler)
