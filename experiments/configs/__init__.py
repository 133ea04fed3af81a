"""Experiment configs: Python modules with `get_config(arg=None) -> ml_collections.ConfigDict` (big_vision style).

Each module's docstring holds the command that runs it and what it should reach. `base.base_config()` lists every
key the job reads with its default, so `--config.<key>=<value>` can override any of them (unknown keys are errors).
"""
