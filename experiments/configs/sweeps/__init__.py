"""Sweep configs: Python modules with `get_config(arg=None)` returning `tljax.sweep.config(...)`: a base job config,
overrides for every run, and axes (values of one key, or named variants of several) crossed into runs.

    python -m experiments.sweep --config experiments/configs/sweeps/schedules.py

Each module's docstring holds the command that runs it, what it costs and what it should show. `point.py` is no
sweep: it is the job config of one point of a running sweep, for `python -m experiments.finetune` subprocesses.
"""
