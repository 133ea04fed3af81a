"""The fine-tuning job: a config in, a test accuracy you can put in a table out.

    config = experiments.configs.default.get_config()
    results = job.run(config, workdir="runs/minilm-lpft")      # resumes an interrupted run; a finished one is read
    built = job.build(config)                                   # every object, nothing trained (tests, notebooks)

`build` (tljax.job.build) resolves the config into library calls (`load_pretrained`, data sources and pipelines,
a freezing schedule, an `EngineConfig`); `run` (tljax.job.run) trains with `engine.fit`, evaluates the test split
at the end of every phase (LP-FT: the linear probe's test accuracy beside the fine-tune's) and on the selected
model (the best validation checkpoint when early stopping or a best metric is configured, else the final one),
exports the model as an HF folder that `load_pretrained` and `experiments.predict` read, and writes
`results.json` atomically. Modes "probe" and "zero_shot" train nothing (tljax.job.untrained).
"""

from tljax import engine
from tljax.job.build import (
    MODES,
    SECTIONS,
    ImageInputs,
    Job,
    Splits,
    TextInputs,
    build,
    eval_metric_names,
    load_splits,
    model_folder,
)
from tljax.job.run import CONFIG, DATA_FILE, EXPORT, RESULTS, config_changes, flat_summary, resolved, run, versions

__all__ = [
    "CONFIG", "DATA_FILE", "EXPORT", "MODES", "RESULTS", "SECTIONS", "ImageInputs", "Job", "Splits", "TextInputs",
    "build", "config_changes", "engine", "eval_metric_names", "flat_summary", "load_splits", "model_folder",
    "resolved", "run", "versions",
]  # fmt: skip
