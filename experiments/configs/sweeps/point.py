"""The job config of one sweep point: what `python -m experiments.sweep --parallel N` (mode "subprocess") runs.

    RUN=runs/sweeps/tiny/runs/schedule=full,seed=0
    python -m experiments.finetune --config experiments/configs/sweeps/point.py:$RUN --workdir $RUN

The argument is the point's run folder: its point.json and the sweep's sweep.json two levels up give the config
(`tljax.sweep.folder_config`), the one mode "inprocess" runs; `--config.<key>=<value>` still overrides any key.
"""

from tljax import sweep


def get_config(arg):
    return sweep.folder_config(arg)
